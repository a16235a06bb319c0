"""Prometheus metrics of the keeper, and per-cluster reports from the
Prometheus servers that watch the clusters.

Two sides (docs/metrics.md has the metric list and example queries):

* `KeeperMetrics` is a progress listener (the keeper's `progress(kind, data)`
  callback) with a registry of its own, served on a loopback port, so that a
  Prometheus can scrape a training session while it runs: rounds, clients,
  invocation attempts by cluster and state, retries, round durations,
  accuracy and loss.
* `metrics_for_config` asks each cluster's platform adapter what the
  cluster's Prometheus saw of its functions (providers/<platform>/metrics.py:
  OpenWhisk's user-event metrics, Knative's activator and queue-proxy
  request metrics; Cloud Functions has no Prometheus source and says so).
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .providers import ProviderError, provider_class
from .providers.prometheus import ClusterMetrics, check_window, prometheus_url

__all__ = ["ClusterMetrics", "KeeperMetrics", "fan_out", "metrics_exit_status", "metrics_for_config",
           "prometheus_url"]

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

def fedkeeper_functions() -> list[str]:
    """The names of every function FedKeeper deploys (each a folder of
    functions/ with its function.toml): what a cluster's metrics are about
    (a namespace may hold other actions too). Not the config's `functions`
    section, which lists only those it configures."""
    from .artifacts import FUNCTIONS_DIR
    return sorted(d.name for d in FUNCTIONS_DIR.iterdir() if (d / "function.toml").is_file())


def metrics_for_config(cfg: Any, window: str | None = "1h", actions: Iterable[str] | None = None,
                       clusters: Iterable[str] | None = None,
                       timeout_s: float = 10.0) -> list[ClusterMetrics]:
    """A `ClusterMetrics` per cluster of the config (or of `clusters`), in
    config order, each from its platform's metrics adapter (the provider
    class's `cluster_metrics`). A cluster whose adapter fails gets a row
    whose `error` says why; a platform without a Prometheus source gets a
    `note`. Nothing here raises for one cluster's sake."""
    check_window(window)
    wanted = set(clusters) if clusters is not None else None
    acts = list(actions) if actions is not None else None
    rows: list[ClusterMetrics] = []
    for name, (section, c) in cfg.providers.clusters().items():
        if wanted is not None and name not in wanted:
            continue
        try:
            cls = provider_class(section, getattr(c, "kind", "remote"))
            rows.append(cls.cluster_metrics(name, c, window, acts, timeout_s))
        except Exception as exc:  # one cluster's failure is its row, never the command's traceback
            log.debug("metrics of %s failed", name, exc_info=True)
            text = str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
            rows.append(ClusterMetrics(cluster=name, prometheus=None, namespace=None, window=window,
                                       error=f"cannot read the metrics of cluster {name}: {text}"))
    return rows


def metrics_exit_status(rows: Iterable[ClusterMetrics]) -> int:
    """`fedkeeper metrics` exits 1 when a cluster's figures could not be
    read (`error`), else 0; a platform without a Prometheus source is a
    `note`, not an error (docs/metrics.md)."""
    return 1 if any(r.error for r in rows) else 0
