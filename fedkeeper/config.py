"""YAML -> typed, validated configuration.

Accepts the original FedKeeper `config-sample.yaml` schema (providers.openwhisk,
providers.google, scenarios.<name> with server_config, clients_info,
data_sampling, mongo_config, training_test_data, model_params, functions) and
adds what it lacked as explicit keys with documented defaults (the `training`
block of a scenario, `kind: local` clusters, fault injection).

Secrets come from `${ENV_VAR}` interpolation or from `<key>_file` siblings and
are held as `SecretStr`, so printing a config never shows them.

Every error names the file, the line and the key path.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError,
                      field_validator, model_validator)

# Keys whose values are secrets wherever they appear.
SECRET_KEYS = {"ow_auth", "ow_apigw_access_token", "auth", "password", "private_key",
               "private_key_id", "token_secret", "client_secret"}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, line, key, expectation."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None):
        self.file, self.line, self.path, self.message = file, line, path, message
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        if path:
            where += f": {path}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- units

def _number(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number for {what}, got a boolean")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number for {what}, got {v!r}")


def parse_memory_mb(v: Any) -> int:
    """'2048', 2048, '2048MB', '2Gi', '2GB', '512M' -> MB."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*(mb|m|mi|mib|gb|g|gi|gib)?\s*", v, re.I)
        if not m:
            raise ValueError(f"expected a memory size such as 2048 or 2048MB or 2Gi, got {v!r}")
        n, unit = float(m.group(1)), (m.group(2) or "mb").lower()
        return int(n * 1024) if unit.startswith("g") else int(n)
    n = _number(v, "memory")
    if n <= 0:
        raise ValueError("memory must be positive")
    return int(n)


def parse_duration_s(v: Any, bare_unit: str) -> float:
    """'300s', '5m', '300000ms' -> seconds; a bare number is in `bare_unit`."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|min|h)?\s*", v, re.I)
        if not m:
            raise ValueError(f"expected a duration such as 300s or 300000ms, got {v!r}")
        n, unit = float(m.group(1)), (m.group(2) or bare_unit).lower()
    else:
        n, unit = _number(v, "duration"), bare_unit
    factor = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if n <= 0:
        raise ValueError("duration must be positive")
    return n * factor


# --------------------------------------------------------------------------- models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class FaultConfig(_Strict):
    """Fault injection on local clusters (probabilities per invocation)."""

    crash: float = Field(0.0, ge=0, le=1)
    timeout: float = Field(0.0, ge=0, le=1)
    throttle: float = Field(0.0, ge=0, le=1)
    slow_ms: int = Field(0, ge=0)
    seed: int = 0
    functions: Optional[list[str]] = None  # None: every function

    @model_validator(mode="after")
    def _total(self):
        if self.crash + self.timeout + self.throttle > 1:
            raise ValueError("crash + timeout + throttle probabilities add up to more than 1")
        return self

    def applies_to(self, function: str) -> bool:
        return self.functions is None or function in self.functions


class PrometheusConfig(_Open):
    host: str = ""
    port_openwhisk_metrics: Optional[int] = None
    port_node_metrics: Optional[int] = None
    url: Optional[str] = None  # full URL of a Prometheus server, overrides host/port


class HostConfigurations(_Open):
    num_hosts: Optional[int] = None
    each_host_cores: Optional[Union[int, str]] = None
    each_host_ram: Optional[str] = None
    gpu_enabled: bool = False
    cuda_cores: Optional[Union[int, str]] = None
    platform: Optional[str] = None
    host_names: Optional[Union[str, list[str]]] = None
    concurrency: Optional[int] = None


class OpenWhiskAuth(_Strict):
    ow_auth: Optional[SecretStr] = None
    ow_api_host: Optional[str] = None
    ow_apigw_access_token: Optional[SecretStr] = None


class PricingConfig(_Strict):
    """Prices used to estimate cost; unset keys keep the platform's defaults
    (README, "Cost")."""

    per_gb_second: Optional[float] = Field(None, ge=0)
    per_ghz_second: Optional[float] = Field(None, ge=0)
    per_million_invocations: Optional[float] = Field(None, ge=0)
    billing_increment_ms: Optional[int] = Field(None, ge=1)
    currency: str = "USD"


class _Cluster(_Strict):
    kind: Literal["remote", "local"] = "remote"
    invocation: Literal["direct", "via_invoker"] = "direct"
    faults: Optional[FaultConfig] = None
    prometheus_config: Optional[PrometheusConfig] = None
    configurations: Optional[HostConfigurations] = None
    kubeconfig: Optional[str] = None
    context: Optional[str] = None
    pricing: Optional["PricingConfig"] = None  # overrides the platform's default prices

    @model_validator(mode="after")
    def _faults_local_only(self):
        if self.faults is not None and self.kind != "local":
            raise ValueError("faults can only be injected on clusters of kind: local")
        return self


class OpenWhiskCluster(_Cluster):
    base_url: Optional[str] = None
    auth: OpenWhiskAuth = OpenWhiskAuth()
    namespace: Optional[str] = None
    insecure: bool = False  # explicit opt-out of TLS verification

    @model_validator(mode="after")
    def _need_endpoint(self):
        if self.kind == "remote":
            if not (self.base_url or self.auth.ow_api_host):
                raise ValueError("a remote OpenWhisk cluster needs base_url or auth.ow_api_host")
            if self.auth.ow_auth is None and not self._url_userinfo():
                raise ValueError("a remote OpenWhisk cluster needs auth.ow_auth (or ow_auth_file)")
        return self

    def _url_userinfo(self) -> Optional[str]:
        if not self.base_url:
            return None
        u = urlsplit(self.base_url)
        if u.username and u.password:
            return f"{u.username}:{u.password}"
        return None

    def api_host(self) -> str:
        """Scheme://host:port of the controller, from base_url or ow_api_host."""
        if self.base_url:
            u = urlsplit(self.base_url)
            host = u.hostname or ""
            netloc = f"{host}:{u.port}" if u.port else host
            return urlunsplit((u.scheme or "https", netloc, "", "", ""))
        h = self.auth.ow_api_host or ""
        return h if "://" in h else f"https://{h}"

    def auth_pair(self) -> tuple[str, str]:
        raw = (self.auth.ow_auth.get_secret_value() if self.auth.ow_auth else None) or self._url_userinfo()
        if not raw:
            raise ValueError("no OpenWhisk auth key")
        user, sep, key = raw.partition(":")
        if not sep or not user or not key:
            raise ValueError("the OpenWhisk auth key must be 'uuid:key' (as `wsk property get --auth` prints)")
        return user, key

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        if self.base_url:
            m = re.search(r"/namespaces/([^/]+)", self.base_url)
            if m:
                return m.group(1)
        return "_"


