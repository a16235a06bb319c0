"""Ctrl-C on a real session and a real sweep (local fabric, embedded
store): exit status 130, the session id, what the store kept and how to
resume; the interrupted session then shows as such and resumes."""
from __future__ import annotations

import json
import shlex

import pymongo
from click.testing import CliRunner

import test_sweep as sweep_tests
from cli_processes import interrupt_cli_when
from in_flight import first_marked_running
from fedkeeper.cli import main as cli


def two_round_config(tmp_path, mongo_url, db_name):
    """test_sweep's config with slow clients (round 2 stays in flight long
    enough to interrupt it) and a target no round reaches."""
    cfg = sweep_tests.write_config(tmp_path / "cfg.yaml", mongo_url, db_name,
                                   faults="{slow_ms: 1500, seed: 1, functions: [fl_client]}")
    cfg.write_text(cfg.read_text().replace("target_accuracy: 0.5", "target_accuracy: 0.999"))
    return cfg


def round_1_in_flight(db):
    return lambda: first_marked_running(db, 1)


def test_ctrl_c_in_start_then_resume(fabric_state, mongo_url, tmp_path):
    db_name = "interrupt_start"
    cfg = two_round_config(tmp_path, mongo_url, db_name)
    db = pymongo.MongoClient(mongo_url)[db_name]
    found, code, out = interrupt_cli_when(["start", "-c", str(cfg), "--keep-services"], round_1_in_flight(db),
                                          "round 2 with invocations in flight")
    sid = found["session"]
    assert code == 130, out
    assert f"session {sid} interrupted; the store keeps its 1 finished round(s)" in out
    command = shlex.join(["fedkeeper", "start", "-c", str(cfg), "--resume", sid])
    assert f"resume it with: {command}" in out
    assert "Traceback" not in out
    status = CliRunner().invoke(cli, ["status", sid, "-c", str(cfg), "--json"])
    assert json.loads(status.stdout)["state"] == "interrupted"
    # The printed command, run as printed (the process is `fedkeeper`), finishes the session.
    resumed = CliRunner().invoke(cli, shlex.split(command)[1:] + ["--keep-services", "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert (summary["session"], summary["state"], summary["rounds"]) == (sid, "finished", 2)


def test_ctrl_c_in_a_sweep(fabric_state, mongo_url, tmp_path):
    db_name = "interrupt_sweep"
    cfg = two_round_config(tmp_path, mongo_url, db_name)
    db = pymongo.MongoClient(mongo_url)[db_name]
    found, code, out = interrupt_cli_when(["sweep", "-c", str(cfg), "--grid", "local_epochs=0", "--keep-services"],
                                          round_1_in_flight(db), "round 2 with invocations in flight")
    sid = found["session"]
    sweep = db["sweeps"].find_one()
    assert code == 130, out
    assert f"session {sid} interrupted; the store keeps its 1 finished round(s)" in out
    assert f"--sweep-id {sweep['_id']}" in out and "resume the sweep with: fedkeeper sweep -c" in out
    assert sweep["state"] == "interrupted"
