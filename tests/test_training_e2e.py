"""Federated training end to end on the local fabric: a local OpenWhisk
cluster and a local Cloud Functions cluster, a real MongoDB-wire-protocol
server, the real FL functions, with injected faults."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pymongo

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from flcommon import store as fs

from cli_processes import kill_cli_when
from in_flight import marked_running
from session_config import FUNCTIONS, fragment, write_session_config

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, mongo_url: str, db: str, *, rounds: int, clients: int, per_round: int,
                 faults: str, timeout_s: int = 30, extra_training: str = "", deadline: int = 240) -> Path:
    ow = clients // 2
    local = {"kind": "local", "faults": fragment(faults)}
    functions = dict(FUNCTIONS, fl_client={"openwhisk": {"timeout": str(timeout_s * 1000), "memory": "1024"},
                                           "google": {"timeout": f"{timeout_s}s", "memory": "1024MB"}})
    return write_session_config(
        path, name="e2e", mongo={"url": mongo_url, "db": db},
        openwhisk={"local_ow": local}, google={"local_gcf": dict(local)}, functions=functions,
        clients_info={"total_num_clients": clients, "num_clients_per_round": per_round,
                      "ow_clients_count": ow, "gcf_clients_count": clients - ow},
        training={"rounds": rounds, "seed": 3, "quorum": 0.5, "round_deadline_s": deadline,
                  "attempt_grace_s": 5, "retries": {"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 1},
                  **fragment(extra_training)})



def check_session_integrity(db, session: str, max_attempts: int) -> dict:
    rounds = list(db[fs.ROUNDS].find({"session": session}).sort("round", 1))
    attempts = list(db[fs.INVOCATIONS].find({"session": session}))
    updates = list(db[fs.UPDATES].find({"session": session}))
    # Retries stay within the cap, per client and round.
    per = Counter((a["round"], a["client"]) for a in attempts if not a["client"].startswith("_"))
    assert per and max(per.values()) <= max_attempts
    # No update counted twice or into a wrong round.
    keys = Counter((u["round"], u["client"]) for u in updates)
    assert max(keys.values()) == 1
    for r in rounds:
        assert r["state"] == "done", r
        included = r["included"]
        assert set(included) <= set(r["selected"])
        got = {u["client"] for u in updates if u["round"] == r["round"]}
        assert set(included) <= got
        model = db[fs.MODELS].find_one({"session": session, "round": r["round"] + 1})
        assert model is not None
        assert r["accepted"] == len(included) - len(r.get("rejected") or [])
    # Every attempt was recorded with its platform id and an end state.
    for a in attempts:
        assert a["state"] in ("succeeded", "failed", "timed_out", "abandoned"), a
        if a["state"] == "succeeded":
            # one whose answer was lost (the keeper killed under it) but whose
            # update is stored is done, with no duration seen to record
            assert a["platform_id"] and (a["duration_ms"] is not None or a.get("stored_update") is True), a
    return {"rounds": rounds, "attempts": attempts, "updates": updates}


def test_training_completes_under_crashes_and_timeouts(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_faults"
    cfg_path = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, rounds=3, clients=6, per_round=6,
                            faults="{crash: 0.2, timeout_instant: 0.1, seed: 7, functions: [fl_client]}")
    rc = run_start(load_config(cfg_path), None, keep_services=True)
    assert rc == 0
    db = pymongo.MongoClient(mongo_url)[db_name]
    sess = db[fs.SESSIONS].find_one(sort=[("created", -1)])
    assert sess["state"] == "finished"
    info = check_session_integrity(db, sess["_id"], max_attempts=3)
    assert len(info["rounds"]) == 3
    failures = Counter(a.get("error_class") for a in info["attempts"] if a["state"] != "succeeded")
    # The injected faults happened and were classified, and retries absorbed them.
    assert failures.get("developer_error", 0) + failures.get("timeout", 0) > 0, failures
    assert any(a["attempt"] > 1 for a in info["attempts"])
    platforms = {a["platform"] for a in info["attempts"]}
    assert {"openwhisk", "gcf"} <= platforms
    # Per-round CSVs were written.
    csvs = sorted((fabric_state / "logs" / sess["_id"]).glob("round_*.csv"))
    assert [p.name for p in csvs] == ["round_001.csv", "round_002.csv", "round_003.csv"]  # shown from 1


def test_resume_after_kill_minus_9_mid_round(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_resume"
    cfg_path = write_config(tmp_path / "cfg.yaml", mongo_url, db_name, rounds=3, clients=4, per_round=4,
                            faults="{slow_ms: 1500, seed: 1, functions: [fl_client]}")
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "fedkeeper.cli", "start", "-c", str(cfg_path), "--keep-services"]
    db = pymongo.MongoClient(mongo_url)[db_name]
    # Kill -9 once round 1 has clients in flight on OpenWhisk (what is checked below).
    kill_cli_when(cmd[3:], lambda: any(a["platform"] == "openwhisk" for a in marked_running(db, 1)),
                  "round 1 with invocations in flight on OpenWhisk")
    sess = db[fs.SESSIONS].find_one(sort=[("created", -1)])
    in_flight = marked_running(db, 1, sess["_id"])
    assert in_flight
    done_before = {(u["round"], u["client"]) for u in db[fs.UPDATES].find({"session": sess["_id"]})}
    res = subprocess.run(cmd + ["--resume", sess["_id"], "--no-deploy"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    sess = db[fs.SESSIONS].find_one({"_id": sess["_id"]})
    assert sess["state"] == "finished"
    info = check_session_integrity(db, sess["_id"], max_attempts=3)
    assert [r["round"] for r in info["rounds"]] == [0, 1, 2]
    # In-flight invocations were adopted and tracked to an end. On OpenWhisk
    # an activation outlives the keeper, so it is tracked to success without
    # being re-run; an HTTP invocation dies with the keeper's connection, so it
    # is resolved at once and its client re-invoked (counted once either way).
    ow = [a for a in in_flight if a["platform"] == "openwhisk"]
    assert ow
    for a in in_flight:
        after = db[fs.INVOCATIONS].find_one({"_id": a["_id"]})
        assert after["state"] not in ("submitting", "running"), after
        if a["platform"] == "openwhisk":
            assert after["state"] == "succeeded", after
    round1 = db[fs.ROUNDS].find_one({"session": sess["_id"], "round": 1})
    assert {a["client"] for a in ow} <= set(round1["included"])
    # No completed update was lost.
    done_after = {(u["round"], u["client"]) for u in db[fs.UPDATES].find({"session": sess["_id"]})}
    assert done_before <= done_after


def test_clients_invoked_through_fl_invoker(fabric_state, mongo_url, tmp_path):
    db_name = "e2e_invoker"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(textwrap.dedent(f"""\
        name: e2e_invoker
        providers:
          openwhisk:
            inv_ow: {{kind: local, invocation: via_invoker}}
        scenarios:
          federated_learning:
            clients_info: {{total_num_clients: 4, num_clients_per_round: 4, ow_clients_count: 4}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: "{mongo_url}", db: {db_name}}}
            model_params: {{lr: "1e-2", local_epochs: "1"}}
            training: {{rounds: 2, seed: 5}}
        """))
    assert run_start(load_config(cfg_path), None, keep_services=True) == 0
    db = pymongo.MongoClient(mongo_url)[db_name]
    sess = db[fs.SESSIONS].find_one(sort=[("created", -1)])
    check_session_integrity(db, sess["_id"], max_attempts=3)
    clients = list(db[fs.INVOCATIONS].find({"session": sess["_id"], "function": "fl_client"}))
    assert len(clients) == 8 and all(a["via"] == "invoker" and a["platform_id"] for a in clients)
    invoker_calls = list(db[fs.INVOCATIONS].find({"session": sess["_id"], "client": "_fl_invoker"}))
    assert len(invoker_calls) == 2 and all(a["state"] == "succeeded" for a in invoker_calls)