class GoogleCluster(_Cluster):
    base_url: Optional[str] = None
    auth: Optional[dict[str, Any]] = None  # service-account JSON, inline
    project: Optional[str] = None
    region: Optional[str] = None
    api_endpoint: Optional[str] = None  # control-plane override (tests, private endpoints)

    @model_validator(mode="after")
    def _derive(self):
        m = re.match(r"https?://([a-z]+-[a-z]+[0-9]+)-([a-z0-9-]+)\.cloudfunctions\.net", self.base_url or "")
        if m and "<" not in (self.base_url or ""):
            self.region = self.region or m.group(1)
            self.project = self.project or m.group(2)
        self.region = self.region or "us-central1"
        return self

    def service_account_info(self) -> dict[str, Any]:
        info = {}
        for k, v in (self.auth or {}).items():
            info[k] = v.get_secret_value() if isinstance(v, SecretStr) else v
        return info


class KnativeCluster(_Cluster):
    """A Kubernetes cluster with Knative Serving (see docs/knative.md).

    Credentials: kubeconfig + context (default: $KUBECONFIG or
    ~/.kube/config and its current context), or in_cluster, or api_server
    (a plain URL such as `kubectl proxy`'s, no credentials)."""

    # Always a Kubernetes cluster: introspection applies without kubeconfig set.
    on_kubernetes: ClassVar[bool] = True

    namespace: str = "default"
    image: Optional[str] = None        # generic runtime image (Python + functions-framework)
    api_server: Optional[str] = None   # e.g. http://127.0.0.1:8001 from `kubectl proxy`
    in_cluster: bool = False           # use the pod's service account
    ready_timeout_s: float = Field(300.0, gt=0)  # bounded wait for Ready after a deploy
    ingress: Optional[str] = None      # gateway address when service host names do not resolve


class Providers(_Strict):
    openwhisk: dict[str, OpenWhiskCluster] = Field(default_factory=dict)
    google: dict[str, GoogleCluster] = Field(default_factory=dict)
    knative: dict[str, KnativeCluster] = Field(default_factory=dict)

    def clusters(self) -> dict[str, tuple[str, Any]]:
        """cluster name -> (provider section, cluster config)."""
        out: dict[str, tuple[str, Any]] = {}
        for section in ("openwhisk", "google", "knative"):
            for name, c in getattr(self, section).items():
                out[name] = (section, c)
        return out


