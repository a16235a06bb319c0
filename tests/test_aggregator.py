"""The aggregator: exact arithmetic, every kind of bad update rejected with
its reason recorded, uniqueness of updates, idempotence, stale updates as
deltas against their own base model with staleness weights, no update
counted twice, and memory bounded by the model size whatever the number of
clients."""
from __future__ import annotations

import io
import pickle
import tracemalloc

import numpy as np
import pymongo
import pytest

from flcommon.strategies import get_strategy
from flcommon import store as fs
from flcommon.blobs import BlobError
from flcommon.update_check import FINITE_BLOCK, UpdateRejected, all_within, check_layout, subtract_base
from reference_fedavg import fedavg
from test_blob_bounds import decode_arrays, encode_arrays
from test_functions import call, load, make_session

F32 = np.dtype(np.float32)


def test_fedavg_matches_a_hand_computation():
    ref = [((2,), F32), ((2, 2), F32)]
    u1 = [np.array([1, 2], np.float32), np.array([[1, 0], [0, 1]], np.float32)]
    u2 = [np.array([4, 8], np.float32), np.array([[0, 3], [3, 0]], np.float32)]
    u3 = [np.array([-2, 0], np.float32), np.array([[6, 6], [6, 6]], np.float32)]
    out = fedavg([(u1, 1), (u2, 2), (u3, 3)], ref)
    # (1*[1,2] + 2*[4,8] + 3*[-2,0]) / 6 = [3/6, 18/6]
    assert np.allclose(out[0], [0.5, 3.0], atol=1e-7)
    # (1*I + 2*[[0,3],[3,0]] + 3*6) / 6
    assert np.allclose(out[1], [[19 / 6, 24 / 6], [24 / 6, 19 / 6]], atol=1e-6)
    assert all(a.dtype == np.float32 for a in out)


def test_update_checks_name_what_is_wrong():
    ref = [((2,), F32), ((2, 2), F32)]
    base = [np.array([1, 1], np.float32), np.eye(2, dtype=np.float32)]
    layout = [
        ([np.array([1, 2], np.float64), np.eye(2, dtype=np.float32)], "dtype float64"),
        ([np.array([1, 2], np.int64), np.eye(2, dtype=np.float32)], "dtype int64"),
        ([np.array([1, 2, 3], np.float32), np.eye(2, dtype=np.float32)], "shape"),
        ([np.array([1, 2], np.float32)], "has 1 arrays, the model has 2"),
    ]
    for arrays, reason in layout:
        with pytest.raises(UpdateRejected, match=reason):
            check_layout(arrays, ref)
    for bad in (np.inf, np.nan):
        arrays = [np.array([1, bad], np.float32), np.eye(2, dtype=np.float32)]
        check_layout(arrays, ref)
        with pytest.raises(UpdateRejected, match="array 0 contains NaN, inf"):
            subtract_base(arrays, base)
    # Finite update, finite model, a delta beyond float32: refused all the same.
    with pytest.raises(UpdateRejected, match="NaN, inf"):
        subtract_base([np.array([3e38, 0], np.float32), np.eye(2, dtype=np.float32)],
                      [np.array([-3e38, 0], np.float32), np.eye(2, dtype=np.float32)])
    with pytest.raises(UpdateRejected, match="base model has 1 arrays"):
        subtract_base([np.ones(2, np.float32), np.eye(2, dtype=np.float32)], iter(base[:1]))
    # Finite but huge: weighted by its examples it would overflow the sum to inf.
    with pytest.raises(UpdateRejected, match="a change beyond 1e\\+24"):
        subtract_base([np.array([3e37, 0], np.float32), np.eye(2, dtype=np.float32)], base)
    # Checked a block at a time: a NaN (or a value past the bound) in the last, short block is found too.
    big = np.zeros((3, FINITE_BLOCK + 5), np.float32)
    assert all_within(big, 1.0) and all_within(np.asfortranarray(big), 1.0) and all_within(np.zeros(0), 1.0)
    big[2, -1] = np.nan
    assert not all_within(big, 1.0) and not all_within(np.asfortranarray(big), 1.0)
    big[2, -1] = -2.0
    assert not all_within(big, 1.0) and all_within(big, 2.0)
    ok = [np.array([1, 2], np.float32), 2 * np.eye(2, dtype=np.float32)]
    check_layout(ok, ref)
    delta = subtract_base(ok, base)
    assert delta is ok and np.array_equal(delta[0], [0, 1]) and np.array_equal(delta[1], np.eye(2))


