"""Prometheus metrics of the keeper, and per-cluster reports from the
Prometheus servers that watch the clusters.

Two sides (docs/metrics.md has the metric list and example queries):

* `KeeperMetrics` is a progress listener (the keeper's `progress(kind, data)`
  callback) with a registry of its own, served on a loopback port, so that a
  Prometheus can scrape a training session while it runs: rounds, clients,
  invocation attempts by cluster and state, retries, round durations,
  accuracy and loss.
* `cluster_report` asks a cluster's Prometheus about its functions, from
  OpenWhisk's user-event metrics (`openwhisk_action_*`, which the local
  fabric serves under the same names): activations, cold starts, errors,
  duration quantiles. `metrics_for_config` does it for every OpenWhisk
  cluster of a config that names a Prometheus in its `prometheus_config`.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fedkeeper.metrics")

Listener = Callable[[str, dict], None]

# Attempt durations: OpenWhisk's buckets (5 ms to 10 s) and then the minutes a
# training function may take.
ATTEMPT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))
CLIENT_STATES = ("delivered", "failed", "running", "waiting", "retrying")


class KeeperMetrics:
    """The keeper's own metrics (prefix `fedkeeper_`).

    Call it as the keeper's progress listener (alone or through `fan_out`)
    and call `record_attempt` whenever an invocation attempt ends. Nothing
    here raises into the keeper: a listener that fails logs and goes on.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self.session_info = Gauge("fedkeeper_session_info", "The training session this keeper runs (value 1)",
                                  ["session", "resumed"], registry=r)
        self.rounds_completed = Counter("fedkeeper_rounds_completed", "Training rounds completed",
                                        registry=r)
        self.rounds_planned = Gauge("fedkeeper_rounds_planned", "Training rounds the session plans",
                                    registry=r)
        self.current_round = Gauge("fedkeeper_round", "The round in progress (the last one once done)",
                                   registry=r)
        self.clients = Gauge("fedkeeper_round_clients",
                             "Selected clients of the round in progress, by state", ["state"], registry=r)
        self.last_round_clients = Gauge("fedkeeper_last_round_clients",
                                        "Clients of the last completed round: selected, delivered, failed",
                                        ["outcome"], registry=r)
        self.round_duration = Histogram("fedkeeper_round_duration_seconds",
                                        "Wall time of a round, dispatch to aggregated model",
                                        buckets=ROUND_BUCKETS, registry=r)
        self.retries = Counter("fedkeeper_retries", "Re-invocations of clients whose attempt failed",
                               registry=r)
        self.rejected = Counter("fedkeeper_rejected_updates", "Client updates the aggregator rejected",
                                registry=r)
        self.accuracy = Gauge("fedkeeper_model_accuracy", "Accuracy of the newest global model", registry=r)
        self.loss = Gauge("fedkeeper_model_loss", "Loss of the newest global model", registry=r)
        self.invocations = Counter("fedkeeper_invocations",
                                   "Invocation attempts that ended, by cluster, state and error class",
                                   ["cluster", "platform", "function", "state", "error_class"], registry=r)
        self.cold_starts = Counter("fedkeeper_cold_starts", "Invocation attempts that were cold starts",
                                   ["cluster", "platform", "function"], registry=r)
        self.attempt_duration = Histogram("fedkeeper_invocation_duration_seconds",
                                          "Duration of invocation attempts as the platform measured it",
                                          ["cluster", "platform", "function"], buckets=ATTEMPT_BUCKETS,
                                          registry=r)
        self.deployments = Counter("fedkeeper_deployments", "Function deployments by result",
                                   ["cluster", "function", "result"], registry=r)
        self.warnings = Counter("fedkeeper_warnings", "Warnings the keeper reported", registry=r)

    # ------------------------------------------------------------------ listener
    def __call__(self, kind: str, data: dict) -> None:
        try:
            self._on(kind, data or {})
        except Exception:  # metrics must never stop a training session
            log.exception("metrics listener failed on %r", kind)

    def _on(self, kind: str, d: dict) -> None:
        if kind == "deployed":
            result = "error" if d.get("error") else ("skipped" if d.get("skipped") else "deployed")
            self.deployments.labels(str(d.get("cluster", "")), str(d.get("function", "")), result).inc()
        elif kind == "session":
            with self._lock:
                self.session_info.clear()
                self.session_info.labels(str(d.get("session", "")),
                                         "true" if d.get("resumed") else "false").set(1)
        elif kind == "tick":
            if d.get("round") is not None:
                self.current_round.set(d["round"])
            for state in CLIENT_STATES:
                if state in d:
                    self.clients.labels(state).set(d[state])
        elif kind == "aggregating":
            if d.get("round") is not None:
                self.current_round.set(d["round"])
        elif kind == "round":
            rep = d.get("report")
            if d.get("rounds") is not None:
                self.rounds_planned.set(d["rounds"])
            if rep is None:
                return
            self.rounds_completed.inc()
            self.current_round.set(rep.round)
            if rep.seconds is not None:
                self.round_duration.observe(max(0.0, float(rep.seconds)))
            for outcome in ("selected", "delivered", "failed"):
                self.last_round_clients.labels(outcome).set(getattr(rep, outcome) or 0)
            if rep.retries:
                self.retries.inc(rep.retries)
            if rep.rejected:
                self.rejected.inc(len(rep.rejected))
            if rep.accuracy is not None:
                self.accuracy.set(rep.accuracy)
            if rep.loss is not None:
                self.loss.set(rep.loss)
        elif kind == "warning":
            self.warnings.inc()

    def record_attempt(self, cluster: str, platform: str, state: str, error_class: str | None = None,
                       duration_s: float | None = None, cold_start: bool | None = None,
                       function: str = "") -> None:
        """One invocation attempt ended (state succeeded | failed | timed_out |
        abandoned), as written to its `invocations` document."""
        try:
            ec = getattr(error_class, "value", error_class) or ""
            self.invocations.labels(cluster, platform, function, state, str(ec)).inc()
            if duration_s is not None and duration_s >= 0 and not math.isnan(duration_s):
                self.attempt_duration.labels(cluster, platform, function).observe(duration_s)
            if cold_start:
                self.cold_starts.labels(cluster, platform, function).inc()
        except Exception:
            log.exception("recording an attempt failed")

    # ------------------------------------------------------------------ serving
    def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: any free port); returns the port."""
        if self._server is not None:
            return self._server.server_address[1]
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def fan_out(*listeners: Listener | None) -> Listener:
    """One progress callback that calls each listener in turn; a failing
    listener is logged and does not keep the others from running."""
    active = [f for f in listeners if f is not None]

    def progress(kind: str, data: dict) -> None:
        for f in active:
            try:
                f(kind, data)
            except Exception:
                log.exception("progress listener %r failed on %r", f, kind)
    return progress


# --------------------------------------------------------------------------- reports

_WINDOW_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


@dataclass
class ClusterMetrics:
    """One cluster's functions over a window, from its Prometheus. Counts
    are None (and `error` says why) when Prometheus could not be asked."""

    cluster: str
    prometheus: str | None
    namespace: str | None
    window: str | None
    activations: float | None = None
    cold_starts: float | None = None
    errors: float | None = None
    error_rate: float | None = None
    duration_p50_s: float | None = None
    duration_p95_s: float | None = None
    duration_mean_s: float | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def selector(namespace: str | None = None, actions: Iterable[str] | None = None,
             extra: str = "") -> str:
    """The label matchers for a namespace and a set of action names."""
    parts = []
    if namespace:
        parts.append(f'namespace="{_label_value(namespace)}"')
    acts = sorted(set(actions or ()))
    if acts:
        parts.append(f'action=~"{_label_value("|".join(re.escape(a) for a in acts))}"')
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _number(result: list) -> float | None:
    if not result:
        return None
    try:
        v = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def cluster_report(prometheus_url: str, namespace: str | None = None, actions: Iterable[str] | None = None,
                   window: str | None = "1h", *, cluster: str = "", timeout_s: float = 10.0,
                   disable_ssl: bool = False, headers: dict | None = None) -> ClusterMetrics:
    """Cold starts, errors and duration quantiles of one cluster's actions.

    `window` is a PromQL duration ("15m", "1h", "1d"): counts are
    `increase()` over it and quantiles come from the bucket `rate()` over it.
    None takes the counters as they stand (everything since the exporter
    started) and the quantiles over all observations: exact figures for a
    run on one exporter, but wrong across an exporter restart.
    """
    import requests
    from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
    from urllib3.util.retry import Retry

    if window is not None and not _WINDOW_RE.match(window):
        raise ValueError(f"window must be a Prometheus duration such as 15m, 1h or 1d, not {window!r}")
    out = ClusterMetrics(cluster=cluster, prometheus=prometheus_url, namespace=namespace, window=window)
    sel = selector(namespace, actions)
    errsel = selector(namespace, actions, 'status!="success"')

    def total(metric: str, s: str = sel) -> str:
        return f"sum({metric}{s})" if window is None else f"sum(increase({metric}{s}[{window}]))"

    def quantile(q: float) -> str:
        b = f"openwhisk_action_duration_seconds_bucket{sel}"
        inner = b if window is None else f"rate({b}[{window}])"
        return f"histogram_quantile({q}, sum by (le) ({inner}))"

    queries = {
        "activations": total("openwhisk_action_activations_total"),
        "cold_starts": total("openwhisk_action_coldStarts_total"),
        "errors": total("openwhisk_action_status", errsel),
        "duration_sum": total("openwhisk_action_duration_seconds_sum"),
        "duration_count": total("openwhisk_action_duration_seconds_count"),
        "p50": quantile(0.5),
        "p95": quantile(0.95),
    }
    # A few quick retries of what a busy server answers; none for a server
    # that is not there, so that a report on a dead cluster fails fast.
    retry = Retry(total=2, connect=0, backoff_factor=0.2, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=None)
    prom = PrometheusConnect(url=prometheus_url, disable_ssl=disable_ssl, headers=headers, timeout=timeout_s,
                             retry=retry)
    values: dict[str, float | None] = {}
    try:
        for key, q in queries.items():
            values[key] = _number(prom.custom_query(q))
    except PrometheusApiClientException as exc:
        out.error = f"Prometheus at {prometheus_url} refused a query: {exc}"
        return out
    except requests.exceptions.RequestException as exc:
        out.error = f"cannot reach Prometheus at {prometheus_url} ({type(exc).__name__})"
        return out
    # No series at all: nothing ran in the window.
    out.activations = values["activations"] or 0.0
    out.cold_starts = values["cold_starts"] or 0.0
    out.errors = values["errors"] or 0.0
    out.error_rate = out.errors / out.activations if out.activations else None
    out.duration_p50_s = values["p50"]
    out.duration_p95_s = values["p95"]
    if values["duration_count"]:
        out.duration_mean_s = (values["duration_sum"] or 0.0) / values["duration_count"]
    return out


def prometheus_url(pc: Any) -> str | None:
    """Where a cluster's `prometheus_config` says its Prometheus is: `url`,
    else http://host:port_openwhisk_metrics (FedKeeper's original keys)."""
    if pc is None:
        return None
    if getattr(pc, "url", None):
        return str(pc.url).rstrip("/")
    host = (getattr(pc, "host", "") or "").strip()
    port = getattr(pc, "port_openwhisk_metrics", None)
    if not host:
        return None
    base = host if "://" in host else f"http://{host}"
    return f"{base.rstrip('/')}:{int(port)}" if port else base.rstrip("/")


