"""`fedkeeper check` and deploy.py against the local clusters, for real."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fedkeeper.local import shutdown_local_services
from fedkeeper.local.store import EmbeddedMongo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path):
    import os
    e = dict(os.environ, FEDKEEPER_STATE_DIR=str(tmp_path / "state"), FEDKEEPER_LOG_DIR=str(tmp_path / "logs"))
    yield e
    shutdown_local_services(tmp_path / "state")
    assert not EmbeddedMongo(tmp_path / "state" / "mongo").stop(), "a command left the embedded store running"


def run(args, env, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_local_clusters_and_a_dead_one(tmp_path, env):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        providers:
          openwhisk:
            local_ow: {{kind: local}}
            dead_ow:
              base_url: http://127.0.0.1:{closed_port()}/api/v1/namespaces/guest/actions/
              auth: {{ow_auth: "user:key"}}
          google:
            local_gcf: {{kind: local}}
        scenarios:
          test:
            functions:
              nodeinfo:
                openwhisk: {{memory: "256", timeout: "60000"}}
        """))
    junit = tmp_path / "check.xml"
    proc = run(["-m", "fedkeeper.cli", "check", "-c", str(cfg), "-s", "test", "--json", "--junit-xml", str(junit)], env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["cluster"]: r for r in json.loads(proc.stdout)}
    for name, platform in (("local_ow", "openwhisk"), ("local_gcf", "gcf")):
        r = rows[name]
        assert r["ok"] and r["platform"] == platform, r
        # a warm run of nodeinfo may take under a millisecond (OpenWhisk
        # records whole milliseconds)
        assert r["cold_ms"] > 0 and r["deploy_s"] > 0
        assert isinstance(r["warm_ms"], (int, float)) and r["warm_ms"] >= 0
        assert r["host"]["cpu_count"] >= 1 and r["host"]["warm"] is True
    dead = rows["dead_ow"]
    assert not dead["ok"] and dead["stage"] == "deploy" and dead["error_class"] == "unreachable"
    assert "endpoint unreachable" in dead["error"]
    assert "cluster dead_ow failed at deploy: endpoint unreachable" in proc.stderr
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    # Only the healthy clusters: exit 0, and nodeinfo was removed again.
    ok = run(["-m", "fedkeeper.cli", "check", "-c", str(cfg), "-s", "test", "--cluster", "local_ow,local_gcf"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "local_ow" in ok.stdout and "ok" in ok.stdout


def test_deploy_py_flags_map_onto_deploy_and_remove(env):
    # -o picks the OpenWhisk cluster only; the action then exists on the fabric.
    d = run(["deploy.py", "-c", "config-local.yaml", "-o", "local_ow", "-s", "test", "-f", "nodeinfo", "-d"], env)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "local_ow" in d.stdout and "local_gcf" not in d.stdout and "deployed" in d.stdout
    # Deploying unchanged code again is skipped (content hash).
    again = run(["deploy.py", "-c", "config-local.yaml", "-o", "local_ow", "-s", "test", "-f", "nodeinfo", "-d"], env)
    assert again.returncode == 0 and "unchanged" in again.stdout
    # -a reaches both clusters; -r removes from both.
    both = run(["deploy.py", "-c", "config-local.yaml", "-a", "-s", "test", "-f", "nodeinfo", "-d"], env)
    assert both.returncode == 0 and "local_gcf" in both.stdout
    rm = run(["deploy.py", "-c", "config-local.yaml", "-a", "-s", "test", "-f", "nodeinfo", "-r"], env)
    assert rm.returncode == 0, rm.stdout + rm.stderr
    assert rm.stdout.count("removed") == 2
    rm2 = run(["deploy.py", "-c", "config-local.yaml", "-g", "local_gcf", "-s", "test", "-f", "nodeinfo", "-r"], env)
    assert rm2.returncode == 0 and "not deployed" in rm2.stdout


def test_main_py_deploy_and_remove_the_training_functions(env):
    d = run(["main.py", "-c", "config-local.yaml", "-d"], env)
    assert d.returncode == 0, d.stdout + d.stderr
    for fn in ("fl_server_init", "fl_server_aggregator", "fl_insights", "fl_client"):
        assert fn in d.stdout
    assert d.stdout.count("deployed") >= 5  # init, aggregator, insights on local_ow, fl_client on both
    r = run(["main.py", "-c", "config-local.yaml", "-r"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("removed") == 5


@pytest.mark.parametrize("flags,message", [
    (["--openwhisk", "local_gcf"], "no openwhisk cluster named 'local_gcf'"),
    (["--google", "local_ow,nowhere"], "no google cluster named 'local_ow'"),
    # The original spelling still works, with a note (-o now means an output path).
    (["-o", "nowhere"], "no openwhisk cluster named 'nowhere'"),
])
def test_check_names_cluster_families_with_long_flags(flags, message, tmp_path):
    from click.testing import CliRunner

    from fedkeeper.cli import main as cli
    res = CliRunner().invoke(cli, ["check", "-c", str(ROOT / "config-local.yaml"), "-s", "test", *flags])
    assert res.exit_code == 2, res.output
    assert f"Error: {message}" in res.output
    assert ("old spellings" in res.output) == (flags[0] == "-o")
