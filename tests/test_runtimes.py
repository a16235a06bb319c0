"""Runtimes: named, pinned dependency sets, declared next to each function,
from which every platform's packaging is derived."""
from __future__ import annotations

import io
import stat
import zipfile
from importlib import metadata

import pytest

from fedkeeper import runtimes
from fedkeeper.artifacts import ArtifactError, build_artifact
from fedkeeper.providers.base import Artifact, FunctionSpec
from fedkeeper.providers.knative import manifests
from fedkeeper.providers.openwhisk import packaging as ow
from fedkeeper.providers.openwhisk.image_variant import OPENWHISK_PYTHON_BASE
from fedkeeper.runtimes import FunctionRuntime, Pin, RuntimeDeclarationError, images

FUNCTIONS = ("fl_client", "fl_server_init", "fl_server_aggregator", "fl_insights", "fl_invoker", "nodeinfo")


def test_every_function_declares_an_existing_runtime():
    folders = {p.name for p in runtimes.FUNCTIONS_DIR.iterdir()
               if (p / "main.py").is_file() or (p / "__main__.py").is_file()}
    by_runtime = runtimes.functions_by_runtime()
    assert set(by_runtime) <= set(runtimes.runtime_names())
    assert {f for fns in by_runtime.values() for f in fns} == folders
    assert {"fl_client", "fl_server_init", "fl_server_aggregator", "fl_insights"} <= set(by_runtime["tensorflow"])
    assert {"fl_invoker", "nodeinfo"} <= set(by_runtime["light"])


@pytest.mark.parametrize("name", ["tensorflow", "light", runtimes.HTTP_ENTRY_LIST])
def test_lists_pin_the_versions_the_tests_run_with(name):
    for pin in runtimes.load_list(name):
        assert metadata.version(pin.name) == pin.version, pin


def test_loose_or_duplicate_pins_are_refused():
    with pytest.raises(RuntimeDeclarationError, match="not pinned"):
        runtimes.parse_pins("x", "numpy>=1\n", "x.txt")
    with pytest.raises(RuntimeDeclarationError, match="twice"):
        runtimes.parse_pins("x", "numpy==1\nNumPy==2\n", "x.txt")
    with pytest.raises(RuntimeDeclarationError, match="no runtime named"):
        runtimes.load("nope")


def test_missing_declaration_names_the_file(tmp_path):
    (tmp_path / "fn").mkdir()
    with pytest.raises(RuntimeDeclarationError, match="functions/fn/function.toml is missing"):
        runtimes.declared_runtime("fn", tmp_path)
    (tmp_path / "fn" / "function.toml").write_text('runtime = "nope"\n')
    with pytest.raises(RuntimeDeclarationError, match="no runtime named 'nope'"):
        runtimes.declared_runtime("fn", tmp_path)


