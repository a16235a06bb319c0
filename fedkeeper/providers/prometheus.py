"""What every platform's metrics adapter shares: the row it answers with,
where a cluster's Prometheus is, and running a set of PromQL queries.

The queries themselves are the platform's (`<platform>/metrics.py`): OpenWhisk
reads its user-event metrics, Knative its activator and queue-proxy request
metrics; a platform without a Prometheus source (Cloud Functions) answers
with a one-line note instead.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from ..config.values import shown_url

# How much of Prometheus' own error text a message quotes.
ERROR_CHARS = 300
_WINDOW_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def check_window(window: str | None) -> None:
    if window is not None and not _WINDOW_RE.match(window):
        raise ValueError(f"window must be a Prometheus duration such as 15m, 1h or 1d, not {window!r}")


@dataclass
class ClusterMetrics:
    """One cluster's functions over a window, from its Prometheus. Counts
    are None when Prometheus could not be asked (`error` says why) or the
    platform has none to ask (`note` says so; not an error)."""

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
    note: str | None = None

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        if out["prometheus"]:   # a URL may carry user:password@: never printed
            out["prometheus"] = shown_url(out["prometheus"])
        return out


def label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def matchers(labels: dict[str, str | Iterable[str] | None], extra: str = "") -> str:
    """`{k="v",k2=~"a|b"}` from exact values and sets of values (regex-escaped)."""
    parts = []
    for key, value in labels.items():
        if value is None:
            continue
        if isinstance(value, str):
            parts.append(f'{key}="{label_value(value)}"')
        else:
            values = sorted(set(value))
            if values:
                parts.append(f'{key}=~"{label_value("|".join(re.escape(v) for v in values))}"')
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


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


def _number(result: list) -> float | None:
    if not result:
        return None
    try:
        v = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def run_queries(url: str, queries: dict[str, str], *, timeout_s: float = 10.0, disable_ssl: bool = False,
                headers: dict | None = None) -> tuple[dict[str, float | None], str | None]:
    """(values by key, error or None): each query's scalar answer."""
    import requests
    from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
    from urllib3.util.retry import Retry

    # A few quick retries of what a busy server answers; none for a server
    # that is not there, so that a report on a dead cluster fails fast.
    retry = Retry(total=2, connect=0, backoff_factor=0.2, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=None)
    prom = PrometheusConnect(url=url, disable_ssl=disable_ssl, headers=headers, timeout=timeout_s, retry=retry)
    values: dict[str, float | None] = {}
    where = shown_url(url)   # a URL may carry user:password@: never in a message
    try:
        for key, q in queries.items():
            values[key] = _number(prom.custom_query(q))
    except PrometheusApiClientException as exc:
        # the client quotes the server's whole answer: the start says why
        return values, f"Prometheus at {where} refused a query: {' '.join(str(exc).split())[:ERROR_CHARS]}"
    except ValueError:
        # an answer that is not JSON (a proxy's HTML page, say); before
        # RequestException, which requests' JSONDecodeError also is
        return values, f"Prometheus at {where} answered with something that is not JSON"
    except requests.exceptions.RequestException as exc:
        return values, f"cannot reach Prometheus at {where} ({type(exc).__name__})"
    return values, None


def fill(out: ClusterMetrics, values: dict[str, float | None]) -> ClusterMetrics:
    """Counts and quantiles from the adapters' common keys (activations,
    cold_starts, errors, duration_sum/count in seconds, p50, p95)."""
    # No series at all: nothing ran in the window, or nothing is scraped
    # (the wrong Prometheus, user events not enabled), which no figure tells
    # apart from an idle cluster: a note says so.
    if values.get("activations") is None:
        out.note = ("Prometheus holds no activation series of these functions for this window: nothing ran, "
                    "or the platform's metrics are not scraped there")
    out.activations = values.get("activations") or 0.0
    out.cold_starts = values.get("cold_starts") or 0.0
    out.errors = values.get("errors") or 0.0
    out.error_rate = out.errors / out.activations if out.activations else None
    out.duration_p50_s = values.get("p50")
    out.duration_p95_s = values.get("p95")
    if values.get("duration_count"):
        out.duration_mean_s = (values.get("duration_sum") or 0.0) / values["duration_count"]
    return out
