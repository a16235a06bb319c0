"""The command line: status from the store, deploy.py/main.py flag mapping,
and exit statuses."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bson import ObjectId
from click.testing import CliRunner

from fedkeeper.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(tmp_path: Path, mongo_url: str, db: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: clitest
        providers:
          openwhisk:
            ow1: {{kind: local}}
        scenarios:
          federated_learning:
            clients_info: {{total_num_clients: 2, num_clients_per_round: 2, ow_clients_count: 2}}
            mongo_config: {{url: "{mongo_url}", db: {db}}}
        """))
    return p


def test_status_reads_rounds_from_the_store(tmp_path, store, mongo_url, isolated_dirs):
    sid = "sess-1"
    store.create_session({"_id": sid, "name": "clitest", "state": "running",
                          "keeper": {"host": "node-7", "pid": 4242, "started": 1.0}})
    store.upsert_round(sid, 0, state="done", selected=["client_0", "client_1"], duration_s=2.5,
                       accuracy=0.5, loss=1.2)
    store.upsert_round(sid, 1, state="running", selected=["client_0", "client_1"])
    docs = [
        (0, "client_0", 1, "succeeded"), (0, "client_1", 1, "failed"), (0, "client_1", 2, "succeeded"),
        (1, "client_0", 1, "running"), (1, "client_1", 1, "timed_out"), (1, "client_1", 2, "running"),
    ]
    store.insert_attempts([{"_id": ObjectId(), "session": sid, "round": r, "client": c, "attempt": a,
                            "state": st} for r, c, a, st in docs])
    cfg = cfg_for(tmp_path, mongo_url, store.db.name)
    res = CliRunner().invoke(cli, ["status", "-c", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["session"] == sid and data["state"] == "running"
    assert data["keeper"] == {"host": "node-7", "pid": 4242}
    r0, r1 = data["rounds"]
    assert (r0["done"], r0["failed"], r0["in_flight"], r0["retries"], r0["accuracy"]) == (2, 0, 0, 1, 0.5)
    assert (r1["done"], r1["failed"], r1["in_flight"], r1["retrying"], r1["retries"]) == (0, 0, 2, 1, 1)
    assert r0["retrying"] == 0
    table = CliRunner().invoke(cli, ["status", sid, "-c", str(cfg)])
    assert table.exit_code == 0 and "0.5000" in table.output
    assert "running (keeper 4242 on node-7)" in table.output
    # --watch refreshes until the session is no longer running.
    import threading
    finisher = threading.Timer(1.0, lambda: store.update_session(sid, state="finished"))
    finisher.start()
    watched = CliRunner().invoke(cli, ["status", sid, "-c", str(cfg), "--watch", "--interval", "0.2"])
    finisher.join()
    assert watched.exit_code == 0 and "finished" in watched.output
    missing = CliRunner().invoke(cli, ["status", "nope", "-c", str(cfg)])
    assert missing.exit_code == 2 and "no session 'nope'" in missing.output


def test_status_of_a_failed_session_says_why_under_its_table(tmp_path, store, mongo_url, isolated_dirs):
    """A session that failed before its first round has an empty table:
    the reason is printed under it, as the store records it."""
    error = "fl_server_init failed on [ow1]: developer_error: ModuleNotFoundError: No module named 'keras'"
    store.create_session({"_id": "sess-failed", "name": "clitest", "state": "failed", "error": error})
    cfg = cfg_for(tmp_path, mongo_url, store.db.name)
    res = CliRunner().invoke(cli, ["status", "sess-failed", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].strip() == "session sess-failed: failed"
    below = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert "round" in " ".join(lines[:below])    # the table's header comes first
    assert " ".join(" ".join(lines[below:]).split()) == f"error: {error}"   # wrapped at spaces, never cut
    # A pipe watching it (nothing left to refresh) gets the reason too.
    watched = CliRunner().invoke(cli, ["status", "sess-failed", "-c", str(cfg), "--watch"])
    assert watched.output.splitlines() == ["session sess-failed: failed", f"error: {error}"]


def test_status_of_a_finished_session_says_why_it_stopped(tmp_path, store, mongo_url, isolated_dirs):
    why = "target accuracy 0.93 reached: 0.9422 after round 4"
    store.create_session({"_id": "sess-done", "name": "clitest", "state": "finished", "stopped": why})
    cfg = cfg_for(tmp_path, mongo_url, store.db.name)
    res = CliRunner().invoke(cli, ["status", "sess-done", "-c", str(cfg)])
    assert res.exit_code == 0 and res.output.splitlines()[-1] == f"stopped: {why}", res.output


@pytest.mark.parametrize("script,args,expect", [
    ("deploy.py", ["-h"], ["-c CONFIGFILE", "-a", "-o OW_PROVIDERS_LIST", "-g GCF_PROVIDERS_LIST",
                           "-s SCENARIO_NAME", "-f FUNCTIONS_LIST", "-d", "-r"]),
    ("main.py", ["-h"], ["-c CONFIGFILE", "-d", "-r", "-s"]),
])
def test_help_prints_the_original_usage(script, args, expect):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for frag in expect:
        assert frag in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["-c", "config-local.yaml", "-o", "nowhere", "-s", "test", "-f", "nodeinfo", "-d"],
     "no openwhisk cluster named 'nowhere'"),
    (["-c", "config-local.yaml", "-g", "local_ow", "-s", "test", "-f", "nodeinfo", "-d"],
     "no google cluster named 'local_ow'"),
    (["-c", "config-local.yaml", "-a", "-s", "nosuch", "-f", "nodeinfo", "-d"], "no scenario named 'nosuch'"),
    (["-c", "missing.yaml", "-a", "-s", "test", "-f", "nodeinfo", "-d"], "config file not found"),
    (["-c", "config-local.yaml", "-a", "-s", "test", "-f", "nodeinfo"], "one of the arguments -d/--deploy -r/--remove"),
    (["-c", "config-local.yaml", "-s", "test", "-f", "nodeinfo", "-d"], "name clusters with -a, -o or -g"),
])
def test_deploy_py_bad_flags_exit_2(args, message, isolated_dirs):
    proc = subprocess.run([sys.executable, "deploy.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_main_py_bad_flags_exit_2(isolated_dirs):
    proc = subprocess.run([sys.executable, "main.py", "-c", "missing.yaml", "-s"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    proc = subprocess.run([sys.executable, "main.py", "-c", "config-local.yaml", "-d", "-s"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
