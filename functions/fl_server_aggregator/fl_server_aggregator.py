"""fl_server_aggregator: turn the global model of round R and the updates the
keeper lists into model R+1, with the session's aggregation strategy.

Payload: {session, round: R, clients: [ids whose round-R update to use],
stale: [{"client": c, "round": r}, ...] (optional, r < R), mark_counted:
true to also mark each counted update `accepted` (optional)}.

Every update becomes a delta against the global model its client trained
from (model r for a stale update) and is weighted
num_examples * (1 + staleness) ** -staleness_exponent. Updates are streamed
one at a time, small ones (kept in their documents, flcommon.update_data)
a group per query (the next read while the current one is added; a long
list of the round's own in one pass over its documents), none may decode
to more than the model's size, and each is checked whole before the
strategy sees it; invalid ones are rejected with a recorded reason and the
round aggregates the rest. An
update already counted by the aggregation of another round is rejected,
never counted twice: model R+1's contributions list what this aggregation
counted, its one record of it (flcommon.contributions). The store is asked
a fixed number of times per round whatever the number of updates (lists in
slices, writes in bulk), besides one query per update too large to be kept
in its document.
In a hierarchical round (training.aggregation: hierarchical) the partial
aggregates the combiners (fl_combiner) stored for the round are added one
each in place of their clients' updates (flcommon.partials).
Server-optimizer state (momentum, moments) is a blob referenced by the
models document and read back by the next aggregation."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pymongo

from flcommon.strategies import StrategyError, get_strategy
from flcommon import store
from flcommon.blobs import BlobError
from flcommon.context import database, global_model, ids, num_classes, partition_arrays, session_spec
from flcommon.entry import BadRequest, require
from flcommon.update_check import all_within
from flcommon.update_stream import aggregate
from flcommon.models import evaluate
from flcommon.privacy import central_dp
from flcommon.trail import model_trail


MAX_LISTED = 20  # rejections listed in a result: keeps it far below any payload limit


def _listed(rejected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"client": r["client"], "round": r["round"], "reason": r["reason"][:200]}
            for r in rejected[:MAX_LISTED]]


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    """The small result the keeper gets; the models doc has the full lists."""
    m = doc.get("metrics", {})
    rejected = doc.get("rejected", [])
    rejected = [dict(r, round=r.get("round", doc["round"] - 1)) for r in rejected]
    return {"round": doc["round"] - 1, "model_round": doc["round"], "loss": m.get("loss"),
            "accuracy": m.get("accuracy"), "accepted": doc.get("accepted", 0),
            "rejected": _listed(rejected), "rejected_count": len(rejected),
            "stale_accepted": sum(1 for c in doc.get("contributions", []) if c.get("staleness", 0) > 0),
            **({"quantization_clipped": doc["quantization_clipped"]} if doc.get("quantization_clipped") else {})}


def _wanted(payload: dict[str, Any], rnd: int) -> list[tuple[str, int]]:
    """(client, model round) of every update to aggregate, each once, the
    round's own updates first."""
    clients = require(payload, "clients", list)  # of ids, as entry.check_fields made sure
    wanted = [(c, rnd) for c in clients]
    for item in payload.get("stale") or []:      # of {client, round}, likewise
        if not item["round"] < rnd:
            raise BadRequest(f"stale update of {item['client']} is for round {item['round'] + 1}; "
                             f"a stale update's round must be below {rnd + 1}")
        wanted.append((item["client"], item["round"]))
    wanted = list(dict.fromkeys(wanted))  # listed twice still counts once
    if not wanted:
        raise BadRequest("clients and stale name no update to aggregate")
    return wanted