class ServerConfig(_Open):
    server_cluster_name: Optional[str] = None
    server_manager_functions: list[str] = Field(default_factory=list)


class ClientsInfo(_Strict):
    total_num_clients: int = Field(gt=0)
    num_clients_per_round: int = Field(gt=0)
    edge_clients_count: int = Field(0, ge=0)
    ow_clients_count: int = Field(0, ge=0)
    gcf_clients_count: int = Field(0, ge=0)
    client_functions: list[str] = Field(default_factory=lambda: ["fl_client"])
    # New: explicit placement, cluster name -> number of clients or client indices.
    clusters: Optional[dict[str, Union[int, list[int]]]] = None

    def placement(self, providers: "Providers") -> dict[str, str]:
        return _client_placement(self, providers)

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
        return self


def _client_placement(ci: "ClientsInfo", providers: "Providers") -> dict[str, str]:
    """client id -> cluster name, from explicit `clusters` or FedKeeper's
    counts: edge clients first, then OpenWhisk (`ow_clients_count`), then
    Google (`gcf_clients_count`), each on the first cluster of its kind."""
    out: dict[str, str] = {}
    if ci.clusters:
        nxt = 0
        for cname, spec in ci.clusters.items():
            ids = spec if isinstance(spec, list) else list(range(nxt, nxt + spec))
            for i in ids:
                out[f"client_{i}"] = cname
            nxt = max([nxt] + [i + 1 for i in ids])
        return out
    first: dict[str, str] = {}
    for name, (section, _) in providers.clusters().items():
        first.setdefault(section, name)
    i = 0
    for section, count in (("edge", ci.edge_clients_count), ("openwhisk", ci.ow_clients_count),
                           ("google", ci.gcf_clients_count)):
        if count and section not in first:
            raise ValueError(f"clients_info places {count} {section} clients, but no {section} cluster "
                             "is configured; use clients_info.clusters to place clients explicitly")
        for _ in range(count):
            out[f"client_{i}"] = first[section]
            i += 1
    return out


class DataSampling(_Open):
    input_size: Optional[int] = None
    hidden_size: Optional[int] = None
    output_size: Optional[int] = None
    input_shape_x: Optional[int] = None
    input_shape_y: Optional[int] = None
    batch_size: int = Field(10, gt=0)
    model: Literal["cnn", "nn", "small"] = "small"
    # New: how fl_server_init partitions the data.
    partition: Literal["iid", "shards", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, gt=0)


class MongoConfig(_Strict):
    url: str = "embedded"  # "embedded", mongodb://..., or legacy host:port (password masked when shown)
    db: str = "fedkeeper"
    collection: Optional[str] = None        # legacy; FedKeeper's weight collection name
    password: Optional[SecretStr] = None    # substituted for :PASSWORD@ in the URL
    state_dir: Optional[str] = None         # embedded server data (default .state/mongo)

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
            url = url.replace("PASSWORD", self.password.get_secret_value())
        return url


class TrainingTestData(_Open):
    dataset: Literal["digits", "npz", "fedkeeper_obj"] = "digits"
    path: Optional[str] = None      # path or http(s) URL of a Keras mnist.npz-style file
    sha256: Optional[str] = None
    train_images_url: Optional[str] = None
    train_labels_url: Optional[str] = None
    test_images_url: Optional[str] = None
    test_labels_url: Optional[str] = None

    @model_validator(mode="after")
    def _legacy(self):
        if any(u for u in (self.train_images_url, self.train_labels_url) if u) and self.dataset == "digits" \
                and "dataset" not in self.model_fields_set:
            self.dataset = "fedkeeper_obj"
        if self.dataset == "npz" and not self.path:
            raise ValueError("dataset: npz needs path (a file path or http(s) URL)")
        return self