def cluster_namespace(name: str, cluster: Any) -> str | None:
    """The namespace label a cluster's activations carry; None when the
    config leaves it to the key's default namespace ("_")."""
    if getattr(cluster, "kind", "remote") == "local":
        from .local.openwhisk import _namespace_for
        return getattr(cluster, "namespace", None) or _namespace_for(name)
    ns = cluster.resolved_namespace()
    return None if ns in ("", "_") else ns


def metrics_for_config(cfg: Any, window: str | None = "1h", actions: Iterable[str] | None = None,
                       clusters: Iterable[str] | None = None,
                       timeout_s: float = 10.0) -> list[ClusterMetrics]:
    """A `ClusterMetrics` per cluster of the config (or of `clusters`), in
    config order. OpenWhisk clusters with a Prometheus are queried; the
    others get a row whose `error` says why there are no figures."""
    if window is not None and not _WINDOW_RE.match(window):
        raise ValueError(f"window must be a Prometheus duration such as 15m, 1h or 1d, not {window!r}")
    wanted = set(clusters) if clusters is not None else None
    acts = list(actions) if actions is not None else None
    rows: list[ClusterMetrics] = []
    # Every cluster whose config names a Prometheus is queried for OpenWhisk's
    # user-event series; a platform that does not export them gets zeros.
    for name, (_section, c) in cfg.providers.clusters().items():
        if wanted is not None and name not in wanted:
            continue
        url = prometheus_url(getattr(c, "prometheus_config", None))
        ns = cluster_namespace(name, c)
        if url is None:
            rows.append(ClusterMetrics(cluster=name, prometheus=None, namespace=ns, window=window,
                                       error="no Prometheus configured (prometheus_config.url, or host and "
                                             "port_openwhisk_metrics)"))
            continue
        rows.append(cluster_report(url, ns, acts, window, cluster=name, timeout_s=timeout_s,
                                   disable_ssl=bool(getattr(c, "insecure", False))))
    return rows
