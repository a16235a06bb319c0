"""Partial aggregates of hierarchical aggregation (training.aggregation:
hierarchical).

A combiner (fl_combiner) streams one cluster's updates of a round into a
PartialSum and stores, keyed by (session, round, cluster), the weighted mean
delta of its clients (one float32 blob of the model's size) with its total
weight, its total examples and the clients it counted. The aggregator then
adds each partial to its strategy once, with the partial's weight and
examples: the strategy's weighted mean delta is the one a flat aggregation
of the same updates gives, so its server step (FedAvg, FedAvgM, FedAdam,
...) is unchanged.

No update is counted twice across levels: a partial is used only if every
client it lists was listed for the round and no partial used before lists
it; otherwise the whole partial is refused and its clients' updates are read
by the aggregator itself, as in a flat round. The model's contributions
say which combiner counted each update through its partial (`combined_by`)."""
from __future__ import annotations

import datetime
import io
import time
from typing import Any

import numpy as np
import pymongo
from bson import ObjectId

from . import store
from .blobs import BlobError, write_arrays

PARTIALS = store.PARTIALS
# Chunks per insert_many when a partial is written: a quarter of a model
# of 4 MB or more at a time, so writing holds little beside the encoding.
_CHUNK_BATCH = 4


class PartialSum:
    """What a combiner feeds updates to: sum_i w_i * delta_i in one float32
    accumulator, sum_i w_i and sum_i m_i. Same add() contract as a streaming
    strategy (it takes ownership of the delta)."""

    streaming = True

    def __init__(self) -> None:
        self.acc: list[np.ndarray] = []
        self.weight = 0.0
        self.mass = 0.0

    def begin(self, reference) -> None:
        """Zeros of the model's layout; a sum already begun is kept, so a
        combiner that follows its round folds each batch of arrivals into
        the same partial."""
        if not self.acc:
            self.acc = [np.zeros(tuple(shape), dtype=np.float32) for shape, _ in reference]

    def add(self, delta, weight: float, mass: float | None = None) -> None:
        w = np.float32(weight)
        for acc, d in zip(self.acc, delta):
            if d.dtype == np.float32 and d.flags.writeable:
                np.multiply(d, w, out=d)   # in place on the delta: no temporaries
                np.add(acc, d, out=acc)
            else:
                acc += np.asarray(d, dtype=np.float32) * w
        self.weight += float(weight)
        self.mass += float(weight if mass is None else mass)

    def mean(self) -> list[np.ndarray]:
        """The weighted mean delta, computed in place (the sum is handed over)."""
        out, self.acc = self.acc, []
        for a in out:
            np.divide(a, np.float32(self.weight), out=a)
        return out


def write_partial(db, session: str, rnd: int, cluster: str, partial: PartialSum,
                  contributions: list[dict[str, Any]], rejected: list[dict[str, Any]], seconds: float
                  ) -> dict[str, Any]:
    """Store a combiner's partial (blob + document). Nothing is written on
    its clients' updates: the model's contributions name the partial's
    cluster (`combined_by`) once the aggregator used it, and a partial it
    refuses counted nothing. A partial already stored for (session, round,
    cluster) is kept: a retried combiner changes nothing."""
    done = db[PARTIALS].find_one({"session": session, "round": rnd, "cluster": cluster})
    if done is not None:
        return done
    # Encoded first and the mean released, then written a batch of chunks
    # at a time: the accumulator, its encoding and the chunks' copies are
    # never all held at once.
    buf = io.BytesIO()
    mean = partial.mean()
    write_arrays(buf, mean)
    del mean
    blob = _put_encoded(db, buf, f"{session}/partial/{rnd:03d}/{cluster}.npz",
                        {"kind": "partial", "session": session, "round": rnd, "cluster": cluster})
    doc = {"session": session, "round": rnd, "cluster": cluster, "blob_id": blob,
           "clients": contributions, "rejected": rejected, "weight": partial.weight,
           "num_examples": partial.mass, "created": time.time(), "seconds": seconds}
    try:
        db[PARTIALS].insert_one(doc)
    except pymongo.errors.DuplicateKeyError:
        # another combiner of this cluster stored its partial meanwhile: that one stands
        store.delete_blob(db, blob)
        return db[PARTIALS].find_one({"session": session, "round": rnd, "cluster": cluster})
    return doc


