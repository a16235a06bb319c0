"""Per-client and per-cluster reliability from invocation records.

Shared by the fl_insights function (the `reliability` workload) and the
keeper (`selection: reliability`, which turns them into its own scores),
so both read the same figures from the same attempt documents (collection
`invocations`, docs/store.md).
Helper invocations (client ids starting with "_") are left out.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

ENDED = ("succeeded", "failed", "timed_out", "abandoned")


def _ended(a: dict[str, Any]) -> bool:
    """An attempt that ended and says something about its client and
    cluster: not one a stopped keeper left unsent (it never ran), nor one a
    resumed keeper closed as stray (its client had a younger attempt)."""
    return a.get("state") in ENDED and not a.get("unsent") and not a.get("stray")


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ended = [a for a in rows if _ended(a)]
    ok = [a for a in ended if a.get("state") == "succeeded"]
    timeouts = [a for a in ended if a.get("state") == "timed_out" or a.get("error_class") == "timeout"]
    colds = [a for a in ended if a.get("cold_start") is not None]
    durations = np.array([a["duration_ms"] for a in ok if a.get("duration_ms") is not None], dtype=float)
    return {
        "attempts": len(ended),
        "succeeded": len(ok),
        "success_rate": len(ok) / len(ended) if ended else None,
        "timeouts": len(timeouts),
        "cold_starts": sum(1 for a in colds if a["cold_start"]),
        "cold_start_rate": sum(1 for a in colds if a["cold_start"]) / len(colds) if colds else None,
        "p50_ms": float(np.percentile(durations, 50)) if durations.size else None,
        "p95_ms": float(np.percentile(durations, 95)) if durations.size else None,
    }


def _group(attempts: Iterable[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        if str(a.get("client", "")).startswith("_"):
            continue
        out.setdefault(a.get(key) or "?", []).append(a)
    return out


def client_stats(attempts: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """client id -> attempts, succeeded, success_rate, timeouts, cold_starts,
    cold_start_rate, p50_ms, p95_ms (over ended client attempts)."""
    return {c: _summary(rows) for c, rows in _group(attempts, "client").items()}


def cluster_stats(attempts: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """cluster name -> the same figures over that cluster's client attempts."""
    return {c: _summary(rows) for c, rows in _group(attempts, "cluster").items()}
