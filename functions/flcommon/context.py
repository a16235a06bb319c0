"""What every FL function needs from the store: its database, the
session's (immutable) spec, and the global model of a round."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import store
from .entry import BadRequest, require

_specs: dict[tuple[str, str, str], dict[str, Any]] = {}


def database(bound: dict[str, str]):
    url, name = bound.get("FK_STORE_URL"), bound.get("FK_STORE_DB")
    if not url or not name:
        raise RuntimeError("FK_STORE_URL / FK_STORE_DB are not bound to this function")
    return store.database(url, name)


def session_spec(db, session: str) -> dict[str, Any]:
    key = (db.client.address and str(db.client.address), db.name, session)
    spec = _specs.get(key)
    if spec is None:
        doc = db[store.SESSIONS].find_one({"_id": session}, {"spec": 1})
        if doc is None or "spec" not in doc:
            raise BadRequest(f"no session {session!r} in the store")
        spec = _specs[key] = doc["spec"]
    return spec


def ids(payload: dict[str, Any]) -> tuple[str, int]:
    return require(payload, "session", str), require(payload, "round", int)


def global_model(db, session: str, rnd: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    doc = db[store.MODELS].find_one({"session": session, "round": rnd})
    if doc is None:
        raise BadRequest(f"no global model for round {rnd} of session {session}")
    return doc, store.get_arrays(db, doc["blob_id"])


def num_classes(db, session: str) -> int:
    doc = db[store.MODELS].find_one({"session": session, "round": 0}, {"num_classes": 1})
    return int(doc["num_classes"]) if doc else 10
