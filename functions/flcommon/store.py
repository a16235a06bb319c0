"""Store access shared by the functions and the keeper.

Collections (the schema is documented in docs/store.md):
  sessions     one document per training session
  rounds       one per (session, round)
  invocations  one per invocation attempt
  events       append-only session log
  updates      one per accepted client update, unique (session, round, client)
  models       one per global model, unique (session, round)
  partitions   one per (session, client): the client's data blob
GridFS bucket `blobs` holds every array payload as a pickle-free npz.
"""
from __future__ import annotations

import datetime
import io
import threading
from typing import Any, Callable, Iterator, Sequence

import gridfs
import numpy as np
import pymongo
from bson import ObjectId

from .blobs import BlobError, iter_arrays, write_arrays
from .read_ahead import read_ahead

BUCKET = "blobs"
SESSIONS = "sessions"
ROUNDS = "rounds"
INVOCATIONS = "invocations"
EVENTS = "events"
UPDATES = "updates"
MODELS = "models"
PARTITIONS = "partitions"
PARTIALS = "partials"   # hierarchical rounds' partial aggregates (flcommon/partials.py)

_clients: dict[str, pymongo.MongoClient] = {}
_clients_lock = threading.Lock()


def client_for(url: str) -> pymongo.MongoClient:
    """One pooled client per URL per process: warm function workers reuse it."""
    with _clients_lock:
        c = _clients.get(url)
        if c is None:
            c = pymongo.MongoClient(url, serverSelectionTimeoutMS=10_000, connect=False)
            _clients[url] = c
        return c


def database(url: str, name: str):
    return client_for(url)[name]


def ensure_function_indexes(db) -> None:
    """The indexes the functions rely on for correctness, not just speed:
    an update is unique per (session, round, client), so a duplicate or
    late attempt can never be counted twice; a global model is unique per
    (session, round), so concurrent aggregations cannot both write one.
    Idempotent; the keeper's store calls it too."""
    asc = pymongo.ASCENDING
    db[UPDATES].create_index([("session", asc), ("round", asc), ("client", asc)], unique=True)
    db[MODELS].create_index([("session", asc), ("round", asc)], unique=True)
    db[PARTITIONS].create_index([("session", asc), ("client", asc)], unique=True)
    # One combiner's partial per cluster and round (hierarchical): a follower
    # combiner and the one run at the round's close may both try to store it.
    # A store written before this index may hold such pairs already: it then
    # goes without the index (write_partial still looks before it writes),
    # rather than refusing every connection.
    try:
        db[PARTIALS].create_index([("session", asc), ("round", asc), ("cluster", asc)], unique=True)
    except pymongo.errors.DuplicateKeyError:
        pass
    # GridFS's own indexes (the names and keys pymongo's GridFS creates),
    # made once here because put_arrays writes chunks directly.
    db[f"{BUCKET}.files"].create_index([("filename", asc), ("uploadDate", asc)])
    db[f"{BUCKET}.chunks"].create_index([("files_id", asc), ("n", asc)], unique=True)


#: Values per `$in` list. The embedded store's cost per value of a `$in`
#: grows with the list's length (measured: 9 ms a value with 1,000 ids,
#: 0.5 ms with 25 to 50), so a long list is asked in slices of this many.
IN_SLICE = 32


def slices(values: Sequence[Any], size: int | None = None) -> Iterator[list[Any]]:
    """`values` without repeats, in order, `size` (IN_SLICE) at a time."""
    size = size or IN_SLICE
    unique = list(dict.fromkeys(values))
    for i in range(0, len(unique), size):
        yield unique[i:i + size]


def keyed(doc: dict[str, Any]) -> bool:
    """Whether a document a client may have written has the keys it is
    looked up by: `client` a string, `round` a whole number (when present).
    MongoDB's equality and `$in` also match an array holding the value, so
    a document written with `client: ["c1"]` is found for c1, and would then
    be an unhashable key."""
    client, rnd = doc.get("client", ""), doc.get("round", 0)
    return isinstance(client, str) and isinstance(rnd, int) and not isinstance(rnd, bool)


