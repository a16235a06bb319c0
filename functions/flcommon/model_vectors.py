"""Models and updates as flat float32 vectors, read from the store through a
worker's byte-bounded cache (fl_insights: norms, cosines and clusters are
computed on these). Stored blobs are never rewritten, so an entry never goes
stale; its blob id is kept with it and checked all the same, so a
re-created session cannot be served another session's arrays. An update
may decode to no more than its model's size; one whose arrays do not match
the model's shapes keeps the reason instead of values, and one that is not
finite only that fact."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from flcommon import store, update_data
from flcommon.blobs import BlobError
from flcommon.context import model_bytes
from flcommon.lru import ByteLRU

ENTRY_OVERHEAD = 256       # bytes counted for an entry without arrays (a NaN marker, a reference)


class ModelVector(NamedTuple):
    blob_id: Any
    values: np.ndarray           # flat float32, read-only
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int                  # the stored arrays' size: what an update of this model may decode to


class UpdateVector(NamedTuple):
    stored_as: Any               # update_data.identity: its blob, or its document when inline
    base_blob_id: Any
    values: np.ndarray | None    # flat float32 delta, read-only; None when unusable
    nan: bool = False
    error: str | None = None


class Reader:
    """Blob reads of one call, through the worker cache unless it is off,
    with the bytes read from the store counted (the stored lengths of the
    blobs actually read)."""

    def __init__(self, db, cache: ByteLRU | None):
        self.db = db
        self.cache = cache
        self.models: dict[int, ModelVector | str] = {}   # this call's: read once even without a cache
        self.bytes_read = 0
        self.blobs_read = 0
        self.update_hits = self.update_misses = 0
        self.model_hits = self.model_misses = 0
        self._lengths: dict[Any, int] = {}

    def _prefetch_lengths(self, blob_ids: list[Any]) -> None:
        wanted = [b for b in blob_ids if b is not None and b not in self._lengths]
        if wanted:
            for d in self.db[f"{store.BUCKET}.files"].find({"_id": {"$in": wanted}}, {"length": 1}):
                self._lengths[d["_id"]] = int(d.get("length") or 0)

    def _read(self, blob_id: Any, max_bytes: int | None) -> list[np.ndarray]:
        arrays = store.get_arrays(self.db, blob_id, max_bytes=max_bytes)
        self.bytes_read += self._lengths.get(blob_id, 0)
        self.blobs_read += 1
        return arrays

    def _read_update(self, u: dict[str, Any], max_bytes: int | None) -> list[np.ndarray]:
        if not update_data.is_inline(u):
            return self._read(u["blob_id"], max_bytes)
        arrays = update_data.get_update_arrays(self.db, u, max_bytes)
        self.bytes_read += u["length"]
        self.blobs_read += 1
        return arrays

    def model(self, session: str, rnd: int, doc: dict[str, Any] | None) -> ModelVector | str:
        """Model `rnd` as a flat vector, or why it cannot be had."""
        if rnd in self.models:
            return self.models[rnd]
        if doc is None or doc.get("blob_id") is None:
            out: ModelVector | str = f"no global model {rnd}"
        else:
            key = ("model", session, rnd)
            hit = self.cache.get(key) if self.cache is not None else None
            if isinstance(hit, ModelVector) and hit.blob_id == doc["blob_id"]:
                self.model_hits += 1
                out = hit
            else:
                self.model_misses += 1
                self._prefetch_lengths([doc["blob_id"]])
                try:
                    arrays = self._read(doc["blob_id"], model_bytes(self.db, session))
                    flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays]) \
                        if arrays else np.zeros(0, np.float32)
                    flat.flags.writeable = False  # shared between invocations
                    out = ModelVector(doc["blob_id"], flat, tuple(tuple(a.shape) for a in arrays),
                                      sum(a.nbytes for a in arrays))
                    if self.cache is not None:
                        self.cache.put(key, out, flat.nbytes + ENTRY_OVERHEAD)
                except BlobError as exc:
                    out = f"global model {rnd} is unreadable: {exc}"
        self.models[rnd] = out
        return out

    def updates(self, session: str, docs: list[dict[str, Any]],
                bases: list[ModelVector | str]) -> list[UpdateVector | str]:
        """The delta of each update against its base model (or why there is none)."""
        out: list[UpdateVector | str | None] = [None] * len(docs)
        missing = []
        for i, (u, base) in enumerate(zip(docs, bases)):
            if isinstance(base, str):
                out[i] = base
                continue
            if u.get("blob_id") is None and not update_data.is_inline(u):
                out[i] = "the update names no blob"
                continue
            key = ("update", session, u["round"], u["client"])
            hit = self.cache.get(key) if self.cache is not None else None
            if isinstance(hit, UpdateVector) and hit.stored_as == update_data.identity(u) \
                    and hit.base_blob_id == base.blob_id:
                self.update_hits += 1
                out[i] = hit
            else:
                self.update_misses += 1
                missing.append(i)
        self._prefetch_lengths([docs[i].get("blob_id") for i in missing])
        for i in missing:
            u, base = docs[i], bases[i]
            vec = self._delta(u, base)
            if self.cache is not None:
                size = vec.values.nbytes if vec.values is not None else 0
                self.cache.put(("update", session, u["round"], u["client"]), vec, size + ENTRY_OVERHEAD)
            out[i] = vec
        return out  # type: ignore[return-value]

    def _delta(self, u: dict[str, Any], base: ModelVector) -> UpdateVector:
        stored_as = update_data.identity(u)
        try:
            arrays = self._read_update(u, base.nbytes)  # an update is never larger than its model
        except BlobError as exc:
            return UpdateVector(stored_as, base.blob_id, None, error=str(exc)[:300])
        if len(arrays) != len(base.shapes):
            return UpdateVector(stored_as, base.blob_id, None,
                                error=f"update has {len(arrays)} arrays, the model has {len(base.shapes)}")
        for i, (a, shape) in enumerate(zip(arrays, base.shapes)):
            if tuple(a.shape) != shape:
                return UpdateVector(stored_as, base.blob_id, None,
                                    error=f"array {i} has shape {tuple(a.shape)}, expected {shape}")
        flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays]) \
            if arrays else np.zeros(0, np.float32)
        del arrays
        if not np.isfinite(flat).all():
            # No norm or cosine for it; nothing worth keeping but the fact.
            return UpdateVector(stored_as, base.blob_id, None, nan=True)
        np.subtract(flat, base.values, out=flat)
        flat.flags.writeable = False
        return UpdateVector(stored_as, base.blob_id, flat)
