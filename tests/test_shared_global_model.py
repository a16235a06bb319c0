"""A warm client keeps the last global model it decoded, by blob id: the next
run with the same model does not read its blob, another model does, the
cache is bounded in bytes, and no run can change what the next one gets."""
from __future__ import annotations

import numpy as np
import pymongo
import pytest
from pymongo import monitoring

from flcommon import context
from flcommon import store as fs
from flcommon import update_data
from flcommon.lru import ByteLRU

MODEL = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(4, np.float32)]


def _put_model(db, session: str, rnd: int, arrays) -> None:
    blob = fs.put_arrays(db, arrays, f"{session}/model/{rnd:03d}.npz",
                         {"kind": "model", "session": session, "round": rnd})
    db[fs.MODELS].insert_one({"session": session, "round": rnd, "blob_id": blob})


class Commands(monitoring.CommandListener):
    """(command, collection) of every command but a connection's own housekeeping."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def started(self, event):
        if event.command_name in ("find", "getMore", "aggregate", "count", "insert", "update", "delete"):
            self.calls.append((event.command_name, str(event.command.get(event.command_name, ""))))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def _blob_reads(listener: Commands) -> list[tuple[str, str]]:
    """Commands that read a blob (GridFS files or chunks), not the models list."""
    return [c for c in listener.calls if c[1] in (f"{fs.BUCKET}.files", f"{fs.BUCKET}.chunks")]


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = ByteLRU(64 * 10**6)
    monkeypatch.setattr(context, "_models", cache)
    return cache


@pytest.fixture
def listener_db(fn_db):
    """(db through a client that records its commands, the listener)."""
    listener = Commands()
    host, port = fn_db.client.address
    client = pymongo.MongoClient(f"mongodb://{host}:{port}/", event_listeners=[listener])
    yield client[fn_db.name], listener
    client.close()


def test_the_same_model_is_read_once_and_another_one_again(listener_db, fresh_cache):
    db, listener = listener_db
    _put_model(db, "s", 0, MODEL)
    _put_model(db, "s", 1, [a + 1 for a in MODEL])
    listener.calls.clear()
    _, first = context.shared_global_model(db, "s", 0)
    assert _blob_reads(listener), "the first run reads the blob"
    listener.calls.clear()
    _, again = context.shared_global_model(db, "s", 0)
    # the round's document is read (which blob is the model), the blob is not
    assert not _blob_reads(listener), listener.calls
    assert [name for name, _ in listener.calls] == ["find"]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    listener.calls.clear()
    _, other = context.shared_global_model(db, "s", 1)
    assert _blob_reads(listener)
    assert np.array_equal(other[0], MODEL[0] + 1)
    # one model held at a time
    assert len(fresh_cache) == 1


def test_returned_arrays_cannot_change_what_the_next_run_gets(fn_db, fresh_cache):
    _put_model(fn_db, "s", 0, MODEL)
    _, weights = context.shared_global_model(fn_db, "s", 0)
    with pytest.raises(ValueError):
        weights[0][0, 0] = 99.0
    with pytest.raises(ValueError):
        weights[0].flags.writeable = True
    with pytest.raises(ValueError):
        weights[1] += 1
    weights[0] = np.zeros_like(weights[0])   # the caller's own list only
    _, next_run = context.shared_global_model(fn_db, "s", 0)
    assert all(np.array_equal(a, b) for a, b in zip(next_run, MODEL))


def test_the_cache_is_bounded_in_bytes(listener_db, monkeypatch):
    db, listener = listener_db
    size = sum(a.nbytes for a in MODEL)
    cache = ByteLRU(size - 1)   # the model does not fit
    monkeypatch.setattr(context, "_models", cache)
    _put_model(db, "s", 0, MODEL)
    for _ in range(2):
        listener.calls.clear()
        _, weights = context.shared_global_model(db, "s", 0)
        assert _blob_reads(listener), "a model over the bound is read every time"
        assert np.array_equal(weights[0], MODEL[0])
    assert cache.bytes == 0 and cache.peak_bytes <= size - 1


def test_a_warm_client_reads_the_model_blob_once_per_model(fn_db, fresh_cache, monkeypatch):
    """fl_client itself, two no-op runs of a round in one process, then the
    next round's model."""
    from test_functions import bound_for, load, make_session

    db = fn_db
    sid = make_session(db, clients=2, local_epochs=0)
    _put_model(db, sid, 0, MODEL)
    _put_model(db, sid, 1, [a + 1 for a in MODEL])
    model_blobs = {d["blob_id"] for d in db[fs.MODELS].find({"session": sid})}
    x, y = np.zeros((4, 3), np.float32), np.arange(4) % 2
    for c in range(2):
        blob = fs.put_arrays(db, [x, y], f"{sid}/part/{c}.npz", {"kind": "partition", "session": sid})
        db[fs.PARTITIONS].insert_one({"session": sid, "client": f"client_{c}", "blob_id": blob})
    reads: list = []
    real = fs.get_arrays

    def counting(db_, blob_id, *args, **kwargs):
        if blob_id in model_blobs:
            reads.append(blob_id)
        return real(db_, blob_id, *args, **kwargs)
    monkeypatch.setattr(fs, "get_arrays", counting)
    handle = load("fl_client").handle
    for rnd, client in ((0, "client_0"), (0, "client_1"), (1, "client_0")):
        out = handle({"session": sid, "round": rnd, "client": client, "attempt": 1}, bound_for(db))
        assert out["num_examples"] == 4 and not out["duplicate"]
    assert len(reads) == 2 and reads[0] != reads[1]
    # what each client stored is the model it was served
    for rnd, client, want in ((0, "client_1", MODEL), (1, "client_0", [a + 1 for a in MODEL])):
        doc = db[fs.UPDATES].find_one({"session": sid, "round": rnd, "client": client})
        assert all(np.array_equal(a, b) for a, b in zip(update_data.get_update_arrays(db, doc), want))