def find_in(coll, query: dict[str, Any], field: str, values: Sequence[Any],
            projection: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The documents matching `query` whose `field` is one of `values`: one
    query per IN_SLICE values, so the cost stays linear in their number.
    Only exact matches: a document whose `field`, or a field `query` asks
    to equal a value, holds an array that merely contains the value (which
    MongoDB matches) is left out."""
    exact = {k: v for k, v in query.items() if not isinstance(v, dict)}
    if projection and all(projection.values()):   # an inclusion projection must bring what is checked
        projection = {**projection, field: 1, **dict.fromkeys(exact, 1)}
    for part in slices(values):
        allowed = set(part)
        for doc in coll.find({**query, field: {"$in": part}}, projection):
            value = doc.get(field)
            if isinstance(value, (list, dict)) or value not in allowed:
                continue
            if all(doc.get(k, v) == v for k, v in exact.items()):
                yield doc


def bucket(db) -> gridfs.GridFSBucket:
    return gridfs.GridFSBucket(db, bucket_name=BUCKET)


CHUNK_SIZE = 255 * 1024  # GridFS's default chunk size
_CHUNK_BATCH = 16        # chunks per insert_many: ~4 MB on the wire at a time


def put_arrays(db, arrays: Sequence[np.ndarray], filename: str, metadata: dict[str, Any]) -> ObjectId:
    """Store arrays as one npz blob in the GridFS bucket; returns its id.

    The blob is written in the GridFS layout (chunks, then the files
    document, so a reader never sees a file with missing chunks) without
    pymongo's GridIn: GridIn probes both collections with an unfiltered
    find_one on every upload to decide whether to create indexes, which the
    embedded server answers by scanning the chunks, so uploads slowed from
    26 ms to 110 ms per MB as the store grew. ensure_function_indexes()
    creates those indexes once instead."""
    data = encode_arrays(arrays)
    try:
        return put_encoded(db, data, filename, metadata)
    finally:
        data.release()


def encode_arrays(arrays: Sequence[np.ndarray]) -> memoryview:
    """Arrays as the npz bytes a blob holds, without a copy of the buffer
    (release() the view when done). np.savez needs a seekable target for
    its zip directory, so this is encoded in memory; arrays are at most one
    model in size."""
    buf = io.BytesIO()
    write_arrays(buf, arrays)
    return buf.getbuffer()


def put_encoded(db, data: bytes | memoryview, filename: str, metadata: dict[str, Any]) -> ObjectId:
    """Store npz bytes (encode_arrays) as one blob, as put_arrays does."""
    file_id = ObjectId()
    chunks = db[f"{BUCKET}.chunks"]
    try:
        batch = []
        for n, start in enumerate(range(0, len(data), CHUNK_SIZE)):
            batch.append({"files_id": file_id, "n": n, "data": bytes(data[start:start + CHUNK_SIZE])})
            if len(batch) == _CHUNK_BATCH:
                chunks.insert_many(batch, ordered=True)
                batch = []
        if batch:
            chunks.insert_many(batch, ordered=True)
        db[f"{BUCKET}.files"].insert_one({
            "_id": file_id, "length": len(data), "chunkSize": CHUNK_SIZE, "filename": filename,
            "uploadDate": datetime.datetime.now(datetime.timezone.utc), "metadata": metadata})
    except BaseException:
        chunks.delete_many({"files_id": file_id})
        raise
    return file_id


CHUNKS_PER_BATCH = 4  # ~1 MB of chunks per round trip: larger batches read no faster here
CHUNKS_AHEAD = 2      # chunks a prefetching reader holds beyond the cursor's batch


def _whole(value: Any) -> bool:
    """A whole number as the store may hold one (int, Int64, or a float with
    no fraction), not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


class ChunkReader(io.RawIOBase):
    """A GridFS file read front to back over one chunk cursor: one query
    for the whole file (pymongo's GridOut may issue one per chunk when a
    reader seeks), a batch size that bounds what is held (the server would
    otherwise send a whole update's chunks at once), and readinto() so each
    chunk is copied once, straight into the array being decoded. Each
    chunk's number and size are checked against the files document.

    With `prefetch`, a thread iterates the cursor (flcommon.read_ahead), so
    the store prepares and sends the next batch while this one is copied
    and checked: CHUNKS_AHEAD more chunks held, the store never idle."""

    def __init__(self, db, blob_id: ObjectId, files_doc: dict[str, Any] | None = None,
                 batch: int = CHUNKS_PER_BATCH, prefetch: bool = False):
        self._cursor = self._prefetched = None  # so that close() works whatever __init__ raises
        doc = files_doc
        if doc is None or "length" not in doc or "chunkSize" not in doc:
            doc = db[f"{BUCKET}.files"].find_one({"_id": blob_id}, {"length": 1, "chunkSize": 1})
        if doc is None:
            raise BlobError(f"blob {blob_id} does not exist")
        length, chunk_size = doc.get("length"), doc.get("chunkSize")
        # Whoever can write to the store can write these: whole numbers or a BlobError, never a crash.
        if not _whole(length) or not _whole(chunk_size) or length < 0 or chunk_size <= 0:
            raise BlobError(f"blob {blob_id} is corrupt in the store: length {length!r}, chunk size {chunk_size!r}")
        self.blob_id, self.length, self.chunk_size = blob_id, int(length), int(chunk_size)
        if prefetch:
            # A small blob gets a smaller batch and fewer chunks ahead, so
            # that what is held beside it stays a fraction of its size.
            batch = max(1, min(batch, -(-self.length // self.chunk_size) // 4))
        self._cursor = db[f"{BUCKET}.chunks"].find({"files_id": blob_id}, {"n": 1, "data": 1}).sort(
            "n", pymongo.ASCENDING).batch_size(batch)
        self._prefetched = read_ahead(self._cursor, lambda doc: None, ahead=min(CHUNKS_AHEAD, batch)) \
            if prefetch else None
        self._chunk, self._off, self._next, self._pos = memoryview(b""), 0, 0, 0

    def _next_doc(self) -> dict[str, Any] | None:
        if self._prefetched is None:
            return next(self._cursor, None)
        doc, _, _ = next(self._prefetched, (None, None, None))
        return doc

    def readable(self) -> bool:
        return True

    def _advance(self) -> bool:
        if self._pos >= self.length:
            return False
        doc = self._next_doc()
        want = min(self.chunk_size, self.length - self._pos)
        data = None if doc is None else doc.get("data")
        if doc is None or doc.get("n") != self._next or not isinstance(data, bytes) or len(data) != want:
            raise BlobError(f"blob {self.blob_id} is corrupt in the store: chunk {self._next} "
                            f"{'missing' if doc is None or doc.get('n') != self._next else 'has the wrong size'}")
        self._chunk, self._off, self._next = memoryview(doc["data"]), 0, self._next + 1
        self._pos += want
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < view.nbytes:
            if self._off >= self._chunk.nbytes and not self._advance():
                break
            n = min(view.nbytes - filled, self._chunk.nbytes - self._off)
            view[filled:filled + n] = self._chunk[self._off:self._off + n]
            self._off += n
            filled += n
        return filled

    def close(self) -> None:
        if self._prefetched is not None:
            self._prefetched.close()  # ends the thread before its cursor is closed
        if self._cursor is not None:
            self._cursor.close()
        super().close()


def get_arrays(db, blob_id: ObjectId, max_bytes: int | None = None,
               files_doc: dict[str, Any] | None = None, prefetch: bool = False) -> list[np.ndarray]:
    return list(stream_arrays(db, blob_id, max_bytes, files_doc, prefetch))


def stream_arrays(db, blob_id: ObjectId, max_bytes: int | None = None,
                  files_doc: dict[str, Any] | None = None, prefetch: bool = False) -> Iterator[np.ndarray]:
    """Yield a blob's arrays one by one, reading its chunks front to back,
    so nothing is held beyond the array being decoded and a batch of chunks.
    `max_bytes` bounds the arrays' total size (blobs.MAX_DECODED_BYTES when
    None); `files_doc` (with length and chunkSize) saves looking it up;
    `prefetch` reads the chunks in a thread (ChunkReader)."""
    reader = ChunkReader(db, blob_id, files_doc, prefetch=prefetch)
    try:
        yield from iter_arrays(reader, length=reader.length, max_bytes=max_bytes)
    finally:
        reader.close()


#: Encoded bytes of single-chunk blobs fetched by one query (small_blob_batches).
SMALL_BATCH_BYTES = 1 << 20


def is_small(files_doc: dict[str, Any]) -> bool:
    """A blob stored in one chunk (its files document says so)."""
    length, chunk_size = files_doc.get("length"), files_doc.get("chunkSize")
    return _whole(length) and _whole(chunk_size) and 0 < length <= chunk_size


def small_blob_batches(items: Sequence[Any], files_doc=lambda item: item) -> Iterator[list[Any]]:
    """`items` in order, in groups: consecutive single-chunk blobs together,
    at most IN_SLICE of them and SMALL_BATCH_BYTES in all, any other blob
    alone. A group of small blobs is read by one query (get_small_arrays)
    instead of one per blob, which is what reading a thousand small updates
    costs most on the embedded store."""
    group: list[Any] = []
    size = 0
    for item in items:
        doc = files_doc(item)
        if not is_small(doc):
            if group:
                yield group
                group, size = [], 0
            yield [item]
            continue
        n = int(doc["length"])
        if group and (len(group) >= IN_SLICE or size + n > SMALL_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group


def get_small_arrays(db, files_docs: Sequence[dict[str, Any]], max_bytes: int | None = None
                     ) -> list[list[np.ndarray] | BlobError]:
    """The arrays of several single-chunk blobs (is_small), read by one
    query per IN_SLICE blobs; in the order given, each either its arrays or
    the BlobError that makes it unreadable (a missing or wrong-sized chunk,
    a bad encoding, more than `max_bytes` decoded). Each chunk is checked
    against its files document, as ChunkReader checks a blob's chunks."""
    data: dict[Any, bytes] = {}
    for doc in find_in(db[f"{BUCKET}.chunks"], {"n": 0}, "files_id", [d["_id"] for d in files_docs],
                       {"files_id": 1, "data": 1}):
        chunk = doc.get("data")
        data[doc["files_id"]] = chunk if isinstance(chunk, bytes) else None   # anything else: a wrong chunk

    def check(d: dict[str, Any], chunk: Any) -> None:
        if not is_small(d):
            raise BlobError(f"blob {d['_id']} is not stored in one chunk")
        if not isinstance(chunk, bytes) or len(chunk) != int(d["length"]):
            raise BlobError(f"blob {d['_id']} is corrupt in the store: chunk 0 "
                            f"{'missing' if chunk is None else 'has the wrong size'}")
    return decode_fetched(files_docs, data, check, max_bytes)


def decode_fetched(docs: Sequence[dict[str, Any]], fetched: dict[Any, Any],
                   check: Callable[[dict[str, Any], Any], None], max_bytes: int | None
                   ) -> list[list[np.ndarray] | BlobError]:
    """For each of `docs` in order, the arrays of its encoding in `fetched`
    (by `_id`, popped as it is decoded, so that it is freed), or the
    BlobError that `check(doc, encoding)` or the bounded decoding raised."""
    out: list[list[np.ndarray] | BlobError] = []
    for d in docs:
        raw = fetched.pop(d["_id"], None)
        try:
            check(d, raw)
            out.append(list(iter_arrays(raw, max_bytes=max_bytes)))
        except BlobError as exc:
            out.append(exc)
        del raw
    return out


def delete_blob(db, blob_id: ObjectId) -> None:
    try:
        bucket(db).delete(blob_id)
    except gridfs.errors.NoFile:
        pass
