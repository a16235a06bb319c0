"""fl_server_aggregator: FedAvg over exactly the clients the keeper lists for
the round, streamed from GridFS one update at a time; invalid updates are
rejected with a recorded reason; the new global model is evaluated and
stored as round r+1."""
from __future__ import annotations

import time
from typing import Any

import pymongo

from flcommon import store
from flcommon.blobs import BlobError
from flcommon.context import database, global_model, ids, num_classes, partition_arrays, session_spec
from flcommon.entry import BadRequest, require
from flcommon.fedavg import StreamingFedAvg, UpdateRejected
from flcommon.models import evaluate


MAX_LISTED = 20  # rejections listed in a result: keeps it far below any payload limit


def _listed(rejected: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"client": r["client"], "reason": r["reason"][:200]} for r in rejected[:MAX_LISTED]]


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    """The small result the keeper gets; the models doc has the full lists."""
    m = doc.get("metrics", {})
    rejected = doc.get("rejected", [])
    return {"round": doc["round"] - 1, "model_round": doc["round"], "loss": m.get("loss"),
            "accuracy": m.get("accuracy"), "accepted": doc.get("accepted", 0),
            "rejected": _listed(rejected), "rejected_count": len(rejected)}


def aggregate(db, session: str, rnd: int, clients: list[str], reference) -> tuple[StreamingFedAvg, list, list]:
    """FedAvg over the listed clients' round-`rnd` updates, one update in
    memory at a time. Returns (aggregate, accepted clients, rejections)."""
    agg = StreamingFedAvg(reference)
    accepted: list[str] = []
    rejected: list[dict[str, str]] = []
    clients = list(dict.fromkeys(clients))  # a client listed twice still counts once
    docs = {d["client"]: d for d in db[store.UPDATES].find(
        {"session": session, "round": rnd, "client": {"$in": clients}})}
    # The partition sizes init wrote: a client cannot inflate its weight by
    # claiming more examples than it holds.
    sizes = {d["client"]: d.get("num_examples") for d in db[store.PARTITIONS].find(
        {"session": session, "client": {"$in": clients}}, {"client": 1, "num_examples": 1})}
    blobs = {d["_id"]: d.get("metadata") or {} for d in db[f"{store.BUCKET}.files"].find(
        {"_id": {"$in": [d["blob_id"] for d in docs.values() if "blob_id" in d]}}, {"metadata": 1})}
    for client in clients:
        doc = docs.get(client)
        if doc is None:
            rejected.append({"client": client, "reason": "no update stored for this round"})
            continue
        try:
            if doc.get("round") != rnd:
                raise UpdateRejected(f"update is for round {doc.get('round')}, not {rnd}")
            if doc.get("blob_id") not in blobs:
                raise UpdateRejected("update blob does not exist")
            meta = blobs[doc["blob_id"]]
            if meta.get("round") != rnd or meta.get("session") != session or meta.get("client") != client:
                raise UpdateRejected(f"update blob belongs to session {meta.get('session')}, "
                                     f"round {meta.get('round')}, client {meta.get('client')}")
            n = doc.get("num_examples")
            if sizes.get(client) is not None and n != sizes[client]:
                raise UpdateRejected(f"update claims {n} examples, the client's partition has {sizes[client]}")
            agg.add(store.get_arrays(db, doc["blob_id"]), n)
            accepted.append(client)
        except (UpdateRejected, BlobError) as exc:
            rejected.append({"client": client, "reason": str(exc)[:300]})
    return agg, accepted, rejected


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    clients = require(payload, "clients", list)
    if not clients or not all(isinstance(c, str) for c in clients):
        raise BadRequest("clients must be a non-empty list of client ids")
    db = database(bound)
    done = db[store.MODELS].find_one({"session": session, "round": rnd + 1})
    if done is not None:  # idempotent: a retried aggregation changes nothing
        return _result(done)
    spec = session_spec(db, session)
    t0 = time.perf_counter()
    _, weights = global_model(db, session, rnd)
    reference = [(w.shape, w.dtype) for w in weights]
    del weights
    agg, accepted, rejected = aggregate(db, session, rnd, clients, reference)
    for r in rejected:
        db[store.UPDATES].update_one({"session": session, "round": rnd, "client": r["client"]},
                                     {"$set": {"status": "rejected", "reason": r["reason"]}})
    if not accepted:
        return {"error": f"round {rnd}: no valid update to aggregate", "rejected": _listed(rejected),
                "rejected_count": len(rejected)}
    db[store.UPDATES].update_many({"session": session, "round": rnd, "client": {"$in": accepted}},
                                  {"$set": {"status": "accepted"}})
    new = agg.result()
    x, y = partition_arrays(db, session, "_test")
    metrics = evaluate(spec, new, x, y, num_classes(db, session))
    blob = store.put_arrays(db, new, f"{session}/model/{rnd + 1:03d}.npz",
                            {"kind": "model", "session": session, "round": rnd + 1})
    doc = {"session": session, "round": rnd + 1, "blob_id": blob, "metrics": metrics,
           "accepted": len(accepted), "accepted_clients": accepted, "rejected": rejected,
           "num_examples": agg.total, "created": time.time(), "seconds": time.perf_counter() - t0}
    try:
        db[store.MODELS].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:
        store.delete_blob(db, blob)
        return _result(db[store.MODELS].find_one({"session": session, "round": rnd + 1}))
    return _result(doc)