def _put_update(db, sid, rnd, client, arrays=None, n=None, blob_round=None, blob_client=None,
                raw: bytes | None = None, doc_round=None):
    meta = {"kind": "update", "session": sid, "round": rnd if blob_round is None else blob_round,
            "client": blob_client or client}
    if raw is not None:
        blob = fs.bucket(db).upload_from_stream("u", io.BytesIO(raw), metadata=meta)
    else:
        blob = fs.put_arrays(db, arrays, "u.npz", meta)
    if n is None:
        part = db[fs.PARTITIONS].find_one({"session": sid, "client": client})
        n = part["num_examples"] if part else 10
    db[fs.UPDATES].insert_one({"session": sid, "round": rnd if doc_round is None else doc_round,
                               "client": client, "attempt": 1, "blob_id": blob, "num_examples": n,
                               "status": "received"})
    return blob


@pytest.fixture(params=["listed then read by id", "read in one pass"])
def read_path(request, monkeypatch):
    """Both ways a round's updates are read: a short list is listed, then
    read a group at a time by id; a list longer than one `$in` slice is
    read in one pass over the round's documents (update_stream._read_round).
    Every check must refuse the same updates with the same reasons on both."""
    if request.param == "read in one pass":
        monkeypatch.setattr(fs, "IN_SLICE", 4)
    return request.param


def test_aggregator_rejects_bad_updates_with_reasons(fn_db, read_path):
    db = fn_db
    sid = make_session(db, clients=12)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    good = [w + 0.01 for w in weights]
    nan = [w.copy() for w in weights]
    nan[-1][0] = np.nan
    _put_update(db, sid, 0, "client_0", good)
    _put_update(db, sid, 0, "client_1", nan)
    _put_update(db, sid, 0, "client_2", [np.zeros((3, 3), np.float32)] + weights[1:])
    _put_update(db, sid, 0, "client_3", good, blob_round=5)  # an update written for another round
    _put_update(db, sid, 0, "client_4", raw=b"this is no npz")
    _put_update(db, sid, 0, "client_5", raw=pickle.dumps({"w": 1}))
    _put_update(db, sid, 0, "client_6", weights[:-1])
    _put_update(db, sid, 0, "client_7", [w.astype(np.float64) for w in weights])
    _put_update(db, sid, 0, "client_8", good, n=10**6)  # claims far more data than it holds
    _put_update(db, sid, 0, "client_9", raw=encode_arrays(good)[:200])  # truncated npz
    _put_update(db, sid, 0, "client_10", good, blob_client="client_0")  # someone else's blob
    # client_11 never delivered.
    clients = [f"client_{i}" for i in range(12)]
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=clients + ["client_0"])
    reasons = {r["client"]: r["reason"] for r in out["rejected"]}
    assert out["accepted"] == 1 and out["rejected_count"] == 11 == len(reasons)
    assert "NaN, inf" in reasons["client_1"]
    assert "shape" in reasons["client_2"]
    assert "round 5" in reasons["client_3"]
    assert "not a valid npz" in reasons["client_4"]
    assert "pickle" in reasons["client_5"]
    assert "has 3 arrays, the model has 4" in reasons["client_6"]
    assert "float64" in reasons["client_7"]
    assert "claims 1000000 examples" in reasons["client_8"]
    assert "of the blob are left" in reasons["client_9"]
    assert "client client_0" in reasons["client_10"]
    assert "no update stored" in reasons["client_11"]
    # The reasons are on the update documents too; only the valid one is
    # counted, which the model's contributions record (nothing is written on
    # it unless the keeper asks: mark_counted).
    for i in range(1, 11):
        doc = db[fs.UPDATES].find_one({"session": sid, "client": f"client_{i}"})
        assert doc["status"] == "rejected" and doc["reason"] == reasons[f"client_{i}"]
    assert db[fs.UPDATES].find_one({"session": sid, "client": "client_0"})["status"] == "received"
    assert [c["client"] for c in db[fs.MODELS].find_one({"session": sid, "round": 1})["contributions"]] \
        == ["client_0"]
    # The new model is exactly the one valid update, counted once although listed twice.
    model = db[fs.MODELS].find_one({"session": sid, "round": 1})
    assert model["accepted"] == 1 and len(model["rejected"]) == 11
    for a, b in zip(fs.get_arrays(db, model["blob_id"]), good):
        assert a.dtype == b.dtype and np.allclose(a, b, atol=1e-6)


