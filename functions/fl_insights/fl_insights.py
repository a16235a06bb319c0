"""fl_insights: answers `fedkeeper insights` queries about a session from the
store (docs/insights.md).

Payload: {session, what: contributions | clusters | reliability,
rounds: [first, last] (optional, inclusive, store numbering), k (optional,
clusters), cache: true (default) | "updates" | false}.

A warm worker keeps two kinds of entries in one LRU bounded in bytes
(FK_INSIGHTS_CACHE_MB, from scenario.insights.cache_mb):
  - decoded updates (as flat deltas) and global models, keyed by
    (session, round, client) and (session, round) (flcommon.model_vectors
    reads them). Stored blobs are never
    rewritten, so an entry never goes stale; its blob id is kept with it
    and checked all the same, so a re-created session cannot be served
    another session's arrays;
  - query results, keyed by the normalised query and a digest of every
    store document the answer depends on (update and model documents, or
    invocation records), so an answer about a session that has moved on
    since is computed afresh, never served stale. An entry holds the
    answer's canonical JSON bytes (decoded on a hit), and is counted as
    their length, so the byte bound is the real size held.
`cache: false` reads and writes neither (the no-cache baseline);
`cache: "updates"` uses the update cache but not the query cache.

A result larger than INLINE_LIMIT bytes of JSON is stored as a GridFS blob
(a uint8 array in the usual npz form, named by its content hash so that the
same answer is stored once) and only its id travels back.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from flcommon import store
from flcommon.context import database
from flcommon.contributions import PROJECTION as COUNTED_FIELDS, counted_in
from flcommon.entry import BadRequest, require
from flcommon.update_stats import (aggregation_round, client_order, cluster_vectors, finite_or_none,
                                   round_rows, score_round)
from flcommon.lru import ByteLRU
from flcommon.model_vectors import ENTRY_OVERHEAD, ModelVector, Reader
from flcommon.reliability import client_stats, cluster_stats

WHATS = ("contributions", "clusters", "reliability")
CACHE_MB_KEY = "FK_INSIGHTS_CACHE_MB"
DEFAULT_CACHE_MB = 512.0
INLINE_LIMIT = 32 * 1024   # bytes of JSON returned in the result itself
RESULT_KIND = "insights"

_cache: ByteLRU | None = None
_cache_lock = threading.Lock()
_calls = 0


def worker_cache(bound: dict[str, str]) -> ByteLRU:
    """The worker's cache, created on first use, bounded by the bound setting."""
    global _cache
    try:
        limit = int(float(bound.get(CACHE_MB_KEY) or DEFAULT_CACHE_MB) * 1e6)
    except ValueError:
        raise BadRequest(f"{CACHE_MB_KEY} is not a number") from None
    with _cache_lock:
        if _cache is None:
            _cache = ByteLRU(limit)
        elif _cache.max_bytes != limit:
            _cache.resize(limit)
        return _cache


# --------------------------------------------------------------------------- query

class Query(NamedTuple):
    session: str
    what: str
    rounds: tuple[int, int] | None
    k: int | None
    cache: bool | str          # True, "updates" or False

    def key(self) -> dict[str, Any]:
        """What the answer depends on besides the store (not the cache mode)."""
        return {"session": self.session, "what": self.what,
                "rounds": list(self.rounds) if self.rounds else None,
                "k": self.k if self.what == "clusters" else None}


def parse_query(payload: dict[str, Any]) -> Query:
    session = require(payload, "session", str)
    what = require(payload, "what", str)
    if what not in WHATS:
        raise BadRequest(f"what must be one of {', '.join(WHATS)}, not {what!r}")
    # rounds and k are bounded by entry.check_fields before the handler runs.
    rounds = payload.get("rounds")
    if rounds is not None:
        rounds = (rounds[0], rounds[1])
    k = payload.get("k")
    cache = payload.get("cache", True)
    if cache not in (True, False, "updates"):
        raise BadRequest('cache must be true, false or "updates"')
    return Query(session, what, rounds, k, cache)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------- updates in range

