"""Where an update's arrays are kept: in its own document when they are
small, else in a GridFS blob.

An update that encodes to at most INLINE_MAX_BYTES (one GridFS chunk) is
written as the `data` field of its update document, so storing it is one
insert instead of three (chunk, files document, update document) and
reading a round's small updates never touches GridFS. On the embedded
store, 1,000 updates of 19.5 KB took 1.5 s of writes inline against 3.8 s
as blobs, and 0.19 s of reads against 0.60 s. A larger update is a blob
(`blob_id`), read a batch of chunks at a time, as before.

A listing of updates leaves `data` out (WITHOUT_DATA) and asks for it by
the documents' ids, a bounded group at a time (get_inline_arrays), so that
it holds no update's arrays. The one reader that takes `data` with the
other fields, the aggregation of a long list of a round's own updates
(update_stream._read_round), streams the round's documents in groups of
the same bounds and drops each one's data once decoded. The bytes are
untrusted like a blob's: their size is checked before decoding
(check_inline) and the decoding is bounded.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from . import store
from .blobs import BlobError

#: An update encoded to at most this many bytes is kept in its document.
INLINE_MAX_BYTES = store.CHUNK_SIZE

#: Projection that leaves the arrays out of an update listing.
WITHOUT_DATA = {"data": 0}


def stored_fields(db, arrays: Sequence[np.ndarray], filename: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The update document's fields that hold its arrays: `data` and
    `length` when the encoding fits INLINE_MAX_BYTES, else `blob_id` of a
    GridFS blob written now from the same encoding (the caller deletes it
    with discard() should its document not be stored)."""
    data = store.encode_arrays(arrays)
    try:
        if len(data) <= INLINE_MAX_BYTES:
            return {"data": bytes(data), "length": len(data)}
        return {"blob_id": store.put_encoded(db, data, filename, metadata)}
    finally:
        data.release()


def kept_inline(layout: Sequence[tuple[Sequence[int], Any]]) -> bool:
    """Whether stored_fields keeps an update of a model of this layout
    ((shape, dtype) per array) in its document: its encoding's size does
    not depend on the values, but a model just under INLINE_MAX_BYTES may
    encode to more (headers)."""
    if sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout) > INLINE_MAX_BYTES:
        return False
    return _encoded_size(tuple((tuple(int(n) for n in shape), np.dtype(dtype).str) for shape, dtype in layout)) \
        <= INLINE_MAX_BYTES


@functools.lru_cache(maxsize=64)
def _encoded_size(layout: tuple[tuple[tuple[int, ...], str], ...]) -> int:
    data = store.encode_arrays([np.zeros(shape, np.dtype(dtype)) for shape, dtype in layout])
    try:
        return len(data)
    finally:
        data.release()


def discard(db, fields: dict[str, Any]) -> None:
    """Undo stored_fields for a document that was not stored."""
    if fields.get("blob_id") is not None:
        store.delete_blob(db, fields["blob_id"])


def is_inline(doc: dict[str, Any]) -> bool:
    """An update document (listed WITHOUT_DATA) whose arrays are its own."""
    return doc.get("blob_id") is None and "length" in doc


def identity(doc: dict[str, Any]) -> Any:
    """What names an update's stored arrays: its blob, or for an inline
    update its document (updates are never rewritten in place)."""
    return doc.get("blob_id") if doc.get("blob_id") is not None else doc.get("_id")


def inline_length(doc: dict[str, Any]) -> int:
    """The encoded size an inline update document declares, checked."""
    n = doc.get("length")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= INLINE_MAX_BYTES:
        raise BlobError(f"inline update declares {n!r} bytes; at most {INLINE_MAX_BYTES} are kept inline")
    return n


def get_inline_arrays(db, docs: Sequence[dict[str, Any]], max_bytes: int | None = None
                      ) -> list[list[np.ndarray] | BlobError]:
    """The arrays of inline update documents (listed WITHOUT_DATA, with
    their `_id`), one query per store.IN_SLICE of them; in the order given,
    each its arrays or the BlobError that makes it unreadable (data missing
    or not of the declared size, a bad encoding, more than `max_bytes`
    decoded)."""
    data: dict[Any, Any] = {}
    for d in store.find_in(db[store.UPDATES], {}, "_id", [d["_id"] for d in docs], {"data": 1}):
        data[d["_id"]] = d.get("data")
    return store.decode_fetched(docs, data, check_inline, max_bytes)


def check_inline(doc: dict[str, Any], raw: Any) -> None:
    """BlobError unless `raw` is the data of the inline update `doc`
    declares: bytes of its declared length."""
    n = inline_length(doc)
    if not isinstance(raw, bytes) or len(raw) != n:
        raise BlobError(f"inline update {doc['_id']} is corrupt in the store: "
                        f"{'no data' if not isinstance(raw, bytes) else f'{len(raw)} bytes, {n} declared'}")


def get_update_arrays(db, doc: dict[str, Any], max_bytes: int | None = None) -> list[np.ndarray]:
    """One update's arrays, wherever they are kept (BlobError if unreadable)."""
    if doc.get("blob_id") is not None:
        return store.get_arrays(db, doc["blob_id"], max_bytes=max_bytes)
    if "length" not in doc:
        raise BlobError("the update names no blob and holds no data")
    got = get_inline_arrays(db, [doc], max_bytes)[0]
    if isinstance(got, BlobError):
        raise got
    return got
