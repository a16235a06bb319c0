"""The fabric's own administration (not part of OpenWhisk's API): limits per
namespace and for the whole fabric, fault injection, status."""
from __future__ import annotations

import math
import os
from typing import Any

from ..faults import FaultPlan
from .actions import LIMIT_RANGES
from .core import Fabric
from .status import ApiError

# API key -> attribute, per namespace and for the whole fabric.
PER_NAMESPACE = {"concurrentInvocations": "concurrent_invocations",
                 "invocationsPerMinute": "invocations_per_minute"}
GLOBAL = {"payloadLimit": "payload_limit", "idleSeconds": "idle_s", "userMemoryMb": "user_memory_mb",
          "blockingWaitSeconds": "blocking_wait_s", "maxRecords": "max_records",
          "recordBytes": "record_bytes", "stemMemoryMb": "stem_memory_mb"}
# Any limit above this is a mistake, not a setting (it also keeps int() finite).
_LIMIT_CEILING = 2 ** 53
# Limits that are durations: past these they are mistakes too, and a time
# that far ahead is past what the clock's types can hold (a blocking wait of
# 1e13 s ended every blocking invoke in a 500, after the activation started).
_SECONDS_CEILING = {"blockingWaitSeconds": 3600, "idleSeconds": 7 * 86400}


def limits(f: Fabric, ns_name: str) -> dict:
    ns = f.ns(ns_name)
    r = {k: (lo, hi) for k, lo, hi in LIMIT_RANGES}
    return {"invocationsPerMinute": ns.invocations_per_minute,
            "concurrentInvocations": ns.concurrent_invocations,
            "firesPerMinute": 60,
            "minActionMemory": 128, "maxActionMemory": f.settings.user_memory_mb,
            "minActionLogs": r["logs"][0], "maxActionLogs": r["logs"][1],
            "minActionTimeout": r["timeout"][0], "maxActionTimeout": r["timeout"][1],
            "minActionConcurrency": r["concurrency"][0], "maxActionConcurrency": r["concurrency"][1],
            "maxParameterSize": f.settings.payload_limit,
            "maxPayloadSize": f.settings.payload_limit,
            "maxActionInstances": ns.concurrent_invocations}


def _stem_cells(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= 40 and isinstance(n, int) and not isinstance(n, bool)
            and 0 <= n <= 16 for k, n in value.items()) or len(value) > 16:
        raise ApiError(400, "stemCells must be an object of runtime names to counts from 0 to 16")
    return dict(value)


def set_limits(f: Fabric, ns_name: str, body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "limits must be a JSON object")
    ns = f.ns(ns_name)
    unknown = set(body) - set(PER_NAMESPACE) - set(GLOBAL) - {"stemCells"}
    if unknown:
        raise ApiError(400, f"unknown limit keys: {sorted(unknown)[:10]}")
    # null: the setting the fabric was started with. A cluster whose config
    # leaves its capacity out sends that, so that it does not run with what
    # an earlier command's config set.
    start, attrs = f.started_settings, {**PER_NAMESPACE, **GLOBAL}
    body = {k: v if v is not None else dict(start.stem_cells) if k == "stemCells" else getattr(start, attrs[k])
            for k, v in body.items()}
    # stem cells per runtime: a fabric-wide setting; fewer are evicted now,
    # more start as memory allows
    stems = _stem_cells(body["stemCells"]) if "stemCells" in body else None
    body = {k: v for k, v in body.items() if k != "stemCells"}
    for k, v in body.items():
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not 0 < v <= _LIMIT_CEILING):
            raise ApiError(400, f"{k} must be a positive, finite number")
        if v > _SECONDS_CEILING.get(k, _LIMIT_CEILING):
            raise ApiError(400, f"{k} must be at most {_SECONDS_CEILING[k]} seconds")
        whole = k in PER_NAMESPACE or isinstance(getattr(f.settings, GLOBAL[k]), int)
        if whole and v != int(v):
            raise ApiError(400, f"{k} must be a whole number")
    with f.lock:
        for k, attr in PER_NAMESPACE.items():
            if k in body:
                setattr(ns, attr, int(body[k]))
        for k, attr in GLOBAL.items():
            if k in body:
                cur = getattr(f.settings, attr)
                setattr(f.settings, attr, int(body[k]) if isinstance(cur, int) else float(body[k]))
        if "invocationsPerMinute" in body:
            ns.minute.clear()
        ops: list = []
        if stems is not None:
            f.settings.stem_cells = stems
            for w in f.scheduler.stem_cells.trim():
                f.scheduler.evict(w, "evicted", ops)
        # what waits is placed under the new limits (or failed, if it can never be)
        ops.extend(f.scheduler.pump_all())
    f.scheduler.run_ops(ops)
    for runtime in (z["runtime"] for z in f.scheduler.zygotes.describe()):
        if stems is not None and not stems.get(runtime or ""):
            f.scheduler.zygotes.stop(runtime)   # a runtime without stem cells needs no zygote
    f.start_stem_cells()
    if stems is not None or "userMemoryMb" in body:
        f.publish_capacity()
    return limits(f, ns.name)


