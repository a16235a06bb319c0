"""fl_server_aggregator: turn the global model of round R and the updates the
keeper lists into model R+1, with the session's aggregation strategy.

Payload: {session, round: R, clients: [ids whose round-R update to use],
stale: [{"client": c, "round": r}, ...] (optional, r < R)}.

Every update becomes a delta against the global model its client trained
from (model r for a stale update) and is weighted
num_examples * (1 + staleness) ** -staleness_exponent. Updates are streamed
from GridFS one at a time (the next one read while the current one is
added), none may decode to more than the model's size, and each is checked
whole before the strategy sees it; invalid ones are rejected with a recorded
reason and the round aggregates the rest. An update already counted
by the aggregation of another round is rejected, never counted twice.
Server-optimizer state (momentum, moments) is a blob referenced by the
models document and read back by the next aggregation."""
from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import numpy as np
import pymongo

from flcommon.strategies import Strategy, StrategyError, get_strategy
from flcommon import store
from flcommon.blobs import BlobError
from flcommon.context import database, global_model, ids, num_classes, partition_arrays, session_spec
from flcommon.entry import BadRequest, require
from flcommon.read_ahead import read_ahead
from flcommon.update_check import UpdateRejected, check_layout, subtract_base
from flcommon.models import evaluate
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
            "stale_accepted": sum(1 for c in doc.get("contributions", []) if c.get("staleness", 0) > 0)}


def _wanted(payload: dict[str, Any], rnd: int) -> list[tuple[str, int]]:
    """(client, model round) of every update to aggregate, each once, the
    round's own updates first."""
    clients = require(payload, "clients", list)  # of ids, as entry.check_fields made sure
    wanted = [(c, rnd) for c in clients]
    for item in payload.get("stale") or []:      # of {client, round}, likewise
        if not item["round"] < rnd:
            raise BadRequest(f"stale update of {item['client']} is for round {item['round']}; "
                             f"a stale update's round must be below {rnd}")
        wanted.append((item["client"], item["round"]))
    wanted = list(dict.fromkeys(wanted))  # listed twice still counts once
    if not wanted:
        raise BadRequest("clients and stale name no update to aggregate")
    return wanted


