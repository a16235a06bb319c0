"""The keeper's MongoDB layer (schema: docs/store.md). Every query the keeper
makes is a method here.

Writes from the round loop are batched (`bulk_write`) because the embedded
server is slow with many concurrent writers. Queries the round loop makes
are served by an index, except the session's attempts by state, since
every index is paid on every write (OBSOLETE_INDEXES). Those are asked
once at a session's end or resume, and once a round by the `reliability`
selection, whose answer is most of the session's attempts anyway: MongoDB
serves them from the unique index's session prefix; the embedded store
scans, reading only the session's own documents in full (0.6 s for
20,000 attempts).

Every call waits out a store that stopped answering for at most
`Store.patience_s` (0: pymongo's own server selection wait only), then
raises `StoreUnavailable` (store/patience.py).

Rounds are numbered from 0 in the store (as every session ever written);
what a user sees counts them from 1.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pymongo
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, UpdateOne

from flcommon import store as fs
from flcommon.blobs import BlobError
from flcommon.update_data import WITHOUT_DATA

from .patience import SERVER_SELECTION_MS, Patience, StoreUnavailable, display_address

__all__ = ["Store", "BlobError", "SWEEPS", "StoreUnavailable", "connect", "effective_state",
           "HEARTBEAT_S", "STALE_AFTER_S"]

# One document per parameter sweep (`fedkeeper sweep`); only the keeper uses it.
SWEEPS = "sweeps"

# Running marks of attempts that ran past their hold, one document per
# batch (keeper/running_marks.py); folded into the attempts they name when
# a keeper resumes or is interrupted, and dropped when the session ends.
RUNNING_MARKS = "running_marks"

INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict[str, Any]]]] = {
    fs.SESSIONS: [([("created", DESCENDING)], {}), ([("state", ASCENDING)], {})],
    fs.ROUNDS: [([("session", ASCENDING), ("round", ASCENDING)], {"unique": True}),
                ([("session", ASCENDING), ("state", ASCENDING)], {})],
    fs.INVOCATIONS: [([("session", ASCENDING), ("round", ASCENDING), ("client", ASCENDING),
                       ("attempt", ASCENDING)], {"unique": True})],
    fs.EVENTS: [([("session", ASCENDING), ("ts", ASCENDING)], {})],
    # (session, status, round): semi_async and async list and count the
    # updates still waiting for an aggregation (one status, a range of
    # rounds) every step. Equalities first: with the range on round ahead
    # of status, the embedded store scanned every update of the session.
    fs.UPDATES: [([("session", ASCENDING), ("round", ASCENDING), ("client", ASCENDING)], {"unique": True}),
                 ([("session", ASCENDING), ("status", ASCENDING), ("round", ASCENDING)], {})],
    fs.MODELS: [([("session", ASCENDING), ("round", ASCENDING)], {"unique": True})],
    fs.PARTITIONS: [([("session", ASCENDING), ("client", ASCENDING)], {"unique": True})],
    SWEEPS: [([("created", DESCENDING)], {})],
    RUNNING_MARKS: [([("session", ASCENDING)], {})],
    f"{fs.BUCKET}.files": [([("metadata.session", ASCENDING), ("metadata.kind", ASCENDING)], {})],
}

# Indexes earlier versions created on the attempts, which a round writes
# three times per client, dropped from a store that has them. The embedded
# store rewrites every index entry of a document it updates, whichever
# fields changed: each secondary index added 0.2-0.4 ms to every attempt
# update and 0.1-0.2 ms to every insert. Nothing queries by platform id,
# and the queries of attempts by state need no index of their own (see the
# module's note).
OBSOLETE_INDEXES: dict[str, list[str]] = {
    fs.INVOCATIONS: ["session_1_state_1", "platform_id_1"],
    fs.UPDATES: ["session_1_round_1_status_1"],   # replaced by (session, status, round)
}

# A running keeper writes `heartbeat` (epoch seconds) on its session document
# every HEARTBEAT_S; a `running` session whose heartbeat is older than
# STALE_AFTER_S has lost its keeper (killed, machine gone) and is shown as
# `interrupted`, like one the user stopped with Ctrl-C.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


#: what names a session's keeper (fedkeeper/keeper/session_owner.py)
OWNER_FIELDS = ("host", "pid", "started")


class Store:
    def __init__(self, url: str, db_name: str, patience_s: float = 0.0):
        self.url = url
        self.where = display_address(url)
        self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=SERVER_SELECTION_MS)
        self.db = self.client[db_name]
        self.patience = Patience(self.where, patience_s)

    @property
    def patience_s(self) -> float:
        return self.patience.patience_s

    @patience_s.setter
    def patience_s(self, value: float) -> None:
        self.patience.patience_s = value

    def _run(self, fn, *args: Any, **kwargs: Any):
        return self.patience.run(fn, *args, **kwargs)

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
        for coll, names in OBSOLETE_INDEXES.items():
            present = set(self.db[coll].index_information())
            for name in names:
                if name in present:
                    try:
                        self.db[coll].drop_index(name)
                    except pymongo.errors.OperationFailure:
                        pass   # another keeper starting at once dropped it first

    # ------------------------------------------------------------- sessions
    def create_session(self, doc: dict[str, Any]) -> None:
        doc.setdefault("created", time.time())
        doc.setdefault("state", "created")
        self._run(self.db[fs.SESSIONS].insert_one, doc, insert=True)

    def session(self, session_id: str) -> dict[str, Any] | None:
        return self._run(self.db[fs.SESSIONS].find_one, {"_id": session_id})

    def latest_session(self) -> dict[str, Any] | None:
        return self._run(self.db[fs.SESSIONS].find_one, sort=[("created", DESCENDING)])

    def update_session(self, session_id: str, **fields: Any) -> None:
        self._run(self.db[fs.SESSIONS].update_one, {"_id": session_id}, {"$set": fields})

    def end_session(self, session_id: str, keeper: dict[str, Any], **fields: Any) -> bool:
        """Write a session's end (state, ended, ...) if it still names
        `keeper` (or none); False when another keeper holds it now."""
        flt = {"_id": session_id, **_kept_by(keeper, or_nobody=True)}
        return self._run(self.db[fs.SESSIONS].update_one, flt, {"$set": fields}).matched_count == 1

    def claim_session(self, session_id: str, seen: dict[str, Any] | None, me: dict[str, Any],
                      **fields: Any) -> bool:
        """Record `me` as the keeper of the session (with `fields`), in one
        conditional write: only if its keeper is still `seen`, the one a
        check found gone (None: no keeper recorded). False when another
        keeper claimed it since, so two resumes never both run it."""
        flt: dict[str, Any] = {"_id": session_id}
        if seen:
            flt.update(_kept_by(seen))
        else:
            flt["keeper"] = {"$exists": False}
        res = self._run(self.db[fs.SESSIONS].update_one, flt, {"$set": {**fields, "keeper": me}})
        if res.matched_count == 1:
            return True
        # A write retried after an outage (Patience) matches nothing when its
        # first try landed and only the answer was lost: the session then
        # names this keeper already.
        doc = self._run(self.db[fs.SESSIONS].find_one, {"_id": session_id}, {"keeper": 1}) or {}
        keeper = doc.get("keeper")
        return isinstance(keeper, dict) and all(keeper.get(k) == me.get(k) for k in OWNER_FIELDS)

    def heartbeat(self, session_id: str, now: float | None = None, timeout_s: float = HEARTBEAT_S,
                  keeper: dict[str, Any] | None = None) -> bool | None:
        """Write the keeper's heartbeat on the session (see effective_state).
        Best effort, never waits longer than `timeout_s`: False when the
        store did not take it. With `keeper`, only while the session names
        that keeper: None when it names another (one that resumed it while
        this keeper could not reach the store)."""
        flt: dict[str, Any] = {"_id": session_id}
        if keeper is not None:
            flt.update(_kept_by(keeper))
        try:
            with pymongo.timeout(timeout_s):
                res = self.db[fs.SESSIONS].update_one(flt, {"$set": {"heartbeat": time.time() if now is None else now}})
        except pymongo.errors.PyMongoError:
            return False
        return True if keeper is None or res.matched_count == 1 else None

    def mark_interrupted(self, session_id: str, timeout_s: float = 2.0, keeper: dict[str, Any] | None = None,
                         **fields: Any) -> bool:
        """state: interrupted, best effort within `timeout_s` (the user is
        waiting for the prompt); False when the store did not take it. With
        `keeper`, only while the session names that keeper or none (another
        may have resumed it meanwhile)."""
        flt: dict[str, Any] = {"_id": session_id, "state": {"$in": ["running", "interrupted"]}}
        if keeper is not None:   # that keeper's, or nobody's (recorded by an earlier version)
            flt.update(_kept_by(keeper, or_nobody=True))
        try:
            with pymongo.timeout(timeout_s):
                self.db[fs.SESSIONS].update_one(flt, {"$set": {"state": "interrupted", "interrupted": time.time(),
                                                               **fields}})
            return True
        except pymongo.errors.PyMongoError:
            return False

    # ------------------------------------------------------------- rounds
    def pause_open_rounds(self, session: str, since: float, now: float) -> None:
        """Add to `paused_s` of each of the session's rounds left running or
        aggregating the time no keeper ran it: from `since` (the stopped
        keeper's last heartbeat), or from its start if later, to `now`.
        Their `duration_s` leaves that out."""
        rounds = self.db[fs.ROUNDS]
        for r in self._run(lambda: list(rounds.find({"session": session, "state": {"$in": ["running", "aggregating"]}},
                                                    {"started": 1}))):
            started = r.get("started")
            began = max(since, started) if isinstance(started, (int, float)) and math.isfinite(started) else since
            if now > began:
                self._run(rounds.update_one, {"_id": r["_id"]}, {"$inc": {"paused_s": now - began}})

    def upsert_round(self, session: str, rnd: int, **fields: Any) -> None:
        self._run(self.db[fs.ROUNDS].update_one, {"session": session, "round": rnd},
                  {"$set": fields, "$setOnInsert": {"session": session, "round": rnd}}, upsert=True)

    def round(self, session: str, rnd: int) -> dict[str, Any] | None:
        return self._run(self.db[fs.ROUNDS].find_one, {"session": session, "round": rnd})

    def rounds(self, session: str) -> list[dict[str, Any]]:
        return self._run(lambda: list(self.db[fs.ROUNDS].find({"session": session}).sort("round", ASCENDING)))

    # ------------------------------------------------------------- invocations
    def insert_attempts(self, docs: Sequence[dict[str, Any]]) -> None:
        if docs:
            self._run(self.db[fs.INVOCATIONS].insert_many, list(docs), ordered=False, insert=True)

    def update_attempts(self, changes: Iterable[tuple[Any, dict[str, Any]]]) -> None:
        ops = [UpdateOne({"_id": _id}, {"$set": fields}) for _id, fields in changes]
        if ops:
            self._run(self.db[fs.INVOCATIONS].bulk_write, ops, ordered=False)

    def attempts(self, session: str, rnd: int | None = None,
                 fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The session's attempt documents (of round `rnd` only, if given),
        by round, client and attempt; with only `fields` of each when given
        (a long session's documents, results and errors included, can be
        far larger than what a caller reads)."""
        q: dict[str, Any] = {"session": session}
        if rnd is not None:
            q["round"] = rnd
        projection = dict.fromkeys(fields, 1) if fields is not None else None
        return self._run(lambda: list(self.db[fs.INVOCATIONS].find(q, projection).sort(
            [("round", 1), ("client", 1), ("attempt", 1)])))

    def attempts_by_id(self, ids: Sequence[Any]) -> dict[Any, dict[str, Any]]:
        """The attempt documents with these ids, by id."""
        return self._run(lambda: {d["_id"]: d for d in self.db[fs.INVOCATIONS].find({"_id": {"$in": list(ids)}})})

    def last_attempt(self, session: str, rnd: int, client: str) -> int:
        """The highest attempt number recorded for (session, round, client), 0 if none."""
        docs = self._run(lambda: list(self.db[fs.INVOCATIONS].find(
            {"session": session, "round": rnd, "client": client}, {"attempt": 1})))
        return max((int(d["attempt"]) for d in docs), default=0)

    def ended_client_attempts(self, session: str, ended_states: Iterable[str]) -> list[dict[str, Any]]:
        """The session's fl_client attempts that ended, with the fields
        reliability scores read."""
        return self._run(lambda: list(self.db[fs.INVOCATIONS].find(
            {"session": session, "function": "fl_client", "state": {"$in": list(ended_states)}},
            {"client": 1, "cluster": 1, "state": 1, "error_class": 1, "cold_start": 1, "duration_ms": 1,
             "unsent": 1, "stray": 1})))

    #: Marks per running_marks document: about 100 bytes each, far below a
    #: document's 16 MB limit however many clients a round invokes.
    MARKS_PER_DOC = 10_000

    def insert_running_marks(self, session: str, marks: Sequence[tuple[Any, dict[str, Any]]]) -> None:
        """A batch of (attempt id, running mark fields), one document per
        MARKS_PER_DOC of them."""
        docs = [{"session": session,
                 "marks": [{"attempt": i, **fields} for i, fields in marks[k:k + self.MARKS_PER_DOC]]}
                for k in range(0, len(marks), self.MARKS_PER_DOC)]
        if docs:
            self._run(self.db[RUNNING_MARKS].insert_many, docs, ordered=False, insert=True)

    def fold_running_marks(self, session: str) -> int:
        """The session's attempts still `submitting` whose running mark a
        batch holds become `running` with it, and the batches are dropped;
        the number of attempts changed. Attempts that ended keep their
        outcome (the mark only applies to `submitting`). Only the batches
        read are dropped: one a keeper's combiner thread writes meanwhile
        is folded next time."""
        def fold() -> int:
            batches = list(self.db[RUNNING_MARKS].find({"session": session}))
            ops = [UpdateOne({"_id": m["attempt"], "state": "submitting"},
                             {"$set": {k: v for k, v in m.items() if k != "attempt"}})
                   for doc in batches for m in doc.get("marks", [])]
            changed = self.db[fs.INVOCATIONS].bulk_write(ops, ordered=False).modified_count if ops else 0
            for part in fs.slices([doc["_id"] for doc in batches]):
                self.db[RUNNING_MARKS].delete_many({"_id": {"$in": part}})
            return changed
        return self._run(fold)

    def close_unaccepted_attempts(self, session: str, why: str, now: float) -> int:
        """Attempts a stopped keeper left `submitting` (the platform's answer
        never recorded) are recorded as abandoned, with `unsent: true` (never
        known to have reached the platform: a resume does not count them
        against max_attempts), or as running when a running mark names them
        (fold_running_marks) or fl_invoker wrote the platform's id on them;
        the number abandoned."""
        self.fold_running_marks(session)

        def close() -> int:
            inv = self.db[fs.INVOCATIONS]
            inv.update_many({"session": session, "state": "submitting",
                             "platform_id": {"$exists": True, "$nin": [None, ""]}},
                            {"$set": {"state": "running"}})
            return inv.update_many({"session": session, "state": "submitting"},
                                   {"$set": {"state": "abandoned", "error": why, "finished": now,
                                             "unsent": True}}).modified_count
        return self._run(close)

    def running_client_attempts(self, session: str, before_round: int) -> list[dict[str, Any]]:
        """fl_client attempts of rounds before `before_round` still `running`."""
        return self._run(lambda: list(self.db[fs.INVOCATIONS].find(
            {"session": session, "state": "running", "function": "fl_client",
             "round": {"$lt": before_round}})))

    # ------------------------------------------------------------- events
    def event(self, session: str, kind: str, message: str, **data: Any) -> None:
        self._run(self.db[fs.EVENTS].insert_one, {"session": session, "ts": time.time(), "kind": kind,
                                                  "message": message, **data}, insert=True)

    def events(self, session: str) -> list[dict[str, Any]]:
        return self._run(lambda: list(self.db[fs.EVENTS].find({"session": session}).sort("ts", ASCENDING)))

    # ------------------------------------------------------------- updates, models
    def delivered_clients(self, session: str, rnd: int) -> set[str]:
        # fs.keyed: an update document any function may have written with
        # `client: [...]` or `round: [...]` (which MongoDB matches) is nobody's
        return self._run(lambda: {d["client"] for d in self.db[fs.UPDATES].find(
            {"session": session, "round": rnd}, {"client": 1, "round": 1}) if fs.keyed(d) and d["round"] == rnd})

    def storing_attempts(self, session: str, rnd: int, clients: Sequence[str]) -> dict[str, int | None]:
        """Which of `clients` have an update stored for round `rnd`, and the
        attempt that stored each (None where the update does not say): one
        query per fs.IN_SLICE clients, however many ask."""
        if not clients:
            return {}
        return self._run(lambda: {d["client"]: _attempt_number(d.get("attempt")) for d in fs.find_in(
            self.db[fs.UPDATES], {"session": session, "round": rnd}, "client", clients,
            {"client": 1, "attempt": 1})})

    def received_updates(self, session: str, lo: int, hi: int) -> list[tuple[str, int]]:
        """(client, round) of updates received and not yet aggregated, of
        rounds lo <= round < hi."""
        return self._run(lambda: [(d["client"], d["round"]) for d in self.db[fs.UPDATES].find(
            {"session": session, "status": "received", "round": {"$gte": lo, "$lt": hi}},
            {"client": 1, "round": 1}) if fs.keyed(d)])   # as delivered_clients

    def count_received_updates(self, session: str, lo: int, hi: int) -> int:
        """How many updates of rounds lo <= round < hi wait to be aggregated.
        (`$lt hi`, never `$lte`: the embedded store reads $lte as $lt on a
        field that a compound index continues past.)"""
        return self._run(self.db[fs.UPDATES].count_documents,
                         {"session": session, "status": "received", "round": {"$gte": lo, "$lt": hi}})

    def mark_updates_stale(self, session: str, before_round: int) -> None:
        """Received updates of rounds before `before_round` will never be aggregated."""
        self._run(self.db[fs.UPDATES].update_many,
                  {"session": session, "status": "received", "round": {"$lt": before_round}},
                  {"$set": {"status": "stale"}})

    def updates(self, session: str, rnd: int | None = None) -> list[dict[str, Any]]:
        q: dict[str, Any] = {"session": session}
        if rnd is not None:
            q["round"] = rnd
        # A listing never holds the updates' arrays (inline ones are in their documents).
        return self._run(lambda: list(self.db[fs.UPDATES].find(q, WITHOUT_DATA).sort([("round", 1), ("client", 1)])))

    def model(self, session: str, rnd: int) -> dict[str, Any] | None:
        return self._run(self.db[fs.MODELS].find_one, {"session": session, "round": rnd})

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


def _kept_by(keeper: dict[str, Any], or_nobody: bool = False) -> dict[str, Any]:
    """A filter for a session document naming `keeper` (by OWNER_FIELDS),
    or with `or_nobody`, naming no keeper at all (written by an earlier
    version)."""
    named = {f"keeper.{k}": keeper.get(k) for k in OWNER_FIELDS}
    return {"$or": [named, {"keeper": {"$exists": False}}]} if or_nobody else named


def _attempt_number(value: Any) -> int | None:
    """An update document's `attempt`, when it is an attempt number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
