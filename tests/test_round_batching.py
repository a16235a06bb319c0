"""Round work that must not grow with the clients: the aggregator asks the
store a fixed number of times however many updates it reads (lists in
slices, small blobs a group per query, writes in bulk)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pymongo
import pytest
from pymongo import monitoring

from flcommon import store as fs
from flcommon.blobs import BlobError
from flcommon.strategies import get_strategy
from flcommon.update_stream import aggregate

from test_aggregator import _put_update

#: Commands every connection sends on its own; not the aggregator's questions.
HOUSEKEEPING = {"hello", "ismaster", "isMaster", "ping", "endSessions", "killCursors", "saslStart", "saslContinue"}


class Commands(monitoring.CommandListener):
    def __init__(self):
        self.names: list[str] = []
        self.collections: list[str] = []
        self.finds: list[tuple[str, dict]] = []   # (collection, filter) of each find
        self.projections: list[dict | None] = []  # each find's projection, in the same order

    def started(self, event):
        if event.command_name not in HOUSEKEEPING:
            self.names.append(event.command_name)
            self.collections.append(str(event.command.get(event.command_name)))
        if event.command_name == "find":
            self.finds.append((str(event.command["find"]), dict(event.command.get("filter", {}))))
            projection = event.command.get("projection")
            self.projections.append(dict(projection) if projection is not None else None)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


@pytest.fixture
def counted(fn_db):
    """(db through a client that counts its commands, the listener)."""
    listener = Commands()
    host, port = fn_db.client.address
    client = pymongo.MongoClient(f"mongodb://{host}:{port}/", event_listeners=[listener])
    yield client[fn_db.name], listener
    client.close()


BASE = [np.zeros((3, 4), np.float32), np.zeros(4, np.float32)]


def _round(db, session: str, clients: int, inline: bool = False) -> list[tuple[str, int]]:
    wanted = []
    for i in range(clients):
        arrays = [b + i for b in BASE]
        if inline:   # as fl_client keeps a small update: in its own document
            data = bytes(fs.encode_arrays(arrays))
            db[fs.UPDATES].insert_one({"session": session, "round": 0, "client": f"client_{i}", "attempt": 1,
                                       "data": data, "length": len(data), "num_examples": 1,
                                       "status": "received"})
        else:
            _put_update(db, session, 0, f"client_{i}", arrays, n=1)
        wanted.append((f"client_{i}", 0))
    return wanted


@pytest.mark.parametrize("inline", [False, True], ids=["blobs", "inline"])
def test_aggregating_asks_the_store_as_often_for_40_updates_as_for_4(counted, monkeypatch, inline):
    db, listener = counted
    monkeypatch.setattr(fs, "IN_SLICE", 64)  # every list fits one slice: the count must not move at all
    asked = {}
    for n in (4, 40):
        wanted = _round(db, f"s{n}", n, inline)
        strategy = get_strategy("fedavg")
        listener.names.clear()
        listener.collections.clear()
        accepted, rejected = aggregate(db, f"s{n}", 0, wanted, BASE, strategy, use_partials=False)
        asked[n] = list(listener.names)
        assert len(accepted) == n and not rejected
        mean, _ = strategy.finish(BASE, None)
        assert np.allclose(mean[0], (n - 1) / 2)  # every client's delta i, equally weighted
    assert asked[4] == asked[40], asked
    if inline:   # GridFS is never asked; the updates' listing, then their data
        assert not [c for c in listener.collections if c.startswith(fs.BUCKET)], listener.collections
        assert listener.collections.count(fs.UPDATES) == 2, listener.collections


def test_a_warm_worker_reads_a_sessions_partition_sizes_once(counted):
    db, listener = counted
    wanted = _round(db, "sizes", 40, inline=True)
    db[fs.PARTITIONS].insert_many([{"session": "sizes", "client": c, "num_examples": 1} for c, _ in wanted])
    asked = []
    for _ in range(2):
        listener.collections.clear()
        accepted, rejected = aggregate(db, "sizes", 0, wanted, BASE, get_strategy("fedavg"), use_partials=False)
        assert len(accepted) == 40 and not rejected
        asked.append(listener.collections.count(fs.PARTITIONS))
    assert asked[0] >= 1 and asked[1] == 0, asked
    # A claim beyond the partition is still refused from the kept sizes.
    db[fs.UPDATES].update_one({"session": "sizes", "client": "client_3"}, {"$set": {"num_examples": 7}})
    _, rejected = aggregate(db, "sizes", 0, wanted, BASE, get_strategy("fedavg"), use_partials=False)
    assert [r["client"] for r in rejected] == ["client_3"] and "partition has 1" in rejected[0]["reason"]


def test_long_lists_are_asked_in_slices_and_nothing_is_lost(counted):
    db, listener = counted
    db["things"].insert_many([{"k": i} for i in range(100)])
    listener.names.clear()
    got = sorted(d["k"] for d in fs.find_in(db["things"], {}, "k", list(range(90)) + [5, 7, 1000]))
    assert got == list(range(90))  # repeats asked once, unknown values match nothing
    assert listener.names.count("find") == -(-90 // fs.IN_SLICE)


def test_small_blobs_are_read_a_group_per_query_and_each_is_checked(counted):
    db, listener = counted
    ids = [fs.put_arrays(db, [np.full(3, i, np.float32)], f"b{i}", {"i": i}) for i in range(5)]
    docs = {d["_id"]: d for d in db[f"{fs.BUCKET}.files"].find({"_id": {"$in": ids}})}
    db[f"{fs.BUCKET}.chunks"].delete_one({"files_id": ids[1]})                        # chunk missing
    db[f"{fs.BUCKET}.chunks"].update_one({"files_id": ids[3]}, {"$set": {"data": b"x"}})  # wrong size
    listener.names.clear()
    out = fs.get_small_arrays(db, [docs[i] for i in ids])
    assert listener.names == ["find"]
    assert [a[0].tolist() for a in (out[0], out[2], out[4])] == [[0.0] * 3, [2.0] * 3, [4.0] * 3]
    assert isinstance(out[1], BlobError) and "missing" in str(out[1])
    assert isinstance(out[3], BlobError) and "wrong size" in str(out[3])
    # An encoding over the caller's bound is refused, not decoded.
    assert isinstance(fs.get_small_arrays(db, [docs[ids[0]]], max_bytes=4)[0], BlobError)


def test_small_blobs_are_grouped_within_the_slice_and_byte_bounds(monkeypatch):
    monkeypatch.setattr(fs, "SMALL_BATCH_BYTES", 100)
    small = [{"length": 40, "chunkSize": 255 * 1024} for _ in range(5)]
    big = {"length": 300 * 1024, "chunkSize": 255 * 1024}
    groups = list(fs.small_blob_batches(small[:3] + [big] + small[3:]))
    # 40 + 40 fits 100 bytes, a third does not; a multi-chunk blob is read alone.
    assert [len(g) for g in groups] == [2, 1, 1, 2]
    assert groups[2] == [big]
    monkeypatch.setattr(fs, "SMALL_BATCH_BYTES", 1 << 20)
    many = [{"length": 10, "chunkSize": 100}] * (2 * fs.IN_SLICE + 1)
    assert [len(g) for g in fs.small_blob_batches(many)] == [fs.IN_SLICE, fs.IN_SLICE, 1]


# ---------------------------------------------------------------- the keeper

def _store_calls_per_session(tmp_path, monkeypatch, clients: int, behave=None) -> Counter:
    """The keeper's store calls over a 3-round sync session on fakes (the
    fake platform's own writes, which stand for the functions', left out)."""
    from keeper_fakes import FakeStore, fake_keeper
    tmp_path.mkdir()
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FEDKEEPER_LOG_DIR", str(tmp_path / "logs"))
    keeper, store, _, _ = fake_keeper(tmp_path, behave, clients=clients, per_round=clients, rounds=3)
    calls: Counter = Counter()
    for name in [m for m in vars(FakeStore) if not m.startswith("_") and m not in ("add_update", "heartbeat")]:
        method = getattr(store, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)
        setattr(store, name, counted)
    summary = keeper.start()
    assert summary.state == "finished" and [r.delivered for r in summary.rounds] == [clients] * 3
    client_attempts = 3 * clients * (2 if behave else 1)
    assert len(store.invocations) == client_attempts + 3 + 1  # every attempt still has its record
    return calls


def test_the_keeper_asks_the_store_as_often_for_100_clients_as_for_5(tmp_path, monkeypatch):
    few = _store_calls_per_session(tmp_path / "few", monkeypatch, 5)
    many = _store_calls_per_session(tmp_path / "many", monkeypatch, 100)
    assert many == few, (few, many)


def test_failed_attempts_cost_the_keeper_one_store_query_per_pass_not_one_each(tmp_path, monkeypatch):
    """Every client's first attempt crashes: whether each crashed client
    has an update stored anyway is asked once per tracking pass."""
    from fedkeeper.providers import ErrorClass, Outcome

    def crash_first(function, payload, attempt):
        if function == "fl_client" and attempt == 1:
            return Outcome("", False, ErrorClass.APPLICATION_ERROR, "crashed")
        return "ok"
    few = _store_calls_per_session(tmp_path / "few", monkeypatch, 5, crash_first)
    many = _store_calls_per_session(tmp_path / "many", monkeypatch, 100, crash_first)
    assert many == few and few["storing_attempts"] == 3, (few, many)


def test_the_store_says_which_clients_have_an_update_in_slices(store, monkeypatch):
    monkeypatch.setattr(fs, "IN_SLICE", 4)
    store.db[fs.UPDATES].insert_many([{"session": "s", "round": r, "client": f"client_{i}", "attempt": i + r}
                                      for r in (0, 1) for i in range(10) if i % 3 or r == 0])
    asked = [f"client_{i}" for i in range(12)]
    assert store.storing_attempts("s", 1, asked) == {f"client_{i}": i + 1 for i in range(10) if i % 3}
    assert store.storing_attempts("s", 0, []) == {}


def test_a_long_list_of_a_rounds_updates_is_one_query_and_counts_only_the_listed(counted, monkeypatch):
    """More listed clients than one `$in` slice: the round's updates are
    read, with their data, by one query (update_stream._read_round), and an
    update of the round that is not listed (one the keeper left out) is
    never counted."""
    db, listener = counted
    monkeypatch.setattr(fs, "IN_SLICE", 4)
    every = _round(db, "long", 10, inline=True)
    wanted = every[:8] + [("client_99", 0)]        # two left out, one never stored
    strategy = get_strategy("fedavg")
    accepted, rejected = aggregate(db, "long", 0, wanted, BASE, strategy, use_partials=False, whole_round=True)
    assert sorted(a["client"] for a in accepted) == sorted(c for c, _ in every[:8])
    assert [(r["client"], r["reason"]) for r in rejected] == [("client_99", "no update stored for this round")]
    mean, _ = strategy.finish(BASE, None)
    assert np.allclose(mean[0], 3.5)   # clients 0..7, equally weighted: not 8 and 9
    listings = [f for c, f in listener.finds if c == fs.UPDATES and "_id" not in f]
    assert listings == [{"session": "long", "round": 0}], listener.finds
    assert not [f for c, f in listener.finds if c == fs.UPDATES and "_id" in f], listener.finds   # no second read


def test_a_combiners_long_list_is_asked_by_client_and_id_not_by_the_whole_round(counted, monkeypatch):
    """A combiner lists one cluster's updates, or those arrived since its
    last fold: reading the whole round with its data for each list would
    read every other cluster's updates too. Only the aggregator's call
    (whole_round) reads the round in one pass."""
    db, listener = counted
    monkeypatch.setattr(fs, "IN_SLICE", 4)
    every = _round(db, "part", 10, inline=True)
    accepted, rejected = aggregate(db, "part", 0, every[:6], BASE, get_strategy("fedavg"), use_partials=False)
    assert sorted(a["client"] for a in accepted) == sorted(c for c, _ in every[:6]) and not rejected
    by_id = [f for c, f in listener.finds if c == fs.UPDATES and "_id" in f]
    assert len(by_id) == 2, listener.finds   # six updates' data, four ids a query
    listings = [f for c, f in listener.finds if c == fs.UPDATES and "_id" not in f]
    assert len(listings) == 2 and all("client" in f for f in listings), listener.finds   # by client, not the round


def test_after_partials_the_clients_left_are_read_by_id_not_by_a_pass_over_the_round(counted, monkeypatch):
    """A hierarchical round: the aggregator reads only the updates no
    partial counted. Those are usually a few of the round's; a pass over
    the round with the data would read every counted one's again."""
    from flcommon.partials import PartialSum, write_partial
    db, listener = counted
    monkeypatch.setattr(fs, "IN_SLICE", 4)
    every = _round(db, "tail", 10, inline=True)
    partial = PartialSum()
    counted_by_alpha, _ = aggregate(db, "tail", 0, every[:3], BASE, partial, use_partials=False)
    write_partial(db, "tail", 0, "alpha", partial, counted_by_alpha, [], 0.0)
    del listener.finds[:], listener.projections[:]
    strategy = get_strategy("fedavg")
    accepted, rejected = aggregate(db, "tail", 0, every, BASE, strategy, whole_round=True)
    assert sorted(a["client"] for a in accepted) == sorted(c for c, _ in every) and not rejected
    mean, _ = strategy.finish(BASE, None)
    assert np.allclose(mean[0], 4.5)   # clients 0..9, equally weighted
    updates = [(f, p) for (c, f), p in zip(listener.finds, listener.projections) if c == fs.UPDATES]
    assert [f for f, _ in updates if "_id" in f], updates   # the seven left, read by id
    assert all(p == {"data": 0} for f, p in updates if "_id" not in f), updates   # listed without their data