def set_faults(f: Fabric, ns_name: str, body: Any) -> dict:
    ns = f.ns(ns_name)
    try:
        faults = FaultPlan.parse(body) if body else None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ApiError(400, str(exc)) from None
    with f.lock:
        ns.faults = faults
        # A new configuration restarts the sequence, so that a seed
        # reproduces the same faults from here on.
        ns.fault_counters.clear()
    return faults.to_json() if faults else {}


def get_faults(f: Fabric, ns_name: str) -> dict:
    n = f.ns(ns_name)
    return n.faults.to_json() if n.faults else {}


def prewarm(f: Fabric, body: Any) -> dict:
    """Start the zygotes of runtimes whose actions are about to be deployed
    (`{"runtimes": [...]}`), so that their modules load while the caller
    still starts its store and packages its code. Only runtimes given stem
    cells get one; the stem cells themselves start once an action of the
    runtime is deployed, as before."""
    runtimes = body.get("runtimes") if isinstance(body, dict) else None
    if (not isinstance(runtimes, list) or len(runtimes) > 64
            or not all(isinstance(r, str) and 0 < len(r) <= 64 for r in runtimes)):
        raise ApiError(400, "prewarm takes {\"runtimes\": [runtime names]}")
    f.prewarm(runtimes)
    return {"zygotes": f.scheduler.zygotes.describe()}


def _action_pools(f: Fabric) -> dict[str, dict]:
    """Per action: its intra-worker concurrency (limits.concurrency: the
    activations one worker runs at once), its workers and the activations
    they run now (lock held)."""
    out = {}
    for n in f.namespaces.values():
        for a in n.actions.values():
            pool = [w for w in f.scheduler.pools.get((n.name, a.name), ()) if w.state != "dead"]
            out[f"{n.name}/{a.name}"] = {
                "concurrency": int(a.limits.get("concurrency", 1)), "memory_mb": int(a.limits["memory"]),
                "workers": len(pool), "in_flight": sum(len(w.assigned) for w in pool),
                "max_in_one_worker": max((len(w.assigned) for w in pool), default=0)}
    return out


def status(f: Fabric) -> dict:
    # Asked before the fabric's lock is taken: a zygote that starts holds
    # the zygotes' lock while its runtime's site is built (minutes, the
    # first time), and everything else waits for the fabric's.
    zygotes = f.scheduler.zygotes.describe()
    with f.lock:
        s = f.scheduler
        return {"pid": os.getpid(), "memory_used_mb": s.memory_used,
                "user_memory_mb": f.settings.user_memory_mb, "stem_cells": dict(f.settings.stem_cells),
                "stem_memory_mb": f.settings.stem_memory_mb, "fork_stem_cells": f.settings.fork_stem_cells,
                "zygotes": zygotes,
                "workers": [w.describe() for w in sorted(s.workers, key=lambda w: w.id)],
                "actions": _action_pools(f),
                "namespaces": {n.name: {"inflight": n.inflight, "records": len(n.records),
                                        "record_bytes": n.records.bytes,
                                        "actions": sorted(n.actions), **n.counts,
                                        "faults": n.faults.to_json() if n.faults else None}
                               for n in f.namespaces.values()},
                "queued": {f"{k[0]}/{k[1]}": len(q) for k, q in s.queues.items()}}
