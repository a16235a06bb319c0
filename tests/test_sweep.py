"""Parameter sweeps on the local fabric with a real store: every run a
session, results in the store and in the printed table, resuming without
re-running finished sessions, an interrupted sweep picked up where its
keeper was killed, and grids rejected before anything runs."""
from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path
from typing import Iterable

import psutil
import pymongo
import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.config import load_config
from fedkeeper.cost import session_cost
from fedkeeper.local import fabric, shutdown_local_services, supervisor
from fedkeeper.local.cloud_functions.host import FrameworkHost
from fedkeeper.local.store import EmbeddedMongo
from fedkeeper.store import SWEEPS, connect
from flcommon import store as fs

from cli_processes import kill_cli_when
from fixtures_fabric import wait_for
from in_flight import first_marked_running

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "config-local.yaml"


def write_config(path: Path, mongo_url: str, db: str, faults: str = "null") -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: sweeptest
        providers:
          openwhisk:
            local_ow: {{kind: local, faults: {faults}}}
        scenarios:
          federated_learning:
            clients_info: {{total_num_clients: 4, num_clients_per_round: 4, ow_clients_count: 4}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: "{mongo_url}", db: {db}}}
            model_params: {{lr: "1e-2", optim: adam, local_epochs: "1"}}
            training:
              rounds: 2
              seed: 11
              target_accuracy: 0.5
              retries: {{max_attempts: 3, backoff_s: 0.1, backoff_max_s: 1}}
        """))
    return path



def billed_invocations(db, session: str) -> list:
    return sorted(a["_id"] for a in db[fs.INVOCATIONS].find({"session": session, "platform_id": {"$ne": None}}))


def test_sweep_stores_every_run_and_resumes_without_rerunning(fabric_state, mongo_url, tmp_path):
    db_name = "sweep_grid"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name)
    out = tmp_path / "results.csv"
    args = ["sweep", "-c", str(cfg), "--grid", "local_epochs=0,1", "--repeats", "1", "--parallel", "2",
            "--keep-services"]
    res = CliRunner().invoke(cli, args + ["--format", "csv", "-o", str(out)])
    assert res.exit_code == 0, res.output
    db = pymongo.MongoClient(mongo_url)[db_name]
    store = connect(mongo_url, db_name)
    sweep = db[SWEEPS].find_one()
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["local_epochs"] for r in rows) == ["0", "1"]
    assert {r["session"] for r in rows} == {run["session"] for run in sweep["runs"].values()}
    assert sweep["state"] == "finished" and sweep["grid"][0]["values"] == ["0", "1"]
    config = load_config(cfg)
    for row in rows:
        sess = db[fs.SESSIONS].find_one({"_id": row["session"]})
        run = next(r for r in sweep["runs"].values() if r["session"] == row["session"])
        assert sess["state"] == row["state"] == run["state"] == "finished"
        assert not run["result"].get("error") and not row.get("error")   # why it stopped is no error
        assert sess["spec"]["local_epochs"] == int(row["local_epochs"]) == run["params"]["local_epochs"]
        assert sess["spec"]["seed"] == int(row["seed"]) == 11 and sess["sweep"] == sweep["_id"]
        done = [r for r in db[fs.ROUNDS].find({"session": row["session"]}).sort("round", 1)
                if r["state"] == "done"]
        assert int(row["rounds"]) == len(done) == run["result"]["rounds"]
        assert float(row["final_accuracy"]) == pytest.approx(done[-1]["accuracy"])
        reached = [r for r in done if r["accuracy"] >= 0.5]
        if reached:
            assert int(row["rounds_to_target"]) == reached[0]["round"] + 1
            assert float(row["time_to_target_s"]) == pytest.approx(
                sum(r["duration_s"] for r in done if r["round"] <= reached[0]["round"]))
        else:
            assert row["rounds_to_target"] == ""
        assert int(row["invocations"]) == len(billed_invocations(db, row["session"]))
        retries = db[fs.INVOCATIONS].count_documents({"session": row["session"], "attempt": {"$gt": 1}})
        assert int(row["retries"]) == retries
        assert float(row["cost"]) == pytest.approx(session_cost(store, row["session"], config)["total"])
        assert float(row["cost"]) > 0 and run["result"]["cost"] == pytest.approx(float(row["cost"]))
    # --parallel 2: the two sessions ran at the same time.
    a, b = (db[fs.SESSIONS].find_one({"_id": r["session"]}) for r in rows)
    assert a["created"] < b["ended"] and b["created"] < a["ended"]

    # The same command again: nothing new is created and nothing re-runs.
    sessions_before = db[fs.SESSIONS].count_documents({})
    invocations_before = {r["session"]: billed_invocations(db, r["session"]) for r in rows}
    again = CliRunner().invoke(cli, args + ["--format", "markdown"])
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier, skipped") == 2
    assert db[fs.SESSIONS].count_documents({}) == sessions_before == 2
    assert db[SWEEPS].count_documents({}) == 1
    for sid, before in invocations_before.items():
        assert billed_invocations(db, sid) == before
        assert f"| {sid} | finished |" in again.output

    # A run whose session failed is tried again as a new session on the next
    # run of the command; the failed session stays listed, its reason shown.
    failed_sid = rows[0]["session"]
    db[fs.SESSIONS].update_one({"_id": failed_sid}, {"$set": {"state": "failed",
                                                              "error": "round 2: quorum not reached"}})
    retried = CliRunner().invoke(cli, args + ["--format", "csv"])
    assert retried.exit_code == 0, retried.output
    assert f"session {failed_sid} failed earlier (round 2: quorum not reached); trying again as session " \
           f"{failed_sid}-try2" in retried.output
    assert "None" not in retried.output
    run = next(r for r in db[SWEEPS].find_one()["runs"].values() if r.get("failed_sessions"))
    assert run["failed_sessions"] == [failed_sid] and run["session"] == f"{failed_sid}-try2"
    assert run["state"] == "finished"
    assert db[fs.SESSIONS].find_one({"_id": f"{failed_sid}-try2"})["state"] == "finished"
    assert db[fs.SESSIONS].find_one({"_id": failed_sid})["state"] == "failed"  # kept as it was
    store.close()


def test_interrupted_sweep_resumes_the_killed_session(fabric_state, mongo_url, tmp_path):
    db_name = "sweep_killed"
    # Slow clients keep round 1 in flight long enough to kill the sweep there.
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name,
                       faults="{slow_ms: 1500, seed: 1, functions: [fl_client]}")
    args = ["sweep", "-c", str(cfg), "--grid", "local_epochs=0", "--keep-services"]
    db = pymongo.MongoClient(mongo_url)[db_name]
    kill_cli_when(args, lambda: first_marked_running(db, 1), "round 1 with invocations in flight")
    sweep = db[SWEEPS].find_one()
    (run,) = sweep["runs"].values()
    assert run["state"] == "running" and sweep["state"] == "running"
    sid = run["session"]
    assert db[fs.SESSIONS].find_one({"_id": sid})["state"] == "running"
    round0 = sorted(a["_id"] for a in db[fs.INVOCATIONS].find({"session": sid, "round": 0}))

    res = CliRunner().invoke(cli, args + ["--format", "csv"])
    assert res.exit_code == 0, res.output
    assert f"({sid}): resumed and finished" in res.output
    assert db[fs.SESSIONS].count_documents({}) == 1
    assert db[fs.SESSIONS].find_one({"_id": sid})["state"] == "finished"
    # The round finished before the kill was not run again.
    assert sorted(a["_id"] for a in db[fs.INVOCATIONS].find({"session": sid, "round": 0})) == round0
    assert [r["state"] for r in db[fs.ROUNDS].find({"session": sid}).sort("round", 1)] == ["done", "done"]
    sweep = db[SWEEPS].find_one()
    assert sweep["state"] == "finished"
    assert [r["state"] for r in sweep["runs"].values()] == ["finished"]
    header = next(i for i, ln in enumerate(res.output.splitlines()) if ln.startswith("local_epochs,"))
    (row,) = csv.DictReader(res.output.splitlines()[header:])
    assert (row["session"], row["state"], row["rounds"]) == (sid, "finished", "2")


def test_one_at_a_time_a_runs_end_is_printed_before_the_next_run_starts(fabric_state, mongo_url, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, "sweep_progress")
    res = CliRunner().invoke(cli, ["sweep", "-c", str(cfg), "--grid", "local_epochs=0,1", "--grid", "rounds=1",
                                   "--parallel", "1", "--keep-services", "--format", "csv"])
    assert res.exit_code == 0, res.output
    progress = [ln for ln in res.stderr.splitlines() if ln.startswith(("run ", "["))]
    assert [ln.split(" (")[0].split(":")[0] for ln in progress] == [
        "run 1/2 local_epochs=0 rounds=1 repeat 0 started", "[1/2] run 1 local_epochs=0 rounds=1 repeat 0",
        "run 2/2 local_epochs=1 rounds=1 repeat 0 started", "[2/2] run 2 local_epochs=1 rounds=1 repeat 0"]


def test_a_swept_setting_named_like_a_result_column_gets_a_column_of_its_own(fabric_state, mongo_url, tmp_path):
    """--grid rounds=...: the rounds planned and the rounds completed are
    two columns, each found by its own name."""
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, "sweep_rounds")
    args = ["sweep", "-c", str(cfg), "--grid", "rounds=1", "--grid", "local_epochs=0", "--keep-services"]
    res = CliRunner().invoke(cli, args + ["--format", "csv"])
    assert res.exit_code == 0, res.output
    header, *rows = list(csv.reader(res.stdout.splitlines()))
    assert len(set(header)) == len(header), header
    assert header[:2] == ["grid.rounds", "local_epochs"] and "rounds" in header
    (row,) = (dict(zip(header, r)) for r in rows)
    assert (row["grid.rounds"], row["local_epochs"], row["rounds"], row["state"]) == ("1", "0", "1", "finished")
    # The table and Markdown put the grid values in one column: no clash there either.
    md = CliRunner().invoke(cli, args + ["--format", "markdown"])
    assert md.exit_code == 0, md.output
    cells = [c.strip() for c in md.stdout.splitlines()[0].strip("|").split("|")]
    assert len(set(cells)) == len(cells) and "rounds=1 local_epochs=0" in md.stdout


@pytest.mark.parametrize("grid, message", [
    (["lrate=1e-3,1e-2"], "unknown grid key 'lrate'"),
    (["model_params.foo=1,2"], "model_params has no 'foo'"),
    (["optim=adam,adamw"], "grid combination optim=adamw: model_params.optim"),
    (["clients_per_round=2,8"], "num_clients_per_round (8) exceeds total_num_clients (4)"),
    (["training.seed=1,2"], "cannot vary"),
    (["lr"], "expected key=value1,value2"),
])
def test_bad_grid_exits_2_before_anything_runs(grid, message, mongo_url, tmp_path, isolated_dirs):
    db_name = "sweep_rejected"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db_name)
    args = ["sweep", "-c", str(cfg)]
    for g in grid:
        args += ["--grid", g]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert pymongo.MongoClient(mongo_url)[db_name][SWEEPS].count_documents({}) == 0


# --------------------------------------------------------------------------- local services

@pytest.fixture
def service_sessions(monkeypatch):
    """The local services this test starts, by session id (their pid) ->
    command line. Each runs in a session of its own (supervisor.spawn), and
    what it starts in turn (the fabric's zygote and workers) stays in that
    session, so these ids find every process of them, even one its parent
    left behind."""
    spawned: dict[int, str] = {}
    spawn = supervisor.spawn

    def recording(cmd, *args, **kwargs):
        proc, rec = spawn(cmd, *args, **kwargs)
        spawned[proc.pid] = " ".join(map(str, cmd))
        return proc, rec
    monkeypatch.setattr(supervisor, "spawn", recording)
    return spawned


def live_in(sessions: Iterable[int]) -> list[str]:
    """Processes still running in those sessions, as `pid command` lines."""
    sessions, found = set(sessions), []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getsid(p.pid) in sessions and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:160]}")
        except (ProcessLookupError, PermissionError):
            continue
    return found


def wait_until_gone(sessions: Iterable[int], timeout_s: float = 30) -> None:
    """Bounded: a process killed a moment ago may not have exited yet."""
    try:
        wait_for(lambda: not live_in(sessions), timeout_s, interval=0.2)
    except AssertionError:
        pytest.fail(f"still running: {live_in(sessions)}")


@pytest.mark.parametrize("keep", [False, True], ids=["stopped", "kept"])
def test_a_sweep_stops_the_local_services_it_started_unless_kept(keep, service_sessions, tmp_path):
    """The local config (fabric, local Cloud Functions, embedded store) in a
    state directory of its own: the runs share the services the sweep
    started, which stop with the sweep, fabric zygote and function hosts
    included; --keep-services leaves them all running."""
    state = Path(os.environ["FEDKEEPER_STATE_DIR"])
    args = ["sweep", "-c", str(LOCAL_CONFIG), "--grid", "rounds=1", "--grid", "clients_per_round=2",
            "--grid", "local_epochs=0,1", "--format", "csv"] + (["--keep-services"] if keep else [])
    try:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert res.stdout.count(",finished,") == 2, res.stdout
        # Both runs used the one fabric and store the sweep started.
        assert sum("fedkeeper.local.fabric serve" in c for c in service_sessions.values()) == 1, service_sessions
        assert sum("secantusd" in c for c in service_sessions.values()) == 1, service_sessions
        if keep:
            info = fabric.fabric_status(state / "fabric")
            assert info is not None, "--keep-services: the fabric was stopped"
            assert FrameworkHost(state / "gcf" / "local_gcf").names(), "--keep-services: the function hosts stopped"
            assert EmbeddedMongo(state / "mongo").running_url(), "--keep-services: the store was stopped"
            # the fabric's own processes (its TensorFlow zygote) are kept with it
            assert [p for p in live_in({info["pid"]}) if not p.startswith(f"{info['pid']} ")]
        else:
            assert fabric.fabric_status(state / "fabric") is None, "the sweep left the fabric running"
            assert not FrameworkHost(state / "gcf" / "local_gcf").names(), "the sweep left function hosts running"
            assert EmbeddedMongo(state / "mongo").running_url() is None, "the sweep left the store running"
            wait_until_gone(service_sessions)   # and every process of them with it
    finally:
        shutdown_local_services(state)
        wait_until_gone(service_sessions)