def _staleness_exponent(spec: dict[str, Any]) -> float:
    value = spec.get("staleness_exponent", 0.5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise BadRequest(f"session staleness_exponent must be a non-negative number, got {value!r}")
    return float(value)


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    wanted = _wanted(payload, rnd)
    db = database(bound)
    done = db[store.MODELS].find_one({"session": session, "round": rnd + 1})
    if done is not None:  # idempotent: a retried aggregation changes nothing
        return _result(done)
    spec = session_spec(db, session)
    try:
        strategy = get_strategy(spec.get("strategy"))
    except StrategyError as exc:
        raise BadRequest(f"session {session}: {exc}") from None
    exponent = _staleness_exponent(spec)
    t0 = time.perf_counter()
    current, weights = global_model(db, session, rnd)
    # Central DP wraps the strategy (clipping, one vote per client, noise);
    # secure aggregation sums masked vectors instead of reading updates.
    dp = central_dp(spec, strategy, current)
    agg = dp or strategy
    if spec.get("secure_aggregation"):
        from flcommon.secagg.server import secure_aggregate
        accepted, rejected = secure_aggregate(db, session, rnd, wanted, weights, strategy, spec)
    else:
        accepted, rejected = aggregate(db, session, rnd, wanted, weights, agg, exponent, whole_round=True)
    marks = [pymongo.UpdateOne({"session": session, "round": r["round"], "client": r["client"],
                                "status": {"$ne": "accepted"}},
                               {"$set": {"status": "rejected", "reason": r["reason"]}})
             for r in rejected if r.pop("mark")]
    if marks:  # one round trip for them all: a write per update grows the round with its clients
        db[store.UPDATES].bulk_write(marks, ordered=False)
    if not accepted:
        # No round number in the answers: the keeper names the round (counted from 1) it asked about.
        return {"error": "no valid update to aggregate", "rejected": _listed(rejected),
                "rejected_count": len(rejected)}
    state = None
    if strategy.stateful and current.get("state_blob_id") is not None:
        try:
            # float32 arrays of the strategy's state layout, nothing more
            state_bytes = 4 * sum(math.prod(shape) for shape in strategy.state_layout())
            state = store.get_arrays(db, current["state_blob_id"], max_bytes=state_bytes)
        except BlobError as exc:
            return {"error": f"the server state stored with model {rnd} is unreadable: {exc}"}
    try:
        new, new_state = agg.finish(weights, state)
    except StrategyError as exc:
        return {"error": str(exc)}
    # A model with NaN or inf could never be moved again (every later delta
    # against it is NaN or inf too): such a round fails, and nothing is stored.
    if not all(all_within(w, float(np.finfo(w.dtype).max)) for w in new if np.issubdtype(w.dtype, np.floating)):
        return {"error": f"the aggregate holds NaN or inf ({strategy.name}); the model is not stored "
                         "(a server learning rate too large?)"}
    del weights, state
    contributions = [{"client": a["client"], "round": a["round"], "staleness": a["staleness"],
                      "num_examples": a["num_examples"], "weight": share,
                      **({"combined_by": a["combined_by"]} if "combined_by" in a else {})}   # hierarchical
                     for a, share in zip(accepted, agg.shares())]
    x, y = partition_arrays(db, session, "_test")
    metrics = evaluate(spec, new, x, y, num_classes(db, session))
    blob = store.put_arrays(db, new, f"{session}/model/{rnd + 1:03d}.npz",
                            {"kind": "model", "session": session, "round": rnd + 1})
    state_blob = None
    if new_state is not None:
        state_blob = store.put_arrays(db, new_state, f"{session}/state/{rnd + 1:03d}.npz",
                                      {"kind": "state", "session": session, "round": rnd + 1,
                                       "strategy": strategy.name})
    # The model's contributions are the record of what this aggregation
    # counted (flcommon.contributions). The updates themselves are marked
    # only for a keeper that finds the updates still waiting by their
    # status (semi_async, async): a write per update, about half of a
    # 1,000-client aggregation on the embedded store, that nothing else reads.
    if payload.get("mark_counted"):
        db[store.UPDATES].bulk_write([
            pymongo.UpdateOne({"session": session, "round": c["round"], "client": c["client"]},
                              {"$set": {"status": "accepted", "aggregated_in": rnd,
                                        "staleness": c["staleness"], "weight": c["weight"],
                                        **({"combined_by": c["combined_by"]} if "combined_by" in c else {})},
                               "$unset": {"reason": ""}}) for c in contributions], ordered=False)
    doc = {"session": session, "round": rnd + 1, "blob_id": blob, "metrics": metrics,
           "accepted": len(contributions), "accepted_clients": [c["client"] for c in contributions],
           "rejected": rejected, "contributions": contributions, "strategy": strategy.name,
           "num_examples": sum(c["num_examples"] for c in contributions),
           "trail": model_trail(spec, __file__, parent=current, contributions=contributions),
           "created": time.time(), "seconds": time.perf_counter() - t0}
    if state_blob is not None:
        doc["state_blob_id"] = state_blob
    if dp is not None:  # the bound, the noise and the next adaptive bound; never the raw norms
        doc["privacy"] = dp.report()
    # secure aggregation: values the clients clipped to the field's bound (the sum is off by them)
    clipped = sum(a.get("quantization_clipped", 0) for a in accepted)
    if clipped:
        doc["quantization_clipped"] = clipped
    try:
        db[store.MODELS].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:
        store.delete_blob(db, blob)
        if state_blob is not None:
            store.delete_blob(db, state_blob)
        return _result(db[store.MODELS].find_one({"session": session, "round": rnd + 1}))
    return _result(doc)
