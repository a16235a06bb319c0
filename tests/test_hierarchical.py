"""Hierarchical aggregation: combiners' partial sums, combined by the
aggregator, give the model a flat aggregation of the same updates gives
(FedAvg and a server optimizer, over two rounds for its state); the round's
documents say which combiner counted which update, and no update is counted
twice across levels; robust strategies and privacy refuse it at config."""
from __future__ import annotations

import numpy as np
import pytest

from fedkeeper.config.training import TrainingConfig
from flcommon import store as fs
from flcommon.partials import PARTIALS
from test_aggregator import _model, _put_update
from test_functions import call, make_session

CLUSTERS = {"alpha": ["client_0", "client_1", "client_2"], "beta": ["client_3", "client_4", "client_5"]}
CLIENTS = [c for cs in CLUSTERS.values() for c in cs]


def _sessions(db, strategy):
    """Two sessions with the same spec and model 0: one flat, one hierarchical."""
    flat = make_session(db, clients=len(CLIENTS), strategy=strategy)
    spec = db[fs.SESSIONS].find_one({"_id": flat})["spec"]
    hier = flat + "-h"
    db[fs.SESSIONS].insert_one({"_id": hier, "spec": spec, "clusters": _cluster_of(CLUSTERS)})
    for sid in (flat, hier):
        call("fl_server_init", db, session=sid, round=0)
    assert all(np.array_equal(a, b) for a, b in zip(_model(db, flat, 0), _model(db, hier, 0)))
    return flat, hier


def _cluster_of(clusters):
    return {c: cluster for cluster, clients in clusters.items() for c in clients}


def _close(db, sid, rnd, included):
    """What the keeper writes before aggregating: the round's listed clients."""
    db[fs.ROUNDS].update_one({"session": sid, "round": rnd},
                             {"$set": {"state": "aggregating", "included": included}}, upsert=True)


def _plant(db, sids, rnd, seed):
    base = _model(db, sids[0], rnd)
    rng = np.random.default_rng(seed)
    for c in CLIENTS:
        update = [(w + rng.standard_normal(w.shape) * 0.1).astype(w.dtype) for w in base]
        for sid in sids:
            _put_update(db, sid, rnd, c, [u.copy() for u in update])


def _round(db, flat, hier, rnd, combiners=CLUSTERS):
    out_flat = call("fl_server_aggregator", db, session=flat, round=rnd, clients=CLIENTS)
    _close(db, hier, rnd, CLIENTS)
    for cluster, clients in combiners.items():
        # Each combiner finds its clients from the store: the cluster map as it is when it runs.
        db[fs.SESSIONS].update_one({"_id": hier}, {"$set": {"clusters": _cluster_of({cluster: clients})}})
        out = call("fl_combiner", db, session=hier, round=rnd, cluster_name=cluster)
        assert out["combined"] == len(clients) and out["rejected_count"] == 0
    out_hier = call("fl_server_aggregator", db, session=hier, round=rnd, clients=CLIENTS)
    return out_flat, out_hier


@pytest.mark.parametrize("strategy", ["fedavg", {"name": "fedadam", "server_lr": 0.05}])
def test_hierarchical_equals_flat(fn_db, strategy):
    db = fn_db
    flat, hier = _sessions(db, strategy)
    for rnd in range(2):   # two rounds: a server optimizer's state is read back
        _plant(db, (flat, hier), rnd, seed=rnd)
        out_flat, out_hier = _round(db, flat, hier, rnd)
        assert out_hier["accepted"] == out_flat["accepted"] == len(CLIENTS)
        w_flat, w_hier = _model(db, flat, rnd + 1), _model(db, hier, rnd + 1)
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_flat, w_hier)) <= 1e-6
        m_flat = db[fs.MODELS].find_one({"session": flat, "round": rnd + 1})
        m_hier = db[fs.MODELS].find_one({"session": hier, "round": rnd + 1})
        assert [c["client"] for c in m_hier["contributions"]] == CLIENTS
        assert [c["weight"] for c in m_hier["contributions"]] == \
            pytest.approx([c["weight"] for c in m_flat["contributions"]])
        # Which combiner counted which update, on both levels' documents.
        by = {c["client"]: c.get("combined_by") for c in m_hier["contributions"]}
        for cluster, clients in CLUSTERS.items():
            part = db[PARTIALS].find_one({"session": hier, "round": rnd, "cluster": cluster})
            assert [c["client"] for c in part["clients"]] == clients and part["used"] is True
            assert all(by[c] == cluster for c in clients)
    if isinstance(strategy, dict):
        assert db[fs.MODELS].find_one({"session": hier, "round": 2}).get("state_blob_id") is not None


