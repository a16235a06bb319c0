"""fl_client: train the round's global model on this client's partition and
store the update under (session, round, client). Returns only counts,
metrics and timings: weights never travel in the result."""
from __future__ import annotations

import time
import zlib
from typing import Any

import pymongo

from flcommon import store, update_data
from flcommon.context import database, ids, num_classes, partition_arrays, session_spec, shared_global_model
from flcommon.entry import BadRequest, require
from flcommon.models import train
from flcommon.privacy import local_dp_weights, masked_upload


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    client = require(payload, "client", str)
    attempt = require(payload, "attempt", int)
    db = database(bound)
    t0 = time.perf_counter()
    spec = session_spec(db, session)
    if client not in spec["clients"]:
        raise BadRequest(f"{client} is not a client of session {session}")
    key = {"session": session, "round": rnd, "client": client}
    # A retry or a hedge (attempt 2 on) may find its client's update landed
    # already: nothing to train. A first attempt skips the look-up (one of a
    # no-op client's seven store queries); should it run twice, the
    # update's unique key still keeps one.
    earlier = db[store.UPDATES].find_one(key, {"num_examples": 1, "metrics": 1, "attempt": 1}) \
        if attempt > 1 else None
    if earlier is not None:
        # stored_by: the keeper may have stopped tracking that attempt (given
        # up for a younger one), and then settles the client on this answer.
        return {"num_examples": earlier.get("num_examples", 0), "metrics": earlier.get("metrics", {}),
                "duplicate": True, "stored_by": earlier.get("attempt"),
                "timings": {"load_ms": round((time.perf_counter() - t0) * 1000, 1),
                            "train_ms": 0.0, "store_ms": 0.0}}
    # read-only: the warm worker serves the same arrays to its next run
    _, weights = shared_global_model(db, session, rnd)
    x, y = partition_arrays(db, session, client)
    t1 = time.perf_counter()
    seed = zlib.crc32(f"{spec.get('seed', 0)}/{rnd}/{client}".encode())
    new, metrics = train(spec, weights, x, y, num_classes(db, session), seed)
    new = local_dp_weights(spec, weights, new)  # local DP: clipped and noised before it leaves
    t2 = time.perf_counter()
    # Secure aggregation: only the masked delta is stored.
    masked, clipped = masked_upload(db, bound, spec, session, rnd, client, attempt, weights, new, int(len(y)))
    # A small update goes in its own document (one write), a larger one in GridFS.
    arrays = {"blob_id": masked} if masked else update_data.stored_fields(
        db, new, f"{session}/update/{rnd:03d}/{client}.npz",
        {"kind": "update", "session": session, "round": rnd, "client": client, "attempt": attempt})
    doc = {"session": session, "round": rnd, "client": client, "attempt": attempt, **arrays,
           "num_examples": int(len(y)), "metrics": metrics, "status": "received", "created": time.time(),
           **({"masked": True, "quantization_clipped": int(clipped)} if masked else {})}
    duplicate: dict[str, Any] = {"duplicate": False}
    try:
        db[store.UPDATES].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:
        # Another attempt of this client delivered this round while we
        # trained: keep that one, drop ours, so it is never counted twice.
        update_data.discard(db, arrays)
        stored = db[store.UPDATES].find_one(key, {"attempt": 1}) or {}
        duplicate = {"duplicate": True, "stored_by": stored.get("attempt")}
    t3 = time.perf_counter()
    return {"num_examples": int(len(y)), "metrics": metrics, **duplicate,
            "timings": {"load_ms": round((t1 - t0) * 1000, 1), "train_ms": round((t2 - t1) * 1000, 1),
                        "store_ms": round((t3 - t2) * 1000, 1)}}
