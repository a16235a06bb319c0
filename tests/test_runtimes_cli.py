"""`fedkeeper runtime show|build` and `fedkeeper deploy --dry-run`."""
from __future__ import annotations

import json
import stat

from click.testing import CliRunner

from fedkeeper.cli import main
from fedkeeper.providers.knative.image_variant import KNATIVE_PYTHON_BASE
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
    assert "FROM openwhisk/action-python-v3.11" in r.output and f"FROM {KNATIVE_PYTHON_BASE}" in r.output
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
    assert by[("gcf", "fl_client")]["target"] == "the local functions-framework host (fl-client)"
    assert by[("ow", "fl_client")]["target"] == "the local fabric action fl_client"
    assert all(row["bytes"] <= row["limit_bytes"] for row in rows if row["limit_bytes"])
    assert not (isolated_dirs / "state" / "fabric").exists()  # no local service was started


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _sample_pointed_at(port: int) -> str:
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "config-sample.yaml").read_text()
    swaps = [("https://openwhisk.example.org:31001", f"https://127.0.0.1:{port}"),
             ("ow_api_host: openwhisk.example.org:31001", f"ow_api_host: 127.0.0.1:{port}"),
             ('host: "prometheus.example.org"', 'host: "127.0.0.1"'),
             ('port_openwhisk_metrics: "30325"', f'port_openwhisk_metrics: "{port}"'),
             ("mongo.example.org:27017", f"127.0.0.1:{port}"),
             ("auth_file: ${GOOGLE_APPLICATION_CREDENTIALS}",
              f"api_endpoint: http://127.0.0.1:{port}\n      auth_file: ${{GOOGLE_APPLICATION_CREDENTIALS}}")]
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_sample_config_commands_end_in_per_cluster_errors(tmp_path):
    """config-sample.yaml with its secrets set to dummy values and every host
    on a closed loopback port: each command ends in clear per-cluster
    errors and its documented exit status, never a traceback."""
    import os
    import subprocess
    import sys
    port = _closed_port()
    home = tmp_path / "home"
    (home / ".fedkeeper").mkdir(parents=True)
    (home / ".fedkeeper" / "mongo_password").write_text("dummy\n")
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"type": "service_account", "project_id": "my-project", "private_key_id": "k",
                              "private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
                              "client_email": "fk@my-project.iam.gserviceaccount.com", "client_id": "1",
                              "token_uri": f"http://127.0.0.1:{port}/token"}))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_sample_pointed_at(port))
    env = {**os.environ, "HOME": str(home), "OW_AUTH": "dummy-user:dummy-key",
           "GOOGLE_APPLICATION_CREDENTIALS": str(sa), "FEDKEEPER_STATE_DIR": str(tmp_path / "state"),
           "FEDKEEPER_LOG_DIR": str(tmp_path / "logs"), "COLUMNS": "200"}
    env.pop("FEDKEEPER_CONFIG", None)

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "fedkeeper.cli", *args, "-c", str(cfg)], env=env,
                           capture_output=True, text=True, timeout=180)
        out = r.stdout + r.stderr
        assert "Traceback" not in out and "dummy-key" not in out, out
        return r.returncode, out

    code, out = run("metrics")
    assert code == 1, out  # OpenWhisk's Prometheus cannot be reached
    assert f"cannot reach Prometheus at http://127.0.0.1:{port}" in out
    assert "Cloud Functions has no Prometheus source" in out
    code, out = run("check")
    assert code == 1, out
    assert "cluster invasic_cluster failed at deploy" in out and "connection refused" in out
    assert "cluster gcf_cluster failed at deploy" in out
    code, out = run("deploy", "--dry-run")
    assert code == 0, out
    assert "runtime-tensorflow:openwhisk-" in out and "requirements.txt (tensorflow)" in out
    code, out = run("cluster", "info")
    assert code == 2 and "has no Kubernetes clusters" in out, out


def test_runtime_build_with_an_engine_builds_and_pushes(tmp_path, monkeypatch, isolated_dirs):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    podman = fake / "podman"
    podman.write_text("#!/bin/sh\n"
                      'if [ "$1" = info ]; then echo 5.0.0; exit 0; fi\n'
                      f'echo "$@" >> "{calls}"\n')
    podman.chmod(podman.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake))
    r = _run(["runtime", "build", "light", "--variant", "knative", "--push", "reg.example/acme"])
    assert r.exit_code == 0, r.output
    image = images.recipe("light", "knative").image("reg.example/acme")
    lines = calls.read_text().splitlines()
    assert lines[0].startswith(f"build -t {image} ") and lines[1] == f"push {image}"
    context = lines[0].rsplit(" ", 1)[1]
    assert "functions-framework==" in open(f"{context}/requirements.txt").read()
    assert f"built {image} and pushed it" in r.output


def test_dry_run_counts_the_user_module_a_deploy_adds(tmp_path, isolated_dirs):
    """The sizes are the deploy's: the user module travels in the zips of the
    functions that run user code, so it is in their dry-run size too."""
    import random
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    plain = tmp_path / "plain.yaml"
    plain.write_text(LOCAL)
    module = tmp_path / "digits_cnn.py"
    # incompressible bytes, so the zip grows by about their size
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(200_000))
    module.write_text((root / "examples" / "digits_cnn.py").read_text() + f"\nNOISE = {noise!r}\n")
    with_module = tmp_path / "mod.yaml"
    with_module.write_text(LOCAL.replace("  federated_learning:\n", "  federated_learning:\n    user_module: "
                                         "{path: digits_cnn.py, model_params: {filters: 4}}\n"))

    def sizes(cfg):
        r = _run(["deploy", "--dry-run", "--json", "-c", str(cfg)])
        assert r.exit_code == 0, r.output
        return {(row["cluster"], row["function"]): row["bytes"] for row in json.loads(r.output[r.output.index("["):])}
    before, after = sizes(plain), sizes(with_module)
    assert after[("gcf", "fl_client")] - before[("gcf", "fl_client")] > 100_000
    from fedkeeper.user_module import USER_CODE_FUNCTIONS
    others = [key for key in before if key[1] not in USER_CODE_FUNCTIONS]
    assert others and all(after[key] == before[key] for key in others)   # no user code runs there
