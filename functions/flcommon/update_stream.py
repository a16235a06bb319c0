"""Streaming a round's listed updates into a strategy, shared by the
aggregator and the combiners (fl_combiner) of hierarchical aggregation.

Every update becomes a delta against the global model its client trained
from (model r for a stale update) and is weighted
num_examples * (1 + staleness) ** -staleness_exponent. Updates are streamed
one at a time, small ones (inline in their documents, flcommon.update_data,
or a GridFS chunk each) a group per query, the next read while the current
one is added; none may decode to more than the model's size, and each is
checked whole before the strategy sees it. An update already counted by the
aggregation of another round is rejected, never counted twice. Partial
aggregates written by combiners for this round (flcommon.partials) are
added as one unit each, in place of reading their clients' updates."""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from . import contributions, store, update_data
from .blobs import BlobError
from .context import partition_sizes
from .partials import add_partials, count_members
from .read_ahead import read_ahead
from .strategies import Strategy, StrategyError
from .update_check import UpdateRejected, check_layout, subtract_base


def _examples(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise UpdateRejected(f"num_examples must be a positive integer, got {n!r}")
    return int(n)


class Candidate(NamedTuple):
    """An update that passed the checks made without reading it."""
    index: int            # its place in the wanted list: rejections are reported in that order
    client: str
    round: int
    blob_id: Any          # None for an inline update (flcommon.update_data)
    files_doc: dict[str, Any]   # its blob's GridFS files document, or its update document without data
    num_examples: int

    @property
    def inline(self) -> bool:
        return self.blob_id is None

    def sizes(self) -> dict[str, Any]:
        """Length and chunk size, as small_blob_batches groups them: an
        inline update reads like a blob of one chunk."""
        if self.inline:
            return {"length": self.files_doc["length"], "chunkSize": update_data.INLINE_MAX_BYTES}
        return self.files_doc


def _listed(db, session: str, rnd: int, clients: list[str]) -> Iterator[dict[str, Any]]:
    """The documents, without their data, of these clients' updates of
    round `rnd`. More clients than one `$in` slice holds are listed with one
    query for the whole round, the others dropped here: the embedded store
    answers that prefix of the updates' unique key 2.3x faster than the same
    documents asked a slice of clients at a time (0.11 s against 0.25 s for
    1,000 updates), and a round holds one update per client at most, so the
    query reads no more than the round's own."""
    if len(clients) <= store.IN_SLICE:
        yield from store.find_in(db[store.UPDATES], {"session": session, "round": rnd}, "client", clients,
                                 update_data.WITHOUT_DATA)
        return
    wanted = set(clients)
    for d in db[store.UPDATES].find({"session": session, "round": rnd}, update_data.WITHOUT_DATA):
        if d.get("client") in wanted:
            yield d


def _candidates(db, session: str, rnd: int, wanted: list[tuple[str, int]]) -> tuple[list[Candidate], list[dict]]:
    """The listed updates worth reading, and the rejections decided from
    their documents alone (missing, counted already, someone else's blob,
    an inflated example count, no base model)."""
    by_round: dict[int, list[str]] = {}
    for client, r in wanted:
        by_round.setdefault(r, []).append(client)
    # Every look-up below is a few queries whatever the number of updates
    # (store.find_in): a query per update was most of a large round's cost.
    docs: dict[tuple[str, int], dict] = {}
    for r, clients in by_round.items():
        for d in _listed(db, session, r, clients):
            docs[(d["client"], d["round"])] = d
    # The partition sizes init wrote: a client cannot inflate its weight by
    # claiming more examples than it holds.
    sizes = partition_sizes(db, session, sorted({c for c, _ in wanted}))
    blobs = {d["_id"]: d for d in store.find_in(
        db[f"{store.BUCKET}.files"], {}, "_id", [d["blob_id"] for d in docs.values() if d.get("blob_id") is not None],
        {"metadata": 1, "length": 1, "chunkSize": 1})}
    # A stale update (trained from an older model) needs that model as its
    # base, and may have been counted by an aggregation since: the models
    # from its round on say both. The round's own updates are newer than
    # every model but the current one, so no model counted them yet.
    stale = [r for r in by_round if r != rnd]
    models = list(db[store.MODELS].find({"session": session, "round": {"$gte": min(stale), "$lt": rnd + 1}},
                                        {**contributions.PROJECTION, "blob_id": 1})) if stale else []
    has_base = {d["round"] for d in models if d["round"] in by_round and d.get("blob_id") is not None}
    counted = contributions.counted_in(models)
    candidates: list[Candidate] = []
    rejected: list[dict[str, Any]] = []
    for index, (client, r) in enumerate(wanted):
        doc = docs.get((client, r))
        if doc is None:
            reason = "no update stored for this round" if r == rnd else f"no update stored for round {r}"
            rejected.append({"index": index, "client": client, "round": r, "reason": reason, "mark": False})
            continue
        done_in = contributions.aggregation_of(doc, counted)
        if done_in is not None and done_in != rnd:
            # Counted already; its record stays as that aggregation left it.
            rejected.append({"index": index, "client": client, "round": r,
                             "reason": f"already aggregated in round {done_in}", "mark": False})
            continue
        try:
            if update_data.is_inline(doc):
                update_data.inline_length(doc)   # its arrays are its own: no one else's to check
                files_doc = doc
            else:
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
        except (UpdateRejected, BlobError) as exc:
            rejected.append({"index": index, "client": client, "round": r, "reason": str(exc)[:300], "mark": True})
            continue
        candidates.append(Candidate(index, client, r, doc.get("blob_id"), files_doc, n))
    return candidates, rejected


def _take(items: list[Any], i: int) -> Any:
    item, items[i] = items[i], None
    return item


def aggregate(db, session: str, rnd: int, wanted: list[tuple[str, int]], global_weights: list[np.ndarray],
              strategy: Strategy, staleness_exponent: float = 0.5, *, use_partials: bool = True
              ) -> tuple[list[dict], list[dict]]:
    """Feed the strategy the delta of every valid listed update (a streaming
    strategy adds it to its accumulator and drops it). The next update (or
    group of small ones, at most store.SMALL_BATCH_BYTES) is read from the
    store while the current one is added (flcommon.read_ahead), so at most
    two updates or two groups are held besides the accumulator; no update
    may decode to more than the model's size. Returns (contributions,
    rejections): contributions in the order added, rejections in the order
    listed; the caller then calls strategy.finish()."""
    reference = [(w.shape, w.dtype) for w in global_weights]
    model_bytes = sum(w.nbytes for w in global_weights)
    strategy.begin(reference)
    # Hierarchical rounds: each combiner's partial aggregate counts its
    # clients; the updates no partial counted are read here, as in a flat round.
    accepted, wanted, partial_rejected = add_partials(db, session, rnd, wanted, reference, model_bytes, strategy) \
        if use_partials else ([], wanted, [])
    candidates, rejected = _candidates(db, session, rnd, wanted)
    rejected += partial_rejected
    base_blobs = {d["round"]: d["blob_id"] for d in db[store.MODELS].find(
        {"session": session, "round": {"$in": sorted({c.round for c in candidates if c.round != rnd})}},
        {"round": 1, "blob_id": 1})}

    def read(group: list[Candidate]) -> list[list[np.ndarray] | BlobError]:
        if len(group) == 1 and not group[0].inline and not store.is_small(group[0].files_doc):
            c = group[0]
            try:
                return [store.get_arrays(db, c.blob_id, max_bytes=model_bytes, files_doc=c.files_doc,
                                         prefetch=True)]
            except BlobError as exc:
                return [exc]
        # Small ones: inline updates and one-chunk blobs, one query for each kind.
        inline = [c.files_doc for c in group if c.inline]
        blobs = [c.files_doc for c in group if not c.inline]
        from_docs = iter(update_data.get_inline_arrays(db, inline, max_bytes=model_bytes) if inline else [])
        from_blobs = iter(store.get_small_arrays(db, blobs, max_bytes=model_bytes) if blobs else [])
        return [next(from_docs) if c.inline else next(from_blobs) for c in group]

    def each(groups) -> Iterator[tuple[Candidate, list[np.ndarray] | BlobError]]:
        for group, loaded, _ in groups:
            for i, c in enumerate(group):
                # Handed over, not kept: the caller's `del` then frees the update.
                yield c, _take(loaded, i)
            del loaded

    from_partials = bool(accepted)
    # Small updates (inline, or one GridFS chunk each) are read a group per
    # query (store.small_blob_batches: at most ~1 MB a group), larger ones
    # one at a time in chunk batches; the next group is read while this one
    # is added.
    groups = read_ahead(store.small_blob_batches(candidates, Candidate.sizes), read)
    for c, arrays in each(groups):
        try:
            if isinstance(arrays, BlobError):
                raise arrays
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
    if from_partials:
        # A partial was added once for all its clients: each client's share
        # (weight / total examples) is told from its own weight, as if it
        # had been added alone.
        count_members(strategy, [a["raw_weight"] for a in accepted], [a["num_examples"] for a in accepted])
    return accepted, rejected
