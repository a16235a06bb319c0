"""fl_insights and `fedkeeper insights`.

Planted cases on synthetic updates written into a real store, answered by
the function's handle through its OpenWhisk entry in-process: a scaled
update is a norm outlier, a sign-flipped one points against the aggregate,
a NaN update carries the reason the real aggregator recorded, two planted
groups come back as two clusters. Warm answers equal cold ones, the cache
stays within its byte bound, and a large answer travels as a GridFS
reference. Then one training session on the local fabric with injected
faults, queried through the command line: its reliability figures are
checked against its invocation records, and fl_insights is served by the
fabric, warm the second time.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pymongo
import pytest
from bson import ObjectId
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.insights import parse_rounds
from flcommon import store as fs
from flcommon import update_data
from flcommon.auth import signed
from flcommon.entry import openwhisk_main
from flcommon.update_stats import OUTLIER_Z, robust_z
from flcommon.lru import ByteLRU
from test_aggregator import _put_update
from test_functions import FUNCTIONS, SECRET, bound_for, call, load, make_session
from test_training_e2e import write_config

SHAPES = [(32, 24), (24,), (24, 10), (10,)]


def worker():
    """A fresh fl_insights module: a new worker with an empty cache."""
    return load("fl_insights")


def ask(mod, db, cache_mb: float | None = None, **payload) -> dict:
    body = signed(SECRET, {"function": "fl_insights", **payload})
    extra = {} if cache_mb is None else {"FK_INSIGHTS_CACHE_MB": str(cache_mb)}
    out = openwhisk_main(mod.handle, {**bound_for(db, **extra), "__OW_ACTIVATION_ID": "a1", **body})
    assert "error" not in out, out
    # The answer itself, or a reference to it: never more than the inline limit.
    assert len(json.dumps(out)) < mod.INLINE_LIMIT + 4096
    return out


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def plant_session(db, groups: list[list[str]], rounds: int, seed: int = 0, spread: float = 0.1,
                  inline: bool = False) -> str:
    """Updates whose deltas point along one random direction per group (plus
    noise) for `rounds` rounds, aggregated as the aggregator records it:
    models R+1 = model R + the num_examples-weighted mean delta, with
    contributions, weights and aggregated_in. `inline`: the updates kept in
    their documents, as fl_client keeps small ones; else GridFS blobs."""
    sid = f"syn-{uuid.uuid4().hex[:8]}"
    clients = [c for g in groups for c in g]
    db[fs.SESSIONS].insert_one({"_id": sid, "spec": {"model": "synthetic", "clients": clients}})
    rng = np.random.default_rng(seed)
    model = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    directions = [[rng.normal(size=s).astype(np.float32) * 0.01 for s in SHAPES] for _ in groups]
    db[fs.MODELS].insert_one({"session": sid, "round": 0,
                              "blob_id": fs.put_arrays(db, model, f"{sid}/m0", {"kind": "model"})})
    for r in range(rounds):
        deltas, counts = [], []
        for g, members in enumerate(groups):
            for c in members:
                d = [x + rng.normal(size=x.shape).astype(np.float32) * 0.01 * spread for x in directions[g]]
                n = int(rng.integers(20, 60))
                arrays = [m + x for m, x in zip(model, d)]
                meta = {"kind": "update", "session": sid, "round": r, "client": c}
                stored = update_data.stored_fields(db, arrays, f"{sid}/u{r}{c}", meta) if inline \
                    else {"blob_id": fs.put_arrays(db, arrays, f"{sid}/u{r}{c}", meta)}
                db[fs.UPDATES].insert_one({"session": sid, "round": r, "client": c, "attempt": 1, **stored,
                                           "num_examples": n, "metrics": {"loss": float(rng.random())},
                                           "status": "received"})
                deltas.append(d)
                counts.append(n)
        total = sum(counts)
        contributions = []
        for (c, n) in zip(clients, counts):
            db[fs.UPDATES].update_one({"session": sid, "round": r, "client": c},
                                      {"$set": {"status": "accepted", "aggregated_in": r, "staleness": 0,
                                                "weight": n / total}})
            contributions.append({"client": c, "round": r, "staleness": 0, "num_examples": n, "weight": n / total})
        model = [m + sum(d[i] * (n / total) for d, n in zip(deltas, counts)).astype(np.float32)
                 for i, m in enumerate(model)]
        db[fs.MODELS].insert_one({"session": sid, "round": r + 1, "contributions": contributions, "rejected": [],
                                  "blob_id": fs.put_arrays(db, model, f"{sid}/m{r + 1}", {"kind": "model"})})
    return sid


def blob_bytes(db, ids) -> int:
    return sum(d["length"] for d in db[f"{fs.BUCKET}.files"].find({"_id": {"$in": list(ids)}}, {"length": 1}))


# --------------------------------------------------------------------------- planted cases

def test_planted_outlier_flip_and_nan_are_flagged(fn_db):
    """Real init and aggregator (which records the NaN update's rejection),
    planted updates in between."""
    db = fn_db
    sid = make_session(db, clients=10)
    call("fl_server_init", db, session=sid, round=0)
    model0 = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    rng = np.random.default_rng(5)
    direction = [rng.normal(size=w.shape).astype(np.float32) * 0.01 for w in model0]
    clients = [f"client_{i}" for i in range(10)]
    for i, client in enumerate(clients):
        # Honest clients' norms spread evenly over +-20%, so none is an outlier by chance.
        d = [x * (0.8 + 0.04 * i) + rng.normal(size=x.shape).astype(np.float32) * 0.002 for x in direction]
        if client == "client_7":
            d = [x * 50 for x in d]
        if client == "client_8":
            d = [-x for x in d]
        weights = [m + x for m, x in zip(model0, d)]
        if client == "client_9":
            weights[-1][0] = np.nan
        _put_update(db, sid, 0, client, weights)
    agg = call("fl_server_aggregator", db, session=sid, round=0, clients=clients)
    assert agg["accepted"] == 9 and agg["rejected_count"] == 1

    mod = worker()
    out = ask(mod, db, session=sid, what="contributions", rounds=[0, 0])
    assert out["from_cache"] is False and out["update_cache_misses"] == 10
    rows = {r["client"]: r for r in out["data"]["rows"]}
    assert set(rows) == set(clients) and out["data"]["rounds"] == [0, 0]
    assert "norm_outlier" in rows["client_7"]["flags"] and rows["client_7"]["z"] > 3.5
    assert "negative_cosine" in rows["client_8"]["flags"] and rows["client_8"]["cosine"] < 0
    nan_row = rows["client_9"]
    recorded = db[fs.UPDATES].find_one({"session": sid, "client": "client_9"})
    assert {"nan", "rejected"} <= set(nan_row["flags"]) and nan_row["status"] == "rejected"
    assert nan_row["reason"] == recorded["reason"] and "NaN, inf" in nan_row["reason"]
    assert nan_row["norm"] is None and nan_row["cosine"] is None and nan_row["share"] is None
    for c in clients[:7]:
        assert rows[c]["flags"] == [], rows[c]
    # Norms, cosines and shares against a computation of their own.
    model1_doc = db[fs.MODELS].find_one({"session": sid, "round": 1})
    model1 = fs.get_arrays(db, model1_doc["blob_id"])
    aggregate = flat(model1) - flat(model0)
    weights = {c["client"]: c["weight"] for c in model1_doc["contributions"]}
    for c in clients[:9]:
        doc = db[fs.UPDATES].find_one({"session": sid, "client": c})
        delta = flat(fs.get_arrays(db, doc["blob_id"])) - flat(model0)
        assert rows[c]["norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-4)
        cos = delta @ aggregate / (np.linalg.norm(delta) * np.linalg.norm(aggregate))
        assert rows[c]["cosine"] == pytest.approx(cos, abs=1e-4)
        assert rows[c]["share"] == pytest.approx(weights[c]) and rows[c]["num_examples"] == doc["num_examples"]
    assert sum(rows[c]["share"] for c in clients[:9]) == pytest.approx(1.0)
    # Warm: the same answer from the query cache, nothing read.
    warm = ask(mod, db, session=sid, what="contributions", rounds=[0, 0])
    assert warm["from_cache"] is True and warm["bytes_read"] == 0 and warm["data"] == out["data"]


def test_two_planted_groups_are_two_clusters(fn_db):
    groups = [[f"client_{i}" for i in range(5)], [f"client_{i}" for i in range(5, 10)]]
    sid = plant_session(fn_db, groups, rounds=3, seed=1)
    mod = worker()
    out = ask(mod, fn_db, session=sid, what="clusters")
    data = out["data"]
    assert data["k"] == 2 and data["k_chosen_by"] == "silhouette" and data["rounds"] == [0, 2]
    assert sorted(sorted(g["clients"]) for g in data["groups"]) == sorted(sorted(g) for g in groups)
    assert data["silhouette"] > 0.5 and data["silhouette"] == max(v for v in data["silhouette_by_k"].values())
    assert data["updates_per_client"] == {c: 3 for g in groups for c in g}
    # A given k; every group stays within one planted group. Read from the warm update cache.
    three = ask(mod, fn_db, session=sid, what="clusters", k=3)
    assert three["data"]["k"] == 3 and three["bytes_read"] == 0 and three["update_cache_misses"] == 0
    for g in three["data"]["groups"]:
        assert any(set(g["clients"]) <= set(p) for p in groups)


@pytest.mark.parametrize("inline", [False, True], ids=["blobs", "inline"])
def test_warm_answers_equal_cold_ones_and_bytes_are_counted(fn_db, inline):
    groups = [[f"client_{i}" for i in range(4)], [f"client_{i}" for i in range(4, 8)]]
    sid = plant_session(fn_db, groups, rounds=3, seed=2, inline=inline)
    updates = list(fn_db[fs.UPDATES].find({"session": sid}))
    assert all(("data" in u) == inline for u in updates)
    inline_bytes = sum(len(u["data"]) for u in updates if "data" in u)
    models = list(fn_db[fs.MODELS].find({"session": sid}))
    mod = worker()
    for what in ("contributions", "clusters"):
        cold = ask(worker(), fn_db, session=sid, what=what, cache=False)
        # Contributions read every model (bases and aggregates); clusters only the bases.
        needed = [m["blob_id"] for m in models if what == "contributions" or m["round"] < 3]
        assert cold["bytes_read"] == inline_bytes + blob_bytes(
            fn_db, [u["blob_id"] for u in updates if "blob_id" in u] + needed)
        first = ask(mod, fn_db, session=sid, what=what)
        assert first["from_cache"] is False and first["data"] == cold["data"]
        again = ask(mod, fn_db, session=sid, what=what)
        assert again["from_cache"] is True and again["bytes_read"] == 0 and again["data"] == cold["data"]
        # The query cache holds the answer's canonical JSON bytes, counted as their real length.
        held = query_entries(mod)
        assert held and all(isinstance(b, bytes) and size == len(b) + mod.ENTRY_OVERHEAD for b, size in held)
        assert {"data": cold["data"]} in [json.loads(b) for b, _ in held]
        updates_only = ask(mod, fn_db, session=sid, what=what, cache="updates")
        assert updates_only["from_cache"] is False and updates_only["bytes_read"] == 0
        assert updates_only["update_cache_hits"] == len(updates) and updates_only["update_cache_misses"] == 0
        assert updates_only["data"] == cold["data"]
        no_cache = ask(mod, fn_db, session=sid, what=what, cache=False)
        assert no_cache["bytes_read"] == cold["bytes_read"] and no_cache["data"] == cold["data"]
    weights = {(u["round"], u["client"]): u["weight"] for u in updates}
    rows = ask(mod, fn_db, session=sid, what="contributions")["data"]["rows"]
    assert len(rows) == len(updates)
    for r in rows:
        assert r["status"] == "accepted" and r["share"] == pytest.approx(weights[(r["round"], r["client"])])
    # An answer about documents that changed since is computed afresh.
    fn_db[fs.UPDATES].update_one({"session": sid, "round": 1, "client": "client_0"},
                                 {"$set": {"status": "rejected", "reason": "planted rejection"},
                                  "$unset": {"weight": "", "aggregated_in": ""}})
    fn_db[fs.MODELS].update_one({"session": sid, "round": 2}, {"$pull": {"contributions": {"client": "client_0"}},
                                                             "$push": {"rejected": {"client": "client_0", "round": 1,
                                                                                    "reason": "planted rejection"}}})
    changed = ask(mod, fn_db, session=sid, what="contributions")
    assert changed["from_cache"] is False and changed["bytes_read"] == 0
    row = next(r for r in changed["data"]["rows"] if r["round"] == 1 and r["client"] == "client_0")
    assert row["status"] == "rejected" and row["reason"] == "planted rejection" and "rejected" in row["flags"]


def query_entries(mod) -> list[tuple[bytes, int]]:
    """(held value, counted size) of every query-cache entry of a worker."""
    return [item for key, item in mod._cache._items.items() if key[0] == "query"]


def test_a_stale_update_is_shown_in_the_aggregation_whose_model_counted_it(fn_db):
    # As a sync or unmarked session leaves it: nothing on the updates, the
    # models' contributions alone say that client_0's round-0 update was
    # counted late, by the aggregation of round 2 (model 3).
    sid = plant_session(fn_db, [[f"client_{i}" for i in range(4)]], rounds=3, seed=7)
    fn_db[fs.UPDATES].update_many({"session": sid}, {"$set": {"status": "received"},
                                                     "$unset": {"weight": "", "aggregated_in": "", "staleness": ""}})
    fn_db[fs.MODELS].update_one({"session": sid, "round": 1}, {"$pull": {"contributions": {"client": "client_0"}}})
    fn_db[fs.MODELS].update_one({"session": sid, "round": 3}, {"$push": {"contributions": {
        "client": "client_0", "round": 0, "staleness": 2, "num_examples": 30, "weight": 0.1}}})
    mod = worker()
    for span in ([2, 2], None):
        data = ask(mod, fn_db, session=sid, what="contributions", cache=False,
                   **({"rounds": span} if span else {}))["data"]
        late = [r for r in data["rows"] if r["client"] == "client_0" and r["trained_from"] == 0]
        assert len(late) == 1 and late[0]["round"] == 2 and late[0]["status"] == "accepted", late
        # Its delta is taken against model 0, read although round 0 is out of the range.
        assert late[0]["error"] is None and late[0]["norm"] > 0 and late[0]["share"] == pytest.approx(0.1)
    assert not [r for r in ask(mod, fn_db, session=sid, what="contributions", cache=False, rounds=[0, 0])
                ["data"]["rows"] if r["client"] == "client_0"]


def test_shares_fall_back_to_num_examples_without_recorded_weights(fn_db):
    sid = plant_session(fn_db, [[f"client_{i}" for i in range(4)]], rounds=1, seed=3)
    fn_db[fs.UPDATES].update_many({"session": sid}, {"$set": {"status": "received"},
                                                     "$unset": {"weight": "", "aggregated_in": ""}})
    fn_db[fs.MODELS].update_many({"session": sid}, {"$unset": {"contributions": "", "rejected": ""}})
    rows = ask(worker(), fn_db, session=sid, what="contributions")["data"]["rows"]
    total = sum(u["num_examples"] for u in fn_db[fs.UPDATES].find({"session": sid}))
    for r in rows:
        assert r["status"] == "accepted" and r["share"] == pytest.approx(r["num_examples"] / total)


def test_cache_never_exceeds_its_byte_bound(fn_db):
    sid = plant_session(fn_db, [[f"client_{i}" for i in range(6)]], rounds=4, seed=4)
    update_size = next(iter(fn_db[f"{fs.BUCKET}.files"].find({"metadata.kind": "update"}, {"length": 1})))["length"]
    bound_mb = 5 * update_size / 1e6  # room for a handful of the 24 updates
    mod = worker()
    reference = {what: ask(worker(), fn_db, session=sid, what=what, cache=False)["data"]
                 for what in ("contributions", "clusters")}
    spans = [[0, 3], [2, 3], [0, 0], [1, 2], [0, 3]]
    for span in spans:
        for what in ("contributions", "clusters"):
            out = ask(mod, fn_db, cache_mb=bound_mb, session=sid, what=what, rounds=span)
            assert out["cache_bytes"] <= out["cache_limit_bytes"] == int(bound_mb * 1e6)
            assert mod._cache.peak_bytes <= mod._cache.max_bytes
            if span == [0, 3]:
                assert out["data"] == reference[what]
    assert mod._cache.evictions > 0


def test_byte_lru_bound_and_order():
    lru = ByteLRU(100)
    rng = np.random.default_rng(0)
    for i in range(500):
        lru.put(i % 37, i, int(rng.integers(0, 60)))
        if i % 3 == 0:
            lru.get(int(rng.integers(0, 37)))
        assert lru.bytes <= 100 and lru.peak_bytes <= 100
        assert lru.bytes == sum(size for _, size in lru._items.values())
    assert lru.put("huge", object(), 101) is False and "huge" not in lru
    small = ByteLRU(30)
    for key in "abc":
        small.put(key, key, 10)
    small.get("a")                      # a is now the most recently used
    small.put("d", "d", 10)             # evicts b, the least recently used
    assert "a" in small and "b" not in small and "c" in small and "d" in small


def test_large_answer_is_a_gridfs_reference(fn_db):
    sid = plant_session(fn_db, [[f"client_{i}" for i in range(6)]], rounds=3, seed=6)
    inline = ask(worker(), fn_db, session=sid, what="contributions")
    assert "data" in inline and "result_ref" not in inline
    mod = worker()
    mod.INLINE_LIMIT = 1000
    out = ask(mod, fn_db, session=sid, what="contributions")
    assert "data" not in out and out["result_bytes"] > 1000
    raw = fs.get_arrays(fn_db, ObjectId(out["result_ref"]))[0]
    assert json.loads(raw.tobytes()) == inline["data"]
    # The query cache keeps the reference as JSON bytes, counted as what it holds.
    [(held, size)] = query_entries(mod)
    assert size == len(held) + mod.ENTRY_OVERHEAD and json.loads(held) == {
        k: out[k] for k in ("result_ref", "result_bytes", "result_sha256")}
    warm = ask(mod, fn_db, session=sid, what="contributions")
    assert warm["from_cache"] is True and warm["result_ref"] == out["result_ref"]
    # The same answer is stored once: a recomputation points at the same blob.
    again = ask(mod, fn_db, session=sid, what="contributions", cache=False)
    assert again["result_ref"] == out["result_ref"]
    assert fn_db[f"{fs.BUCKET}.files"].count_documents({"metadata.kind": "insights"}) == 1


def test_functions_framework_serves_the_http_entry(fn_db, monkeypatch):
    """main.py through functions-framework (Cloud Functions, Knative)."""
    import functions_framework
    sid = plant_session(fn_db, [["client_0", "client_1", "client_2"]], rounds=1)
    for k, v in bound_for(fn_db).items():
        monkeypatch.setenv(k, v)
    folder = FUNCTIONS / "fl_insights"
    monkeypatch.syspath_prepend(str(folder))
    client = functions_framework.create_app("fl_insights", str(folder / "main.py")).test_client()
    body = signed(SECRET, {"function": "fl_insights", "session": sid, "what": "contributions"})
    first = client.post("/", json=body).get_json()
    second = client.post("/", json=body).get_json()
    assert len(first["data"]["rows"]) == 3 and first["from_cache"] is False
    assert second["from_cache"] is True and second["data"] == first["data"]
    assert client.post("/", json=dict(body, what="clusters")).status_code == 401


def test_bad_queries_are_refused(fn_db):
    sid = plant_session(fn_db, [["client_0", "client_1"]], rounds=1)
    mod = worker()
    for payload, message in [({"session": "nope", "what": "clusters"}, "no session 'nope'"),
                             ({"session": sid, "what": "everything"}, "what must be one of"),
                             ({"session": sid, "what": "clusters", "rounds": [3, 1]}, "'rounds' must be"),
                             ({"session": sid, "what": "clusters", "k": 5}, "k=5 groups cannot be made"),
                             ({"session": sid, "what": "clusters", "cache": "maybe"}, "cache must be")]:
        body = signed(SECRET, {"function": "fl_insights", **payload})
        out = openwhisk_main(mod.handle, {**bound_for(fn_db), **body})
        assert message in out.get("error", ""), (payload, out)
    forged = dict(signed(SECRET, {"session": sid, "what": "clusters"}), what="reliability")
    assert openwhisk_main(mod.handle, {**bound_for(fn_db), **forged})["error"].startswith("unauthorized")


def test_robust_z_flags_only_material_outliers():
    alike = [1.0, 1.004, 0.998, 1.001, 1.012, 0.995]
    assert all(abs(z) < OUTLIER_Z for z in robust_z(alike))
    zs = robust_z(alike + [50.0, None, float("nan")])
    assert zs[-2:] == [None, None] and zs[-3] > OUTLIER_Z
    assert all(abs(z) < OUTLIER_Z for z in zs[:-3])
    assert robust_z([1.0, 100.0]) == [None, None]  # too few to tell


def test_round_options_count_from_1():
    assert parse_rounds(3, None, None) == (3, 3)
    assert parse_rounds(None, "2:4", None) == (2, 4)
    assert parse_rounds(None, ":4", None) == (1, 4)
    assert parse_rounds(None, "2:", 9) == (2, 9)
    assert parse_rounds(None, None, None) is None
    for bad in [(1, "1:2"), (None, "4:2"), (None, "a:b"), (-1, None), (0, None), (None, "0:2")]:
        with pytest.raises(ValueError):
            parse_rounds(bad[0], bad[1], 5)


# --------------------------------------------------------------------------- on the local fabric

def expected_stats(attempts: list[dict]) -> dict:
    """Reliability figures straight from attempt records."""
    ended = [a for a in attempts if a["state"] in ("succeeded", "failed", "timed_out", "abandoned")]
    ok = [a for a in ended if a["state"] == "succeeded"]
    known = [a for a in ended if a.get("cold_start") is not None]
    durations = [a["duration_ms"] for a in ok if a.get("duration_ms") is not None]
    return {"attempts": len(ended), "succeeded": len(ok), "success_rate": len(ok) / len(ended),
            "timeouts": sum(1 for a in ended if a["state"] == "timed_out" or a.get("error_class") == "timeout"),
            "cold_starts": sum(1 for a in known if a["cold_start"]),
            "cold_start_rate": sum(1 for a in known if a["cold_start"]) / len(known) if known else None,
            "p50_ms": float(np.percentile(durations, 50)) if durations else None,
            "p95_ms": float(np.percentile(durations, 95)) if durations else None}


def test_fabric_session_reliability_through_the_cli(fabric_state, mongo_url, tmp_path):
    db_name = "insights_e2e"
    cfg_path = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, rounds=2, clients=4, per_round=4,
                            faults="{crash: 0.3, seed: 1, functions: [fl_client]}")
    assert run_start(load_config(cfg_path), None, keep_services=True) == 0
    db = pymongo.MongoClient(mongo_url)[db_name]
    sid = db[fs.SESSIONS].find_one(sort=[("created", -1)])["_id"]
    runner = CliRunner()

    def insights(*args):
        # --keep-services: the warm action keeps its cache from one query to the next.
        res = runner.invoke(cli, ["insights", sid, *args, "-c", str(cfg_path), "--keep-services"],
                            catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    rel = json.loads(insights("reliability", "--json"))
    assert rel["platform"] == "openwhisk" and rel["cluster"] == "local_ow"  # served by the fabric
    attempts = [a for a in db[fs.INVOCATIONS].find({"session": sid}) if not a["client"].startswith("_")]
    assert any(a["state"] != "succeeded" for a in attempts), "the injected faults never fired"
    data = rel["data"]
    assert set(data["clients"]) == {a["client"] for a in attempts}
    for client, got in data["clients"].items():
        want = expected_stats([a for a in attempts if a["client"] == client])
        assert {k: got[k] for k in want} == pytest.approx(want), client
    for cluster, got in data["clusters"].items():
        want = expected_stats([a for a in attempts if a["cluster"] == cluster])
        assert {k: got[k] for k in want} == pytest.approx(want), cluster
    assert set(data["clusters"]) == {"local_ow", "local_gcf"}

    # Contributions: computed by the warm action, then answered from its cache.
    first = json.loads(insights("contributions", "--json"))
    assert first["from_cache"] is False and first["bytes_read"] > 0
    updates = list(db[fs.UPDATES].find({"session": sid}))
    assert len(first["data"]["rows"]) == len(updates)
    # A sync session: what counted, and its share, is in the models' contributions.
    weights = {(c["client"], c["round"]): c["weight"]
               for m in db[fs.MODELS].find({"session": sid}) for c in m.get("contributions") or []}
    for row in first["data"]["rows"]:
        # Rounds in the answer count from 1; the store counts from 0.
        doc = next(u for u in updates if u["client"] == row["client"] and u["round"] + 1 == row["trained_from"])
        assert row["status"] == "accepted" and doc["status"] == "received"
        assert row["share"] == pytest.approx(weights[(doc["client"], doc["round"])])
        assert row["norm"] > 0 and -1 <= row["cosine"] <= 1
    second = json.loads(insights("contributions", "--json"))
    assert second["from_cache"] is True and second["bytes_read"] == 0 and second["data"] == first["data"]
    assert second["worker_pid"] == first["worker_pid"]
    table = insights("contributions", "--round", "1")
    assert "from the query cache" not in table and "read from the store" in table and "client_" in table

    res = runner.invoke(cli, ["insights", "no-such-session", "reliability", "-c", str(cfg_path)])
    assert res.exit_code == 2 and "no session 'no-such-session'" in res.output
