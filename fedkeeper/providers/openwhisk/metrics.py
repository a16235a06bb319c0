"""OpenWhisk's metrics adapter: its user-event metrics (`openwhisk_action_*`,
which the local fabric serves under the same names) from the Prometheus a
cluster's `prometheus_config` names: activations, cold starts, errors and
duration quantiles of its actions (docs/metrics.md)."""
from __future__ import annotations

from typing import Any, Iterable

from ..prometheus import ClusterMetrics, check_window, fill, matchers, prometheus_url, run_queries

NO_PROMETHEUS = "no Prometheus configured (prometheus_config.url, or host and port_openwhisk_metrics)"


def selector(namespace: str | None = None, actions: Iterable[str] | None = None, extra: str = "") -> str:
    """The label matchers for a namespace and a set of action names."""
    return matchers({"namespace": namespace or None, "action": list(actions or ())}, extra)


def cluster_report(prometheus: str, namespace: str | None = None, actions: Iterable[str] | None = None,
                   window: str | None = "1h", *, cluster: str = "", timeout_s: float = 10.0,
                   disable_ssl: bool = False, headers: dict | None = None) -> ClusterMetrics:
    """Cold starts, errors and duration quantiles of one cluster's actions.

    `window` is a PromQL duration ("15m", "1h", "1d"): counts are
    `increase()` over it and quantiles come from the bucket `rate()` over it.
    None takes the counters as they stand (everything since the exporter
    started) and the quantiles over all observations: exact figures for a
    run on one exporter, but wrong across an exporter restart.
    """
    check_window(window)
    out = ClusterMetrics(cluster=cluster, prometheus=prometheus, namespace=namespace, window=window)
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
    values, error = run_queries(prometheus, queries, timeout_s=timeout_s, disable_ssl=disable_ssl,
                                headers=headers)
    if error:
        out.error = error
        return out
    return fill(out, values)


def cluster_metrics(name: str, cluster: Any, namespace: str | None, window: str | None,
                    actions: Iterable[str] | None, timeout_s: float) -> ClusterMetrics:
    """`namespace`: the label the cluster's activations carry (None: any)."""
    url = prometheus_url(getattr(cluster, "prometheus_config", None))
    ns = namespace
    if url is None:
        return ClusterMetrics(cluster=name, prometheus=None, namespace=ns, window=window, error=NO_PROMETHEUS)
    return cluster_report(url, ns, actions, window, cluster=name, timeout_s=timeout_s,
                          disable_ssl=bool(getattr(cluster, "insecure", False)))
