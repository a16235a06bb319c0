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

import io
import threading
from typing import Any, BinaryIO, Sequence

import gridfs
import numpy as np
import pymongo
from bson import ObjectId

from .blobs import BlobError, decode_arrays, iter_arrays, write_arrays

BUCKET = "blobs"
SESSIONS = "sessions"
ROUNDS = "rounds"
INVOCATIONS = "invocations"
EVENTS = "events"
UPDATES = "updates"
MODELS = "models"
PARTITIONS = "partitions"

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


def bucket(db) -> gridfs.GridFSBucket:
    return gridfs.GridFSBucket(db, bucket_name=BUCKET)


def put_arrays(db, arrays: Sequence[np.ndarray], filename: str, metadata: dict[str, Any]) -> ObjectId:
    # np.savez needs a seekable target for its zip directory, so encode to
    # memory first; arrays are at most one model in size.
    buf = io.BytesIO()
    write_arrays(buf, arrays)
    buf.seek(0)
    return bucket(db).upload_from_stream(filename, buf, metadata=metadata)


def open_blob(db, blob_id: ObjectId) -> BinaryIO:
    try:
        return bucket(db).open_download_stream(blob_id)
    except gridfs.errors.NoFile:
        raise BlobError(f"blob {blob_id} does not exist") from None


def get_arrays(db, blob_id: ObjectId) -> list[np.ndarray]:
    with open_blob(db, blob_id) as stream:
        return decode_arrays(stream)


def stream_arrays(db, blob_id: ObjectId):
    """Yield a blob's arrays one by one (GridOut is seekable, so nothing is
    buffered beyond the array being decoded)."""
    with open_blob(db, blob_id) as stream:
        yield from iter_arrays(stream)


def delete_blob(db, blob_id: ObjectId) -> None:
    try:
        bucket(db).delete(blob_id)
    except gridfs.errors.NoFile:
        pass
