"""What a keeper command needs around it: the state directory, the store
(embedded or remote), the token secret, one provider per cluster, and the
function specs a scenario deploys where.

Everything here is platform-neutral: providers come from the registry, and a
cluster is only ever a name plus a config section the registry understands.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets as pysecrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from flcommon.data_url import BOUND_KEY as DATA_CREDENTIALS_KEY

from .artifacts import build_artifact
from .user_module import artifact_members as user_module_members
from .config import Config, FunctionConfig, Scenario
from .privacy.secagg_stages import FUNCTION as SECAGG_FUNCTION, bound_for as secagg_bound
from .privacy.settings import secure_aggregation
from .providers import Artifact, FunctionSpec, Provider, ProviderContext, make_provider
from .store import Store, connect
from .local.store import EmbeddedMongo, register_store

log = logging.getLogger("fedkeeper.runtime")

STATE_DIR_ENV = "FEDKEEPER_STATE_DIR"
TOKEN_SECRET_ENV = "FEDKEEPER_TOKEN_SECRET"

# Limits used when the scenario's functions block names none.
FUNCTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "fl_client": {"memory_mb": 1024, "timeout_s": 120.0, "concurrency": 1},
    # A TensorFlow function holds about 260 MB of its own; the aggregator
    # about 3x the model on top. 512 MB lets the server functions stay warm
    # beside a client within an OpenWhisk invoker's 2 GB; raise it for big models.
    "fl_server_init": {"memory_mb": 512, "timeout_s": 300.0, "concurrency": 1},
    "fl_server_aggregator": {"memory_mb": 512, "timeout_s": 300.0, "concurrency": 1},
    "fl_invoker": {"memory_mb": 512, "timeout_s": 300.0, "concurrency": 1},
    # training.aggregation: hierarchical; holds about 3x the model, like the aggregator
    "fl_combiner": {"memory_mb": 1024, "timeout_s": 300.0, "concurrency": 1},
    "nodeinfo": {"memory_mb": 256, "timeout_s": 60.0, "concurrency": 1},
    # Memory at least its cache bound plus INSIGHTS_WORKING_MB (function_spec).
    "fl_insights": {"memory_mb": 2048, "timeout_s": 300.0, "concurrency": 1},
}
# fl_insights' memory beyond its cache: the runtime, scikit-learn and one
# round of updates being read.
INSIGHTS_WORKING_MB = 1024
SERVER_FUNCTIONS = ("fl_server_init", "fl_server_aggregator")
# The functions that download a session's data set: the only ones given
# the data URL's credentials.
DATA_LOADERS = ("fl_server_init", "fl_model_validate")
# Deployed with the training functions, but training goes on without them.
OPTIONAL_FUNCTIONS = ("fl_insights",)


def state_dir() -> Path:
    d = Path(os.environ.get(STATE_DIR_ENV, ".state")).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d


def token_secret(sdir: Path) -> str:
    """The HMAC secret bound to every deployed function. From the environment,
    or generated once per state directory (mode 0600)."""
    env = os.environ.get(TOKEN_SECRET_ENV)
    if env:
        return env
    path = sdir / "token_secret"
    if path.exists():
        return path.read_text().strip()
    value = pysecrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def deployment_hash(artifact: Artifact, spec: FunctionSpec) -> str:
    """Content hash of what a deployment consists of: the code and every
    setting bound to it (secrets enter only through a hash of their own)."""
    settings = {"name": spec.name, "source": spec.source, "memory_mb": spec.memory_mb,
                "timeout_s": spec.timeout_s, "concurrency": spec.concurrency,
                "image": spec.image, "runtime": spec.runtime, "extra": spec.extra,
                "platform_api": spec.platform_api,
                "bound": hashlib.sha256(json.dumps(spec.bound, sort_keys=True).encode()).hexdigest()}
    h = hashlib.sha256(artifact.sha256.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class Placement:
    """Which function runs on which cluster."""

    cluster: str
    section: str
    spec: FunctionSpec


@dataclass
class Runtime:
    cfg: Config
    scenario_name: str
    scenario: Scenario
    state: Path
    store: Store | None = None
    store_url: str | None = None
    secret: str = ""
    providers: dict[str, Provider] = field(default_factory=dict)
    keep_local_services: bool = False
    # Told what long work begins (starting a store, deploying, a cold
    # invocation), for a command to show while the user waits; silent by default.
    phase: Callable[[str], None] = field(default=lambda text: None, repr=False)
    _embedded: EmbeddedMongo | None = None
    _started_store: bool = False

    # ------------------------------------------------------------------ setup
    @classmethod
    def open(cls, cfg: Config, scenario_name: str | None = None, *, need_store: bool = True,
             keep_local_services: bool = False, phase: Callable[[str], None] | None = None) -> "Runtime":
        name, scen = cfg.scenario(scenario_name)
        rt = cls(cfg=cfg, scenario_name=name, scenario=scen, state=state_dir(),
                 keep_local_services=keep_local_services)
        if phase is not None:
            rt.phase = phase
        rt.secret = token_secret(rt.state)
        if need_store:
            rt.open_store()
        return rt

    def open_store(self) -> Store:
        if self.store is not None:
            return self.store
        mc = self.scenario.mongo_config
        if mc.embedded:
            sdir = Path(mc.state_dir).resolve() if mc.state_dir else self.state / "mongo"
            self._embedded = EmbeddedMongo(sdir)
            if self._embedded.running_url() is None:
                self.phase("starting the embedded MongoDB")
            self.store_url, self._started_store = self._embedded.start()
            register_store(self.state, sdir)  # so that `fabric down` finds one kept elsewhere
            log.info("embedded MongoDB at %s (%s)", self.store_url,
                     "started" if self._started_store else "reused")
        else:
            self.store_url = mc.resolved_url()
        self.store = connect(self.store_url, mc.db)
        return self.store

    def restart_store(self) -> bool:
        """Start the embedded store again after it stopped answering (same
        data, same port, so function deployments stay valid). False when the
        store is not the embedded one, or comes back at another address."""
        if self._embedded is None:
            return False
        fresh = EmbeddedMongo(self._embedded.state_dir)
        url, started = fresh.start()
        if url != self.store_url:
            fresh.stop()
            return False
        # The dead server's lease went with it; this one is held from now on.
        self._embedded = fresh
        self._started_store = self._started_store or started
        return True

    def provider(self, cluster: str) -> Provider:
        p = self.providers.get(cluster)
        if p is None:
            section, ccfg = self.cfg.providers.clusters()[cluster]
            p = make_provider(cluster, section, ccfg,
                              ProviderContext(state_dir=self.state, store_url=self.store_url,
                                              keep_local_services=self.keep_local_services,
                                              clusters=self.cfg.providers.clusters()))
            self.providers[cluster] = p
        return p

    def close(self, *, stop_store: bool = True) -> None:
        """Close providers (they stop local services unless kept). With
        `stop_store`, give the embedded store back (its last holder stops
        it, whichever command started it, unless one kept it); without, a
        store this runtime started is kept for later commands."""
        for p in self.providers.values():
            try:
                p.close()
            except Exception:  # closing must not hide the real outcome
                log.exception("closing provider %s", p.cluster_name)
        self.providers.clear()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._embedded is not None:
            if stop_store:
                self._embedded.stop()
            elif self._started_store:
                self._embedded.keep()

    # ------------------------------------------------------------------ placement
    def function_spec(self, function: str, section: str) -> FunctionSpec:
        per = self.scenario.functions.get(function, {})
        fc: FunctionConfig | None = per.get(section)
        d = dict(FUNCTION_DEFAULTS.get(function, FUNCTION_DEFAULTS["nodeinfo"]))
        extra: dict[str, Any] = {}
        image = runtime = None
        bound_extra: dict[str, str] = {}
        if function == "fl_insights":
            d["memory_mb"] = max(d["memory_mb"], int(self.scenario.insights.cache_mb) + INSIGHTS_WORKING_MB)
        if fc is not None:
            if fc.memory is not None:
                d["memory_mb"] = int(fc.memory)
            if fc.timeout is not None:
                d["timeout_s"] = float(fc.timeout)
            if fc.concurrency is not None:
                d["concurrency"] = int(fc.concurrency)
            image, runtime = fc.docker_image, fc.runtime
            extra = {k: v for k, v in (fc.model_extra or {}).items()}
            if fc.region:
                extra["region"] = fc.region
        if function == "fl_insights":
            # The cache must fit in the memory the function gets, whatever
            # functions.fl_insights sets.
            cache_mb = min(self.scenario.insights.cache_mb, max(0, d["memory_mb"] - INSIGHTS_WORKING_MB))
            if cache_mb < self.scenario.insights.cache_mb:
                log.warning("fl_insights on %s has %d MB: its cache is cut to %g MB (insights.cache_mb %g)",
                            section, d["memory_mb"], cache_mb, self.scenario.insights.cache_mb)
            bound_extra["FK_INSIGHTS_CACHE_MB"] = f"{cache_mb:g}"
        if secure_aggregation(self.scenario.training.secure_aggregation):
            bound_extra.update(secagg_bound(function, self.state))  # client functions only
        data_credentials = self.scenario.training_test_data.credentials()
        if function in DATA_LOADERS and data_credentials:
            bound_extra[DATA_CREDENTIALS_KEY] = json.dumps(data_credentials, sort_keys=True)
        bound = {"FK_FUNCTION": function, "FK_TOKEN_SECRET": self.secret,
                 "FK_STORE_URL": self.store_url or "", "FK_STORE_DB": self.scenario.mongo_config.db,
                 **bound_extra}
        return FunctionSpec(name=function, source=function, bound=bound, image=image,
                            runtime=runtime, extra=extra, platform_api=function == "fl_invoker", **d)

    def server_cluster(self) -> str:
        clusters = self.cfg.providers.clusters()
        sc = self.scenario.server_config
        if sc and sc.server_cluster_name:
            return sc.server_cluster_name
        if not clusters:
            raise ValueError("the config names no clusters under providers")
        return next(iter(clusters))

    def insights_cluster(self) -> str:
        """Where fl_insights runs: scenario.insights.cluster, else the server's."""
        return self.scenario.insights.cluster or self.server_cluster()

    def client_clusters(self) -> dict[str, str]:
        """client id -> cluster name."""
        ci = self.scenario.clients_info
        return {} if ci is None else ci.placement(self.cfg.providers)

    def training_placements(self) -> list[Placement]:
        clusters = self.cfg.providers.clusters()
        out: list[Placement] = []
        server = self.server_cluster()
        for fn in SERVER_FUNCTIONS:
            section = clusters[server][0]
            out.append(Placement(server, section, self.function_spec(fn, section)))
        insights = self.insights_cluster()
        section = clusters[insights][0]
        out.append(Placement(insights, section, self.function_spec("fl_insights", section)))
        ci = self.scenario.clients_info
        client_fns = ci.client_functions if ci else ["fl_client"]
        if secure_aggregation(self.scenario.training.secure_aggregation):
            client_fns = [*client_fns, SECAGG_FUNCTION]
        for cname in dict.fromkeys(self.client_clusters().values()):
            section, ccfg = clusters[cname]
            for fn in client_fns:
                out.append(Placement(cname, section, self.function_spec(fn, section)))
            if getattr(ccfg, "invocation", "direct") == "via_invoker":
                out.append(Placement(cname, section, self.function_spec("fl_invoker", section)))
            if self.scenario.training.aggregation == "hierarchical":
                out.append(Placement(cname, section, self.function_spec("fl_combiner", section)))
        return out

    def placements_for(self, functions: Iterable[str], clusters: Iterable[str]) -> list[Placement]:
        all_clusters = self.cfg.providers.clusters()
        out = []
        for cname in clusters:
            section = all_clusters[cname][0]
            for fn in functions:
                out.append(Placement(cname, section, self.function_spec(fn, section)))
        return out

    # ------------------------------------------------------------------ deploy
    def artifact_for(self, placement: Placement) -> Artifact:
        provider = self.provider(placement.cluster)
        base = build_artifact(placement.spec.source, provider.entry,
                              user_module_members(self.cfg, self.scenario, placement.spec.source))
        return replace(base, sha256=deployment_hash(base, placement.spec))

    def deploy(self, placements: list[Placement],
               on_done: Callable[[Placement, Any, BaseException | None], None] | None = None,
               max_workers: int = 8) -> list[tuple[Placement, Any, BaseException | None]]:
        """Deploy concurrently; returns (placement, DeployResult|None, error|None)."""
        results: list[tuple[Placement, Any, BaseException | None]] = []

        def one(pl: Placement):
            try:
                res = self.provider(pl.cluster).deploy(pl.spec, self.artifact_for(pl))
                return pl, res, None
            except Exception as exc:  # reported per placement, never swallowed
                return pl, None, exc

        # Providers are created up front, so that lazily started local services
        # (fabric, functions-framework hosts) are not raced by threads.
        for pl in placements:
            self.provider(pl.cluster)
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(placements)))) as ex:
            for item in ex.map(one, placements):
                results.append(item)
                if on_done:
                    on_done(*item)
        return results

    def remove(self, placements: list[Placement]) -> list[tuple[Placement, bool | None, BaseException | None]]:
        def one(pl: Placement):
            try:
                return pl, self.provider(pl.cluster).remove(pl.spec.name), None
            except Exception as exc:
                return pl, None, exc

        for pl in placements:
            self.provider(pl.cluster)
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(placements)))) as ex:
            return list(ex.map(one, placements))
