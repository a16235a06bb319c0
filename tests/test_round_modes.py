"""Round modes end to end on the local fabric under injected faults: sync,
semi_async (stragglers join later rounds as stale updates) and async
(FedBuff). Every mode finishes, every round has a model, and the store shows
no update aggregated twice and no stale update beyond the tolerance; an
async session killed with -9 resumes, and a semi_async keeper interrupted
(Ctrl-C) with a straggler running leaves it for the resumed keeper to adopt.

Stragglers are made by placement, not by chance: half the clients run on a
cluster whose fl_client activations take longer (the fabric adds `slow_ms`
to their run time), the other half on a cluster with a shorter delay. Both
also inject timeouts, and the fast one crashes."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pymongo
import pytest

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from flcommon import store as fs

from cli_processes import kill_cli_when
from in_flight import marked_running
from session_config import FUNCTIONS, fragment, write_session_config

# Every fl_client activation on the fast cluster gets FAST_MS added to its
# run time, on the slow one SLOW_MS: a round (a fast client plus the
# aggregation) then takes well over FAST_MS, and a straggler's extra
# SLOW_MS - FAST_MS lands it within a round or two, inside the tolerance.
FAST_MS = 400
SLOW_MS = 1500
TOLERANCE = 3
DB = "round_modes"  # one database: the functions' deployments (and warm workers) are shared


def write_config(path: Path, mongo_url: str, *, mode: str, rounds: int, per_round: int,
                 extra_training: str = "") -> Path:
    # Fault seeds whose sequences put a timeout and a crash (fast cluster)
    # and a timeout (slow cluster) among each session's first few client
    # invocations: even a short session meets faults.
    fast = {"crash": 0.1, "timeout_instant": 0.15, "slow_ms": FAST_MS, "seed": 9, "functions": ["fl_client"]}
    slow = {"timeout_instant": 0.15, "slow_ms": SLOW_MS, "seed": 6, "functions": ["fl_client"]}
    return write_session_config(
        path, name="modes", mongo={"url": mongo_url, "db": DB}, server="rm_fast",
        openwhisk={"rm_fast": {"kind": "local", "faults": fast}, "rm_slow": {"kind": "local", "faults": slow}},
        clients_info={"total_num_clients": 4, "num_clients_per_round": per_round,
                      "clusters": {"rm_fast": 2, "rm_slow": 2}},
        training={"mode": mode, "rounds": rounds, "seed": 3, "quorum": 0.5, "round_deadline_s": 120,
                  "attempt_grace_s": 5, "staleness_tolerance": TOLERANCE,
                  "retries": {"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 1},
                  **fragment(extra_training)},
        functions=dict(FUNCTIONS, fl_client={"openwhisk": {"timeout": "30000", "memory": "1024"}}))



def run_session(tmp_path: Path, mongo_url: str, **kw) -> tuple[pymongo.database.Database, dict]:
    db = pymongo.MongoClient(mongo_url)[DB]
    before = {s["_id"] for s in db[fs.SESSIONS].find({}, {"_id": 1})}
    assert run_start(load_config(write_config(tmp_path / "cfg.yaml", mongo_url, **kw)), None,
                     keep_services=True) == 0
    (sess,) = [s for s in db[fs.SESSIONS].find() if s["_id"] not in before]
    assert sess["state"] == "finished"
    return db, sess


def check_aggregation(db, session: str, rounds: int) -> dict:
    """What must hold in every mode: each round has a model, no update is
    aggregated twice, staleness stays within the tolerance, and the models'
    contributions agree with the updates' own records: marked `accepted`
    where the keeper finds waiting updates by their status (semi_async,
    async), left as received in sync, where nothing reads a mark."""
    rounds_docs = list(db[fs.ROUNDS].find({"session": session}).sort("round", 1))
    marked = db[fs.SESSIONS].find_one({"_id": session})["spec"]["mode"] != "sync"
    updates = list(db[fs.UPDATES].find({"session": session}))
    models = {m["round"]: m for m in db[fs.MODELS].find({"session": session})}
    attempts = list(db[fs.INVOCATIONS].find({"session": session}))
    assert [r["round"] for r in rounds_docs] == list(range(rounds))
    for r in rounds_docs:
        assert r["state"] == "done", r
        assert r["round"] + 1 in models, f"no model after round {r['round']}"
        for s in r.get("stale_included") or []:
            assert 0 < r["round"] - s["round"] <= TOLERANCE, (r["round"], s)
    # Each (client, round) update is aggregated at most once, in one model.
    contributions = [(c["client"], c["round"], m["round"] - 1)
                     for m in models.values() for c in m.get("contributions") or []]
    assert max(Counter((c, r) for c, r, _ in contributions).values()) == 1
    by_key = {(u["client"], u["round"]): u for u in updates}
    for client, upd_round, agg_round in contributions:
        u = by_key[(client, upd_round)]
        if marked:
            assert u["status"] == "accepted" and u["aggregated_in"] == agg_round, u
        else:
            assert u["status"] == "received" and agg_round == upd_round, u
        assert 0 <= agg_round - upd_round <= TOLERANCE
    accepted = [u for u in updates if u["status"] == "accepted"]
    assert len(contributions) == sum(m.get("accepted", 0) for r, m in models.items() if r > 0)
    assert len(accepted) == (len(contributions) if marked else 0)
    for u in updates:
        if u["status"] != "accepted":
            assert u.get("aggregated_in") is None, u
    # Every client attempt ended and recorded its function's memory.
    for a in attempts:
        assert a["state"] in ("succeeded", "failed", "timed_out", "abandoned"), a
        assert a["memory_mb"] > 0, a
    failures = Counter(a.get("error_class") for a in attempts if a["state"] != "succeeded")
    return {"rounds": rounds_docs, "updates": updates, "models": models, "attempts": attempts,
            "contributions": contributions, "failures": failures}


def stale_contributions(info: dict) -> list[tuple[str, int, int]]:
    return [c for c in info["contributions"] if c[2] > c[1]]


def test_sync_rounds_under_faults(fabric_state, mongo_url, tmp_path):
    db, sess = run_session(tmp_path, mongo_url, mode="sync", rounds=2, per_round=4)
    info = check_aggregation(db, sess["_id"], 2)
    # Injected faults happened and retries absorbed them.
    assert sum(info["failures"].values()) > 0, info["failures"]
    # Sync waits for its clients: nothing is ever stale.
    assert stale_contributions(info) == []
    for r in info["rounds"]:
        assert set(r["included"]) <= set(r["selected"]) and r["mode"] == "sync"


def test_semi_async_aggregates_stragglers_as_stale_updates(fabric_state, mongo_url, tmp_path):
    db, sess = run_session(tmp_path, mongo_url, mode="semi_async", rounds=5, per_round=4)
    info = check_aggregation(db, sess["_id"], 5)
    assert sum(info["failures"].values()) > 0, info["failures"]
    r0 = info["rounds"][0]
    # A round closes at quorum (half its clients), not when all deliver.
    assert len(r0["included"]) < len(r0["selected"])
    # Clients of the slow cluster straggled and their updates were
    # aggregated, down-weighted, in a later round.
    stale = stale_contributions(info)
    assert stale, info["rounds"]
    slow = {a["client"] for a in info["attempts"] if a["cluster"] == "rm_slow"}
    assert {c for c, _, _ in stale} & slow
    # Down-weighted: per example, a stale update weighs (1 + staleness) ** -0.5
    # (the default staleness_exponent) of a fresh one in the same aggregate.
    compared = 0
    for m in info["models"].values():
        per_example = {(c["client"], c["staleness"]): c["weight"] / c["num_examples"]
                       for c in m.get("contributions") or []}
        fresh = [w for (_, st), w in per_example.items() if st == 0]
        for (_, st), w in per_example.items():
            if st > 0 and fresh:
                assert w / fresh[0] == pytest.approx((1 + st) ** -0.5, rel=1e-6)
                compared += 1
    assert compared
    # A client busy with a straggling attempt was not selected again meanwhile.
    # Selection may wait past the round's start for a straggler to end (when
    # every client is busy), and an attempt's `finished` is when the keeper
    # saw it end: compare with the round's first invocation, which follows
    # its selection and precedes any later look at the stragglers.
    for r in info["rounds"]:
        submitted = [a["submitted"] for a in info["attempts"]
                     if a["round"] == r["round"] and a["client"] in r["selected"]]
        chosen_by = min(submitted, default=r["started"])
        running_elsewhere = {a["client"] for a in info["attempts"] if a["round"] < r["round"]
                             and a["submitted"] < chosen_by and a.get("finished", 0) > chosen_by
                             and a["state"] == "succeeded"}
        assert not running_elsewhere & set(r["selected"]), r["round"]


def test_async_buffered_steps_under_faults(fabric_state, mongo_url, tmp_path):
    db, sess = run_session(tmp_path, mongo_url, mode="async", rounds=5, per_round=3,
                           extra_training="buffer_size: 2")
    info = check_aggregation(db, sess["_id"], 5)
    assert sum(info["failures"].values()) > 0, info["failures"]
    clients = [a for a in info["attempts"] if not a["client"].startswith("_")]
    # A client is invoked once per model version it trains from: its
    # attempts there are that invocation and its retries, numbered 1..n.
    per_version: dict[tuple[int, str], list[int]] = {}
    for a in clients:
        per_version.setdefault((a["round"], a["client"]), []).append(a["attempt"])
    for numbers in per_version.values():
        assert sorted(numbers) == list(range(1, len(numbers) + 1)) and len(numbers) <= 3
    stale = stale_contributions(info)
    for r in info["rounds"]:
        # Each step waited for a full buffer (buffer_size: 2).
        agg = [c for c in info["contributions"] if c[2] == r["round"]]
        assert len(agg) >= 2 and r["mode"] == "async"
        assert len([c for c in stale if c[2] == r["round"]]) == len(r["stale_included"])
        # Fresh updates of a step come from clients invoked while its model was current.
        assert set(r["included"]) <= set(r["selected"])
        invoked = {a["client"] for a in clients if a["round"] == r["round"]}
        assert set(r["selected"]) == invoked


def test_async_session_resumes_after_kill_minus_9(fabric_state, mongo_url, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, mode="async", rounds=5, per_round=3,
                       extra_training="buffer_size: 2")
    cmd = [sys.executable, "-m", "fedkeeper.cli", "start", "-c", str(cfg), "--keep-services"]
    db = pymongo.MongoClient(mongo_url)[DB]
    before = {s["_id"] for s in db[fs.SESSIONS].find({}, {"_id": 1})}

    in_flight_states = {"$in": ["submitting", "running"]}

    def step_2_or_later_in_flight():
        sess = db[fs.SESSIONS].find_one({"_id": {"$nin": list(before)}})
        return sess if sess and db[fs.INVOCATIONS].find_one(
            {"session": sess["_id"], "round": {"$gte": 2}, "state": in_flight_states,
             "function": "fl_client"}) else None

    # Kill -9 once a step from the third on has clients in flight (a step
    # whose buffer late updates filled invokes its picks only in the next
    # one, from the model then current). Their attempts are `submitting`,
    # marked running (on the document or in a batch of marks) once they ran
    # a second (keeper/running_marks.py).
    sess = kill_cli_when(cmd[3:], step_2_or_later_in_flight, "step 2 or later with invocations in flight")
    in_flight = list(db[fs.INVOCATIONS].find({"session": sess["_id"], "state": in_flight_states}))
    marked = {a["_id"] for a in marked_running(db, session=sess["_id"])}
    assert in_flight
    res = subprocess.run(cmd + ["--resume", sess["_id"], "--no-deploy"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert db[fs.SESSIONS].find_one({"_id": sess["_id"]})["state"] == "finished"
    check_aggregation(db, sess["_id"], 5)
    # The invocations in flight at the kill were tracked to an end when
    # their running mark was written (adopted), else recorded as abandoned,
    # their clients free to be invoked again (check_aggregation: never
    # counted twice).
    for a in in_flight:
        state = db[fs.INVOCATIONS].find_one({"_id": a["_id"]})["state"]
        assert state not in ("submitting", "running"), a
        if a["_id"] not in marked:
            assert state == "abandoned", a


def test_semi_async_interrupted_keeper_leaves_stragglers_for_resume(fabric_state, mongo_url, tmp_path):
    """Ctrl-C in the keeper (a KeyboardInterrupt out of its progress callback)
    once a semi_async round has closed with a straggler still running: the
    straggler's attempt stays `running` (as after kill -9), so the resumed
    keeper adopts it instead of invoking its client again while it runs.
    The session is marked `interrupted`, and the resumed one must keep its
    round mode."""
    from fedkeeper.keeper import Keeper, SessionError, SessionInterrupted, new_session_id
    from fedkeeper.runtime import Runtime

    rounds = 4
    cfg = load_config(write_config(tmp_path / "cfg.yaml", mongo_url, mode="semi_async", rounds=rounds,
                                   per_round=4))
    db = pymongo.MongoClient(mongo_url)[DB]
    sid = new_session_id(cfg.name)
    seen: dict = {}

    def interrupt(kind, data):
        # "round": round R is aggregated and done. The keeper does not track
        # during the aggregation, so attempts marked running in the store
        # are the stragglers of R (or earlier rounds) as of its last poll.
        if kind == "round":
            running = marked_running(db, session=sid)
            if running:
                seen.update(round=data["report"].round, running=running)
                raise KeyboardInterrupt

    rt = Runtime.open(cfg, keep_local_services=True)
    try:
        keeper = Keeper(rt, progress=interrupt)
        with pytest.raises(SessionInterrupted) as interrupted:
            keeper.start(session_id=sid)
    finally:
        rt.close(stop_store=False)
    assert seen, "no round closed with a straggler running"
    stragglers = seen["running"]
    # Left as kill -9 would leave them: running, nothing abandoned.
    for a in stragglers:
        assert db[fs.INVOCATIONS].find_one({"_id": a["_id"]})["state"] == "running", a
    assert db[fs.INVOCATIONS].count_documents({"session": sid, "state": "abandoned"}) == 0
    assert db[fs.SESSIONS].find_one({"_id": sid})["state"] == "interrupted"
    assert interrupted.value.rounds_done == seen["round"] + 1
    assert f"--resume {sid}" in str(interrupted.value)

    # A resume under another round mode is refused before it touches anything.
    sync_cfg = load_config(write_config(tmp_path / "sync.yaml", mongo_url, mode="sync", rounds=rounds,
                                        per_round=4))
    rt = Runtime.open(sync_cfg, keep_local_services=True)
    try:
        with pytest.raises(SessionError, match="mode"):
            Keeper(rt).start(resume=sid, deploy=False)
    finally:
        rt.close(stop_store=False)
    for a in stragglers:
        assert db[fs.INVOCATIONS].find_one({"_id": a["_id"]})["state"] == "running", a

    rt = Runtime.open(cfg, keep_local_services=True)
    try:
        summary = Keeper(rt).start(resume=sid, deploy=False)
    finally:
        rt.close(stop_store=False)
    assert summary.state == "finished", summary.message
    assert db[fs.SESSIONS].find_one({"_id": sid})["state"] == "finished"
    # No update aggregated twice, every attempt ended (none left running).
    info = check_aggregation(db, sid, rounds)
    for s in stragglers:
        end = db[fs.INVOCATIONS].find_one({"_id": s["_id"]})
        assert end["state"] != "running", end
        # Its client was not invoked again (for its round or any other)
        # while this attempt was still running.
        for a in info["attempts"]:
            if a["client"] == s["client"] and a["_id"] != s["_id"] and a["submitted"] >= s["submitted"]:
                assert a["submitted"] >= end["finished"], (a, end)
