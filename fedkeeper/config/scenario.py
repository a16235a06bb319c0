"""scenarios.<name>: the original blocks (server_config, clients_info,
data_sampling, mongo_config, training_test_data, model_params, functions)
and the `training` and `insights` blocks FedKeeper lacked."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, Optional, Union
from urllib.parse import quote_plus, urlsplit

from flcommon.data import OBJ_HELP
from flcommon.urls import origin, split_userinfo, user_info_ends_early
from pydantic import Field, SecretStr, field_validator, model_validator

from ..user_module import UserModuleConfig
from .clusters import Open, Strict
from .errors import did_you_mean
from .training import InsightsConfig, ModelParams, TrainingConfig
from .units import count, parse_duration_s, parse_memory_mb
from .values import ImageRef, Sha256, host_port, http_url, no_placeholder, shown_url

if TYPE_CHECKING:
    from .clusters import Providers


class ServerConfig(Open):
    server_cluster_name: Optional[str] = None
    server_manager_functions: list[str] = Field(default_factory=list)


# The keeper holds a record per client (placement, selection, attempts):
# validating 3e6 clients took 466 MB, and a mistyped 1e9 would need 150 GB.
MAX_CLIENTS = 1_000_000


class ClientsInfo(Strict):
    total_num_clients: int = Field(gt=0, le=MAX_CLIENTS)
    num_clients_per_round: int = Field(gt=0)
    edge_clients_count: int = Field(0, ge=0, le=MAX_CLIENTS)
    ow_clients_count: int = Field(0, ge=0, le=MAX_CLIENTS)
    gcf_clients_count: int = Field(0, ge=0, le=MAX_CLIENTS)
    client_functions: list[str] = Field(default_factory=lambda: ["fl_client"], min_length=1)
    # New: explicit placement, cluster name -> number of clients or client indices.
    clusters: Optional[dict[str, Union[int, list[int]]]] = None

    @field_validator("clusters")
    @classmethod
    def _placements(cls, v):
        seen: set[int] = set()
        for name, spec in (v or {}).items():
            if isinstance(spec, int) and spec < 1:
                raise ValueError(f"{name}: places {spec} clients; give a count of at least 1 or a list of indices")
            if isinstance(spec, int) and spec > MAX_CLIENTS:
                raise ValueError(f"{name}: places {spec} clients; at most {MAX_CLIENTS:,} in all")
            for i in spec if isinstance(spec, list) else []:
                if i < 0:
                    raise ValueError(f"{name}: client index {i} is negative")
                if i in seen:
                    raise ValueError(f"{name}: client index {i} is placed twice")
                seen.add(i)
        return v

    def placement(self, providers: "Providers") -> dict[str, str]:
        return client_placement(self, providers)

    @model_validator(mode="after")
    def _counts(self):
        if self.num_clients_per_round > self.total_num_clients:
            raise ValueError(f"num_clients_per_round ({self.num_clients_per_round}) exceeds "
                             f"total_num_clients ({self.total_num_clients})")
        if self.clusters is None:
            n = self.edge_clients_count + self.ow_clients_count + self.gcf_clients_count
            if n != self.total_num_clients:
                raise ValueError(f"edge_clients_count + ow_clients_count + gcf_clients_count = {n}, "
                                 f"but total_num_clients is {self.total_num_clients}")
        else:
            ids = [i for spec in self.clusters.values() if isinstance(spec, list) for i in spec]
            if ids and max(ids) >= self.total_num_clients:
                raise ValueError(f"clusters place client index {max(ids)}, but total_num_clients is "
                                 f"{self.total_num_clients} (indices start at 0)")
        return self


class PlacementError(ValueError):
    """Clients counted for a platform no configured cluster belongs to."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def client_placement(ci: ClientsInfo, providers: "Providers") -> dict[str, str]:
    """client id -> cluster name, from explicit `clusters` or FedKeeper's
    counts: edge clients first, then each platform's count (the key its
    cluster model names) in registry order, each on the first cluster of the
    section that count belongs to."""
    out: dict[str, str] = {}
    if ci.clusters:
        nxt = 0
        for cname, spec in ci.clusters.items():
            ids = spec if isinstance(spec, list) else list(range(nxt, nxt + spec))
            for i in ids:
                out[f"client_{i}"] = cname
            nxt = max([nxt] + [i + 1 for i in ids])
        return out
    first: dict[str, str] = {}  # count key -> first cluster of its section
    for name, (section, cluster) in providers.clusters().items():
        key = type(cluster).client_count_key
        if key:
            first.setdefault(key, name)
    i = 0
    for key in ("edge_clients_count", "ow_clients_count", "gcf_clients_count"):
        n = getattr(ci, key)
        if n and key not in first:
            raise PlacementError(key, f"clients_info.{key} places {n} clients, but no cluster of the "
                                      "platform it counts is configured; use clients_info.clusters to "
                                      "place clients explicitly")
        for _ in range(n):
            out[f"client_{i}"] = first[key]
            i += 1
    return out