# Round ranges are queried as [first, last + 1): the embedded store
# (SecantusDB 0.7.0b3) treats $lte on a key followed by further keys of a
# compound index, e.g. round in (session, round, client), as $lt.
UPDATE_FIELDS = {"_id": 1, "client": 1, "round": 1, "blob_id": 1, "length": 1, "num_examples": 1, "metrics": 1, "status": 1,
                 "reason": 1, "aggregated_in": 1, "staleness": 1, "weight": 1}
MODEL_FIELDS = {"_id": 0, "round": 1, "blob_id": 1, "contributions": 1, "rejected": 1, "accepted_clients": 1}


class Gathered(NamedTuple):
    rounds: tuple[int, int] | None
    by_round: dict[int, list[dict[str, Any]]]
    models: dict[int, dict[str, Any]]
    fingerprint: str


def _models(db, session: str, first: int, end: int | None) -> dict[int, dict[str, Any]]:
    """The session's model documents of rounds first <= round < end (no end: all from first on)."""
    rounds: dict[str, Any] = {"$gte": first} if end is None else {"$gte": first, "$lt": end}
    return {m["round"]: m for m in db[store.MODELS].find({"session": session, "round": rounds}, MODEL_FIELDS)}


def gather_updates(db, q: Query) -> Gathered:
    """The update and model documents of the rounds in range; their digest
    is the query cache's check that the answer still holds."""
    flt: dict[str, Any] = {"session": q.session}
    if q.rounds:
        # An update counted in round R may be older (stale) but never newer.
        flt["round"] = {"$lt": q.rounds[1] + 1}
    docs = [d for d in db[store.UPDATES].find(flt, UPDATE_FIELDS) if store.keyed(d)]
    # Models' contributions say which aggregation counted each update. An
    # update is counted after its own round, so the models from lo on say
    # all that matters (one counted before lo is out of range either way);
    # without a range, every model from the oldest update's on. Past the
    # range only their contributions are read: a stale update counted after
    # hi belongs to no round in range.
    models: dict[int, dict[str, Any]] = {}
    later: list[dict[str, Any]] = []
    read_from = None
    if docs:
        read_from = q.rounds[0] if q.rounds else min(u["round"] for u in docs)
        models = _models(db, q.session, read_from, q.rounds[1] + 2 if q.rounds else None)
        if q.rounds:
            later = list(db[store.MODELS].find({"session": q.session, "round": {"$gte": q.rounds[1] + 2}},
                                               COUNTED_FIELDS))
    counted = counted_in([*models.values(), *later])
    by_round: dict[int, list[dict[str, Any]]] = {}
    for u in docs:
        by_round.setdefault(aggregation_round(u, counted), []).append(u)
    if q.rounds:
        lo, hi = q.rounds
        by_round = {r: us for r, us in by_round.items() if lo <= r <= hi}
        rounds: tuple[int, int] | None = q.rounds
    else:
        rounds = (min(by_round), max(by_round)) if by_round else None
    for us in by_round.values():
        us.sort(key=lambda u: (client_order(u["client"]), u["round"]))
    if by_round:   # those the rounds in range need: their updates' bases, their own and the next
        first = min(min(u["round"] for u in us) for us in by_round.values())
        if read_from is not None and first < read_from:   # stale updates' older bases
            models.update(_models(db, q.session, first, read_from))
        models = {r: m for r, m in models.items() if first <= r < max(by_round) + 2}
    else:
        models = {}
    fingerprint = _digest({"updates": sorted(([r, u] for r, us in by_round.items() for u in us),
                                             key=lambda x: (x[0], x[1]["client"], x[1]["round"])),
                           "models": [models[r] for r in sorted(models)]})
    return Gathered(rounds, dict(sorted(by_round.items())), models, fingerprint)


def _vectors_of_round(reader: Reader, q: Query, g: Gathered, rnd: int):
    updates = g.by_round[rnd]
    bases = [reader.model(q.session, u["round"], g.models.get(u["round"])) for u in updates]
    return updates, reader.updates(q.session, updates, bases)


def _release_models(reader: Reader, g: Gathered, done: int) -> None:
    """Drop this call's models that no round after `done` needs (as its own,
    its next or a stale update's base), so a call holds a few models, not all."""
    later = [r for r in g.by_round if r > done]
    needed = min((min([r] + [u["round"] for u in g.by_round[r]]) for r in later), default=None)
    for old in [r for r in reader.models if needed is None or r < needed]:
        del reader.models[old]