@pytest.mark.parametrize("floats", [100, 65140, 65150, 65300])
def test_an_update_is_taken_for_inline_exactly_when_its_encoding_fits_a_chunk(floats):
    """A model just under a chunk may encode to more (the archive's
    headers): its updates are then blobs, and a pass over the round's
    documents would bring no data."""
    from flcommon import update_data
    arrays = [np.zeros(floats, np.float32), np.zeros(10, np.float32)]
    fits = len(fs.encode_arrays(arrays)) <= update_data.INLINE_MAX_BYTES
    assert update_data.kept_inline([(a.shape, a.dtype) for a in arrays]) is fits
    assert fits is (floats <= 65140)


def test_a_pass_over_the_round_drops_every_documents_data_once_decoded():
    """The documents of blobs are kept till the pass ends: a `data` field
    on one (written by anyone holding the store's credentials) must not
    stay held with it."""
    from flcommon.update_stream import _decoded
    data = bytes(fs.encode_arrays(BASE))
    group = [{"client": "a", "blob_id": "b1", "data": b"x" * 1000},
             {"client": "b", "length": len(data), "data": data}]
    out = _decoded(group, sum(b.nbytes for b in BASE))
    assert out[0] is None and [a.shape for a in out[1]] == [b.shape for b in BASE]
    assert all("data" not in d for d in group)


def test_a_round_document_whose_client_is_no_name_is_nobodys(counted, monkeypatch):
    """Documents whose `client` is a mapping or a list (which a set cannot
    hold) in the round: the listed clients are aggregated as usual, whether
    the round is read in one pass or listed first (as after partials)."""
    from flcommon.update_stream import _listed
    db, _ = counted
    monkeypatch.setattr(fs, "IN_SLICE", 4)
    every = _round(db, "odd", 10, inline=True)
    for weird in ({"$oops": 1}, ["not_listed"]):
        db[fs.UPDATES].insert_one({"session": "odd", "round": 0, "client": weird, "attempt": 1, "length": 8,
                                   "data": b"12345678", "num_examples": 1, "status": "received"})
    accepted, rejected = aggregate(db, "odd", 0, every, BASE, get_strategy("fedavg"), use_partials=False,
                                   whole_round=True)
    assert sorted(a["client"] for a in accepted) == sorted(c for c, _ in every) and not rejected
    listed = list(_listed(db, "odd", 0, [c for c, _ in every], whole_round=True))
    assert sorted(d["client"] for d in listed) == sorted(c for c, _ in every)
