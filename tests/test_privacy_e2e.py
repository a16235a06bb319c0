"""Differential privacy and secure aggregation end to end through
`fedkeeper start` on the local clusters (local OpenWhisk and local Cloud
Functions, a real MongoDB-wire-protocol server, the real functions): epsilon
per round as dp-accounting gives it, the target-epsilon stop, local DP, and
secure aggregation (SecAgg+'s sparse graph under injected faults, the full
graph after a kill -9 and --resume), with nothing unmasked ever stored."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pymongo
import pytest

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.privacy.accountant import PrivacyBudget
from flcommon import store as fs
from flcommon import update_data
from flcommon.secagg import relay

from cli_processes import kill_cli_when
from in_flight import first_marked_running
from session_config import fragment, write_session_config


def write_config(path: Path, mongo_url: str, db: str, training: str, *, rounds: int = 2, clients: int = 4,
                 per_round: int = 3, faults: str = "{}") -> Path:
    ow = clients // 2
    local = {"kind": "local", "faults": fragment(faults)}
    return write_session_config(
        path, name=db, mongo={"url": mongo_url, "db": db},
        openwhisk={"local_ow": local}, google={"local_gcf": dict(local)},
        clients_info={"total_num_clients": clients, "num_clients_per_round": per_round,
                      "ow_clients_count": ow, "gcf_clients_count": clients - ow},
        training={"rounds": rounds, "seed": 5, "quorum": 0.5, "round_deadline_s": 240, "attempt_grace_s": 5,
                  "retries": {"max_attempts": 4, "backoff_s": 0.1, "backoff_max_s": 1}, **fragment(training)})


def open_db(mongo_url: str, name: str):
    return pymongo.MongoClient(mongo_url)[name]


def latest_session(db):
    return db[fs.SESSIONS].find_one(sort=[("created", -1)])


def test_central_dp_reports_epsilon_after_every_round(fabric_state, mongo_url, tmp_path):
    # Under injected crashes: a retried client is the same sampled client,
    # so the accounting does not change.
    db_name = "e2e_dp_central"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, """\
        privacy: {mode: central, noise_multiplier: 1.0, clip_norm: 0.5, delta: 1e-3}
        """, rounds=2, faults="{crash: 0.3, seed: 4, functions: [fl_client]}")
    assert run_start(load_config(cfg), None, keep_services=True) == 0
    db = open_db(mongo_url, db_name)
    sess = latest_session(db)
    assert sess["state"] == "finished"
    crashed = db[fs.INVOCATIONS].count_documents({"session": sess["_id"], "state": "failed"})
    assert crashed > 0, "no injected crash happened: pick another fault seed"
    assert sess["spec"]["privacy"] == {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5,
                                       "clients_per_round": 3}
    budget = PrivacyBudget("central", 1.0, 3, 4, 1e-3, 2)
    rounds = list(db[fs.ROUNDS].find({"session": sess["_id"]}).sort("round", 1))
    assert [r["epsilon"] for r in rounds] == pytest.approx([budget.epsilon_after(1), budget.epsilon_after(2)])
    models = list(db[fs.MODELS].find({"session": sess["_id"], "round": {"$gte": 1}}))
    assert len(models) == 2
    for m in models:
        assert m["privacy"]["clip_norm"] == 0.5 and m["privacy"]["noise_std"] == pytest.approx(0.5)
        assert m["privacy"]["denominator"] == 3 and "norms" not in m["privacy"]
        assert all(c["weight"] == pytest.approx(1 / 3) for c in m["contributions"])  # one vote per client
        assert math.isfinite(m["metrics"]["accuracy"])


def test_target_epsilon_stops_before_the_round_that_would_exceed_it(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_dp_target"
    budget = PrivacyBudget("central", 2.0, 3, 4, 1e-3, 6)
    target = (budget.epsilon_after(2) + budget.epsilon_after(3)) / 2  # two rounds fit, not three
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, f"""\
        privacy: {{mode: central, noise_multiplier: 2.0, clip_norm: 1.0, delta: 1e-3, target_epsilon: {target}}}
        """, rounds=6)
    assert run_start(load_config(cfg), None, keep_services=True) == 0
    db = open_db(mongo_url, db_name)
    sess = latest_session(db)
    assert sess["state"] == "finished"
    assert [r["round"] for r in db[fs.ROUNDS].find({"session": sess["_id"]})] == [0, 1]
    event = db[fs.EVENTS].find_one({"session": sess["_id"], "kind": "privacy_budget"})
    assert event and "round 3 would bring epsilon to" in event["message"]
    assert event["epsilon"] == pytest.approx(budget.epsilon_after(2))
    assert event["epsilon"] <= target


def test_local_dp_clients_upload_noised_deltas(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_dp_local"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, """\
        privacy: {mode: local, noise_multiplier: 0.5, clip_norm: 1.0, delta: 1e-3}
        """, rounds=1)
    assert run_start(load_config(cfg), None, keep_services=True) == 0
    db = open_db(mongo_url, db_name)
    sess = latest_session(db)
    assert sess["state"] == "finished"
    r = db[fs.ROUNDS].find_one({"session": sess["_id"], "round": 0})
    assert r["epsilon"] == pytest.approx(PrivacyBudget("local", 0.5, 3, 4, 1e-3, 1).epsilon_after(1))
    # Each stored update moved the model by the clipped delta plus noise of
    # std 0.5 per coordinate: far more than the bound of 1 alone.
    g = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sess["_id"], "round": 0})["blob_id"])
    stored = list(db[fs.UPDATES].find({"session": sess["_id"], "round": 0}))
    assert len(stored) == len(r["included"]) > 0
    for u in stored:
        w = update_data.get_update_arrays(db, u)
        moved = math.sqrt(sum(float(((a - b).astype("float64") ** 2).sum()) for a, b in zip(w, g)))
        n = sum(a.size for a in g)
        assert moved == pytest.approx(0.5 * math.sqrt(n), rel=0.2)


def check_secure_session(db, session: str, rounds: int) -> None:
    done = list(db[fs.ROUNDS].find({"session": session}).sort("round", 1))
    assert [r["round"] for r in done] == list(range(rounds)) and all(r["state"] == "done" for r in done)
    kinds = {f["metadata"]["kind"] for f in db[f"{fs.BUCKET}.files"].find({"metadata.session": session})}
    assert "update" not in kinds and "masked" in kinds  # nothing unmasked ever stored
    for r in done:
        sets = relay.sets(db, session, r["round"])
        assert set(sets["u3"]) <= set(sets["u2"]) <= set(sets["u1"]) <= set(r["selected"])
        assert r["included"] == sets["u3"]
        model = db[fs.MODELS].find_one({"session": session, "round": r["round"] + 1})
        assert [c["client"] for c in model["contributions"]] == sets["u3"]
        assert math.isfinite(model["metrics"]["accuracy"])
        stored = list(db[fs.UPDATES].find({"session": session, "round": r["round"]}))
        assert len(stored) >= len(r["included"]) and all(u.get("masked") is True for u in stored)
    stages = {a["stage"] for a in db[fs.INVOCATIONS].find({"session": session, "function": "fl_secagg_client"})}
    assert stages == {"advertise", "share", "unmask"}


def test_secure_aggregation_under_faults(fabric_state, mongo_url, tmp_path):
    # SecAgg+'s sparse graph: of 4 clients each masks with 2 and shares among 3.
    db_name = "e2e_secagg_faults"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, """\
        secure_aggregation: {neighbours: 2}
        """, rounds=2, clients=4, per_round=4,
        faults="{crash: 0.2, seed: 3, functions: [fl_client, fl_secagg_client]}")
    assert run_start(load_config(cfg), None, keep_services=True) == 0
    db = open_db(mongo_url, db_name)
    sess = latest_session(db)
    assert sess["state"] == "finished", sess.get("error")
    check_secure_session(db, sess["_id"], 2)
    shares = list(db[relay.SECAGG].find({"session": sess["_id"], "stage": "shares"}))
    assert shares and all(len(d["to"]) == 3 for d in shares)   # a client and its 2 neighbours
    attempts = list(db[fs.INVOCATIONS].find({"session": sess["_id"]}))
    assert any(a["state"] == "failed" for a in attempts)          # faults happened...
    assert any(a["attempt"] > 1 for a in attempts)                # ...and were retried
    accuracy = [m["metrics"]["accuracy"] for m in db[fs.MODELS].find({"session": sess["_id"], "round": {"$gte": 1}})]
    assert accuracy[-1] > 0.3  # 10 classes: it learns through the masks


def test_secure_aggregation_resumes_after_kill_minus_9(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_secagg_resume"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, """\
        secure_aggregation: true
        """, rounds=2, clients=4, per_round=4, faults="{slow_ms: 1500, seed: 1, functions: [fl_client]}")
    cmd = [sys.executable, "-m", "fedkeeper.cli", "start", "-c", str(cfg), "--keep-services"]
    db = open_db(mongo_url, db_name)
    kill_cli_when(cmd[3:], lambda: first_marked_running(db, 1), "round 2 training in flight")
    sess = latest_session(db)
    before = relay.sets(db, sess["_id"], 1)
    assert "u2" in before and "u3" not in before
    res = subprocess.run(cmd + ["--resume", sess["_id"], "--no-deploy"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert latest_session(db)["state"] == "finished"
    check_secure_session(db, sess["_id"], 2)
    after = relay.sets(db, sess["_id"], 1)
    assert after["u1"] == before["u1"] and after["u2"] == before["u2"]
    # The resumed keeper did not repeat the stages that were done.
    keys = db[fs.INVOCATIONS].count_documents({"session": sess["_id"], "round": 1, "stage": "advertise"})
    assert keys == len(before["u1"])