class ModelParams(_Strict):
    lr: float = Field(1e-3, gt=0)
    optim: Literal["adam", "nadam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1)
    local_epochs: int = Field(1, ge=0)  # 0: no training (measures system overhead)

    @field_validator("lr", "momentum", "local_epochs", mode="before")
    @classmethod
    def _from_string(cls, v):
        # FedKeeper writes numbers as strings: lr: "1e-3", local_epochs: "5".
        if isinstance(v, str):
            try:
                return float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        return v

    @field_validator("optim", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(15.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1)


STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
              "median", "trimmed_mean", "krum")


class StrategyConfig(_Strict):
    """training.strategy: a name, or a mapping with the name and its settings.

    Settings a strategy does not use are ignored; every one has a default
    (see README, "Strategies")."""

    name: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    server_lr: Optional[float] = Field(None, gt=0)   # default: 1.0 (fedavgm), 0.01 (adaptive)
    server_momentum: float = Field(0.9, ge=0, lt=1)  # fedavgm
    beta1: float = Field(0.9, ge=0, lt=1)            # fedadam / fedyogi / fedadagrad
    beta2: float = Field(0.99, ge=0, lt=1)           # fedadam / fedyogi
    tau: float = Field(1e-3, gt=0)                   # adaptivity
    mu: float = Field(0.01, ge=0)                    # fedprox proximal term (client side)
    trim_ratio: float = Field(0.1, ge=0, lt=0.5)     # trimmed_mean: share cut at each end
    byzantine: int = Field(1, ge=0)                  # krum: tolerated faulty clients f

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v):
        return {"name": v.lower()} if isinstance(v, str) else v


class TrainingConfig(_Strict):
    """What FedKeeper lacked; every key has a default (see README)."""

    rounds: int = Field(20, gt=0)
    target_accuracy: Optional[float] = Field(None, gt=0, le=1)
    seed: int = 0
    strategy: StrategyConfig = StrategyConfig()
    retries: RetryConfig = RetryConfig()
    quorum: float = Field(0.8, gt=0, le=1)
    round_deadline_s: float = Field(600.0, gt=0)
    attempt_grace_s: float = Field(10.0, ge=0)
    # sync: a round waits for its clients (quorum + deadline).
    # semi_async: a round closes at quorum; stragglers keep running and their
    #   updates join a later round, down-weighted by staleness, while they
    #   are at most staleness_tolerance rounds old.
    # async: FedBuff; clients are re-invoked as soon as they finish and the
    #   server aggregates every buffer_size updates (a "round" is one server step).
    mode: Literal["sync", "semi_async", "async"] = "sync"
    staleness_tolerance: int = Field(2, ge=0)
    staleness_exponent: float = Field(0.5, ge=0)   # weight = (1 + staleness) ** -exponent
    buffer_size: Optional[int] = Field(None, gt=0)  # async; default: half the clients per round
    selection: Literal["random", "reliability"] = "random"
    exploration: float = Field(0.2, ge=0, le=1)    # reliability: share of picks made at random


class InsightsConfig(_Strict):
    """fl_insights: the byte bound of its warm cache of decoded updates and
    query results, and the cluster it runs on (default: the server's)."""

    cache_mb: float = Field(512, ge=0)
    cluster: Optional[str] = None


class FunctionConfig(_Open):
    """functions.<fn>.<provider>: FedKeeper's per-platform deployment keys."""

    func_path: Optional[str] = None
    docker_image: Optional[str] = None
    memory: Optional[Union[int, str]] = None
    timeout: Optional[Union[int, float, str]] = None
    concurrency: Optional[Union[int, str]] = None
    runtime: Optional[str] = None
    region: Optional[str] = None
    entry_point: Optional[str] = Field(None, alias="entry-point")
    params_file_path: Optional[str] = None  # legacy: parameters now live in the store
    blocking_cli: Optional[bool] = None      # legacy


class Scenario(_Strict):
    server_config: Optional[ServerConfig] = None
    clients_info: Optional[ClientsInfo] = None
    data_sampling: DataSampling = DataSampling()
    mongo_config: MongoConfig = MongoConfig()
    training_test_data: TrainingTestData = TrainingTestData()
    model_params: ModelParams = ModelParams()
    training: TrainingConfig = TrainingConfig()
    insights: "InsightsConfig" = Field(default_factory=lambda: InsightsConfig())
    functions: dict[str, dict[str, FunctionConfig]] = Field(default_factory=dict)