def _zip_names(artifact: Artifact) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(artifact.data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_http_zip_carries_the_runtime_requirements(fn):
    art = build_artifact(fn, "http")
    rt = runtimes.runtime_for(fn)
    assert art.runtime == rt.name
    files = _zip_names(art)
    reqs = [line for line in files["requirements.txt"].decode().splitlines() if not line.startswith("#")]
    assert reqs == [str(p) for p in rt.requirements(http_entry=True)]
    assert any(r.startswith("functions-framework==") for r in reqs)
    assert "main.py" in files and "__main__.py" not in files
    # the OpenWhisk zip has no requirements: its packages come with the image
    assert "requirements.txt" not in _zip_names(build_artifact(fn, "openwhisk"))


def test_image_tag_follows_the_list():
    a = FunctionRuntime("t", (Pin("numpy", "2.0.0"),))
    b = FunctionRuntime("t", (Pin("numpy", "2.0.1"),))
    for variant in images.variant_names():
        ra, rb = images.recipe(a, variant), images.recipe(b, variant)
        assert ra.tag != rb.tag and ra.tag.startswith(variant + "-")
        assert images.recipe(a, variant).tag == ra.tag  # stable
    ow_recipe = images.recipe("tensorflow", "openwhisk")
    assert ow_recipe.dockerfile.startswith("# ") and f"FROM {OPENWHISK_PYTHON_BASE}" in ow_recipe.dockerfile
    assert "tensorflow-cpu==" in ow_recipe.requirements and "functions-framework" not in ow_recipe.requirements
    kn = images.recipe("light", "knative")
    assert "functions-framework==" in kn.requirements
    assert ow_recipe.image("reg.example/team") == f"reg.example/team/runtime-tensorflow:{ow_recipe.tag}"


def test_image_variants_come_from_the_provider_packages():
    """images.py knows no platform: each variant (base image, HTTP entry,
    Dockerfile) is its provider package's, found through the registry; the
    Dockerfiles are exactly those the images were built from before."""
    import inspect

    from fedkeeper import providers
    assert images.variant_names() == providers.image_variant_names() == ("openwhisk", "knative")
    source = inspect.getsource(images).lower()
    assert "openwhisk" not in source and "knative" not in source
    with pytest.raises(ValueError, match="unknown image variant 'lambda'; expected one of openwhisk, knative"):
        images.recipe("light", "lambda")
    assert images.recipe("light", "openwhisk").dockerfile == (
        "# FedKeeper runtime light for OpenWhisk Docker actions (exec.kind: blackbox).\n"
        "# The function's zip arrives as exec.code; the action loop of the base\n"
        "# image runs its __main__.py main(args).\n"
        "FROM openwhisk/action-python-v3.11:c0a1e6d\n"
        "COPY requirements.txt /fedkeeper/requirements.txt\n"
        "RUN pip install --no-cache-dir -r /fedkeeper/requirements.txt\n")
    assert images.recipe("light", "knative").dockerfile == (
        "# FedKeeper runtime light for Knative: the Service mounts the function's\n"
        "# zip and serves its main.py with functions-framework on $PORT.\n"
        "FROM python:3.11.7-slim-bookworm\n"
        "COPY requirements.txt /fedkeeper/requirements.txt\n"
        "RUN pip install --no-cache-dir -r /fedkeeper/requirements.txt\n"
        "ENV PYTHONUNBUFFERED=1\n")


def _spec(**kw) -> FunctionSpec:
    return FunctionSpec(name="fl_client", source="fl_client", **kw)


def test_openwhisk_deploys_a_docker_action_on_the_runtime_image():
    art = build_artifact("fl_client", "openwhisk")
    ex = ow.action_exec(_spec(), art, None)
    assert ex["kind"] == "blackbox" and ex["image"] == images.runtime_image("tensorflow", "openwhisk")
    assert ex["binary"] is True and ex["code"]
    assert ow.action_exec(_spec(), art, "reg.example")["image"].startswith("reg.example/runtime-tensorflow:")
    # a named image wins; an explicit kind says the stock runtime is enough
    assert ow.action_exec(_spec(image="me/img:1"), art, None)["image"] == "me/img:1"
    assert ow.action_exec(_spec(runtime="python:3.11"), art, None)["kind"] == "python:3.11"


def test_knative_uses_the_runtime_image_unless_one_is_named():
    art = build_artifact("nodeinfo", "http")
    spec = FunctionSpec(name="nodeinfo", source="nodeinfo")
    body = manifests.desired_service(spec, art, namespace="ns", generic_image=None)
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == images.runtime_image("light", "knative")
    assert container["command"] == manifests.GENERIC_COMMAND  # code from the ConfigMap
    body = manifests.desired_service(spec, art, namespace="ns", generic_image="my/generic:1")
    assert body["spec"]["template"]["spec"]["containers"][0]["image"] == "my/generic:1"


def test_a_function_file_named_like_a_generated_one_is_refused(tmp_path, monkeypatch):
    from fedkeeper import artifacts
    fdir = tmp_path / "fx"
    fdir.mkdir()
    (fdir / "main.py").write_text("")
    (fdir / "requirements.txt").write_text("numpy\n")
    (fdir / "function.toml").write_text('runtime = "light"\n')
    (tmp_path / "flcommon").mkdir()
    monkeypatch.setattr(artifacts, "FUNCTIONS_DIR", tmp_path)
    monkeypatch.setattr(runtimes, "FUNCTIONS_DIR", tmp_path)
    artifacts.build_artifact.cache_clear()
    try:
        with pytest.raises(ArtifactError, match="requirements.txt would be replaced"):
            artifacts.build_artifact("fx", "http")
    finally:
        artifacts.build_artifact.cache_clear()


def _fake_engine(bin_dir, info_status: int):
    """A `docker` that answers `info` with the given status and records the
    other commands it is given."""
    script = bin_dir / "docker"
    script.write_text("#!/bin/sh\n"
                      f'if [ "$1" = info ]; then echo "Cannot connect to the Docker daemon" >&2; exit {info_status}; fi\n'
                      f'echo "$@" >> "{bin_dir}/calls"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_engine_unreachable_is_detected(tmp_path, monkeypatch):
    _fake_engine(tmp_path, 1)
    monkeypatch.setenv("PATH", str(tmp_path))
    engine = images.find_engine()
    assert engine.command == "docker" and engine.path and not engine.reachable
    assert "Cannot connect" in engine.detail
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert images.find_engine().path is None


def test_plan_build_writes_contexts_and_commands(tmp_path):
    steps = images.plan_build(["light"], ["openwhisk", "knative"], tmp_path, prefix="reg.example/t", push=True)
    assert [s.recipe.variant for s in steps] == ["openwhisk", "knative"]
    for s in steps:
        assert (s.context / "Dockerfile").read_text() == s.recipe.dockerfile
        assert (s.context / "requirements.txt").read_text() == s.recipe.requirements
        assert s.commands == [["docker", "build", "-t", s.image, str(s.context)], ["docker", "push", s.image]]


def test_config_sample_names_the_images_the_runtimes_produce():
    import yaml
    sample = yaml.safe_load(open(runtimes.FUNCTIONS_DIR.parent / "config-sample.yaml"))
    named = {(fn, section): cfg["docker_image"]
             for scen in sample["scenarios"].values() for fn, per in (scen.get("functions") or {}).items()
             for section, cfg in per.items() if cfg.get("docker_image")}
    assert named, "the sample names no images"
    for (fn, section), image in named.items():
        assert section == "openwhisk"
        assert image == images.runtime_image(runtimes.declared_runtime(fn), "openwhisk"), fn


def test_an_image_names_its_runtime_only_when_built_from_the_current_list():
    for name in ("light", "tensorflow"):
        for variant in images.variant_names():
            assert images.runtime_of_image(images.runtime_image(name, variant, "reg.example:5000/acme")) == name
    stale = images.runtime_image("light", "openwhisk").rsplit("-", 1)[0] + "-000000000000"
    for other in (stale, "me/img:1", "fedkeeper/runtime-nope:openwhisk-abc", "localhost:5000/runtime-light"):
        assert images.runtime_of_image(other) is None, other
