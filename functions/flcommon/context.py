"""What every FL function needs from the store: its database, the session's
spec, a data partition and the global model of a round.

Warm workers keep what never changes: a session's spec (written once by the
keeper before anything is invoked), its model's size and its number of
classes (recorded once by fl_server_init), data partitions (written once by
fl_server_init, keyed by blob id, so a re-initialised session can never be
served stale data) and their sizes (a pure function of the session's data,
clients and seed). A global model's blob is never rewritten either, so a
client keeps the last one it decoded, by blob id (shared_global_model);
which blob is a round's model, and updates, are read fresh every time.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from . import store
from .entry import BadRequest, require
from .lru import ByteLRU

_specs: dict[tuple[int, str, str], dict[str, Any]] = {}
_model_bytes: dict[tuple[int, str, str], int] = {}
_num_classes: dict[tuple[int, str, str], int] = {}
_parts: "OrderedDict[tuple[int, str, str], list[np.ndarray]]" = OrderedDict()
_sizes: "OrderedDict[tuple[int, str, str], dict[str, Any]]" = OrderedDict()
SIZES_SESSIONS = 8
_parts_bytes = 0
_lock = threading.Lock()


def _model_cache_limit() -> int:
    # A warm client holds one global model between runs: the next one it
    # decodes replaces it (shared_global_model). A model over this bound is
    # read every time, as before.
    return int(float(os.environ.get("FK_MODEL_CACHE_MB", "64")) * 1e6)


_models = ByteLRU(_model_cache_limit())


def _cache_limit() -> int:
    # Bounded so that a worker serving many clients cannot grow without end;
    # MNIST's 60k training images are 188 MB as float32, a client's share far less.
    return int(float(os.environ.get("FK_PARTITION_CACHE_MB", "256")) * 1e6)


def database(bound: dict[str, str]):
    url, name = bound.get("FK_STORE_URL"), bound.get("FK_STORE_DB")
    if not url or not name:
        raise RuntimeError("FK_STORE_URL / FK_STORE_DB are not bound to this function")
    return store.database(url, name)


def session_spec(db, session: str) -> dict[str, Any]:
    key = (id(db.client), db.name, session)
    spec = _specs.get(key)
    if spec is None:
        doc = db[store.SESSIONS].find_one({"_id": session}, {"spec": 1})
        if doc is None or not isinstance(doc.get("spec"), dict):
            raise BadRequest(f"no session {session!r} in the store")
        spec = doc["spec"]
        for field in ("model", "clients"):
            if field not in spec:
                raise BadRequest(f"session {session!r} has no {field} in its spec")
        _specs[key] = spec
    return spec


def ids(payload: dict[str, Any]) -> tuple[str, int]:
    """(session, round) of a payload whose fields entry.check_fields bounded."""
    return require(payload, "session", str), require(payload, "round", int)


def model_bytes(db, session: str) -> int | None:
    """The size of the session's model, as fl_server_init recorded it with
    model 0 (None before init or for sessions initialised without it).
    Every later model has that size, so it bounds what reading one decodes."""
    key = (id(db.client), db.name, session)
    size = _model_bytes.get(key)
    if size is None:
        doc = db[store.MODELS].find_one({"session": session, "round": 0}, {"model_bytes": 1})
        value = (doc or {}).get("model_bytes")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return None
        size = _model_bytes[key] = value
    return size


def global_model(db, session: str, rnd: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    doc = db[store.MODELS].find_one({"session": session, "round": rnd})
    if doc is None:
        raise BadRequest(f"no global model for round {rnd + 1} of session {session}")
    return doc, store.get_arrays(db, doc["blob_id"], max_bytes=model_bytes(db, session))


def _read_only_views(arrays: list[np.ndarray]) -> list[np.ndarray]:
    # A view of a read-only array cannot be made writeable again, so no
    # caller can change what the next run is served; a view costs nothing.
    views = []
    for a in arrays:
        v = a.view()
        v.flags.writeable = False
        views.append(v)
    return views


def shared_global_model(db, session: str, rnd: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """global_model, its arrays read-only: served from the warm worker's
    copy when its blob is the one decoded last, so a client of every round
    reads one small document, not the model, after its first run."""
    doc = db[store.MODELS].find_one({"session": session, "round": rnd})
    if doc is None:
        raise BadRequest(f"no global model for round {rnd + 1} of session {session}")
    key = (id(db.client), db.name, str(doc["blob_id"]))
    arrays = _models.get(key)
    if arrays is None:
        # One model at a time: the last one goes before the next is decoded,
        # so the worker never holds two of them for the cache's sake.
        _models.clear()
        arrays = store.get_arrays(db, doc["blob_id"], max_bytes=model_bytes(db, session))
        for a in arrays:
            a.flags.writeable = False
        _models.put(key, arrays, sum(a.nbytes for a in arrays))
    return doc, _read_only_views(arrays)


def partition_sizes(db, session: str, clients: list[str]) -> dict[str, Any]:
    """num_examples of each client's partition (None when it has none).
    Partitions are a pure function of the session's data, clients and seed,
    written before model 0 (fl_server_init), so a warm worker keeps the
    sizes it read, for its last SIZES_SESSIONS sessions: an aggregation of
    1,000 updates asked for them in 32 queries every round."""
    key = (id(db.client), db.name, session)
    with _lock:
        known = _sizes.get(key) or {}
        if known:
            _sizes.move_to_end(key)   # the least recently used session goes first
        missing = [c for c in clients if c not in known]
        out = {c: known[c] for c in clients if c in known}
    if missing:
        found = {d["client"]: d.get("num_examples") for d in store.find_in(
            db[store.PARTITIONS], {"session": session}, "client", sorted(set(missing)),
            {"client": 1, "num_examples": 1})}
        out.update(found)
        with _lock:
            _sizes.setdefault(key, {}).update(found)
            _sizes.move_to_end(key)
            while len(_sizes) > SIZES_SESSIONS:
                _sizes.popitem(last=False)
    return {c: out.get(c) for c in clients}


def partition_arrays(db, session: str, client: str) -> list[np.ndarray]:
    """[x, y] of a client's partition ("_test" is the test set), cached by blob id."""
    global _parts_bytes
    doc = db[store.PARTITIONS].find_one({"session": session, "client": client}, {"blob_id": 1})
    if doc is None:
        raise BadRequest(f"no data partition for {client} in session {session}")
    key = (id(db.client), db.name, str(doc["blob_id"]))
    with _lock:
        hit = _parts.get(key)
        if hit is not None:
            _parts.move_to_end(key)
            return hit
    arrays = store.get_arrays(db, doc["blob_id"])
    if len(arrays) != 2 or len(arrays[0]) != len(arrays[1]) or len(arrays[1]) == 0:
        raise BadRequest(f"data partition of {client} in session {session} is malformed")
    for a in arrays:
        a.flags.writeable = False  # shared between invocations: nobody may modify it
    size = sum(a.nbytes for a in arrays)
    with _lock:
        if size <= _cache_limit():
            _parts[key] = arrays
            _parts_bytes += size
            while _parts_bytes > _cache_limit():
                _, old = _parts.popitem(last=False)
                _parts_bytes -= sum(a.nbytes for a in old)
    return arrays


def num_classes(db, session: str) -> int:
    # Cached like the model's size: every client run asked the store again,
    # one query of a no-op client's seven.
    key = (id(db.client), db.name, session)
    n = _num_classes.get(key)
    if n is None:
        doc = db[store.MODELS].find_one({"session": session, "round": 0}, {"num_classes": 1})
        if not (doc and doc.get("num_classes")):
            return 10
        n = _num_classes[key] = int(doc["num_classes"])
    return n