class DataSampling(Open):
    input_size: Optional[int] = Field(None, gt=0)
    hidden_size: Optional[int] = Field(None, gt=0)
    output_size: Optional[int] = Field(None, gt=0)
    input_shape_x: Optional[int] = Field(None, gt=0)
    input_shape_y: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(10, gt=0)
    model: Literal["cnn", "nn", "small"] = "small"
    # New: how fl_server_init partitions the data.
    partition: Literal["iid", "shards", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, gt=0)


class MongoConfig(Strict):
    url: str = "embedded"  # "embedded", mongodb://..., or legacy host:port (password masked when shown)
    db: str = "fedkeeper"
    collection: Optional[str] = None        # legacy; FedKeeper's weight collection name
    password: Optional[SecretStr] = None    # substituted for :PASSWORD@ in the URL
    state_dir: Optional[str] = None         # embedded server data (default .state/mongo)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        s = v.strip()
        if s == "embedded":
            return v
        no_placeholder(s)
        shown = shown_url(s)
        if "://" in s:
            u = urlsplit(s)
            if u.scheme not in ("mongodb", "mongodb+srv"):
                raise ValueError(f"{shown!r} has scheme {u.scheme!r}; expected mongodb:// or mongodb+srv://")
            hosts = u.netloc.rpartition("@")[2]
            if user_info_ends_early(s):
                raise ValueError(UNESCAPED_USER_INFO.format(
                    shown=shown, more=", or give the password as mongo_config.password"))
            if not hosts:
                raise ValueError(f"{shown!r} names no host")
            for h in hosts.split(","):
                host_port(h)
            return v
        if ":" not in s:
            raise ValueError(f"{shown!r} is not embedded, a mongodb:// URL or host:port"
                             f"{did_you_mean(s, ['embedded'])}")
        try:
            host_port(s)
        except ValueError:
            raise ValueError(f"{shown!r} is not embedded, a mongodb:// URL or host:port") from None
        return v

    @field_validator("db", "collection")
    @classmethod
    def _name(cls, v):
        if v is not None and (not v or len(v) > 63 or re.search(r"[/\\. \"$*<>:|?\x00]", v)):
            raise ValueError(f"{v!r} is not a valid MongoDB name (1 to 63 characters, none of "
                             "/ \\ . \" $ * < > : | ? or space)")
        return v

    @model_validator(mode="after")
    def _password_placeholder(self):
        # The password replaces the literal PASSWORD in the URL (FedKeeper's convention).
        if self.password is not None and self.password.get_secret_value() and "PASSWORD" not in self.url:
            raise ValueError("password is given but url has no PASSWORD for it to replace "
                             "(write the URL as mongodb://user:PASSWORD@host:port)")
        if self.password is None and not self.embedded and ":PASSWORD@" in self.url:
            raise ValueError("url has the PASSWORD placeholder but no password (or password_file) is given")
        return self

    @property
    def embedded(self) -> bool:
        return self.url.strip() == "embedded"

    def resolved_url(self) -> str:
        url = self.url.strip()
        if url == "embedded":
            raise ValueError("embedded MongoDB has no URL until it is started")
        if "://" not in url:  # FedKeeper's bare host:port form
            url = f"mongodb://{url}"
        if self.password is not None:
            # Escaped as pymongo documents: an '@', ':' or '/' in the password
            # would otherwise end the user info and change the host.
            url = url.replace("PASSWORD", quote_plus(self.password.get_secret_value()))
        return url


# A password's '/', '?' or '#' ends the host part early: refused without
# naming the host, which would show the password's first part.
UNESCAPED_USER_INFO = ("{shown!r}: its user info holds a '/', '?' or '#' that is not escaped "
                       "(write them %2F, %3F, %23{more})")