class Config(_Strict):
    version: Optional[Union[str, float]] = None
    name: str = "fedkeeper"
    providers: Providers = Providers()
    scenarios: dict[str, Scenario] = Field(default_factory=dict)

    # set by load_config
    source: Optional[str] = Field(None, exclude=True)

    def scenario(self, name: Optional[str] = None) -> tuple[str, Scenario]:
        if name:
            if name not in self.scenarios:
                raise ConfigError(f"no scenario named {name!r}; the config has "
                                  f"{sorted(self.scenarios) or 'none'}", file=self.source,
                                  path="scenarios")
            return name, self.scenarios[name]
        if "federated_learning" in self.scenarios:
            return "federated_learning", self.scenarios["federated_learning"]
        training = [n for n, s in self.scenarios.items() if s.clients_info is not None]
        if len(training) == 1:
            return training[0], self.scenarios[training[0]]
        raise ConfigError("name the scenario to run (-s NAME); candidates: "
                          f"{sorted(training) or 'none with clients_info'}", file=self.source,
                          path="scenarios")

    def secret_values(self) -> set[str]:
        """Every secret string in the config, for log redaction."""
        found: set[str] = set()

        def walk(o: Any):
            if isinstance(o, SecretStr):
                v = o.get_secret_value()
                if v and v != "embedded":
                    found.add(v)
                    if ":" in v:  # uuid:key -> the key alone too
                        found.add(v.split(":", 1)[1])
            elif isinstance(o, BaseModel):
                for k in type(o).model_fields:
                    walk(getattr(o, k))
            elif isinstance(o, dict):
                for k, v in o.items():
                    if k in SECRET_KEYS and isinstance(v, str) and v:
                        found.add(v)
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
            elif isinstance(o, str):
                u = urlsplit(o) if "://" in o else None
                if u is not None and u.password:
                    found.add(u.password)

        walk(self)
        return {s for s in found if len(s) >= 4}

    def redacted(self) -> dict[str, Any]:
        return redact(self.model_dump(mode="python", by_alias=True, exclude_none=True))


def redact(o: Any) -> Any:
    if isinstance(o, SecretStr):
        return "***" if o.get_secret_value() not in ("", "embedded") else o.get_secret_value()
    if isinstance(o, dict):
        return {k: ("***" if k in SECRET_KEYS and isinstance(v, (str, SecretStr)) and v else redact(v))
                for k, v in o.items()}
    if isinstance(o, list):
        return [redact(v) for v in o]
    if isinstance(o, str) and "://" in o:
        u = urlsplit(o)
        if u.password or u.username:
            host = u.hostname or ""
            netloc = f"***@{host}" + (f":{u.port}" if u.port else "")
            return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
    return o


# --------------------------------------------------------------------------- loading

