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
from flcommon.context import database, global_model, ids, num_classes, session_spec
from flcommon.entry import BadRequest, require
from flcommon.fedavg import StreamingFedAvg, UpdateRejected
from flcommon.models import evaluate


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    m = doc.get("metrics", {})
    return {"round": doc["round"] - 1, "model_round": doc["round"], "loss": m.get("loss"),
            "accuracy": m.get("accuracy"), "accepted": doc.get("accepted", 0),
            "rejected": doc.get("rejected", [])}


def aggregate(db, session: str, rnd: int, clients: list[str], reference) -> tuple[StreamingFedAvg, list, list]:
    agg = StreamingFedAvg(reference)
    accepted: list[str] = []
    rejected: list[dict[str, str]] = []
    docs = {d["client"]: d for d in db[store.UPDATES].find(
        {"session": session, "round": rnd, "client": {"$in": clients}})}
    for client in clients:
        doc = docs.get(client)
        if doc is None:
            rejected.append({"client": client, "reason": "no update stored for this round"})
            continue
        try:
            if doc.get("round") != rnd:
                raise UpdateRejected(f"update is for round {doc.get('round')}, not {rnd}")
            meta = (db[f"{store.BUCKET}.files"].find_one({"_id": doc["blob_id"]}, {"metadata": 1}) or {}).get(
                "metadata") or {}
            if meta.get("round") != rnd or meta.get("session") != session or meta.get("client") != client:
                raise UpdateRejected(f"update blob belongs to session {meta.get('session')}, "
                                     f"round {meta.get('round')}, client {meta.get('client')}")
            agg.add(store.get_arrays(db, doc["blob_id"]), doc.get("num_examples"))
            accepted.append(client)
        except (UpdateRejected, BlobError) as exc:
            rejected.append({"client": client, "reason": str(exc)})
    return agg, accepted, rejected


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    clients = require(payload, "clients", list)
    if not all(isinstance(c, str) for c in clients):
        raise BadRequest("clients must be a list of client ids")
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
        return {"error": f"round {rnd}: no valid update to aggregate", "rejected": rejected}
    db[store.UPDATES].update_many({"session": session, "round": rnd, "client": {"$in": accepted}},
                                  {"$set": {"status": "accepted"}})
    new = agg.result()
    test = db[store.PARTITIONS].find_one({"session": session, "client": "_test"})
    x, y = store.get_arrays(db, test["blob_id"])
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