def _put_encoded(db, buf: io.BytesIO, filename: str, metadata: dict[str, Any]) -> ObjectId:
    """An encoded blob written in the GridFS layout store.put_arrays uses
    (chunks first, then the files document), without GridIn's index probes
    on every upload; `buf` is released as it is written."""
    data = buf.getbuffer()
    file_id = ObjectId()
    chunks = db[f"{store.BUCKET}.chunks"]
    try:
        starts = range(0, len(data), store.CHUNK_SIZE)
        for first in range(0, len(starts), _CHUNK_BATCH):
            chunks.insert_many([{"files_id": file_id, "n": n, "data": bytes(data[s:s + store.CHUNK_SIZE])}
                                for n, s in enumerate(starts[first:first + _CHUNK_BATCH], start=first)],
                               ordered=True)
        db[f"{store.BUCKET}.files"].insert_one({
            "_id": file_id, "length": len(data), "chunkSize": store.CHUNK_SIZE, "filename": filename,
            "uploadDate": datetime.datetime.now(datetime.timezone.utc), "metadata": metadata})
    except BaseException:
        chunks.delete_many({"files_id": file_id})
        raise
    finally:
        data.release()
        buf.close()
    return file_id


def add_partials(db, session: str, rnd: int, wanted: list[tuple[str, int]], reference, model_bytes: int,
                 strategy) -> tuple[list[dict], list[tuple[str, int]], list[dict]]:
    """Add the round's stored partials to `strategy`, one add() each (held:
    one partial at a time). Returns (contributions of the clients they
    counted, the wanted updates left to read one by one, rejections the
    combiners recorded for the clients of the partials used)."""
    if not hasattr(strategy, "_weights"):
        return [], wanted, []   # a wrapped strategy (central DP) never aggregates hierarchically
    listed = set(wanted)
    claimed: set[tuple[str, int]] = set()
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for doc in db[PARTIALS].find({"session": session, "round": rnd}).sort("cluster", 1):
        members = [(c["client"], c["round"]) for c in doc.get("clients", [])]
        refused = [(c["client"], c["round"]) for c in doc.get("rejected", [])]
        if not members or len(set(members + refused)) != len(members) + len(refused) \
                or not set(members + refused) <= listed or claimed & set(members + refused):
            db[PARTIALS].update_one({"_id": doc["_id"]}, {"$set": {
                "refused": "lists a client not listed for the round, or one another partial counted"}})
            continue
        try:
            mean = store.get_arrays(db, doc["blob_id"], max_bytes=model_bytes)
            if [a.shape for a in mean] != [tuple(s) for s, _ in reference]:
                raise BlobError("partial does not fit the model")
        except BlobError as exc:
            db[PARTIALS].update_one({"_id": doc["_id"]}, {"$set": {"refused": str(exc)[:300]}})
            continue
        strategy.add(mean, doc["weight"], mass=doc["num_examples"])
        del mean
        claimed |= set(members + refused)
        accepted += [{**{k: c[k] for k in ("client", "round", "staleness", "num_examples", "raw_weight")},
                      "combined_by": doc["cluster"]} for c in doc["clients"]]
        rejected += [{"index": -1, "client": r["client"], "round": r["round"], "reason": r["reason"],
                      "mark": False} for r in doc.get("rejected", [])]
        db[PARTIALS].update_one({"_id": doc["_id"]}, {"$set": {"used": True}})
    return accepted, [w for w in wanted if w not in claimed], rejected


def count_members(strategy, weights: list[float], masses: list[float]) -> None:
    """After partials were added one unit each: the strategy's per-update
    bookkeeping (its shares()) holds each client, as a flat round's would.
    The totals, which the mean delta is divided by, are the same."""
    strategy._weights = [float(w) for w in weights]
    strategy._masses = [float(m) for m in masses]
