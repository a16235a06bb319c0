"""The keeper's MongoDB layer (schema: docs/store.md).

Writes from the round loop are batched (`bulk_write`) because the embedded
server is slow with many concurrent writers; every field the code filters on
has an index, because it is slow on unindexed queries too.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import numpy as np
import pymongo
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, UpdateOne

from flcommon import store as fs
from flcommon.blobs import BlobError

__all__ = ["Store", "BlobError", "SWEEPS", "connect"]

# One document per parameter sweep (`fedkeeper sweep`); only the keeper uses it.
SWEEPS = "sweeps"

INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict[str, Any]]]] = {
    fs.SESSIONS: [([("created", DESCENDING)], {}), ([("state", ASCENDING)], {})],
    fs.ROUNDS: [([("session", ASCENDING), ("round", ASCENDING)], {"unique": True}),
                ([("session", ASCENDING), ("state", ASCENDING)], {})],
    fs.INVOCATIONS: [([("session", ASCENDING), ("round", ASCENDING), ("client", ASCENDING),
                       ("attempt", ASCENDING)], {"unique": True}),
                     ([("session", ASCENDING), ("state", ASCENDING)], {}),
                     ([("platform_id", ASCENDING)], {})],
    fs.EVENTS: [([("session", ASCENDING), ("ts", ASCENDING)], {})],
    fs.UPDATES: [([("session", ASCENDING), ("round", ASCENDING), ("client", ASCENDING)], {"unique": True}),
                 ([("session", ASCENDING), ("round", ASCENDING), ("status", ASCENDING)], {})],
    fs.MODELS: [([("session", ASCENDING), ("round", ASCENDING)], {"unique": True})],
    fs.PARTITIONS: [([("session", ASCENDING), ("client", ASCENDING)], {"unique": True})],
    SWEEPS: [([("created", DESCENDING)], {})],
    f"{fs.BUCKET}.files": [([("metadata.session", ASCENDING), ("metadata.kind", ASCENDING)], {})],
}


class Store:
    def __init__(self, url: str, db_name: str):
        self.url = url
        self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=10_000)
        self.db = self.client[db_name]

    def close(self) -> None:
        self.client.close()

    def ping(self) -> None:
        self.client.admin.command("ping")

    def ensure_indexes(self) -> None:
        # The functions' own (uniqueness, GridFS) indexes first: they write
        # GridFS chunks directly and rely on the unique keys for correctness.
        fs.ensure_function_indexes(self.db)
        for coll, specs in INDEXES.items():
            for keys, opts in specs:
                self.db[coll].create_index(keys, **opts)

    # ------------------------------------------------------------- sessions
    def create_session(self, doc: dict[str, Any]) -> None:
        doc.setdefault("created", time.time())
        doc.setdefault("state", "created")
        self.db[fs.SESSIONS].insert_one(doc)

    def session(self, session_id: str) -> dict[str, Any] | None:
        return self.db[fs.SESSIONS].find_one({"_id": session_id})

    def latest_session(self) -> dict[str, Any] | None:
        return self.db[fs.SESSIONS].find_one(sort=[("created", DESCENDING)])

    def update_session(self, session_id: str, **fields: Any) -> None:
        self.db[fs.SESSIONS].update_one({"_id": session_id}, {"$set": fields})

    # ------------------------------------------------------------- rounds
    def upsert_round(self, session: str, rnd: int, **fields: Any) -> None:
        self.db[fs.ROUNDS].update_one({"session": session, "round": rnd},
                                      {"$set": fields, "$setOnInsert": {"session": session, "round": rnd}},
                                      upsert=True)

    def round(self, session: str, rnd: int) -> dict[str, Any] | None:
        return self.db[fs.ROUNDS].find_one({"session": session, "round": rnd})

    def rounds(self, session: str) -> list[dict[str, Any]]:
        return list(self.db[fs.ROUNDS].find({"session": session}).sort("round", ASCENDING))

    # ------------------------------------------------------------- invocations
    def insert_attempts(self, docs: Sequence[dict[str, Any]]) -> None:
        if docs:
            self.db[fs.INVOCATIONS].insert_many(list(docs), ordered=False)

    def update_attempts(self, changes: Iterable[tuple[Any, dict[str, Any]]]) -> None:
        ops = [UpdateOne({"_id": _id}, {"$set": fields}) for _id, fields in changes]
        if ops:
            self.db[fs.INVOCATIONS].bulk_write(ops, ordered=False)

    def attempts(self, session: str, rnd: int | None = None) -> list[dict[str, Any]]:
        q: dict[str, Any] = {"session": session}
        if rnd is not None:
            q["round"] = rnd
        return list(self.db[fs.INVOCATIONS].find(q).sort([("round", 1), ("client", 1), ("attempt", 1)]))

    # ------------------------------------------------------------- events
    def event(self, session: str, kind: str, message: str, **data: Any) -> None:
        self.db[fs.EVENTS].insert_one({"session": session, "ts": time.time(), "kind": kind,
                                       "message": message, **data})

    def events(self, session: str) -> list[dict[str, Any]]:
        return list(self.db[fs.EVENTS].find({"session": session}).sort("ts", ASCENDING))

    # ------------------------------------------------------------- updates, models
    def delivered_clients(self, session: str, rnd: int) -> set[str]:
        cur = self.db[fs.UPDATES].find({"session": session, "round": rnd}, {"client": 1})
        return {d["client"] for d in cur}

    def updates(self, session: str, rnd: int | None = None) -> list[dict[str, Any]]:
        q: dict[str, Any] = {"session": session}
        if rnd is not None:
            q["round"] = rnd
        return list(self.db[fs.UPDATES].find(q).sort([("round", 1), ("client", 1)]))

    def model(self, session: str, rnd: int) -> dict[str, Any] | None:
        return self.db[fs.MODELS].find_one({"session": session, "round": rnd})

    # ------------------------------------------------------------- sweeps
    def create_sweep(self, doc: dict[str, Any]) -> bool:
        """Insert a sweep document; False when one with its id exists."""
        doc.setdefault("created", time.time())
        try:
            self.db[SWEEPS].insert_one(doc)
            return True
        except pymongo.errors.DuplicateKeyError:
            return False

    def sweep(self, sweep_id: str) -> dict[str, Any] | None:
        return self.db[SWEEPS].find_one({"_id": sweep_id})

    def update_sweep(self, sweep_id: str, **fields: Any) -> None:
        """$set on the sweep document; dotted keys reach into one run."""
        self.db[SWEEPS].update_one({"_id": sweep_id}, {"$set": {**fields, "updated": time.time()}})

    # ------------------------------------------------------------- blobs
    def put_arrays(self, arrays: Sequence[np.ndarray], filename: str, **metadata: Any) -> ObjectId:
        return fs.put_arrays(self.db, arrays, filename, metadata)

    def get_arrays(self, blob_id: ObjectId) -> list[np.ndarray]:
        return fs.get_arrays(self.db, blob_id)


# A running keeper writes `heartbeat` (epoch seconds) on its session document
# every HEARTBEAT_S; a `running` session whose heartbeat is older than
# STALE_AFTER_S has lost its keeper (killed, machine gone) and is shown as
# `interrupted`, like one the user stopped with Ctrl-C.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


def effective_state(session_doc: dict[str, Any], now: float | None = None) -> str:
    """The state to show for a session: its stored state, except that a
    `running` session without a live keeper is `interrupted`."""
    state = session_doc.get("state", "created")
    if state != "running":
        return state
    now = time.time() if now is None else now
    beat = session_doc.get("heartbeat")
    if beat is None:
        return state  # written before heartbeats existed: cannot tell
    return "interrupted" if now - float(beat) > STALE_AFTER_S else state


def connect(url: str, db_name: str) -> Store:
    store = Store(url, db_name)
    store.ping()
    store.ensure_indexes()
    return store
