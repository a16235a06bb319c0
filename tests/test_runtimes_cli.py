"""`fedkeeper runtime show|build` and `fedkeeper deploy --dry-run`."""
from __future__ import annotations

import json
import stat

from click.testing import CliRunner

from fedkeeper.cli import main
from fedkeeper.runtimes import images

LOCAL = """
providers:
  openwhisk:
    ow: {kind: local}
  google:
    gcf: {kind: local}
scenarios:
  federated_learning:
    clients_info: {total_num_clients: 2, num_clients_per_round: 2, clusters: {ow: 1, gcf: 1}}
"""


def _run(args, **kw):
    result = CliRunner().invoke(main, args, catch_exceptions=False, **kw)
    assert "Traceback" not in result.output
    return result


def test_runtime_show_lists_pins_functions_and_images():
    r = _run(["runtime", "show", "--json"])
    assert r.exit_code == 0
    data = {d["runtime"]: d for d in json.loads(r.output)}
    assert "fl_client" in data["tensorflow"]["functions"] and "nodeinfo" in data["light"]["functions"]
    assert data["light"]["images"]["openwhisk"] == images.runtime_image("light", "openwhisk")
    assert _run(["runtime", "show", "nope"]).exit_code == 2


def test_runtime_build_without_an_engine_prints_dockerfile_and_commands(tmp_path, monkeypatch, isolated_dirs):
    fake = tmp_path / "bin"
    fake.mkdir()
    docker = fake / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake))
    r = _run(["runtime", "build", "light", "--push", "reg.example/acme"])
    assert r.exit_code == 0
    assert "FROM openwhisk/action-python-v3.11" in r.output and "FROM python:3.11-slim" in r.output
    ow = images.recipe("light", "openwhisk").image("reg.example/acme")
    assert f"docker build -t {ow} " in r.output and f"docker push {ow}" in r.output
    assert "engine is unreachable" in r.output  # the note (stderr is mixed in by CliRunner)


def test_dry_run_shows_uploads_without_starting_anything(tmp_path, isolated_dirs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LOCAL)
    r = _run(["deploy", "--dry-run", "--json", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("["):])
    by = {(row["cluster"], row["function"]): row for row in rows}
    assert by[("ow", "fl_client")]["what"].startswith("Docker action (blackbox) on fedkeeper/runtime-tensorflow:")
    assert by[("gcf", "fl_client")]["runtime"] == "tensorflow" and by[("gcf", "fl_client")]["bytes"] > 0
    assert all(row["bytes"] <= row["limit_bytes"] for row in rows if row["limit_bytes"])
    assert not (isolated_dirs / "state" / "fabric").exists()  # no local service was started