def test_a_client_in_two_partials_is_counted_once(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    _plant(db, (flat, hier), 0, seed=3)
    overlapping = {"alpha": CLIENTS[:3], "beta": CLIENTS[2:5]}   # client_2 in both; client_5 in none
    out_flat, out_hier = _round(db, flat, hier, 0, combiners=overlapping)
    # beta's partial lists client_2, which alpha's counted: refused whole;
    # its clients and client_5 are read by the aggregator itself, once each.
    beta = db[PARTIALS].find_one({"session": hier, "round": 0, "cluster": "beta"})
    assert "refused" in beta and not beta.get("used")
    # An update is credited to the combiner whose partial was used for it, no other.
    model = db[fs.MODELS].find_one({"session": hier, "round": 1})
    marks = {c["client"]: c.get("combined_by") for c in model["contributions"]}
    assert marks == {"client_0": "alpha", "client_1": "alpha", "client_2": "alpha",
                     "client_3": None, "client_4": None, "client_5": None}
    counted = [c["client"] for c in model["contributions"]]
    assert sorted(counted) == sorted(CLIENTS) and len(counted) == len(set(counted))
    assert out_hier["accepted"] == out_flat["accepted"] == len(CLIENTS)
    w_flat, w_hier = _model(db, flat, 1), _model(db, hier, 1)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_flat, w_hier)) <= 1e-6


