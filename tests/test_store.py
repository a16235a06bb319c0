"""The store against a real server (SecantusDB via the embedded launcher)."""
from __future__ import annotations

import io
import os
import pickle
import threading
import time

import numpy as np
import pymongo
import pytest

from fedkeeper.store import INDEXES, OBSOLETE_INDEXES, Store
from fedkeeper.local.store import POOL_PER_PROCESS, EmbeddedMongo
from flcommon import store as fs
from flcommon.blobs import BlobError


def test_gridfs_round_trips_a_20mb_npz(store: Store):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2500, 1000)).astype(np.float32),   # 10 MB
              rng.standard_normal((1250, 1000)).astype(np.float64),   # 10 MB
              np.arange(10, dtype=np.int64)]
    blob = store.put_arrays(arrays, "big.npz", kind="model", session="s", round=0)
    size = store.db[f"{fs.BUCKET}.files"].find_one({"_id": blob})["length"]
    assert size >= 20_000_000
    back = store.get_arrays(blob)
    assert len(back) == 3
    for a, b in zip(arrays, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_a_pickle_blob_is_refused_on_load(store: Store):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bucket = fs.bucket(store.db)
    pid = bucket.upload_from_stream("evil.npz", io.BytesIO(pickle.dumps(Evil())))
    with pytest.raises(BlobError, match="pickle"):
        store.get_arrays(pid)
    # An npz whose member is an object array needs pickle too: refused.
    buf = io.BytesIO()
    np.savez(buf, arr_0000=np.array([{"a": 1}], dtype=object))
    oid = bucket.upload_from_stream("obj.npz", io.BytesIO(buf.getvalue()))
    with pytest.raises(BlobError):
        store.get_arrays(oid)


def test_non_npz_and_missing_blobs_are_refused(store: Store):
    bid = fs.bucket(store.db).upload_from_stream("junk", io.BytesIO(b"not a zip at all"))
    with pytest.raises(BlobError, match="not a valid npz"):
        store.get_arrays(bid)
    from bson import ObjectId
    with pytest.raises(BlobError, match="does not exist"):
        store.get_arrays(ObjectId())


def test_updates_are_unique_per_session_round_client(store: Store):
    doc = {"session": "s1", "round": 3, "client": "client_1", "attempt": 1, "num_examples": 5}
    store.db[fs.UPDATES].insert_one(dict(doc))
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        store.db[fs.UPDATES].insert_one(dict(doc, attempt=2))
    # Same client, other round or session: fine.
    store.db[fs.UPDATES].insert_one(dict(doc, round=4))
    store.db[fs.UPDATES].insert_one(dict(doc, session="s2"))
    assert store.delivered_clients("s1", 3) == {"client_1"}
    assert len(store.updates("s1")) == 2


def test_the_round_loops_queries_are_indexed(store: Store):
    for coll, specs in INDEXES.items():
        info = store.db[coll].index_information()
        keys = {tuple(tuple(k) for k in v["key"]) for v in info.values()}
        for fields, _ in specs:
            assert tuple(fields) in keys, f"{coll} lacks index {fields}"
    # The queries the keeper runs use those indexes rather than scanning:
    # a round's attempts, and the updates waiting for an aggregation (a
    # status and a range of rounds, asked every semi_async round and async
    # step).
    store.db[fs.UPDATES].insert_many([{"session": "x", "round": r, "client": f"c{c}",
                                       "status": "received" if r > 5 else "accepted"}
                                      for r in range(10) for c in range(5)])
    for cursor in (store.db[fs.INVOCATIONS].find({"session": "x", "round": 1}),
                   store.db[fs.UPDATES].find({"session": "x", "status": "received", "round": {"$gte": 2, "$lt": 8}})):
        plan = cursor.explain()
        assert "COLLSCAN" not in str(plan.get("queryPlanner", plan)), plan
    assert sorted(store.received_updates("x", 2, 8)) == sorted((f"c{c}", r) for r in (6, 7) for c in range(5))
    assert store.count_received_updates("x", 2, 8) == 10


def test_indexes_no_query_needs_are_dropped_from_an_older_store(store: Store):
    # As an earlier version left them: paid on every attempt write.
    store.db[fs.INVOCATIONS].create_index([("session", 1), ("state", 1)])
    store.db[fs.INVOCATIONS].create_index([("platform_id", 1)])
    store.db[fs.UPDATES].create_index([("session", 1), ("round", 1), ("status", 1)])
    store.ensure_indexes()
    for coll, names in OBSOLETE_INDEXES.items():
        present = set(store.db[coll].index_information())
        assert not present & set(names), coll
        assert len(present) == 1 + len(INDEXES[coll]), present   # _id and the ones kept
    store.ensure_indexes()   # nothing left to drop: no error


def test_sessions_rounds_attempts_and_events(store: Store):
    store.create_session({"_id": "a", "name": "n"})
    time.sleep(0.01)
    store.create_session({"_id": "b", "name": "n"})
    assert store.latest_session()["_id"] == "b"
    store.upsert_round("b", 0, state="running", selected=["client_0"])
    store.upsert_round("b", 0, state="done", accuracy=0.5)
    r = store.round("b", 0)
    assert r["state"] == "done" and r["selected"] == ["client_0"] and r["accuracy"] == 0.5
    from bson import ObjectId
    ids = [ObjectId(), ObjectId()]
    store.insert_attempts([{"_id": ids[0], "session": "b", "round": 0, "client": "client_0", "attempt": 1,
                            "state": "submitting"},
                           {"_id": ids[1], "session": "b", "round": 0, "client": "client_0", "attempt": 2,
                            "state": "submitting"}])
    store.update_attempts([(ids[0], {"state": "failed"}), (ids[1], {"state": "succeeded"})])
    assert [a["state"] for a in store.attempts("b", 0)] == ["failed", "succeeded"]
    # only the fields asked for (and the id), in the same order
    assert store.attempts("b", fields=("attempt", "state")) == [
        {"_id": ids[0], "attempt": 1, "state": "failed"}, {"_id": ids[1], "attempt": 2, "state": "succeeded"}]
    with pytest.raises(pymongo.errors.BulkWriteError):
        store.insert_attempts([{"session": "b", "round": 0, "client": "client_0", "attempt": 2}])
    # a resume adds the time the open rounds stood still, and leaves finished ones alone
    store.upsert_round("b", 1, state="running", started=100.0)
    store.upsert_round("b", 2, state="aggregating", started=110.0)
    store.pause_open_rounds("b", since=105.0, now=117.5)   # from the last heartbeat, or a later start
    store.pause_open_rounds("b", since=120.0, now=122.5)
    assert store.round("b", 1)["paused_s"] == 15.0 and store.round("b", 2)["paused_s"] == 10.0
    assert "paused_s" not in store.round("b", 0)
    store.event("b", "note", "hello", n=1)
    assert store.events("b")[0]["n"] == 1


def test_attempts_left_submitting_are_closed_on_resume(store: Store):
    from bson import ObjectId
    ids = [ObjectId() for _ in range(4)]
    base = {"session": "r", "round": 0, "function": "fl_client"}
    store.insert_attempts([
        {**base, "_id": ids[0], "client": "client_0", "attempt": 1, "state": "submitting"},
        {**base, "_id": ids[1], "client": "client_1", "attempt": 1, "state": "submitting", "platform_id": "p1"},
        {**base, "_id": ids[2], "client": "client_2", "attempt": 1, "state": "running", "platform_id": "p2"},
        {**base, "_id": ids[3], "session": "other", "client": "client_0", "attempt": 1, "state": "submitting"}])
    assert store.close_unaccepted_attempts("r", "keeper stopped", 5.0) == 1
    docs = store.attempts_by_id(ids)
    assert docs[ids[0]]["state"] == "abandoned" and docs[ids[0]]["error"] == "keeper stopped"
    assert docs[ids[0]]["finished"] == 5.0
    assert [docs[i]["state"] for i in ids[1:]] == ["running", "running", "submitting"]
    assert store.close_unaccepted_attempts("r", "keeper stopped", 6.0) == 0


def test_running_marks_written_in_batches_are_folded_into_the_attempts_they_name(store: Store):
    """keeper/running_marks.py: on resume (or when a keeper is interrupted)
    an attempt still `submitting` that a batch marks becomes `running`, an
    attempt that ended keeps its outcome, an unmarked one is abandoned, and
    the session's batches are dropped."""
    from bson import ObjectId
    from fedkeeper.store import RUNNING_MARKS
    ids = [ObjectId() for _ in range(4)]
    base = {"session": "m", "round": 0, "function": "fl_client", "attempt": 1, "submitted": 1.0}
    store.insert_attempts([
        {**base, "_id": ids[0], "client": "client_0", "state": "submitting"},
        {**base, "_id": ids[1], "client": "client_1", "state": "submitting"},
        {**base, "_id": ids[2], "client": "client_2", "state": "succeeded", "platform_id": "p2"},
        {**base, "_id": ids[3], "session": "other", "client": "client_0", "state": "submitting"}])
    mark = {"state": "running", "submitted": 2.5}
    store.MARKS_PER_DOC = 1   # a batch over several documents
    store.insert_running_marks("m", [(ids[0], {**mark, "platform_id": "p0"}),
                                     (ids[2], {**mark, "platform_id": "p2-late"})])
    assert store.db[RUNNING_MARKS].count_documents({"session": "m"}) == 2
    store.insert_running_marks("other", [(ids[3], {**mark, "platform_id": "p3"})])
    assert store.close_unaccepted_attempts("m", "keeper stopped", 5.0) == 1
    docs = store.attempts_by_id(ids)
    assert (docs[ids[0]]["state"], docs[ids[0]]["platform_id"], docs[ids[0]]["submitted"]) == ("running", "p0", 2.5)
    assert docs[ids[1]]["state"] == "abandoned" and docs[ids[1]]["unsent"] is True   # not counted on resume
    assert "unsent" not in docs[ids[0]]
    assert (docs[ids[2]]["state"], docs[ids[2]]["platform_id"]) == ("succeeded", "p2")
    assert docs[ids[3]]["state"] == "submitting"            # another session's, untouched
    assert store.db[RUNNING_MARKS].count_documents({"session": "m"}) == 0
    assert store.db[RUNNING_MARKS].count_documents({"session": "other"}) == 1


def test_a_batch_of_marks_written_while_marks_are_folded_is_kept_for_the_next_fold(store, monkeypatch):
    """A combiner thread may write a batch while an interrupted keeper folds
    its marks: the fold drops only the batches it read."""
    from bson import ObjectId
    from pymongo.collection import Collection
    from fedkeeper.store import RUNNING_MARKS
    ids = [ObjectId() for _ in range(2)]
    store.insert_attempts([{"_id": i, "session": "m", "round": 0, "client": f"client_{k}", "function": "fl_client",
                            "attempt": 1, "submitted": 1.0, "state": "submitting"} for k, i in enumerate(ids)])
    store.insert_running_marks("m", [(ids[0], {"state": "running", "platform_id": "p0"})])
    bulk_write, raced = Collection.bulk_write, []

    def racing_bulk_write(self, ops, **kw):
        if not raced:   # the other thread's batch lands between the fold's read and its delete
            raced.append(store.insert_running_marks("m", [(ids[1], {"state": "running", "platform_id": "p1"})]))
        return bulk_write(self, ops, **kw)
    monkeypatch.setattr(Collection, "bulk_write", racing_bulk_write)
    assert store.fold_running_marks("m") == 1
    assert store.db[RUNNING_MARKS].count_documents({"session": "m"}) == 1
    assert store.fold_running_marks("m") == 1
    docs = store.attempts_by_id(ids)
    assert [docs[i]["platform_id"] for i in ids] == ["p0", "p1"]
    assert store.db[RUNNING_MARKS].count_documents({"session": "m"}) == 0


def test_embedded_server_is_reused_and_stops_cleanly(tmp_path):
    server = EmbeddedMongo(tmp_path / "m")
    url, started = server.start()
    try:
        assert started
        again = EmbeddedMongo(tmp_path / "m")
        url2, started2 = again.start()
        assert (url2, started2) == (url, False)
        with pymongo.MongoClient(url) as c:
            c.db.k.insert_one({"x": 1})
            # What every client of the embedded store gets from its URL
            # (the keeper's and the functions'): see EmbeddedMongo.url_for.
            assert c.options.retry_writes is False
            assert c.options.pool_options.max_pool_size == POOL_PER_PROCESS
    finally:
        assert server.stop()
    assert server.running_url() is None
    # Data and port survive a restart.
    url3, started3 = server.start()
    try:
        assert started3 and url3 == url
        with pymongo.MongoClient(url3) as c:
            assert c.db.k.find_one({"x": 1}) is not None
    finally:
        server.stop()


def test_a_server_that_runs_but_answers_slowly_is_waited_for_not_started_twice(tmp_path):
    """A loaded machine's server misses the quick ping: a second command
    waits for it (a second server on the same data would be refused and
    the first one's leases dropped), and says so if it never answers."""
    import signal
    from fedkeeper.local.store import EmbeddedMongoError
    server = EmbeddedMongo(tmp_path / "m")
    url, _ = server.start()
    pid = server._read_info()["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)   # alive, answering nothing
        with pytest.raises(EmbeddedMongoError, match=f"pid {pid}\\) runs but has not answered"):
            EmbeddedMongo(tmp_path / "m").start(timeout_s=2.0)
        threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()   # answers again a moment later
        assert EmbeddedMongo(tmp_path / "m").start(timeout_s=20.0) == (url, False)   # this process's lease
        assert server._read_info()["pid"] == pid
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


# --------------------------------------------------------------------------- a store that stops answering
def _patience_with_fake_time(patience_s: float):
    from fedkeeper.store.patience import Patience
    t = [0.0]
    slept: list[float] = []

    def sleep(d: float) -> None:
        slept.append(d)
        t[0] += d

    return Patience("db.example:27017", patience_s, backoff_s=0.5, backoff_max_s=4.0, sleep=sleep,
                    clock=lambda: t[0]), slept


def test_an_unreachable_store_is_waited_for_with_capped_backoff_then_named_in_one_line():
    from fedkeeper.store import StoreUnavailable
    patience, slept = _patience_with_fake_time(20.0)

    def down():
        raise pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:1: [Errno 111] Connection refused, "
                                                          "Timeout: 5s, Topology Description: <...>")

    with pytest.raises(StoreUnavailable) as info:
        patience.run(down)
    assert slept[:4] == [0.5, 1.0, 2.0, 4.0] and max(slept) == 4.0
    assert sum(slept) == pytest.approx(20.0)
    text = str(info.value)
    assert text.startswith("the store at db.example:27017 is unreachable") and "\n" not in text
    assert "Topology" not in text


def test_a_store_that_comes_back_is_used_again_and_a_landed_insert_counts_as_done():
    patience, slept = _patience_with_fake_time(60.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise pymongo.errors.AutoReconnect("connection reset")
        if len(calls) == 3:
            # The first try's insert landed before its answer was lost.
            raise pymongo.errors.DuplicateKeyError("E11000 duplicate key")
        return "ok"

    assert patience.run(flaky, insert=True) is None
    assert len(calls) == 3 and slept == [0.5, 1.0]
    # Without an outage before it, a duplicate key is a real error.
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        patience.run(lambda: (_ for _ in ()).throw(pymongo.errors.DuplicateKeyError("dup")), insert=True)


def test_store_credentials_never_appear_in_its_address():
    from fedkeeper.store.patience import display_address
    assert display_address("mongodb://user:s3cret@db.example:27017/fl?tls=true") == "db.example:27017"
    assert "s3cret" not in display_address("mongodb+srv://user:s3cret@cluster0.example.net")


def test_keeper_queries_answer_from_the_store(store: Store):
    store.create_session({"_id": "s"})
    store.insert_attempts([
        {"_id": 1, "session": "s", "round": 0, "client": "client_0", "attempt": 1, "function": "fl_client",
         "state": "running", "cluster": "a"},
        {"_id": 2, "session": "s", "round": 0, "client": "_fl_server_aggregator", "attempt": 2,
         "function": "fl_server_aggregator", "state": "failed", "cluster": "a"},
        {"_id": 3, "session": "s", "round": 1, "client": "client_1", "attempt": 1, "function": "fl_client",
         "state": "succeeded", "cluster": "a", "duration_ms": 5.0}])
    assert store.last_attempt("s", 0, "_fl_server_aggregator") == 2
    assert store.last_attempt("s", 3, "client_0") == 0
    assert [a["_id"] for a in store.running_client_attempts("s", 1)] == [1]
    assert store.running_client_attempts("s", 0) == []
    assert [a["_id"] for a in store.ended_client_attempts("s", ["succeeded", "failed"])] == [3]
    assert set(store.attempts_by_id([1, 3])) == {1, 3}
    for rnd, client, attempt in ((0, "client_0", 1), (1, "client_1", 1), (1, "client_2", 3), (2, "client_0", 1),
                                 (1, "client_3", True), (1, "client_4", None)):
        store.db[fs.UPDATES].insert_one({"session": "s", "round": rnd, "client": client, "status": "received",
                                         **({"attempt": attempt} if attempt is not None else {})})
    # the attempt that stored each (None where the document gives no attempt number)
    assert store.storing_attempts("s", 1, ["client_2", "client_0", "client_3", "client_4"]) == {
        "client_2": 3, "client_3": None, "client_4": None}
    assert sorted(store.received_updates("s", 1, 2)) == [("client_1", 1), ("client_2", 1), ("client_3", 1),
                                                         ("client_4", 1)]
    assert store.count_received_updates("s", 0, 2) == 5
    store.mark_updates_stale("s", 1)
    assert store.count_received_updates("s", 0, 3) == 5   # rounds 1 and 2
    assert store.received_updates("s", 0, 1) == []
    assert store.heartbeat("s", now=123.0) and store.session("s")["heartbeat"] == 123.0
    me, other = {"host": "h", "pid": 8, "started": 2.5}, {"host": "h", "pid": 9, "started": 3.5}
    store.update_session("s", keeper=me)
    assert store.heartbeat("s", now=124.0, keeper=me) is True and store.session("s")["heartbeat"] == 124.0
    assert store.heartbeat("s", now=125.0, keeper=other) is None     # the session names another keeper
    assert store.session("s")["heartbeat"] == 124.0
    store.update_session("s", state="running")
    store.mark_interrupted("s", keeper=other)                       # not other's to mark
    assert store.session("s")["state"] == "running"
    store.mark_interrupted("s", keeper=me)
    assert store.session("s")["state"] == "interrupted"
    assert not store.end_session("s", other, state="finished") and store.session("s")["state"] == "interrupted"
    assert store.end_session("s", me, state="finished") and store.session("s")["state"] == "finished"
    store.update_session("s", state="running")
    assert store.mark_interrupted("s") and store.session("s")["state"] == "interrupted"
    store.update_session("s", state="finished")
    store.mark_interrupted("s")
    assert store.session("s")["state"] == "finished"


def test_a_store_restart_hook_is_tried_once_per_outage():
    patience, slept = _patience_with_fake_time(10.0)
    restarts = []
    calls = []

    def down_until_restarted():
        calls.append(1)
        if not restarts:
            raise pymongo.errors.AutoReconnect("connection refused")
        return "back"

    patience.restart = lambda: restarts.append(1) or True
    assert patience.run(down_until_restarted) == "back"
    assert restarts == [1] and slept == [] and len(calls) == 2


def test_the_embedded_store_killed_under_a_runtime_is_started_again(tmp_path, monkeypatch):
    """The keeper owns the embedded store: when it dies, the runtime starts
    it again on the same port and data, and the store calls go on."""
    from fedkeeper.config import load_config
    from fedkeeper.local.store import EmbeddedMongo
    from fedkeeper.runtime import Runtime
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(tmp_path / "state"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: t\nproviders:\n  openwhisk:\n    c1: {kind: local}\nscenarios:\n"
                   "  federated_learning:\n    clients_info: {total_num_clients: 2, num_clients_per_round: 2,"
                   " clusters: {c1: 2}}\n    mongo_config: {url: embedded, db: t}\n")
    rt = Runtime.open(load_config(cfg))
    try:
        rt.store.create_session({"_id": "s"})
        assert EmbeddedMongo(rt._embedded.state_dir).shutdown()
        rt.store.patience_s = 30.0
        rt.store.patience.restart = rt.restart_store
        assert rt.store.session("s")["_id"] == "s"
    finally:
        rt.close()


def test_a_session_is_claimed_only_from_the_keeper_a_check_saw(store: Store):
    """claim_session is one conditional write: of two keepers that both saw
    the same gone keeper, the second finds the session claimed."""
    store.create_session({"_id": "c"})
    gone = {"host": "h", "pid": 7, "started": 1.5}
    a, b = {"host": "h", "pid": 8, "started": 2.5}, {"host": "h", "pid": 9, "started": 3.5}
    assert store.claim_session("c", None, gone, state="running")       # none recorded yet
    assert not store.claim_session("c", None, a, state="x")             # not "none" any more
    assert store.claim_session("c", gone, a, state="running", heartbeat=10.0)
    assert not store.claim_session("c", gone, b, state="y")             # a claimed it first
    doc = store.session("c")
    assert doc["keeper"] == a and doc["state"] == "running" and doc["heartbeat"] == 10.0
    assert store.claim_session("c", a, a)                                # the same keeper again


def test_a_claim_whose_answer_was_lost_is_still_the_keepers(store: Store, monkeypatch):
    """The claim's write lands, its answer is lost, the store layer retries
    it: the retry matches nothing (the keeper is no longer the one seen),
    yet the session is this keeper's, not another's."""
    from pymongo.collection import Collection
    store.create_session({"_id": "c", "keeper": {"host": "h", "pid": 7, "started": 1.5}})
    me, other = {"host": "h", "pid": 8, "started": 2.5}, {"host": "h", "pid": 9, "started": 3.5}
    update_one, lost = Collection.update_one, []

    def answer_lost_once(self, *args, **kw):
        res = update_one(self, *args, **kw)
        if self.name == fs.SESSIONS and not lost:
            lost.append(1)
            raise pymongo.errors.AutoReconnect("connection reset")
        return res
    monkeypatch.setattr(Collection, "update_one", answer_lost_once)
    monkeypatch.setattr(store.patience, "patience_s", 10.0)   # the keeper's store waits out an outage
    monkeypatch.setattr(store.patience, "_sleep", lambda s: None)
    assert store.claim_session("c", {"host": "h", "pid": 7, "started": 1.5}, me, state="running") and lost
    assert store.session("c")["keeper"] == me
    assert not store.claim_session("c", {"host": "h", "pid": 7, "started": 1.5}, other)


def test_the_embedded_store_writes_no_oplog(mongo_url):
    """FedKeeper reads no change stream: the embedded store runs standalone,
    so no write pays for an oplog entry (about a sixth of an update's cost)."""
    client = pymongo.MongoClient(mongo_url)
    try:
        assert "setName" not in client.admin.command("hello")
        coll = client["oplog_check"]["docs"]
        coll.insert_one({"_id": 1, "state": "submitting"})
        coll.update_one({"_id": 1}, {"$set": {"state": "succeeded"}})
        assert client["local"]["oplog.rs"].count_documents({"ns": "oplog_check.docs"}) == 0
    finally:
        client.close()


def test_the_keepers_reads_skip_update_documents_that_are_nobodys(store: Store):
    """An update document written with `client: [...]` or `round: [...]`
    (any function can write one; MongoDB's matching finds it) crashed the
    keeper on every resume and every async step (an unhashable key)."""
    store.db[fs.UPDATES].insert_many([
        {"session": "s", "round": 0, "client": "client_0", "status": "received", "attempt": 1},
        {"session": "s", "round": 0, "client": ["client_2"], "status": "received", "attempt": 1},
        {"session": "s", "round": [0, 1], "client": "client_3", "status": "received", "attempt": 1}])
    assert store.delivered_clients("s", 0) == {"client_0"}
    assert store.received_updates("s", 0, 2) == [("client_0", 0)]
    assert store.storing_attempts("s", 0, ["client_0", "client_2", "client_3"]) == {"client_0": 1}
