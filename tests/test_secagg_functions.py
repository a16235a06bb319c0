"""Secure aggregation through the store: fl_secagg_client's stages through
its real OpenWhisk entry, the clients' masked uploads and the aggregator's
unmasking (flcommon.secagg.client / server) against a real store, with and
without dropouts; the securely aggregated model equals plain FedAvg within
the quantization error, and nothing stored holds an unmasked update."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from flcommon import store as fs
from flcommon.auth import signed
from flcommon.entry import BadRequest, openwhisk_main
from flcommon.secagg import encode_update, error_bound, relay
from flcommon.secagg.client import masked_update
from flcommon.secagg.server import secure_aggregate
from flcommon.strategies import get_strategy
from reference_fedavg import fedavg

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"
TOKEN = "token-secret-for-tests"
CLIENT_SECRET = "client-secret-for-tests-0123456789"
SHAPES = [(12, 5), (5,)]


def _load():
    path = FUNCTIONS / "fl_secagg_client" / "fl_secagg_client.py"
    spec = importlib.util.spec_from_file_location("_fn_fl_secagg_client", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HANDLE = _load().handle


def bound(db, **extra):
    host, port = db.client.address
    return {"FK_STORE_URL": f"mongodb://{host}:{port}/", "FK_STORE_DB": db.name, "FK_TOKEN_SECRET": TOKEN,
            "FK_FUNCTION": "fl_secagg_client", "FK_CLIENT_SECRET": CLIENT_SECRET, **extra}


def stage(db, sid, rnd, client, name, **extra):
    body = signed(TOKEN, {"function": "fl_secagg_client", "session": sid, "round": rnd, "client": client,
                          "stage": name})
    return openwhisk_main(HANDLE, {**bound(db, **extra), **body})


def make_session(db, n, **sa):
    sid = f"sa-{db.name}"
    clients = [f"client_{i}" for i in range(n)]
    db[fs.SESSIONS].insert_one({"_id": sid, "spec": {"model": "small", "clients": clients,
                                                     "strategy": "fedavg", "secure_aggregation": sa or True}})
    return sid, clients


def upload(db, sid, rnd, client, delta, n):
    """What fl_client does with a trained update in a secure session."""
    blob, clipped = masked_update(db, bound(db), db[fs.SESSIONS].find_one({"_id": sid})["spec"], sid, rnd, client,
                                  1, delta, n)
    assert clipped == 0
    db[fs.UPDATES].insert_one({"session": sid, "round": rnd, "client": client, "attempt": 1, "blob_id": blob,
                               "num_examples": n, "masked": True, "status": "received", "created": time.time()})


def run_round(db, sid, rnd, clients, deltas, examples, *, drop_after_share=(), silent_at_unmask=(), receivers=None):
    """The keeper's part: invoke each stage and fix u1, u2, u3 from what the
    store holds after it."""
    for c in clients:
        assert stage(db, sid, rnd, c, "advertise")["written"]
    relay.set_sets(db, sid, rnd, u1=relay.done(db, sid, rnd, "keys", clients))
    for c in clients:
        out = stage(db, sid, rnd, c, "share")
        assert out["written"] and out["receivers"] == (receivers or len(clients)), out
    relay.set_sets(db, sid, rnd, u2=relay.done(db, sid, rnd, "shares", clients))
    for c in clients:
        if c not in drop_after_share:
            upload(db, sid, rnd, c, deltas[c], examples[c])
    u3 = sorted(d["client"] for d in db[fs.UPDATES].find({"session": sid, "round": rnd}))
    relay.set_sets(db, sid, rnd, u3=u3)
    for c in u3:
        if c not in silent_at_unmask:
            assert "error" not in stage(db, sid, rnd, c, "unmask")
    return u3


def setup_clients(db, sid, clients, seed=0):
    rng = np.random.default_rng(seed)
    global_weights = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    deltas = {c: [rng.normal(0, 0.05, s).astype(np.float32) for s in SHAPES] for c in clients}
    examples = {c: int(rng.integers(10, 90)) for c in clients}
    for c in clients:
        db[fs.PARTITIONS].insert_one({"session": sid, "client": c, "num_examples": examples[c]})
    return global_weights, deltas, examples


@pytest.mark.parametrize("dropouts, neighbours", [("none", None), ("after_share", None), ("silent_at_unmask", None),
                                                   ("none", 4), ("after_share", 4), ("silent_at_unmask", 4)])
def test_secure_round_equals_plain_fedavg(fn_db, dropouts, neighbours):
    db = fn_db
    # SecAgg+ (neighbours 4): 9 clients each mask with 4 of the others and share among 5.
    sid, clients = make_session(db, 9, neighbours=neighbours) if neighbours else make_session(db, 5)
    global_weights, deltas, examples = setup_clients(db, sid, clients)
    kw = {"none": {}, "after_share": {"drop_after_share": {clients[1]}},
          "silent_at_unmask": {"silent_at_unmask": {clients[0], clients[3]}}}[dropouts]
    if neighbours:
        kw["receivers"] = neighbours + 1
    u3 = run_round(db, sid, 0, clients, deltas, examples, **kw)
    strategy = get_strategy("fedavg")
    spec = db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    accepted, rejected = secure_aggregate(db, sid, 0, [(c, 0) for c in u3], [w.copy() for w in global_weights],
                                          strategy, spec)
    new, _ = strategy.finish([w.copy() for w in global_weights])
    assert [a["client"] for a in accepted] == u3 and rejected == []
    ref = [(s, np.dtype(np.float32)) for s in SHAPES]
    plain = fedavg([([g + d for g, d in zip(global_weights, deltas[c])], examples[c]) for c in u3], ref)
    bound_ = error_bound(len(u3), sum(examples[c] for c in u3))
    for a, b in zip(new, plain):
        assert np.abs(a.astype(np.float64) - b.astype(np.float64)).max() <= bound_ + 1e-6
    total = sum(examples[c] for c in u3)
    assert strategy.shares() == pytest.approx([examples[c] / total for c in u3])


def test_nothing_stored_holds_an_unmasked_update(fn_db):
    db = fn_db
    sid, clients = make_session(db, 4)
    _, deltas, examples = setup_clients(db, sid, clients, seed=1)
    run_round(db, sid, 0, clients, deltas, examples, drop_after_share={clients[2]})
    plain = []
    for c in clients:
        q, _ = encode_update(deltas[c], examples[c], max_clients=4)
        plain.append(q.astype("<u8").tobytes()[:64])                       # the quantized update
        plain.append(np.concatenate([d.ravel() for d in deltas[c]]).astype("<f4").tobytes()[:64])  # the delta
    stored = [bytes(ch["data"]) for ch in db[f"{fs.BUCKET}.chunks"].find()]
    stored += [repr(d).encode() for coll in (relay.SECAGG, fs.UPDATES) for d in db[coll].find()]
    assert len(stored) > 4
    for needle in plain:
        assert not any(needle in blob for blob in stored)
    kinds = {f["metadata"]["kind"] for f in db[f"{fs.BUCKET}.files"].find()}
    assert kinds == {"masked"}
    # The dropped client (shared, never uploaded) had its s key rebuilt, never its b seed.
    reveals = list(db[relay.SECAGG].find({"session": sid, "stage": "reveal"}))
    assert reveals and all(set(r["s"]) == {clients[2]} and clients[2] not in r["b"] for r in reveals)


def test_a_retried_stage_writes_nothing_new(fn_db):
    db = fn_db
    sid, clients = make_session(db, 3)
    first = stage(db, sid, 0, clients[0], "advertise")
    doc = relay.get(db, sid, 0, clients[0], "keys")
    again = stage(db, sid, 0, clients[0], "advertise")
    assert first["written"] and not again["written"]
    assert relay.get(db, sid, 0, clients[0], "keys") == doc


def test_stages_refuse_what_the_protocol_does_not_allow(fn_db):
    db = fn_db
    sid, clients = make_session(db, 4)
    for c in clients[:3]:
        stage(db, sid, 0, c, "advertise")
    relay.set_sets(db, sid, 0, u1=clients[:3])
    assert "not in round 1's secure-aggregation set u1" in stage(db, sid, 0, clients[3], "share")["error"]
    assert "FK_CLIENT_SECRET" in stage(db, sid, 0, clients[0], "share", FK_CLIENT_SECRET="")["error"]
    assert "stage must be one of" in stage(db, sid, 0, clients[0], "train")["error"]
    assert "has no secure-aggregation set u2" in stage(db, sid, 0, clients[0], "unmask")["error"]
    # A set once fixed never changes (a resumed keeper reads it back).
    relay.set_sets(db, sid, 0, u1=clients)
    assert relay.sets(db, sid, 0)["u1"] == clients[:3]


def test_the_aggregator_refuses_a_round_without_enough_reveals(fn_db):
    db = fn_db
    sid, clients = make_session(db, 4)
    global_weights, deltas, examples = setup_clients(db, sid, clients)
    u3 = run_round(db, sid, 0, clients, deltas, examples, silent_at_unmask=set(clients[:2]))
    spec = db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    with pytest.raises(BadRequest, match="cannot unmask"):
        secure_aggregate(db, sid, 0, [(c, 0) for c in u3], global_weights, get_strategy("fedavg"), spec)
    with pytest.raises(BadRequest, match="FedAvg-family"):
        secure_aggregate(db, sid, 0, [(c, 0) for c in u3], global_weights, get_strategy("median"), spec)


def test_values_clipped_to_the_fields_bound_are_counted_and_reach_the_aggregation(fn_db):
    from flcommon.privacy import masked_upload
    db = fn_db
    sid, clients = make_session(db, 4)
    global_weights, deltas, examples = setup_clients(db, sid, clients)
    run_round(db, sid, 0, clients, deltas, examples)
    spec = db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    # fl_client's own path: a delta past the field's bound is clipped, and the count comes back
    huge = [g + np.float32(1e12) for g in global_weights]
    blob, clipped = masked_upload(db, bound(db), spec, sid, 0, clients[0], 2, global_weights, huge, 10)
    assert blob is not None and clipped == sum(g.size for g in global_weights)
    assert masked_upload(db, bound(db), {**spec, "secure_aggregation": None}, sid, 0, clients[0], 2,
                         global_weights, huge, 1) == (None, 0)
    # the aggregation passes each update's count on, and ignores one that is not a count
    for client, count in zip(clients, (3, -5, "7", 10 ** 15)):
        db[fs.UPDATES].update_one({"session": sid, "round": 0, "client": client},
                                  {"$set": {"quantization_clipped": count}})
    accepted, _ = secure_aggregate(db, sid, 0, [(c, 0) for c in clients], [w.copy() for w in global_weights],
                                   get_strategy("fedavg"), spec)
    assert [a["quantization_clipped"] for a in accepted] == [3, 0, 0, 0]