def test_a_partial_of_clients_not_listed_for_the_round_is_refused(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    _plant(db, (flat, hier), 0, seed=4)
    _close(db, hier, 0, CLIENTS)
    for cluster in CLUSTERS:
        call("fl_combiner", db, session=hier, round=0, cluster_name=cluster)
    # The aggregator is then given fewer clients than the round's document listed.
    out = call("fl_server_aggregator", db, session=hier, round=0, clients=CLIENTS[:4])
    assert out["accepted"] == 4   # alpha used; beta refused (lists client_5), client_3 read directly
    beta = db[PARTIALS].find_one({"session": hier, "round": 0, "cluster": "beta"})
    assert "refused" in beta
    model = db[fs.MODELS].find_one({"session": hier, "round": 1})
    assert [c["client"] for c in model["contributions"]] == CLIENTS[:4]


@pytest.mark.parametrize("strategy", ["median", "krum", "trimmed_mean"])
def test_robust_strategies_refuse_hierarchical(strategy):
    with pytest.raises(ValueError, match=f"hierarchical needs a streaming strategy.*{strategy}") as info:
        TrainingConfig(aggregation="hierarchical", strategy=strategy)
    assert info.value.errors()[0]["loc"] == ("aggregation",)
    assert TrainingConfig(aggregation="flat", strategy=strategy).aggregation == "flat"


def test_privacy_and_secure_aggregation_refuse_hierarchical():
    with pytest.raises(ValueError, match="hierarchical cannot be combined"):
        TrainingConfig(aggregation="hierarchical", secure_aggregation=True)


def test_memory_stays_within_three_models_at_both_levels(fn_db):
    """A combiner streams its cluster's updates (one accumulator, read-ahead
    of one update), and the top level holds one partial at a time: peak
    traced memory under 3x the model plus a constant at each level."""
    import tracemalloc

    from flcommon.partials import PartialSum, write_partial
    from flcommon.strategies import get_strategy
    from flcommon.update_stream import aggregate

    db = fn_db
    shapes = [(500, 1000), (1000,), (1000, 500), (10,)]
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    groups = {"alpha": [f"client_{i}" for i in range(12)], "beta": [f"client_{i}" for i in range(12, 24)]}
    for i, c in enumerate(c for cs in groups.values() for c in cs):
        _put_update(db, "mem", 0, c, [b + i for b in base], n=i + 1)
    peaks = []
    tracemalloc.start()
    try:
        for cluster, clients in groups.items():
            tracemalloc.reset_peak()
            partial = PartialSum()
            accepted, rejected = aggregate(db, "mem", 0, [(c, 0) for c in clients], base, partial,
                                           use_partials=False)
            write_partial(db, "mem", 0, cluster, partial, accepted, rejected, 0.0)
            del partial
            peaks.append(tracemalloc.get_traced_memory()[1])
            assert len(accepted) == len(clients) and not rejected
        tracemalloc.reset_peak()
        strategy = get_strategy("fedavg")
        everyone = [(c, 0) for cs in groups.values() for c in cs]
        accepted, rejected = aggregate(db, "mem", 0, everyone, base, strategy)
        result, _ = strategy.finish(base, None)
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    assert len(accepted) == 24 and not rejected
    # The constant is the chunk reader's, whatever the model's size: a
    # cursor batch of 4 chunks received and decoded (2 x 1 MB) and 2 chunks
    # ahead (0.5 MB). With 2 MB, one run in three or four peaked at
    # 3 x model + 2.3-2.4 MB, as the next update's read caught those
    # buffers full.
    assert all(p <= 3 * model_bytes + 3_000_000 for p in peaks), (peaks, model_bytes)
    w = np.arange(1, 25)   # update i is base + i, weighted by i + 1
    shift = float((w * (w - 1)).sum() / w.sum())
    again = np.random.default_rng(0).standard_normal(shapes[0]).astype(np.float32)
    assert np.allclose(result[0], again + shift, atol=1e-3)


def _plant_many(db, sid, rnd, clients, base):
    """`clients` updates of a small model, written in bulk (GridFS layout,
    one chunk each) so that a thousand cost a few store round trips."""
    import io

    from bson import ObjectId

    from flcommon.blobs import write_arrays
    files, chunks, updates = [], [], []
    for i, c in enumerate(clients):
        buf = io.BytesIO()
        write_arrays(buf, [b + np.float32(i % 5) for b in base])
        blob = ObjectId()
        data = buf.getvalue()
        files.append({"_id": blob, "length": len(data), "chunkSize": fs.CHUNK_SIZE, "filename": "u.npz",
                      "metadata": {"kind": "update", "session": sid, "round": rnd, "client": c}})
        chunks.append({"files_id": blob, "n": 0, "data": data})
        updates.append({"session": sid, "round": rnd, "client": c, "attempt": 1, "blob_id": blob,
                        "num_examples": 1 + i % 3, "status": "received"})
    db[f"{fs.BUCKET}.chunks"].insert_many(chunks)
    db[f"{fs.BUCKET}.files"].insert_many(files)
    db[fs.UPDATES].insert_many(updates)


def test_a_combiner_of_a_thousand_clients_has_a_payload_of_constant_size(fn_db):
    """The combiner is told its session, round and cluster only: it finds
    the thousand clients of its cluster listed for the round in the store
    (not the other cluster's, nor a client of its cluster left out of the
    round), and its partial counts each of them once."""
    from flcommon.strategies import get_strategy
    from flcommon.update_stream import aggregate

    db = fn_db
    sid = "thousand"
    base = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    ours = [f"client_{i}" for i in range(1000)]
    theirs = [f"client_{i}" for i in range(1000, 1010)]
    left_out = "client_1010"
    clusters = {**{c: "alpha" for c in ours + [left_out]}, **{c: "beta" for c in theirs}}
    db[fs.SESSIONS].insert_one({"_id": sid, "clusters": clusters, "spec": {
        "model": "small", "clients": ours + theirs + [left_out], "strategy": "fedavg"}})
    db[fs.MODELS].insert_one({"session": sid, "round": 0,
                              "blob_id": fs.put_arrays(db, base, "m.npz", {"kind": "model"})})
    _plant_many(db, sid, 0, ours + theirs + [left_out], base)
    _close(db, sid, 0, ours + theirs)
    out = call("fl_combiner", db, session=sid, round=0, cluster_name="alpha")   # asserts both sizes < 16 KB
    assert out["combined"] == 1000 and out["rejected_count"] == 0
    part = db[PARTIALS].find_one({"session": sid, "round": 0, "cluster": "alpha"})
    assert [c["client"] for c in part["clients"]] == ours
    # The top level counts the thousand through the partial, the other ten one by one.
    strategy = get_strategy("fedavg")
    accepted, rejected = aggregate(db, sid, 0, [(c, 0) for c in ours + theirs], base, strategy)
    assert not rejected and [a["client"] for a in accepted] == ours + theirs
    assert [a.get("combined_by") for a in accepted] == ["alpha"] * 1000 + [None] * 10
    result, _ = strategy.finish([b.copy() for b in base], None)
    n = np.array([1 + i % 3 for i in range(1010)], dtype=np.float64)
    shift = float((n * (np.arange(1010) % 5)).sum() / n.sum())
    assert np.allclose(result[0], base[0] + shift, atol=1e-5)


def test_a_combiner_before_the_round_lists_its_clients_refuses_to_run(fn_db):
    db = fn_db
    sid = make_session(db, clients=2)
    db[fs.SESSIONS].update_one({"_id": sid}, {"$set": {"clusters": {"client_0": "alpha", "client_1": "alpha"}}})
    out = call("fl_combiner", db, session=sid, round=0, cluster_name="alpha")
    assert "lists no clients for aggregation yet" in out["error"]
    _close(db, sid, 0, ["client_1"])
    db[fs.SESSIONS].update_one({"_id": sid}, {"$unset": {"clusters": ""}})
    assert "records no cluster for its clients" in call("fl_combiner", db, session=sid, round=0,
                                                        cluster_name="alpha")["error"]


class RecordingDispatch:
    """Dispatcher.call as combine_clusters and follow_round use it: each
    call recorded; `follow` says how each cluster's follower ends."""

    def __init__(self, follow=None):
        import types
        self.calls, self.follow = [], follow or {}
        self.platforms = types.SimpleNamespace(spec=lambda cluster, fn: types.SimpleNamespace(timeout_s=300.0))
        self.policy = types.SimpleNamespace(grace_s=10.0)

    def call(self, cluster, session, rnd, function, rng=None, stop=None, **payload):
        from fedkeeper.keeper.errors import SessionError
        assert rng is not None   # combiners run off the round loop: their backoffs draw from their own
        self.calls.append((cluster, function, payload))
        if "follow_s" in payload:
            how = self.follow.get(cluster, "partial")
            if how == "fails":
                raise SessionError(f"{function} failed for round {rnd} after 3 attempt(s)")
            return {"combined": 2} if how == "partial" else {"following": "the round did not close in time"}
        return {"combined": 1}


def test_the_keeper_names_no_client_in_a_combiners_payload():
    from fedkeeper.keeper.aggregation import combine_clusters

    dispatch = RecordingDispatch()
    clients = [f"client_{i}" for i in range(3000)]
    where = {c: ("alpha" if i % 3 else "beta") for i, c in enumerate(clients)}
    out = combine_clusters(dispatch, "s", 4, clients, where)
    assert sorted(out) == ["alpha", "beta"]
    assert sorted(dispatch.calls) == [
        ("alpha", "fl_combiner", {"slot_name": "_fl_combiner@alpha", "cluster_name": "alpha"}),
        ("beta", "fl_combiner", {"slot_name": "_fl_combiner@beta", "cluster_name": "beta"})]


def test_followers_started_with_the_round_are_waited_for_and_replaced_when_they_store_nothing():
    """Each cluster of the selected clients gets a follower (half the
    combiner's time limit to follow); at the close, a follower's partial is
    used, and a cluster whose follower failed or ran out of time gets a
    combiner of its own slot (no retry of the follower's) at once."""
    from fedkeeper.keeper.aggregation import combine_clusters, follow_round

    where = {"client_0": "a", "client_1": "b", "client_2": "c", "client_3": "d"}
    dispatch = RecordingDispatch(follow={"b": "times out", "c": "fails"})
    following = follow_round(dispatch, "s", 2, list(where), where)
    out = combine_clusters(dispatch, "s", 2, ["client_0", "client_1", "client_2"], where, following=following)
    followers = sorted(c for c in dispatch.calls if "follow_s" in c[2])
    assert followers == [(k, "fl_combiner", {"slot_name": f"_fl_combiner@{k}", "cluster_name": k, "follow_s": 150.0})
                         for k in "abcd"]
    after = sorted(c for c in dispatch.calls if "follow_s" not in c[2])
    assert after == [(k, "fl_combiner", {"slot_name": f"_fl_combiner@{k}/closed", "cluster_name": k}) for k in "bc"]
    assert out == {"a": {"combined": 2}, "b": {"combined": 1}, "c": {"combined": 1}}   # d delivered nothing


def test_a_partial_stored_meanwhile_by_another_combiner_stands_and_ours_leaves_nothing(fn_db, monkeypatch):
    """Two combiners of one cluster (a follower left behind and the one run
    at the round's close) may both find no partial and both write one: the
    store keeps one per (session, round, cluster), and the second's blob is
    deleted."""
    from pymongo.collection import Collection

    from flcommon.partials import PartialSum, write_partial

    db = fn_db
    first = PartialSum()
    first.add([np.ones(3, np.float32)], 2.0, 2.0)
    kept = write_partial(db, "s", 0, "alpha", first, [{"client": "client_0"}], [], 0.0)
    # the second combiner's look-up ran before the first one's write landed
    find_one = Collection.find_one
    missed = []

    def misses_once(coll, *args, **kwargs):
        if coll.name == PARTIALS and not missed:
            missed.append(True)
            return None
        return find_one(coll, *args, **kwargs)

    monkeypatch.setattr(Collection, "find_one", misses_once)
    second = PartialSum()
    second.add([np.zeros(3, np.float32)], 5.0, 5.0)
    out = write_partial(db, "s", 0, "alpha", second, [{"client": "client_1"}], [], 0.0)
    assert missed and out["_id"] == kept["_id"] and out["clients"] == [{"client": "client_0"}]
    assert db[PARTIALS].count_documents({"session": "s", "round": 0, "cluster": "alpha"}) == 1
    assert db[f"{fs.BUCKET}.files"].count_documents({"metadata.kind": "partial"}) == 1


def test_a_store_that_holds_duplicate_partials_from_before_the_unique_key_still_opens(fn_db):
    db = fn_db
    db[PARTIALS].drop_indexes()
    db[PARTIALS].insert_many([{"session": "old", "round": 0, "cluster": "alpha", "n": i} for i in range(2)])
    fs.ensure_function_indexes(db)   # no error: the index is left out
    assert db[PARTIALS].count_documents({"session": "old"}) == 2
