"""Knative's metrics adapter: the request metrics Knative Serving exports
(docs/metrics.md), from the Prometheus a cluster's `prometheus_config` names.

  revision_app_request_count       requests the queue-proxy passed to the
                                   function's container (its activations);
                                   response_code_class="5xx" are its errors
  revision_app_request_latencies   their durations, a histogram in ms
  activator_request_count          requests the activator handled: a
                                   revision scaled to zero (a cold start) or
                                   beyond its burst capacity gets its
                                   requests through the activator

Services are selected by namespace_name and service_name (the function
names mapped as the provider maps them).
"""
from __future__ import annotations

from typing import Any, Iterable

from ..prometheus import ClusterMetrics, check_window, fill, matchers, prometheus_url, run_queries
from .manifests import service_name

NO_PROMETHEUS = "no Prometheus configured (prometheus_config.url)"


def cluster_report(prometheus: str, namespace: str, functions: Iterable[str] | None = None,
                   window: str | None = "1h", *, cluster: str = "", timeout_s: float = 10.0,
                   disable_ssl: bool = False) -> ClusterMetrics:
    check_window(window)
    out = ClusterMetrics(cluster=cluster, prometheus=prometheus, namespace=namespace, window=window)
    labels = {"namespace_name": namespace, "service_name": [service_name(f) for f in functions or ()]}
    sel = matchers(labels)
    errsel = matchers(labels, 'response_code_class="5xx"')

    def total(metric: str, s: str = sel) -> str:
        return f"sum({metric}{s})" if window is None else f"sum(increase({metric}{s}[{window}]))"

    def quantile(q: float) -> str:
        b = f"revision_app_request_latencies_bucket{sel}"
        inner = b if window is None else f"rate({b}[{window}])"
        return f"histogram_quantile({q}, sum by (le) ({inner})) / 1000"

    queries = {
        "activations": total("revision_app_request_count"),
        "cold_starts": total("activator_request_count"),
        "errors": total("revision_app_request_count", errsel),
        "duration_sum": f"({total('revision_app_request_latencies_sum')}) / 1000",
        "duration_count": total("revision_app_request_latencies_count"),
        "p50": quantile(0.5),
        "p95": quantile(0.95),
    }
    values, error = run_queries(prometheus, queries, timeout_s=timeout_s, disable_ssl=disable_ssl)
    if error:
        out.error = error
        return out
    return fill(out, values)


def cluster_metrics(name: str, cluster: Any, window: str | None, actions: Iterable[str] | None,
                    timeout_s: float) -> ClusterMetrics:
    ns = getattr(cluster, "namespace", None) or "default"
    url = prometheus_url(getattr(cluster, "prometheus_config", None))
    if url is None:
        return ClusterMetrics(cluster=name, prometheus=None, namespace=ns, window=window, error=NO_PROMETHEUS)
    return cluster_report(url, ns, actions, window, cluster=name, timeout_s=timeout_s,
                          disable_ssl=bool(getattr(cluster, "insecure", False)))