def _put_inline(db, sid, rnd, client, data, length=None, n=None):
    """An update kept in its document (flcommon.update_data), as fl_client writes a small one."""
    if n is None:
        n = db[fs.PARTITIONS].find_one({"session": sid, "client": client})["num_examples"]
    db[fs.UPDATES].insert_one({"session": sid, "round": rnd, "client": client, "attempt": 1, "data": data,
                               "length": len(data) if length is None else length, "num_examples": n,
                               "status": "received"})


def test_inline_updates_are_bounded_checked_and_counted_with_blob_ones(fn_db, read_path):
    from flcommon import update_data
    db = fn_db
    sid = make_session(db, clients=9)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    good = [w + 0.01 for w in weights]
    other = [w + 0.03 for w in weights]
    data = encode_arrays(good)
    assert len(data) <= update_data.INLINE_MAX_BYTES
    _put_inline(db, sid, 0, "client_0", data)
    _put_update(db, sid, 0, "client_1", other)                  # a blob beside inline ones
    _put_inline(db, sid, 0, "client_2", data, length=len(data) + 1)            # not the size declared
    _put_inline(db, sid, 0, "client_3", b"x" * 10, length=update_data.INLINE_MAX_BYTES + 1)  # too large
    _put_inline(db, sid, 0, "client_4", "not bytes", length=9)
    larger = encode_arrays([np.zeros(sum(w.size for w in weights) + 100, np.float32)])   # decodes past the model
    assert len(larger) <= update_data.INLINE_MAX_BYTES
    _put_inline(db, sid, 0, "client_5", larger)
    _put_inline(db, sid, 0, "client_6", data, length=True)
    _put_inline(db, sid, 0, "client_7", pickle.dumps({"w": 1}))
    _put_inline(db, sid, 0, "client_8", data)
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=[f"client_{i}" for i in range(9)])
    reasons = {r["client"]: r["reason"] for r in out["rejected"]}
    assert out["accepted"] == 3 and set(reasons) == {f"client_{i}" for i in range(2, 8)}, reasons
    assert f"{len(data)} bytes, {len(data) + 1} declared" in reasons["client_2"]
    assert "at most" in reasons["client_3"] and "at most" in reasons["client_6"]
    assert "no data" in reasons["client_4"]
    assert "exceed" in reasons["client_5"] or "more than" in reasons["client_5"], reasons["client_5"]
    assert "pickle" in reasons["client_7"]
    # The model is the examples-weighted mean of the three valid updates.
    sizes = {c: db[fs.PARTITIONS].find_one({"session": sid, "client": c})["num_examples"]
             for c in ("client_0", "client_1", "client_8")}
    total = sum(sizes.values())
    model = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 1})["blob_id"])
    for m, g, o in zip(model, good, other):
        want = (g * (sizes["client_0"] + sizes["client_8"]) + o * sizes["client_1"]) / total
        assert np.allclose(m, want, atol=1e-6)


def test_update_documents_in_the_wrong_round_are_not_counted(fn_db):
    """Only round r's documents are read; a doc whose round disagrees with its
    blob (written for r, filed under r+1) is rejected when r+1 is aggregated."""
    db = fn_db
    sid = make_session(db, clients=2)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    _put_update(db, sid, 0, "client_0", [w + 1 for w in weights])
    _put_update(db, sid, 0, "client_1", [w + 3 for w in weights], doc_round=1)
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=["client_0", "client_1"])
    assert out["accepted"] == 1 and out["rejected"] == [{"client": "client_1", "round": 0,
                                                         "reason": "no update stored for this round"}]
    new = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 1})["blob_id"])
    assert np.allclose(new[0], weights[0] + 1)
    out = call("fl_server_aggregator", db, session=sid, round=1, clients=["client_1"])
    assert "no valid update" in out["error"] and "round 0" in out["rejected"][0]["reason"]
    assert db[fs.MODELS].find_one({"session": sid, "round": 2}) is None  # nothing half-written