def contributions(reader: Reader, q: Query, g: Gathered) -> dict[str, Any]:
    rows_out: list[dict[str, Any]] = []
    for rnd in g.by_round:
        updates, vectors = _vectors_of_round(reader, q, g, rnd)
        rows = round_rows(rnd, updates, g.models.get(rnd + 1))
        aggregate = None
        now, nxt = reader.model(q.session, rnd, g.models.get(rnd)), None
        if g.models.get(rnd + 1) is not None:
            nxt = reader.model(q.session, rnd + 1, g.models.get(rnd + 1))
        if isinstance(now, ModelVector) and isinstance(nxt, ModelVector) and now.values.shape == nxt.values.shape:
            aggregate = nxt.values - now.values
        usable = []
        for row, vec in zip(rows, vectors):
            if isinstance(vec, str):
                row["error"] = vec
                usable.append(None)
            else:
                row["nan"] = vec.nan
                row["error"] = vec.error
                usable.append(vec.values if aggregate is None or vec.values is None
                              or vec.values.shape == aggregate.shape else None)
        rows_out.extend(score_round(rows, usable, aggregate))
        _release_models(reader, g, rnd)
    for row in rows_out:
        for key in ("norm", "cosine", "z", "share"):
            row[key] = finite_or_none(row.get(key))
    flagged = sum(1 for r in rows_out if r["flags"])
    return {"rounds": list(g.rounds) if g.rounds else None, "rows": rows_out, "flagged": flagged}


