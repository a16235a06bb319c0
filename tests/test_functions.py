"""The FL functions, called through their real entries against a real store:
tokens, payload sizes, bad input, FedAvg, the aggregator's memory bound."""
from __future__ import annotations

import http.server
import importlib.util
import io
import json
import pickle
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from flcommon import store as fs
from flcommon.auth import signed
from flcommon.data import OBJ_HELP, BadRequest, fetch, load_dataset, load_npz, partition
from flcommon.entry import http_main, openwhisk_main
from flcommon.fedavg import StreamingFedAvg, UpdateRejected, fedavg

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"
SECRET = "s3cret-for-tests"


def load_handle(name: str):
    spec = importlib.util.spec_from_file_location(f"_fn_{name}", FUNCTIONS / name / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.handle


@pytest.fixture
def bound(store):
    return {"FK_STORE_URL": store.url, "FK_STORE_DB": store.db.name, "FK_TOKEN_SECRET": SECRET,
            "FK_FUNCTION": "x"}


def call(name: str, bound: dict, **payload):
    """Through the OpenWhisk entry, as the fabric does (bound keys merged in)."""
    body = signed(SECRET, payload)
    req = json.dumps(body)
    assert len(req) < 16 * 1024, f"{name} request is {len(req)} bytes"
    out = openwhisk_main(load_handle(name), {**bound, **body})
    assert len(json.dumps(out)) < 16 * 1024, f"{name} response is {len(json.dumps(out))} bytes"
    return out


def make_session(store, clients=3, model="small"):
    sid = "s-" + store.db.name
    store.create_session({"_id": sid, "spec": {
        "model": model, "data": {"dataset": "digits"}, "partition": {"method": "iid"},
        "clients": [f"client_{i}" for i in range(clients)], "seed": 1, "optim": "adam", "lr": 0.01,
        "momentum": 0.0, "local_epochs": 1, "batch_size": 16, "strategy": "fedavg"}})
    return sid


def test_tokens_are_verified_by_both_entries(bound):
    handle = load_handle("nodeinfo")
    good = signed(SECRET, {"function": "nodeinfo", "session": "s", "round": 0})
    assert "hostname" in openwhisk_main(handle, {**bound, **good})
    forged = dict(good, round=1)  # ids changed after signing
    assert openwhisk_main(handle, {**bound, **forged})["error"].startswith("unauthorized")
    assert "unauthorized" in openwhisk_main(handle, {**bound, "session": "s"})["error"]
    wrong_secret = signed("other", {"function": "nodeinfo", "session": "s", "round": 0})
    assert "unauthorized" in openwhisk_main(handle, {**bound, **wrong_secret})["error"]
    import os
    old = dict(os.environ)
    os.environ.update(bound)
    try:
        def req(body):
            return Request(EnvironBuilder(method="POST", json=body).get_environ())
        body, status, _ = http_main(handle, req(good))
        assert status == 200 and "hostname" in json.loads(body)
        body, status, _ = http_main(handle, req(forged))
        assert status == 401 and "unauthorized" in json.loads(body)["error"]
        _, status, _ = http_main(handle, Request(EnvironBuilder(method="POST", data=b"[1,2]",
                                                                content_type="application/json").get_environ()))
        assert status == 400
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_init_client_aggregate_round_trip(store, bound):
    sid = make_session(store)
    init = call("fl_server_init", bound, function="fl_server_init", session=sid, round=0, client=None, attempt=1)
    assert init["num_clients"] == 3 and init["num_params"] > 0
    assert call("fl_server_init", bound, function="fl_server_init", session=sid, round=0, client=None,
                attempt=2)["reused"]
    accs = []
    for rnd in range(2):
        for c in range(3):
            out = call("fl_client", bound, function="fl_client", session=sid, round=rnd,
                       client=f"client_{c}", attempt=1)
            assert out["num_examples"] > 0 and not out["duplicate"] and "loss" in out["metrics"]
        # A second attempt of the same client in the same round is not counted twice.
        again = call("fl_client", bound, function="fl_client", session=sid, round=rnd, client="client_0",
                     attempt=2)
        assert again["duplicate"]
        assert store.db[fs.UPDATES].count_documents({"session": sid, "round": rnd}) == 3
        agg = call("fl_server_aggregator", bound, function="fl_server_aggregator", session=sid, round=rnd,
                   client=None, attempt=1, clients=[f"client_{c}" for c in range(3)])
        assert agg["accepted"] == 3 and agg["rejected"] == [] and agg["model_round"] == rnd + 1
        accs.append(agg["accuracy"])
    assert accs[-1] > 0.5  # 10 classes: far above chance
    for r in range(3):
        assert store.model(sid, r) is not None
    # Clients outside the session and missing models are refused as bad input.
    assert "not a client" in call("fl_client", bound, function="fl_client", session=sid, round=0,
                                  client="client_9", attempt=1)["error"]
    assert "no global model" in call("fl_client", bound, function="fl_client", session=sid, round=7,
                                     client="client_1", attempt=1)["error"]


def _put_update(store, sid, rnd, client, arrays, n=10, round_in_blob=None, raw: bytes | None = None):
    if raw is not None:
        blob = fs.bucket(store.db).upload_from_stream(
            "u", io.BytesIO(raw), metadata={"session": sid, "round": rnd, "client": client})
    else:
        blob = store.put_arrays(arrays, "u.npz", kind="update", session=sid,
                                round=rnd if round_in_blob is None else round_in_blob, client=client)
    store.db[fs.UPDATES].insert_one({"session": sid, "round": rnd, "client": client, "attempt": 1,
                                     "blob_id": blob, "num_examples": n, "status": "received"})


def test_aggregator_rejects_bad_updates_with_reasons(store, bound):
    sid = make_session(store, clients=7)
    call("fl_server_init", bound, function="fl_server_init", session=sid, round=0, client=None, attempt=1)
    _, weights = None, store.get_arrays(store.model(sid, 0)["blob_id"])
    good = [w + 0.01 for w in weights]
    _put_update(store, sid, 0, "client_0", good)
    _put_update(store, sid, 0, "client_1", [w.copy() for w in weights[:-1]] + [np.full_like(weights[-1], np.nan)])
    _put_update(store, sid, 0, "client_2", [np.zeros((3, 3), np.float32)] + weights[1:])
    _put_update(store, sid, 0, "client_3", good, round_in_blob=5)
    _put_update(store, sid, 0, "client_4", None, raw=b"this is no npz")
    _put_update(store, sid, 0, "client_5", None, raw=pickle.dumps({"w": 1}))
    out = call("fl_server_aggregator", bound, function="fl_server_aggregator", session=sid, round=0,
               client=None, attempt=1, clients=[f"client_{i}" for i in range(7)])
    reasons = {r["client"]: r["reason"] for r in out["rejected"]}
    assert out["accepted"] == 1
    assert "NaN or inf" in reasons["client_1"]
    assert "shape" in reasons["client_2"]
    assert "round 5" in reasons["client_3"]
    assert "not a valid npz" in reasons["client_4"]
    assert "pickle" in reasons["client_5"]
    assert "no update stored" in reasons["client_6"]
    # The reasons are recorded on the update documents too.
    doc = store.db[fs.UPDATES].find_one({"session": sid, "client": "client_1"})
    assert doc["status"] == "rejected" and "NaN" in doc["reason"]
    assert store.db[fs.UPDATES].find_one({"session": sid, "client": "client_0"})["status"] == "accepted"
    # The new model is exactly the one valid update.
    new = store.get_arrays(store.model(sid, 1)["blob_id"])
    for a, b in zip(new, good):
        assert np.allclose(a, b, atol=1e-6)


def test_fedavg_matches_a_hand_computation():
    ref = [((2,), np.dtype(np.float32)), ((2, 2), np.dtype(np.float32))]
    u1 = [np.array([1, 2], np.float32), np.array([[1, 0], [0, 1]], np.float32)]
    u2 = [np.array([4, 8], np.float32), np.array([[0, 3], [3, 0]], np.float32)]
    out = fedavg([(u1, 1), (u2, 2)], ref)
    assert np.allclose(out[0], [3.0, 6.0])              # (1*[1,2] + 2*[4,8]) / 3
    assert np.allclose(out[1], [[1 / 3, 2], [2, 1 / 3]])
    agg = StreamingFedAvg(ref)
    with pytest.raises(UpdateRejected):
        agg.add([np.array([1, np.inf], np.float32), u1[1].copy()], 1)
    with pytest.raises(UpdateRejected):
        agg.add([np.array([1, 2], np.int64), u1[1].copy()], 1)
    with pytest.raises(UpdateRejected):
        agg.add([u1[0].copy(), u1[1].copy()], 0)
    with pytest.raises(UpdateRejected, match="no valid update"):
        agg.result()


def test_aggregator_memory_is_bounded_by_model_size(store):
    """50 updates of a 4 MB model: peak traced memory stays under 3x the model."""
    from importlib import util
    spec = util.spec_from_file_location("_agg", FUNCTIONS / "fl_server_aggregator" / "fl_server_aggregator.py")
    agg_mod = util.module_from_spec(spec)
    spec.loader.exec_module(agg_mod)
    rng = np.random.default_rng(0)
    shapes = [(500, 1000), (1000,), (1000, 500), (10,)]
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
    sid = "mem"
    clients = [f"client_{i}" for i in range(50)]
    for i, c in enumerate(clients):
        _put_update(store, sid, 0, c, [rng.standard_normal(s).astype(np.float32) for s in shapes], n=i + 1)
    reference = [(s, np.dtype(np.float32)) for s in shapes]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        agg, accepted, rejected = agg_mod.aggregate(store.db, sid, 0, clients, reference)
        result = agg.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(accepted) == 50 and not rejected
    assert peak <= 3 * model_bytes + 2_000_000, (peak, model_bytes)
    assert result[0].shape == shapes[0]


def test_partitions_are_seeded_and_cover_the_data():
    labels = np.repeat(np.arange(10), 30)
    for method in ("iid", "shards"):
        a = partition(labels, 7, method, seed=3)
        b = partition(labels, 7, method, seed=3)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        allidx = np.concatenate(a)
        assert sorted(allidx.tolist()) == list(range(300))
        assert min(len(p) for p in a) >= 1
    shards = partition(labels, 10, "shards", seed=0)
    assert max(len(np.unique(labels[p])) for p in shards) <= 2  # 2 shards: at most 2 labels
    dirichlet = partition(labels, 10, "dirichlet", seed=0, alpha=0.1)
    assert sum(len(p) for p in dirichlet) == 300 and min(len(p) for p in dirichlet) >= 1
    iid_spread = np.mean([len(np.unique(labels[p])) for p in partition(labels, 10, "iid", seed=0)])
    dir_spread = np.mean([len(np.unique(labels[p])) for p in dirichlet])
    assert dir_spread < iid_spread  # label skew
    with pytest.raises(BadRequest):
        partition(labels, 400, "iid")


def _mnist_like(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 20), x_test=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             y_test=rng.integers(0, 10, 5))
    return path