def test_a_client_has_one_update_per_round(fn_db):
    db = fn_db
    db[fs.UPDATES].insert_one({"session": "s", "round": 0, "client": "c", "attempt": 1})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db[fs.UPDATES].insert_one({"session": "s", "round": 0, "client": "c", "attempt": 2})
    db[fs.UPDATES].insert_one({"session": "s", "round": 1, "client": "c", "attempt": 1})
    db[fs.MODELS].insert_one({"session": "s", "round": 1})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db[fs.MODELS].insert_one({"session": "s", "round": 1})


def test_pickle_is_never_loaded():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle was loaded')",))

    for raw in (pickle.dumps(Boom()), pickle.dumps([np.zeros(2)])):
        with pytest.raises(BlobError, match="pickle"):
            decode_arrays(raw)
    # An npz whose member is an object array (pickled inside the zip) is refused too.
    buf = io.BytesIO()
    np.savez(buf, arr_0000=np.array([Boom()], dtype=object))
    with pytest.raises(BlobError):
        decode_arrays(buf.getvalue())
    with pytest.raises(BlobError, match="object arrays"):
        encode_arrays([np.array([1, "a"], dtype=object)])


def test_aggregator_memory_is_bounded_by_model_size(fn_db):
    """50 updates of a 4 MB model: peak traced memory stays under 3x the model
    plus a constant (chunk buffers in flight, whose timing with the read-ahead
    thread varies: up to 0.8 MB over 2 MB was seen), so it does not grow with
    the number of clients."""
    db = fn_db
    agg_mod = load("fl_server_aggregator")
    shapes = [(500, 1000), (1000,), (1000, 500), (10,)]
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    clients = [f"client_{i}" for i in range(50)]
    for i, c in enumerate(clients):
        _put_update(db, "mem", 0, c, [b + i for b in base], n=i + 1)
    strategy = get_strategy("fedavg")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        accepted, rejected = agg_mod.aggregate(db, "mem", 0, [(c, 0) for c in clients], base, strategy)
        result, state = strategy.finish(base, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(accepted) == 50 and not rejected and state is None
    assert peak <= 3 * model_bytes + 4_000_000, (peak, model_bytes)
    # base + sum_i (i+1) * i / sum_i (i+1): the deltas are i, weighted by i+1
    w = np.arange(1, 51)
    shift = float((w * (w - 1)).sum() / w.sum())
    again = np.random.default_rng(0).standard_normal(shapes[0]).astype(np.float32)
    assert np.allclose(result[0], again + shift, atol=1e-3)


def test_blobs_are_standard_gridfs_files_read_front_to_back(fn_db):
    db = fn_db
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((700, 300)).astype(np.float32), np.arange(7), np.zeros((0, 2))]
    blob = fs.put_arrays(db, arrays, "x.npz", {"kind": "test"})
    assert db["blobs.chunks"].count_documents({"files_id": blob}) == 4  # 840 KB in 255 KiB chunks
    # Written without GridIn, readable by pymongo's own GridFS (and so by any driver).
    with fs.bucket(db).open_download_stream(blob) as stream:
        assert stream.filename == "x.npz" and stream.metadata == {"kind": "test"}
        assert [a.shape for a in decode_arrays(stream.read())] == [a.shape for a in arrays]
    back = fs.get_arrays(db, blob)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, back))
    # A compressed npz (never what put_arrays writes) is refused, not inflated.
    buf = io.BytesIO()
    np.savez_compressed(buf, arr_0000=arrays[0])
    other = fs.bucket(db).upload_from_stream("c.npz", io.BytesIO(buf.getvalue()))
    with pytest.raises(BlobError, match="compressed"):
        fs.get_arrays(db, other)
    # A lost chunk or flipped bits are refused, never decoded into wrong weights.
    db["blobs.chunks"].delete_one({"files_id": blob, "n": 2})
    with pytest.raises(BlobError, match="chunk 2 missing"):
        fs.get_arrays(db, blob)
    flipped = fs.put_arrays(db, arrays, "y.npz", {})
    chunk = db["blobs.chunks"].find_one({"files_id": flipped, "n": 1})
    data = bytearray(chunk["data"])
    data[1000] ^= 0x40
    db["blobs.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(data)}})
    with pytest.raises(BlobError, match="CRC mismatch"):
        fs.get_arrays(db, flipped)
    fs.delete_blob(db, flipped)
    with pytest.raises(BlobError, match="does not exist"):
        fs.get_arrays(db, flipped)


def _model(db, sid, rnd):
    return fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": rnd})["blob_id"])


def _sizes(db, sid):
    return {d["client"]: d["num_examples"] for d in db[fs.PARTITIONS].find({"session": sid})}


def test_stale_updates_are_deltas_against_their_own_model_weighted_by_staleness(fn_db):
    db = fn_db
    sid = make_session(db, clients=3, staleness_exponent=1.0)
    call("fl_server_init", db, session=sid, round=0)
    n = _sizes(db, sid)
    w0 = _model(db, sid, 0)
    # Round 0 aggregates client_0 only; client_1 trained from model 0 too but
    # delivers late, and joins round 1 as a stale update.
    _put_update(db, sid, 0, "client_0", [w + 1 for w in w0])
    _put_update(db, sid, 0, "client_1", [w + 4 for w in w0])
    out = call("fl_server_aggregator", db, mark_counted=True, session=sid, round=0, clients=["client_0"])
    assert out["accepted"] == 1 and out["stale_accepted"] == 0
    w1 = _model(db, sid, 1)
    assert np.allclose(w1[0], w0[0] + 1, atol=1e-6)
    _put_update(db, sid, 1, "client_2", [w + 2 for w in w1])
    # A retried aggregation may find its updates marked already: still counted.
    db[fs.UPDATES].update_one({"session": sid, "round": 1, "client": "client_2"},
                              {"$set": {"status": "accepted", "aggregated_in": 1}})
    out = call("fl_server_aggregator", db, mark_counted=True, session=sid, round=1, clients=["client_2"],
               stale=[{"client": "client_1", "round": 0}])
    assert out["accepted"] == 2 and out["stale_accepted"] == 1 and out["rejected_count"] == 0
    # Deltas: client_2 +2 against model 1 (staleness 0, weight n2);
    # client_1 +4 against model 0 (staleness 1, weight n1 * (1 + 1) ** -1.0),
    # divided by the examples (n1 + n2): damping shrinks the step.
    w_fresh, w_stale = n["client_2"] * 1.0, n["client_1"] / 2.0
    mass = n["client_2"] + n["client_1"]
    expected_delta = (w_fresh * 2 + w_stale * 4) / mass
    w2 = _model(db, sid, 2)
    assert all(np.allclose(a, b + expected_delta, atol=1e-5) for a, b in zip(w2, w1))
    model = db[fs.MODELS].find_one({"session": sid, "round": 2})
    assert model["strategy"] == "fedavg" and "state_blob_id" not in model
    assert model["contributions"] == [
        {"client": "client_2", "round": 1, "staleness": 0, "num_examples": n["client_2"],
         "weight": pytest.approx(w_fresh / mass)},
        {"client": "client_1", "round": 0, "staleness": 1, "num_examples": n["client_1"],
         "weight": pytest.approx(w_stale / mass)}]
    stale_doc = db[fs.UPDATES].find_one({"session": sid, "round": 0, "client": "client_1"})
    assert stale_doc["status"] == "accepted" and stale_doc["aggregated_in"] == 1 and stale_doc["staleness"] == 1
    assert stale_doc["weight"] == pytest.approx(w_stale / mass)
    first = db[fs.UPDATES].find_one({"session": sid, "round": 0, "client": "client_0"})
    assert first["aggregated_in"] == 0 and first["staleness"] == 0 and first["weight"] == pytest.approx(1.0)
    # Idempotent with stale updates too: the stored result comes back.
    assert call("fl_server_aggregator", db, mark_counted=True, session=sid, round=1, clients=["client_2"],
                stale=[{"client": "client_1", "round": 0}]) == out


@pytest.mark.parametrize("marked", [False, True], ids=["by_the_model", "marked_too"])
def test_an_update_is_never_counted_twice(fn_db, marked):
    # Refused from the model's contributions alone (sync), and with the
    # updates' own marks as well (as semi_async and async ask).
    db = fn_db
    sid = make_session(db, clients=3)
    call("fl_server_init", db, session=sid, round=0)
    w0 = _model(db, sid, 0)
    for c in ("client_0", "client_1"):
        _put_update(db, sid, 0, c, [w + 1 for w in w0])
    call("fl_server_aggregator", db, session=sid, round=0, clients=["client_0", "client_1"], mark_counted=marked)
    assert {d["status"] for d in db[fs.UPDATES].find({"session": sid, "round": 0})} \
        == {"accepted" if marked else "received"}
    before = {d["client"]: d for d in db[fs.UPDATES].find({"session": sid, "round": 0})}
    # Listed again as stale in round 1, alone: nothing valid to aggregate.
    out = call("fl_server_aggregator", db, session=sid, round=1, clients=[],
               stale=[{"client": "client_0", "round": 0}])
    assert "no valid update" in out["error"]
    assert out["rejected"] == [{"client": "client_0", "round": 0, "reason": "already aggregated in round 1"}]
    assert db[fs.MODELS].find_one({"session": sid, "round": 2}) is None
    # Next to a valid update: counted once, in round 0, and its record is untouched.
    w1 = _model(db, sid, 1)
    _put_update(db, sid, 1, "client_2", [w + 3 for w in w1])
    out = call("fl_server_aggregator", db, session=sid, round=1, clients=["client_2", "client_2"],
               stale=[{"client": "client_0", "round": 0}, {"client": "client_1", "round": 0}])
    assert out["accepted"] == 1 and out["stale_accepted"] == 0 and out["rejected_count"] == 2
    assert {r["reason"] for r in out["rejected"]} == {"already aggregated in round 1"}
    assert all(np.allclose(a, b + 3, atol=1e-5) for a, b in zip(_model(db, sid, 2), w1))
    after = {d["client"]: d for d in db[fs.UPDATES].find({"session": sid, "round": 0})}
    assert after == before
    model = db[fs.MODELS].find_one({"session": sid, "round": 2})
    assert [(r["client"], r["round"]) for r in model["rejected"]] == [("client_0", 0), ("client_1", 0)]
    assert [c["client"] for c in model["contributions"]] == ["client_2"]


def test_stale_entries_are_checked(fn_db):
    db = fn_db
    sid = make_session(db, clients=2)
    call("fl_server_init", db, session=sid, round=0)
    for stale, reason in (([{"client": "client_0", "round": 0}], "must be below 1"),
                          ([{"client": "client_0"}], "payload field 'stale[0]' must be"),
                          ([["client_0", 0]], "payload field 'stale[0]' must be"),
                          ([{"client": "client_0", "round": 10**20}], "'stale[0].round' must be a whole number"),
                          ({"client_0": 0}, "payload field 'stale' must be a list")):
        out = call("fl_server_aggregator", db, session=sid, round=0, clients=["client_1"], stale=stale)
        assert reason in out["error"], out
    for flag in ("yes", 1, [True]):
        out = call("fl_server_aggregator", db, session=sid, round=0, clients=["client_1"], mark_counted=flag)
        assert "payload field 'mark_counted' must be true or false" in out["error"], out
    assert "no update to aggregate" in call("fl_server_aggregator", db, session=sid, round=0, clients=[])["error"]
    # A stale update that was never stored is rejected like a missing one.
    w0 = _model(db, sid, 0)
    _put_update(db, sid, 0, "client_0", [w + 1 for w in w0])
    call("fl_server_aggregator", db, session=sid, round=0, clients=["client_0"])
    _put_update(db, sid, 1, "client_0", [w + 1 for w in _model(db, sid, 1)])
    out = call("fl_server_aggregator", db, session=sid, round=1, clients=["client_0"],
               stale=[{"client": "client_1", "round": 0}])
    assert out["rejected"] == [{"client": "client_1", "round": 0, "reason": "no update stored for round 1"}]


def test_staleness_weight_follows_the_exponent(fn_db):
    """Two stale updates of different age, exponent 0.5: weights
    n * 2 ** -0.5 and n * 3 ** -0.5, over the examples."""
    db = fn_db
    sid = make_session(db, clients=3, staleness_exponent=0.5)
    call("fl_server_init", db, session=sid, round=0)
    n = _sizes(db, sid)
    w0 = _model(db, sid, 0)
    _put_update(db, sid, 0, "client_0", [w + 1 for w in w0])
    _put_update(db, sid, 0, "client_1", [w - 1 for w in w0])
    call("fl_server_aggregator", db, mark_counted=True, session=sid, round=0, clients=["client_0"])
    w1 = _model(db, sid, 1)
    _put_update(db, sid, 1, "client_2", [w + 2 for w in w1])
    call("fl_server_aggregator", db, mark_counted=True, session=sid, round=1, clients=["client_2"])
    w2 = _model(db, sid, 2)
    _put_update(db, sid, 2, "client_0", [w + 5 for w in w2])
    out = call("fl_server_aggregator", db, mark_counted=True, session=sid, round=2, clients=["client_0"],
               stale=[{"client": "client_1", "round": 0}])
    assert out["accepted"] == 2 and out["stale_accepted"] == 1
    raw = {"client_0": n["client_0"] * 1.0, "client_1": n["client_1"] * 3 ** -0.5}
    total = n["client_0"] + n["client_1"]
    expected_delta = (raw["client_0"] * 5 + raw["client_1"] * -1) / total
    assert all(np.allclose(a, b + expected_delta, atol=1e-5) for a, b in zip(_model(db, sid, 3), w2))
    docs = {(d["client"], d["round"]): d for d in db[fs.UPDATES].find({"session": sid, "aggregated_in": 2})}
    assert docs[("client_1", 0)]["staleness"] == 2
    assert docs[("client_1", 0)]["weight"] == pytest.approx(raw["client_1"] / total)
    assert docs[("client_0", 2)]["weight"] == pytest.approx(raw["client_0"] / total)


def test_server_state_is_stored_and_read_back_by_the_next_aggregation(fn_db):
    """FedAvgM over two rounds through the function: the velocity is a blob
    referenced by the models document and carried into the next round."""
    db = fn_db
    sid = make_session(db, clients=2, strategy={"name": "fedavgm", "server_lr": 0.5, "server_momentum": 0.9})
    call("fl_server_init", db, session=sid, round=0)
    w0 = _model(db, sid, 0)
    _put_update(db, sid, 0, "client_0", [w + 2 for w in w0])
    call("fl_server_aggregator", db, session=sid, round=0, clients=["client_0"])
    # v1 = 0.9 * 0 + 2 = 2; w1 = w0 + 0.5 * 2 = w0 + 1
    w1 = _model(db, sid, 1)
    assert all(np.allclose(a, b + 1, atol=1e-5) for a, b in zip(w1, w0))
    first = db[fs.MODELS].find_one({"session": sid, "round": 1})
    assert first["strategy"] == "fedavgm"
    velocity = fs.get_arrays(db, first["state_blob_id"])
    assert all(np.allclose(v, 2) for v in velocity)
    meta = db["blobs.files"].find_one({"_id": first["state_blob_id"]})["metadata"]
    assert meta == {"kind": "state", "session": sid, "round": 1, "strategy": "fedavgm"}
    _put_update(db, sid, 1, "client_1", [w - 1 for w in w1])
    call("fl_server_aggregator", db, session=sid, round=1, clients=["client_1"])
    # v2 = 0.9 * 2 + (-1) = 0.8; w2 = w1 + 0.5 * 0.8 = w1 + 0.4
    assert all(np.allclose(a, b + 0.4, atol=1e-5) for a, b in zip(_model(db, sid, 2), w1))
    second = db[fs.MODELS].find_one({"session": sid, "round": 2})
    assert second["state_blob_id"] != first["state_blob_id"]
    assert all(np.allclose(v, 0.8) for v in fs.get_arrays(db, second["state_blob_id"]))
