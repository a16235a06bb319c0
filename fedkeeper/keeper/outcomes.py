"""A platform's Outcome as the keeper records it: whether it succeeded
(a function that answers with an error did not) and the fields of its
attempt document."""
from __future__ import annotations

from typing import Any

from ..providers import Outcome


def succeeded(out: Outcome) -> bool:
    return out.ok and not (out.result or {}).get("error")


def outcome_fields(out: Outcome, now: float) -> dict[str, Any]:
    """An outcome as the fields of its attempt document."""
    fields: dict[str, Any] = {
        "platform_id": out.platform_id or None,
        "state": "succeeded" if succeeded(out) else "failed",
        "error_class": out.error_class.value if out.error_class else None,
        "error": out.error or (out.result or {}).get("error"),
        "start": out.start, "end": out.end, "duration_ms": out.duration_ms,
        "wait_ms": out.wait_ms, "init_ms": out.init_ms, "cold_start": out.cold_start,
        "finished": now,
    }
    res = out.result or {}
    summary = {k: res[k] for k in ("num_examples", "metrics", "timings", "duplicate", "stored_by") if k in res}
    if summary:
        fields["result"] = summary
    return fields