def _line_index(text: str) -> dict[tuple, int]:
    """Key path -> 1-based line, from PyYAML's node tree."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node, path: tuple):
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                index[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _line_for(index: dict[tuple, int], path: tuple) -> Optional[int]:
    p = tuple(str(x) if not isinstance(x, int) else x for x in path)
    while p:
        if p in index:
            return index[p]
        p = p[:-1]
    return None


def _dotted(path: tuple) -> str:
    return ".".join(str(x) for x in path)


def _interpolate(o: Any, path: tuple, file: str, index: dict, base_dir: Path) -> Any:
    if isinstance(o, str):
        def sub(m):
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {var} is not set", file=file,
                              line=_line_for(index, path), path=_dotted(path))
        return _ENV_RE.sub(sub, o)
    if isinstance(o, list):
        return [_interpolate(v, path + (i,), file, index, base_dir) for i, v in enumerate(o)]
    if isinstance(o, dict):
        out: dict[str, Any] = {}
        for k, v in o.items():
            k = str(k)
            v = _interpolate(v, path + (k,), file, index, base_dir)
            if k.endswith("_file") and k[:-5] in SECRET_KEYS | {"url"}:
                target = k[:-5]
                if target in o:
                    raise ConfigError(f"give either {target} or {k}, not both", file=file,
                                      line=_line_for(index, path + (k,)), path=_dotted(path + (k,)))
                fp = Path(str(v)).expanduser()
                if not fp.is_absolute():
                    fp = base_dir / fp
                try:
                    content = fp.read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"cannot read secret file {fp}: {exc.strerror}", file=file,
                                      line=_line_for(index, path + (k,)), path=_dotted(path + (k,))) from None
                if target == "auth" and content.startswith("{"):
                    try:
                        out[target] = json.loads(content)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"secret file {fp} is not valid JSON: {exc.msg}", file=file,
                                          line=_line_for(index, path + (k,)), path=_dotted(path + (k,))) from None
                else:
                    out[target] = content
            else:
                out[k] = v
        return out
    return o


def _normalise_functions(data: dict) -> None:
    """Turn FedKeeper's unit conventions into plain numbers before validation:
    OpenWhisk writes timeout in ms ("300000") and memory in MB ("2048"); Google
    writes "300s" and "2048MB"."""
    for sname, scen in (data.get("scenarios") or {}).items():
        if not isinstance(scen, dict):
            continue
        for fname, per in (scen.get("functions") or {}).items():
            if not isinstance(per, dict):
                continue
            for section, fc in per.items():
                if not isinstance(fc, dict):
                    continue
                bare = "ms" if section == "openwhisk" else "s"
                for key, conv in (("memory", parse_memory_mb),
                                  ("timeout", lambda v: parse_duration_s(v, bare))):
                    if fc.get(key) is not None:
                        try:
                            fc[key] = conv(fc[key])
                        except ValueError as exc:
                            raise _PathValueError(("scenarios", sname, "functions", fname, section, key),
                                                  str(exc)) from None
                if fc.get("concurrency") is not None:
                    try:
                        fc["concurrency"] = int(_number(fc["concurrency"], "concurrency"))
                    except ValueError as exc:
                        raise _PathValueError(("scenarios", sname, "functions", fname, section,
                                               "concurrency"), str(exc)) from None


class _PathValueError(ValueError):
    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


def _friendly(err: dict) -> str:
    t, msg = err.get("type", ""), err.get("msg", "")
    if t == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if t == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def parse_config(text: str, file: str = "<config>", base_dir: Optional[Path] = None) -> Config:
    base_dir = base_dir or Path.cwd()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML: {problem}", file=file,
                          line=(mark.line + 1) if mark else None) from None
    if data is None:
        raise ConfigError("the file is empty", file=file)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}",
                          file=file, line=1)
    index = _line_index(text)
    data = _interpolate(data, (), file, index, base_dir)
    try:
        _normalise_functions(data)
    except _PathValueError as exc:
        raise ConfigError(str(exc), file=file, line=_line_for(index, exc.path),
                          path=_dotted(exc.path)) from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0]
        path = tuple(first["loc"])
        more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        raise ConfigError(_friendly(first) + more, file=file, line=_line_for(index, path),
                          path=_dotted(path)) from None
    cfg.source = file
    check_references(cfg, index)
    return cfg


def check_references(cfg: Config, index: dict) -> None:
    """Checks across sections (cluster names, placements, buffer sizes); also
    run by `fedkeeper sweep` on every combination it derives."""
    clusters = cfg.providers.clusters()
    for sname, scen in cfg.scenarios.items():
        sc = scen.server_config
        if sc and sc.server_cluster_name and sc.server_cluster_name not in clusters:
            path = ("scenarios", sname, "server_config", "server_cluster_name")
            raise ConfigError(f"names cluster {sc.server_cluster_name!r}, which is not under providers "
                              f"(known: {sorted(clusters) or 'none'})", file=cfg.source,
                              line=_line_for(index, path), path=_dotted(path))
        if scen.insights.cluster and scen.insights.cluster not in clusters:
            path = ("scenarios", sname, "insights", "cluster")
            raise ConfigError(f"names cluster {scen.insights.cluster!r}, which is not under providers "
                              f"(known: {sorted(clusters) or 'none'})", file=cfg.source,
                              line=_line_for(index, path), path=_dotted(path))
        t, ci = scen.training, scen.clients_info
        if t.mode == "async" and t.buffer_size and ci and t.buffer_size > ci.num_clients_per_round:
            path = ("scenarios", sname, "training", "buffer_size")
            raise ConfigError(f"buffer_size {t.buffer_size} exceeds num_clients_per_round "
                              f"{ci.num_clients_per_round}: a buffer could never fill",
                              file=cfg.source, line=_line_for(index, path), path=_dotted(path))
        if ci and ci.clusters:
            for cname, spec in ci.clusters.items():
                path = ("scenarios", sname, "clients_info", "clusters", cname)
                if cname not in clusters:
                    raise ConfigError(f"no cluster named {cname!r} under providers", file=cfg.source,
                                      line=_line_for(index, path), path=_dotted(path))
            assigned = []
            for cname, spec in ci.clusters.items():
                assigned.extend(spec if isinstance(spec, list) else [None] * spec)
            if len(assigned) != ci.total_num_clients:
                path = ("scenarios", sname, "clients_info", "clusters")
                raise ConfigError(f"places {len(assigned)} clients but total_num_clients is "
                                  f"{ci.total_num_clients}", file=cfg.source,
                                  line=_line_for(index, path), path=_dotted(path))


def load_config(path: str | os.PathLike) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", file=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(p)) from None
    return parse_config(text, file=str(p), base_dir=p.resolve().parent)