def _examples(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise UpdateRejected(f"num_examples must be a positive integer, got {n!r}")
    return int(n)


class Candidate(NamedTuple):
    """An update that passed the checks made without reading it."""
    index: int            # its place in the wanted list: rejections are reported in that order
    client: str
    round: int
    blob_id: Any
    files_doc: dict[str, Any]
    num_examples: int


def _candidates(db, session: str, rnd: int, wanted: list[tuple[str, int]]) -> tuple[list[Candidate], list[dict]]:
    """The listed updates worth reading, and the rejections decided from
    their documents alone (missing, counted already, someone else's blob,
    an inflated example count, no base model)."""
    by_round: dict[int, list[str]] = {}
    for client, r in wanted:
        by_round.setdefault(r, []).append(client)
    docs: dict[tuple[str, int], dict] = {}
    for r, clients in by_round.items():
        for d in db[store.UPDATES].find({"session": session, "round": r, "client": {"$in": clients}}):
            docs[(d["client"], d["round"])] = d
    # The partition sizes init wrote: a client cannot inflate its weight by
    # claiming more examples than it holds.
    sizes = {d["client"]: d.get("num_examples") for d in db[store.PARTITIONS].find(
        {"session": session, "client": {"$in": sorted({c for c, _ in wanted})}}, {"client": 1, "num_examples": 1})}
    blobs = {d["_id"]: d for d in db[f"{store.BUCKET}.files"].find(
        {"_id": {"$in": [d["blob_id"] for d in docs.values() if "blob_id" in d]}},
        {"metadata": 1, "length": 1, "chunkSize": 1})}
    has_base = {d["round"] for d in db[store.MODELS].find(
        {"session": session, "round": {"$in": [r for r in by_round if r != rnd]}}, {"round": 1, "blob_id": 1})
        if d.get("blob_id") is not None}
    candidates: list[Candidate] = []
    rejected: list[dict[str, Any]] = []
    for index, (client, r) in enumerate(wanted):
        doc = docs.get((client, r))
        if doc is None:
            reason = "no update stored for this round" if r == rnd else f"no update stored for round {r}"
            rejected.append({"index": index, "client": client, "round": r, "reason": reason, "mark": False})
            continue
        done_in = doc.get("aggregated_in", doc.get("round"))
        if doc.get("status") == "accepted" and done_in != rnd:
            # Counted already; its record stays as that aggregation left it.
            rejected.append({"index": index, "client": client, "round": r,
                             "reason": f"already aggregated in round {done_in}", "mark": False})
            continue
        try:
            if doc.get("blob_id") not in blobs:
                raise UpdateRejected("update blob does not exist")
            files_doc = blobs[doc["blob_id"]]
            meta = files_doc.get("metadata") or {}
            if meta.get("round") != r or meta.get("session") != session or meta.get("client") != client:
                raise UpdateRejected(f"update blob belongs to session {meta.get('session')}, "
                                     f"round {meta.get('round')}, client {meta.get('client')}")
            n = _examples(doc.get("num_examples"))
            if sizes.get(client) is not None and n != sizes[client]:
                raise UpdateRejected(f"update claims {n} examples, the client's partition has {sizes[client]}")
            if r != rnd and r not in has_base:
                raise UpdateRejected(f"no global model of round {r} to take the delta against")
        except UpdateRejected as exc:
            rejected.append({"index": index, "client": client, "round": r, "reason": str(exc)[:300], "mark": True})
            continue
        candidates.append(Candidate(index, client, r, doc["blob_id"], files_doc, n))
    return candidates, rejected


def aggregate(db, session: str, rnd: int, wanted: list[tuple[str, int]], global_weights: list[np.ndarray],
              strategy: Strategy, staleness_exponent: float = 0.5) -> tuple[list[dict], list[dict]]:
    """Feed the strategy the delta of every valid listed update (a streaming
    strategy adds it to its accumulator and drops it). The next update is
    read from the store while the current one is added (flcommon.read_ahead),
    so at most two updates are held besides the accumulator; no update may
    decode to more than the model's size. Returns (contributions,
    rejections): contributions in the order added, rejections in the order
    listed; the caller then calls strategy.finish()."""
    reference = [(w.shape, w.dtype) for w in global_weights]
    model_bytes = sum(w.nbytes for w in global_weights)
    strategy.begin(reference)
    candidates, rejected = _candidates(db, session, rnd, wanted)
    base_blobs = {d["round"]: d["blob_id"] for d in db[store.MODELS].find(
        {"session": session, "round": {"$in": sorted({c.round for c in candidates if c.round != rnd})}},
        {"round": 1, "blob_id": 1})}

    def read(c: Candidate) -> list[np.ndarray]:
        return store.get_arrays(db, c.blob_id, max_bytes=model_bytes, files_doc=c.files_doc, prefetch=True)

    accepted: list[dict[str, Any]] = []
    for c, arrays, error in read_ahead(candidates, read, expected=(BlobError,)):
        try:
            if error is not None:
                raise error
            check_layout(arrays, reference)
            base = global_weights if c.round == rnd else \
                store.stream_arrays(db, base_blobs[c.round], max_bytes=model_bytes)
            delta = subtract_base(arrays, base)
            del arrays
            staleness = rnd - c.round
            weight = c.num_examples * (1.0 + staleness) ** -staleness_exponent
            strategy.add(delta, weight, mass=c.num_examples)
            del delta
            accepted.append({"client": c.client, "round": c.round, "staleness": staleness,
                             "num_examples": c.num_examples, "raw_weight": weight})
        except (UpdateRejected, BlobError, StrategyError) as exc:
            arrays = delta = None  # released before the next update is taken
            rejected.append({"index": c.index, "client": c.client, "round": c.round, "reason": str(exc)[:300],
                             "mark": True})
    rejected.sort(key=lambda r: r["index"])
    for r in rejected:
        del r["index"]
    return accepted, rejected


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
    accepted, rejected = aggregate(db, session, rnd, wanted, weights, strategy, exponent)
    for r in rejected:
        if r.pop("mark"):
            db[store.UPDATES].update_one({"session": session, "round": r["round"], "client": r["client"],
                                          "status": {"$ne": "accepted"}},
                                         {"$set": {"status": "rejected", "reason": r["reason"]}})
    if not accepted:
        return {"error": f"round {rnd}: no valid update to aggregate", "rejected": _listed(rejected),
                "rejected_count": len(rejected)}
    state = None
    if strategy.stateful and current.get("state_blob_id") is not None:
        try:
            # float32 arrays of the strategy's state layout, nothing more
            state_bytes = 4 * sum(math.prod(shape) for shape in strategy.state_layout())
            state = store.get_arrays(db, current["state_blob_id"], max_bytes=state_bytes)
        except BlobError as exc:
            return {"error": f"round {rnd}: server state of model {rnd} is unreadable: {exc}"}
    try:
        new, new_state = strategy.finish(weights, state)
    except StrategyError as exc:
        return {"error": f"round {rnd}: {exc}"}
    del weights, state
    contributions = [{"client": a["client"], "round": a["round"], "staleness": a["staleness"],
                      "num_examples": a["num_examples"], "weight": share}
                     for a, share in zip(accepted, strategy.shares())]
    x, y = partition_arrays(db, session, "_test")
    metrics = evaluate(spec, new, x, y, num_classes(db, session))
    blob = store.put_arrays(db, new, f"{session}/model/{rnd + 1:03d}.npz",
                            {"kind": "model", "session": session, "round": rnd + 1})
    state_blob = None
    if new_state is not None:
        state_blob = store.put_arrays(db, new_state, f"{session}/state/{rnd + 1:03d}.npz",
                                      {"kind": "state", "session": session, "round": rnd + 1,
                                       "strategy": strategy.name})
    for c in contributions:
        db[store.UPDATES].update_one({"session": session, "round": c["round"], "client": c["client"]},
                                     {"$set": {"status": "accepted", "aggregated_in": rnd,
                                               "staleness": c["staleness"], "weight": c["weight"]},
                                      "$unset": {"reason": ""}})
    doc = {"session": session, "round": rnd + 1, "blob_id": blob, "metrics": metrics,
           "accepted": len(contributions), "accepted_clients": [c["client"] for c in contributions],
           "rejected": rejected, "contributions": contributions, "strategy": strategy.name,
           "num_examples": sum(c["num_examples"] for c in contributions),
           "trail": model_trail(spec, __file__, parent=current, contributions=contributions),
           "created": time.time(), "seconds": time.perf_counter() - t0}
    if state_blob is not None:
        doc["state_blob_id"] = state_blob
    try:
        db[store.MODELS].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:
        store.delete_blob(db, blob)
        if state_blob is not None:
            store.delete_blob(db, state_blob)
        return _result(db[store.MODELS].find_one({"session": session, "round": rnd + 1}))
    return _result(doc)
