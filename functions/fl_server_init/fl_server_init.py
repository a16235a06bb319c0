"""fl_server_init: partition the data (seeded), store each client's
partition and the test set, and store the round-0 global model."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pymongo

from flcommon import store
from flcommon.context import database, ids, session_spec
from flcommon.data_url import bound_credentials
from flcommon.trail import model_trail
from flcommon.user_code import code_for
from flcommon.entry import BadRequest
from flcommon.models import MODELS, OPTIMIZERS, initial_weights


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("num_clients", "num_params", "model_bytes", "num_classes", "partition_sizes")
            if k in doc}


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, _ = ids(payload)
    db = database(bound)
    done = db[store.MODELS].find_one({"session": session, "round": 0})
    if done is not None:  # idempotent: a retried init changes nothing
        return dict(_summary(done), reused=True)
    spec = session_spec(db, session)
    if spec["model"] not in MODELS or spec.get("optim", "adam") not in OPTIMIZERS:
        raise BadRequest(f"session {session}: model must be one of {MODELS}, optim one of {OPTIMIZERS}")
    t0 = time.perf_counter()
    code = code_for(spec)  # the built-ins or the session's user module
    x_tr, y_tr, x_te, y_te = code.load_data(bound_credentials(bound))
    clients: list[str] = spec["clients"]
    if not clients or len(set(clients)) != len(clients) or "_test" in clients:
        raise BadRequest("session clients must be a non-empty list of distinct ids (and not '_test')")
    parts = code.partition(y_tr, len(clients), int(spec.get("seed", 0)))
    # Partitions are a pure function of (data, clients, seed), so a previous,
    # interrupted or concurrent init wrote the very same ones: replace each
    # (unique per session and client) and drop the blob it pointed to.
    for client, idx in [*zip(clients, parts), ("_test", None)]:
        x, y = (x_te, y_te) if idx is None else (x_tr[idx], y_tr[idx])
        blob = store.put_arrays(db, [x, y], f"{session}/data/{client}.npz",
                                {"kind": "partition", "session": session, "client": client})
        old = db[store.PARTITIONS].find_one_and_replace(
            {"session": session, "client": client},
            {"session": session, "client": client, "blob_id": blob, "num_examples": int(len(y))}, upsert=True)
        if old is not None:
            store.delete_blob(db, old["blob_id"])
    n_classes = int(max(y_tr.max(), y_te.max()) + 1)
    weights = initial_weights(spec["model"], x_tr.shape[1:], n_classes, int(spec.get("seed", 0)), code=code)
    blob = store.put_arrays(db, weights, f"{session}/model/000.npz",
                            {"kind": "model", "session": session, "round": 0})
    sizes = [len(i) for i in parts]
    doc = {"session": session, "round": 0, "blob_id": blob, "num_classes": n_classes,
           "num_clients": len(clients), "num_params": int(sum(w.size for w in weights)),
           "model_bytes": int(sum(w.nbytes for w in weights)),
           "partition_sizes": {"min": int(min(sizes)), "median": float(np.median(sizes)), "max": int(max(sizes))},
           "trail": model_trail(spec, __file__), "created": time.time(), "seconds": time.perf_counter() - t0}
    try:
        db[store.MODELS].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:  # a concurrent attempt won
        store.delete_blob(db, blob)
        return dict(_summary(db[store.MODELS].find_one({"session": session, "round": 0})), reused=True)
    return _summary(doc)