def _refuse_obj(v: Optional[str]) -> Optional[str]:
    if v and urlsplit(v).path.lower().endswith(".obj"):
        raise ValueError(OBJ_HELP)
    return v


class TrainingTestData(Open):
    dataset: Literal["digits", "npz", "fedkeeper_obj"] = "digits"
    path: Optional[str] = None      # path or http(s) URL of a Keras mnist.npz-style file
    sha256: Optional[Sha256] = None
    train_images_url: Optional[str] = None
    train_labels_url: Optional[str] = None
    test_images_url: Optional[str] = None
    test_labels_url: Optional[str] = None

    @field_validator("train_images_url", "train_labels_url", "test_images_url", "test_labels_url")
    @classmethod
    def _legacy_urls(cls, v):
        # The functions refuse the original pickled .obj files (they would run pickle).
        return http_url(_refuse_obj(v)) if v else v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v):
        if v == "fedkeeper_obj":
            raise ValueError(OBJ_HELP)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v):
        if not v:
            return v
        _refuse_obj(v)
        if "://" in v:
            if user_info_ends_early(v):
                raise ValueError(UNESCAPED_USER_INFO.format(shown=shown_url(v), more=""))
            http_url(v)
        if not urlsplit(v).path.lower().endswith(".npz"):
            raise ValueError(f"{shown_url(v)!r} is not an .npz file; the functions read Keras' mnist.npz layout "
                             "(x_train, y_train, x_test, y_test) from a local path or an http(s) URL")
        return v

    @model_validator(mode="after")
    def _needs_path(self):
        if self.dataset == "npz" and not self.path:
            raise ValueError("dataset: npz needs path (a file path or http(s) URL)")
        return self

    def credentials(self) -> dict[str, str]:
        """Origin -> the user info written in the data URL: bound to the
        function that downloads it, never stored with a session
        (flcommon/data_url.py)."""
        bare, userinfo = split_userinfo(self.path or "")
        return {origin(bare): userinfo} if userinfo else {}

    def stored(self) -> dict[str, Any]:
        """These settings as a session's spec stores them: every URL in them
        (the data URL, the legacy ones, any extra key) without its user info."""
        return _without_userinfo(self.model_dump(exclude_none=True))


def _without_userinfo(o: Any) -> Any:
    if isinstance(o, str):
        return split_userinfo(o)[0]
    if isinstance(o, dict):
        return {k: _without_userinfo(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_without_userinfo(v) for v in o]
    return o


class FunctionConfig(Open):
    """functions.<fn>.<provider>: FedKeeper's per-platform deployment keys.
    memory is in MB and timeout in seconds once loaded (the loader reads each
    platform's bare-number convention)."""

    func_path: Optional[str] = None
    docker_image: Optional[ImageRef] = None
    memory: Optional[int] = None
    timeout: Optional[float] = None
    concurrency: Optional[int] = None
    runtime: Optional[str] = None
    region: Optional[str] = None
    entry_point: Optional[str] = Field(None, alias="entry-point")
    params_file_path: Optional[str] = None  # legacy: parameters now live in the store
    blocking_cli: Optional[bool] = None      # legacy

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        return None if v is None else parse_memory_mb(v)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v):
        return None if v is None else parse_duration_s(v, "s")

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v):
        return None if v is None else count(v, "concurrency")

    @field_validator("region")
    @classmethod
    def _region(cls, v):
        if v is not None and not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+", v):
            raise ValueError(f"{v!r} is not a region such as us-central1")
        return v

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, v):
        if v is not None and not v.isidentifier():
            raise ValueError(f"{v!r} is not a function name")
        return v


# functions.<fn>.<section> sections of the original schema that FedKeeper
# has no provider for; accepted and ignored so such files still load.
IGNORED_FUNCTION_SECTIONS = ("openfaas",)


class Scenario(Strict):
    user_module: Optional[UserModuleConfig] = None  # your model, data and partition (docs/models.md)
    server_config: Optional[ServerConfig] = None
    clients_info: Optional[ClientsInfo] = None
    data_sampling: DataSampling = DataSampling()
    mongo_config: MongoConfig = MongoConfig()
    training_test_data: TrainingTestData = TrainingTestData()
    model_params: ModelParams = ModelParams()
    training: TrainingConfig = TrainingConfig()
    insights: InsightsConfig = Field(default_factory=InsightsConfig)
    functions: dict[str, dict[str, FunctionConfig]] = Field(default_factory=dict)