def clusters(reader: Reader, q: Query, g: Gathered) -> dict[str, Any]:
    """Each client's vector is the mean of its usable deltas over the rounds
    in range (any status: the question is what the client sent)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    unusable: dict[str, int] = {}
    for rnd in g.by_round:
        updates, vectors = _vectors_of_round(reader, q, g, rnd)
        for u, vec in zip(updates, vectors):
            c = u["client"]
            if isinstance(vec, str) or vec.values is None or (c in sums and sums[c].shape != vec.values.shape):
                unusable[c] = unusable.get(c, 0) + 1
                continue
            if c in sums:
                np.add(sums[c], vec.values, out=sums[c])
            else:
                sums[c] = vec.values.copy()
            counts[c] = counts.get(c, 0) + 1
        _release_models(reader, g, rnd)
    clients = sorted(sums, key=client_order)
    shapes = {sums[c].shape for c in clients}
    if len(shapes) > 1:
        raise BadRequest("the updates in range belong to models of different sizes")
    matrix = np.stack([sums[c] / np.float32(counts[c]) for c in clients]) if clients else np.zeros((0, 0), np.float32)
    del sums
    try:
        result = cluster_vectors(clients, matrix, q.k)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    result["silhouette"] = finite_or_none(result["silhouette"])
    result["silhouette_by_k"] = {k: finite_or_none(v) for k, v in result["silhouette_by_k"].items()}
    for grp in result["groups"]:
        grp["mean_cosine"] = finite_or_none(grp["mean_cosine"])
    result.update(rounds=list(g.rounds) if g.rounds else None, updates_per_client=counts,
                  unusable_updates=dict(sorted(unusable.items(), key=lambda kv: client_order(kv[0]))))
    return result


# --------------------------------------------------------------------------- reliability

ATTEMPT_FIELDS = {"client": 1, "cluster": 1, "platform": 1, "function": 1, "round": 1, "attempt": 1,
                  "state": 1, "error_class": 1, "cold_start": 1, "duration_ms": 1, "unsent": 1, "stray": 1}


def gather_attempts(db, q: Query) -> tuple[list[dict[str, Any]], tuple[int, int] | None, str]:
    flt: dict[str, Any] = {"session": q.session}
    if q.rounds:
        flt["round"] = {"$gte": q.rounds[0], "$lt": q.rounds[1] + 1}
    docs = sorted(db[store.INVOCATIONS].find(flt, ATTEMPT_FIELDS), key=lambda a: str(a["_id"]))
    rounds = q.rounds
    if rounds is None:
        mine = [a["round"] for a in docs if isinstance(a.get("round"), int)]
        rounds = (min(mine), max(mine)) if mine else None
    return docs, rounds, _digest(docs)


def reliability(docs: list[dict[str, Any]], rounds: tuple[int, int] | None) -> dict[str, Any]:
    per_client = client_stats(docs)
    where: dict[str, str] = {}
    platforms: dict[str, str] = {}
    for a in docs:
        if str(a.get("client", "")).startswith("_"):
            continue
        where.setdefault(a.get("client"), a.get("cluster") or "?")
        platforms.setdefault(a.get("cluster") or "?", a.get("platform") or "?")
    clients = {c: dict(s, cluster=where.get(c)) for c, s in sorted(per_client.items(),
                                                                     key=lambda kv: client_order(kv[0]))}
    clusters_ = {c: dict(s, platform=platforms.get(c)) for c, s in sorted(cluster_stats(docs).items())}
    return {"rounds": list(rounds) if rounds else None, "clients": clients, "clusters": clusters_}


# --------------------------------------------------------------------------- results

def _stored_result(db, q: Query, raw: bytes) -> dict[str, Any]:
    """Keep a large answer in GridFS under its content hash; the same answer
    is stored once whichever worker computes it."""
    digest = hashlib.sha256(raw).hexdigest()
    filename = f"{q.session}/insights/{digest}.npz"
    doc = db[f"{store.BUCKET}.files"].find_one({"filename": filename}, {"_id": 1})
    blob = doc["_id"] if doc else store.put_arrays(
        db, [np.frombuffer(raw, dtype=np.uint8)], filename,
        {"kind": RESULT_KIND, "session": q.session, "what": q.what, "sha256": digest})
    return {"result_ref": str(blob), "result_bytes": len(raw), "result_sha256": digest}


def query_entry_bytes(held: bytes) -> int:
    """What a query-cache entry is counted as: the canonical JSON bytes it
    holds (the answer, or the reference to a stored one), plus the overhead
    of its key and bookkeeping."""
    return len(held) + ENTRY_OVERHEAD


def _answer(db, q: Query, reader: Reader) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
    """(fingerprint source, compute) of one query."""
    if q.what == "reliability":
        docs, rounds, fingerprint = gather_attempts(db, q)
        return {"fingerprint": fingerprint}, lambda: reliability(docs, rounds)
    g = gather_updates(db, q)
    compute = contributions if q.what == "contributions" else clusters
    return {"fingerprint": g.fingerprint}, lambda: compute(reader, q, g)


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    global _calls
    _calls += 1
    t0 = time.perf_counter()
    q = parse_query(payload)
    db = database(bound)
    if db[store.SESSIONS].find_one({"_id": q.session}, {"_id": 1}) is None:
        raise BadRequest(f"no session {q.session!r} in the store")
    cache = worker_cache(bound)
    reader = Reader(db, cache if q.cache else None)
    depends, compute = _answer(db, q, reader)
    key = ("query", _digest({"query": q.key(), **depends}))
    held = cache.get(key) if q.cache is True else None
    from_cache = held is not None
    if held is None:
        raw = _canonical_json(compute())
        held = (b'{"data":' + raw + b"}" if len(raw) <= INLINE_LIMIT
                else _canonical_json(_stored_result(db, q, raw)))
        if q.cache is True:
            cache.put(key, held, query_entry_bytes(held))
    # Cold and warm answers are both decoded from the same canonical bytes, so
    # they are equal (JSON shapes: lists, string keys) whether cached or not.
    answer = json.loads(held)
    stats = cache.stats()
    return {"what": q.what, "session": q.session, **answer, "from_cache": from_cache,
            "cache_mode": "off" if q.cache is False else ("updates" if q.cache == "updates" else "on"),
            "update_cache_hits": reader.update_hits, "update_cache_misses": reader.update_misses,
            "model_cache_hits": reader.model_hits, "model_cache_misses": reader.model_misses,
            "bytes_read": reader.bytes_read, "blobs_read": reader.blobs_read,
            "cache_bytes": stats["bytes"], "cache_limit_bytes": stats["max_bytes"],
            "cache_entries": stats["entries"], "cache_evictions": stats["evictions"],
            "worker_pid": os.getpid(), "worker_invocations": _calls,
            "seconds": round(time.perf_counter() - t0, 6)}
