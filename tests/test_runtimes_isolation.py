"""Local function processes see exactly their runtime's packages: what is
declared (and its dependency closure) imports, anything else fails with the
module named, as it would in a cloud."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import pytest

from fedkeeper import artifacts, runtimes
from fedkeeper.runtimes import Pin, isolation

from fixtures_fabric import fabric_dir, fabric_info  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def light(cache):
    return isolation.isolated_env(runtimes.load("light").requirements(http_entry=True), cache)


def run(env, code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(env.command("-c", code), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_declared_packages_import_and_nothing_else(light, tmp_path):
    ok = run(light, "import numpy, pymongo, gridfs, functions_framework, flask; print(numpy.__version__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "2.4.6"
    # installed in the keeper's environment, but not in the light runtime
    for module in ("yaml", "requests", "tensorflow", "fedkeeper", "google.cloud.functions_v2"):
        r = run(light, f"import {module}", tmp_path)
        assert r.returncode == 1 and f"No module named '{module}'" in r.stderr, (module, r.stderr)
    paths = json.loads(run(light, "import sys, json; print(json.dumps(sys.path))", tmp_path).stdout)
    assert not any("site-packages" in p for p in paths) and str(light.site) == paths[-1]


def test_site_is_cached_by_the_list(cache, light):
    again = isolation.isolated_env(runtimes.load("light").requirements(http_entry=True), cache)
    assert again == light
    other = isolation.isolated_env(runtimes.load("light").pins, cache)
    assert other.site != light.site
    meta = json.loads((light.site / "fedkeeper-runtime.json").read_text())
    assert "functions-framework==3.10.2" in meta["pins"] and any(c.startswith("dnspython==") for c in meta["closure"])


def test_an_undeclared_import_in_a_function_fails_with_the_module_named(tmp_path, monkeypatch, light):
    fdir = tmp_path / "functions" / "fx"
    fdir.mkdir(parents=True)
    (tmp_path / "functions" / "flcommon").mkdir()
    (fdir / "function.toml").write_text('runtime = "light"\n')
    (fdir / "__main__.py").write_text("import yaml  # not in the light runtime\n\ndef main(args):\n    return {}\n")
    (fdir / "main.py").write_text("import yaml\n")
    monkeypatch.setattr(artifacts, "FUNCTIONS_DIR", tmp_path / "functions")
    monkeypatch.setattr(runtimes, "FUNCTIONS_DIR", tmp_path / "functions")
    artifacts.build_artifact.cache_clear()
    try:
        art = artifacts.build_artifact("fx", "openwhisk")
    finally:
        artifacts.build_artifact.cache_clear()
    code = tmp_path / "unpacked"
    zipfile.ZipFile(io.BytesIO(art.data)).extractall(code)
    r = subprocess.run(light.command(str(code / "__main__.py")), capture_output=True, text=True, cwd=code,
                       timeout=60)
    assert r.returncode == 1
    assert "ModuleNotFoundError: No module named 'yaml'" in r.stderr
    # the keeper's own interpreter has it: only the isolation makes it fail
    assert subprocess.run([sys.executable, "-c", "import yaml"]).returncode == 0


def test_mismatched_versions_build_a_real_virtualenv(tmp_path, monkeypatch):
    pins = [Pin("numpy", "0.0.1")]
    assert isolation.version_mismatches(pins) == ["numpy is 2.4.6, the runtime pins 0.0.1"]
    assert isolation.version_mismatches([Pin("not-a-dist-fk", "1")]) == ["not-a-dist-fk==1 is not installed"]
    built = []

    def fake_build(p, venv):
        built.append((list(p), venv))
        (venv / "bin").mkdir(parents=True)
        return str(venv / "bin" / "python")
    monkeypatch.setattr(isolation, "_build_venv", fake_build)
    env = isolation.isolated_env(pins, tmp_path)
    assert built and built[0][0] == pins and env.site is None
    assert env.command("x.py")[:4] == [env.python, "-I", "-u", "-B"]
    assert isolation.isolated_env(pins, tmp_path) == env and len(built) == 1  # cached


def test_requirements_txt_of_a_source_zip(cache, light):
    text = runtimes.load("light").requirements_txt(http_entry=True)
    assert isolation.env_for_requirements(text, cache) == light
    with pytest.raises(isolation.IsolationError, match="not pinned"):
        isolation.env_for_requirements("numpy\n", cache)


def _runs(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_local_openwhisk_actions_get_their_image_runtime_or_the_stdlib(cache, tmp_path):
    from fedkeeper.runtimes.images import runtime_image
    light_action = {"kind": "blackbox", "image": runtime_image("light", "openwhisk", "reg.example")}
    ok = _runs(isolation.action_command(light_action, "-c", "import numpy, pymongo", cache_dir=cache), tmp_path)
    assert ok.returncode == 0, ok.stderr
    for stock in ({"kind": "python:3"}, {"kind": "blackbox", "image": "me/own-image:1"}):
        r = _runs(isolation.action_command(stock, "-c", "import numpy", cache_dir=cache), tmp_path)
        assert "No module named 'numpy'" in r.stderr, stock
        assert _runs(isolation.action_command(stock, "-c", "import json, zipfile", cache_dir=cache),
                     tmp_path).returncode == 0


def test_local_cloud_functions_install_the_sources_requirements(cache, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bare = _runs(isolation.source_command(src, "-c", "import functions_framework, numpy", cache_dir=cache), src)
    assert "No module named 'numpy'" in bare.stderr  # only functions-framework without a requirements.txt
    (src / "requirements.txt").write_text(runtimes.load("light").requirements_txt(http_entry=True))
    ok = _runs(isolation.source_command(src, "-c", "import functions_framework, numpy", cache_dir=cache), src)
    assert ok.returncode == 0, ok.stderr
    (src / "requirements.txt").write_text("numpy>=1\n")
    with pytest.raises(isolation.IsolationError, match="not pinned"):
        isolation.source_command(src, "-c", "pass", cache_dir=cache)


def test_local_openwhisk_runs_an_action_with_exactly_its_runtime(fabric_info, tmp_path):
    """Through the fabric, as `fedkeeper start` uses it: a Docker action on
    the light runtime's image imports numpy; the same code on the stock kind
    cannot; an import the runtime does not declare fails naming the module."""
    from fedkeeper.config import OpenWhiskCluster
    from fedkeeper.providers.base import FunctionSpec, ProviderContext
    from fedkeeper.providers.openwhisk import OpenWhiskProvider
    from fedkeeper.runtimes.images import runtime_image
    from fixtures_fabric import make_artifact

    p = OpenWhiskProvider("ow", OpenWhiskCluster(base_url=fabric_info["url"], auth={"ow_auth": fabric_info["auth"]}),
                          ProviderContext(state_dir=tmp_path))
    uses_numpy = "import numpy\ndef main(args):\n    return {'v': numpy.__version__}\n"
    uses_yaml = "import yaml\ndef main(args):\n    return {}\n"
    light = runtime_image("light", "openwhisk")
    try:
        p.deploy(FunctionSpec(name="iso_numpy", source="x", image=light), make_artifact(uses_numpy))
        out = p.call("iso_numpy", {}, timeout_s=60)
        assert out.ok and out.result == {"v": "2.4.6"}, out.error
        p.deploy(FunctionSpec(name="iso_stock", source="x", runtime="python:3"), make_artifact(uses_numpy))
        out = p.call("iso_stock", {}, timeout_s=60)
        assert not out.ok and "No module named 'numpy'" in out.error
        p.deploy(FunctionSpec(name="iso_yaml", source="x", image=light), make_artifact(uses_yaml))
        out = p.call("iso_yaml", {}, timeout_s=60)
        assert not out.ok and "No module named 'yaml'" in out.error
    finally:
        for name in ("iso_numpy", "iso_stock", "iso_yaml"):
            p.remove(name)
        p.close()


def test_cache_dir_beside_the_environment_else_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(isolation.CACHE_ENV, raising=False)
    monkeypatch.setattr(isolation.sys, "prefix", str(tmp_path / "venv"))
    assert isolation.default_cache_dir() == tmp_path / "venv" / "var" / "fedkeeper-runtimes"
    monkeypatch.setattr(isolation.os, "access", lambda path, mode: False)  # a read-only environment
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert isolation.default_cache_dir() == tmp_path / "cache" / "fedkeeper" / "runtimes"
    monkeypatch.setenv(isolation.CACHE_ENV, str(tmp_path / "chosen"))
    assert isolation.default_cache_dir() == tmp_path / "chosen"


def test_a_virtualenv_another_process_finished_first_is_used_and_ours_removed(tmp_path, monkeypatch):
    """Each process builds in a directory of its own; when another moved its
    virtualenv into place while ours was installing, ours is dropped and
    theirs used, not an error."""
    from pathlib import Path
    venv = tmp_path / "cache" / "venv-abc"

    def run(cmd, **kw):
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")
        else:   # pip install: meanwhile the other process finishes first
            (venv / "bin").mkdir(parents=True, exist_ok=True)
            (venv / "bin" / "python").write_text("theirs")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(isolation.subprocess, "run", run)
    python = isolation._build_venv([Pin("numpy", "==1.0")], venv)
    assert python == str(venv / "bin" / "python") and (venv / "bin" / "python").read_text() == "theirs"
    assert sorted(p.name for p in venv.parent.iterdir()) == ["venv-abc"]   # our build left nothing
