"""Helper function calls (init, aggregator, combiner, invoker): invoke one
function and wait for it, with the bounded retries of client attempts, every
attempt recorded. A resumed keeper continues the attempt numbering of the
one it replaces."""
from __future__ import annotations

import logging
import random
import threading
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from ..providers import ErrorClass, Outcome, ProviderError
from .attempts import Slot
from .errors import SessionError
from .events import shown
from .outcomes import outcome_fields

if TYPE_CHECKING:
    from .dispatch import Dispatcher

log = logging.getLogger("fedkeeper.keeper")


def call_helper(d: "Dispatcher", cluster: str, session: str, rnd: int, function: str, *,
                slot_name: str | None = None, rng: random.Random | None = None,
                stop: threading.Event | None = None, **args: Any) -> dict[str, Any]:
    """Invoke `function` on `cluster` through the dispatcher `d` and wait.
    `slot_name`
    (default `_<function>`) names its attempt records: calls of one
    function made in parallel (one combiner per cluster) each need their own.
    A call made off the keeper's thread passes its own `rng` for its
    backoffs (the dispatcher's seeded one stays the round loop's) and may
    be given a `stop` event: once set, no further attempt is made."""
    provider = d.platforms.provider(cluster)
    spec = d.platforms.spec(cluster, function)
    name = slot_name or f"_{function}"
    before = d.store.last_attempt(session, rnd, name)
    slot = Slot(name, cluster, rnd, attempt=before, uncounted=before, function=function)
    table = d.table([slot], rng)
    while True:
        if stop is not None and stop.is_set():
            raise SessionError(f"{function} for round {shown(rnd)} was abandoned after {slot.counted} "
                               "attempt(s)")
        table.begin([slot])
        payload = d.platforms.payload(function=function, session=session, round=rnd, client=None,
                                         attempt=slot.attempt, **args)
        doc = {"_id": ObjectId(), "session": session, "round": rnd, "client": slot.client,
               "attempt": slot.attempt, "cluster": cluster, "platform": provider.platform,
               "function": function, "memory_mb": spec.memory_mb, "state": "submitting",
               "submitted": d.clock()}
        d.insert_attempts([doc])
        try:
            out = provider.call(function, payload, timeout_s=spec.timeout_s + d.policy.grace_s)
        except ProviderError as exc:
            out = Outcome(platform_id="", ok=False, error_class=exc.error_class, error=str(exc),
                          retry_after=exc.retry_after)
        d.update_attempts([(doc["_id"], outcome_fields(out, d.clock()))])
        if out.ok and out.result and "error" not in out.result:
            d.clusters.answered(cluster)
            return out.result
        error = out.error or (out.result or {}).get("error") or "failed"
        reached = out.error_class != ErrorClass.UNREACHABLE
        if reached:
            log.warning("%s round %d attempt %d failed: %s", function, shown(rnd), slot.attempt, error)
        # An answer with an error field is the function's own error, as for a client.
        ec = out.error_class or (ErrorClass.APPLICATION_ERROR if out.ok else None)
        verdict = table.failed(slot, ec, error, out.retry_after, reached=reached)
        if not reached:
            d.clusters.failed(cluster, error)
            slot.next_try = max(slot.next_try, d.clusters.next_probe(cluster))
        if verdict.redeploy:
            d.platforms.redeploy(cluster, function)
        if not verdict.retry:
            raise SessionError(f"{function} failed for round {shown(rnd)} after {slot.counted} "
                               f"attempt(s): {error}")
        d.sleep(max(0.0, slot.next_try - d.clock()))