def test_npz_loader_from_path_and_url_with_checksum(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("FK_DATA_CACHE", str(tmp_path / "cache"))
    f = _mnist_like(tmp_path / "mnist.npz")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    x_tr, y_tr, x_te, y_te = load_npz(str(f), digest)
    assert x_tr.shape == (20, 28, 28, 1) and x_tr.max() <= 1.0 and y_te.shape == (5,)

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/mnist.npz"
        data = load_dataset({"dataset": "npz", "path": url, "sha256": digest})
        assert data[0].shape == (20, 28, 28, 1)
        assert len(list((tmp_path / "cache").iterdir())) == 1  # cached
        with pytest.raises(BadRequest, match="checksum mismatch"):
            load_dataset({"dataset": "npz", "path": url, "sha256": "0" * 64})
        with pytest.raises(BadRequest, match="cannot download"):
            fetch(f"http://127.0.0.1:{srv.server_port}/missing.npz")
    finally:
        srv.shutdown()
    with pytest.raises(BadRequest, match="does not exist"):
        load_npz(str(tmp_path / "nope.npz"))


def test_pickled_obj_data_is_refused_with_conversion_help():
    with pytest.raises(BadRequest) as err:
        load_dataset({"dataset": "fedkeeper_obj", "train_images_url": "https://x/mnist_train_img.obj"})
    assert str(err.value) == OBJ_HELP and "numpy.savez" in OBJ_HELP
