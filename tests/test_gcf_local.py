"""Local Cloud Functions: real functions-framework processes on loopback,
invoked through the same HTTP path as the real provider."""
from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import pytest

from fedkeeper.config import FaultConfig, GoogleCluster
from fedkeeper.providers.base import Artifact, ErrorClass, FunctionSpec, ProviderContext, ProviderError
from fedkeeper.providers.http_answers import classify_response
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider

pytestmark = pytest.mark.timeout(120)

ECHO_MAIN = '''
import os
import time

import functions_framework


@functions_framework.http
def echo(request):
    p = request.get_json(silent=True)
    if not isinstance(p, dict):
        return {"error": "bad payload"}, 400
    if p.get("refuse"):
        return {"error": "refused"}, 500
    if p.get("crash"):
        raise RuntimeError("boom")
    if p.get("started_mark"):   # the test waits for it: the request is in the function
        open(p["started_mark"], "w").close()
    if p.get("sleep"):
        time.sleep(float(p["sleep"]))
    return {"echo": p.get("n"), "fn": os.environ.get("FK_FUNCTION"), "pid": os.getpid(),
            "leak": os.environ.get("FK_TEST_KEEPER_ONLY")}
'''


def make_artifact(main_src: str = ECHO_MAIN, extra: dict[str, str] | None = None) -> Artifact:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        files = {"main.py": main_src, **(extra or {})}
        for name in sorted(files):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), files[name])
    data = buf.getvalue()
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry="http")


def wait_all(provider, invs, timeout=30.0):
    pending = {i.platform_id: i for i in invs}
    outcomes = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for o in provider.track(list(pending.values())):
            outcomes[o.platform_id] = o
            pending.pop(o.platform_id)
        if pending:
            time.sleep(0.01)
    assert not pending, f"{len(pending)} invocations never finished"
    return [outcomes[i.platform_id] for i in invs]


SPEC = FunctionSpec(name="echo", source="echo", memory_mb=256, timeout_s=20,
                    bound={"FK_FUNCTION": "echo", "FK_TOKEN_SECRET": "s3cret-value"})


@pytest.fixture
def provider(tmp_path):
    p = LocalCloudFunctionsProvider("local_gcf", GoogleCluster(kind="local"),
                                    ProviderContext(state_dir=tmp_path))
    yield p
    p.close()


def test_deploy_serves_and_invokes(provider, monkeypatch):
    monkeypatch.setenv("FK_TEST_KEEPER_ONLY", "keeper-secret")
    art = make_artifact()
    res = provider.deploy(SPEC, art)
    assert not res.skipped and res.url.startswith("http://127.0.0.1:")
    assert provider.exists("echo")
    out = provider.call("echo", {"n": 7}, timeout_s=20)
    assert out.ok, out
    assert out.result["echo"] == 7 and out.result["fn"] == "echo"
    # the keeper's own environment never reaches a function
    assert out.result["leak"] is None
    assert out.duration_ms > 0 and out.start <= out.end and out.cold_start is None
    # same content, same configuration: nothing restarted
    again = provider.deploy(SPEC, art)
    assert again.skipped and again.url == res.url
    # a changed source replaces the process
    changed = provider.deploy(SPEC, make_artifact(ECHO_MAIN + "\n# v2\n"))
    assert not changed.skipped


def test_reuse_across_provider_instances(tmp_path):
    art = make_artifact()
    keep = ProviderContext(state_dir=tmp_path, keep_local_services=True)
    first = LocalCloudFunctionsProvider("c", GoogleCluster(kind="local"), keep)
    r1 = first.deploy(SPEC, art)
    first.close()
    second = LocalCloudFunctionsProvider("c", GoogleCluster(kind="local"), ProviderContext(state_dir=tmp_path))
    try:
        r2 = second.deploy(SPEC, art)
        assert r2.skipped and r2.url == r1.url
        assert second.call("echo", {"n": 1}, timeout_s=20).ok
    finally:
        second.close()
    assert not second.exists("echo")


def test_many_concurrent_invocations(provider):
    provider.deploy(SPEC, make_artifact())
    invs = [provider.invoke("echo", {"n": i, "sleep": 0.05}) for i in range(60)]
    assert len({i.platform_id for i in invs}) == 60
    outs = wait_all(provider, invs)
    assert all(o.ok for o in outs)
    assert sorted(o.result["echo"] for o in outs) == list(range(60))
    # nothing left to report once collected
    assert provider.track(invs) and all(not o.ok for o in provider.track(invs))


def test_function_answers_map_to_classes(provider):
    provider.deploy(SPEC, make_artifact())
    refused, crashed, bad = wait_all(provider, [
        provider.invoke("echo", {"refuse": True}),
        provider.invoke("echo", {"crash": True}),
        provider.invoke("echo", {"n": 1}),
    ])
    assert refused.error_class is ErrorClass.APPLICATION_ERROR and "refused" in refused.error
    assert crashed.error_class is ErrorClass.DEVELOPER_ERROR
    assert bad.ok


def test_timeout_when_function_overruns(provider):
    """The instance answers a run past the function's time limit at the
    limit (504), long before the keeper's own wait would end; the function
    carries on, and the instance keeps serving."""
    spec = FunctionSpec(name="echo", source="echo", timeout_s=0.5, bound={"FK_FUNCTION": "echo"})
    provider.deploy(spec, make_artifact())
    provider.invoke_grace_s = 30.0
    started = time.monotonic()
    (out,) = wait_all(provider, [provider.invoke("echo", {"sleep": 90})], timeout=80)
    assert out.error_class is ErrorClass.TIMEOUT, out.error
    assert time.monotonic() - started < 60    # answered at the limit, not when the run ended
    assert provider.call("echo", {"n": 2}, timeout_s=20).result["echo"] == 2
    log = (Path(provider.host.lookup("echo").directory).parent / "function.log").read_text()
    assert "ran past its time limit of 0.5 s" in log


def test_injected_faults(tmp_path):
    # one cluster with every fault kind; the seeded draws cover all of them
    faults = FaultConfig(crash=0.25, timeout_instant=0.25, throttle=0.25, slow_ms=100, seed=3,
                         functions=["echo"])
    p = LocalCloudFunctionsProvider("f", GoogleCluster(kind="local", faults=faults),
                                    ProviderContext(state_dir=tmp_path))
    try:
        p.deploy(SPEC, make_artifact())
        p.deploy(FunctionSpec(name="other", source="x", extra={"entry_point": "echo"}),
                 make_artifact())
        outs = wait_all(p, [p.invoke("echo", {"n": i}) for i in range(40)])
        seen = {o.error_class for o in outs}
        assert seen == {None, ErrorClass.DEVELOPER_ERROR, ErrorClass.TIMEOUT,
                        ErrorClass.THROTTLED}, [o.error for o in outs]
        assert all(o.duration_ms >= 100 for o in outs)
        throttled = next(o for o in outs if o.error_class is ErrorClass.THROTTLED)
        assert getattr(throttled, "retry_after", None) == 1 or "retry after 1" in throttled.error
        # functions outside the fault list are left alone
        assert all(o.ok for o in wait_all(p, [p.invoke("other", {"n": i}) for i in range(10)]))
    finally:
        p.close()


def test_remove_stops_the_process(provider):
    provider.deploy(SPEC, make_artifact())
    hosted = provider.host.lookup("echo")
    assert hosted is not None
    assert provider.remove("echo")
    assert not provider.exists("echo")
    assert not provider.remove("echo")
    with pytest.raises(ProcessLookupError):
        os.kill(hosted.pid, 0)
    with pytest.raises(ProviderError) as ei:
        provider.invoke("echo", {})
    assert ei.value.error_class is ErrorClass.FUNCTION_MISSING


def test_close_stops_everything(tmp_path):
    p = LocalCloudFunctionsProvider("z", GoogleCluster(kind="local"),
                                    ProviderContext(state_dir=tmp_path))
    p.deploy(SPEC, make_artifact())
    pid = p.host.lookup("echo").pid
    p.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_function_whose_process_died_is_missing_and_a_deploy_starts_it_again(provider, tmp_path):
    """The process was killed (out of memory, say), before a call and
    during one: FUNCTION_MISSING, which has the keeper deploy it again and
    retry (Cloud Functions would start a new instance), not UNREACHABLE,
    which only waited for the cluster to come back."""
    import signal
    provider.deploy(SPEC, make_artifact())
    os.kill(provider.host.lookup("echo").pid, signal.SIGKILL)
    wait_for_exit = time.monotonic() + 10
    while provider.host.lookup("echo") is not None and time.monotonic() < wait_for_exit:
        time.sleep(0.02)
    (before,) = wait_all(provider, [provider.invoke("echo", {"n": 1})])
    assert before.error_class is ErrorClass.FUNCTION_MISSING and "is gone" in before.error, before
    assert not provider.deploy(SPEC, make_artifact()).skipped   # a new process
    (again,) = wait_all(provider, [provider.invoke("echo", {"n": 2})])
    assert again.ok and again.result["echo"] == 2
    started = tmp_path / "started"
    during = provider.invoke("echo", {"sleep": 5, "started_mark": str(started)})
    until = time.monotonic() + 20
    while not started.exists() and time.monotonic() < until:
        time.sleep(0.02)
    assert started.exists(), "the request never reached the function"
    os.kill(again.result["pid"], signal.SIGKILL)
    (out,) = wait_all(provider, [during])
    assert out.error_class is ErrorClass.FUNCTION_MISSING and "lost after the request was sent" in out.error, out
    # a live function's failures stand as they are
    provider.deploy(SPEC, make_artifact())
    (refused,) = wait_all(provider, [provider.invoke("echo", {"refuse": True})])
    assert refused.error_class is not ErrorClass.FUNCTION_MISSING


def test_import_error_is_reported(provider):
    with pytest.raises(ProviderError) as ei:
        provider.deploy(SPEC, make_artifact("import no_such_module_here\n"))
    assert ei.value.error_class is ErrorClass.DEVELOPER_ERROR
    assert "no_such_module_here" in str(ei.value)


def test_generic_classification():
    j = b'{"error": "x"}'
    assert classify_response(200, {}, b'{"a": 1}')[0]
    assert classify_response(200, {}, b"[1]")[1] is ErrorClass.APPLICATION_ERROR
    assert classify_response(401, {}, j)[1] is ErrorClass.APPLICATION_ERROR
    assert classify_response(401, {}, b"<html>")[1] is ErrorClass.AUTH
    assert classify_response(403, {}, b"")[1] is ErrorClass.AUTH
    assert classify_response(404, {}, b"<html>")[1] is ErrorClass.FUNCTION_MISSING
    assert classify_response(408, {}, b"")[1] is ErrorClass.TIMEOUT
    assert classify_response(504, {}, b"")[1] is ErrorClass.TIMEOUT
    assert classify_response(413, {}, b"")[1] is ErrorClass.PAYLOAD_TOO_LARGE
    assert classify_response(429, {}, j)[1] is ErrorClass.THROTTLED
    assert classify_response(500, {}, j)[1] is ErrorClass.APPLICATION_ERROR
    assert classify_response(502, {}, b"")[1] is ErrorClass.PLATFORM_ERROR
    assert classify_response(503, {}, j)[1] is ErrorClass.PLATFORM_ERROR


PRELOAD_MAIN = '''
import os
import sys

import functions_framework


@functions_framework.http
def echo(request):
    # the function itself never imports numpy: only a prewarmed instance has it
    return {"preloaded": "numpy" in sys.modules and "pymongo" in sys.modules, "pid": os.getpid()}
'''


def test_an_instance_of_a_runtime_is_prewarmed_with_its_modules(provider):
    from fedkeeper.runtimes import load
    light = make_artifact(PRELOAD_MAIN, {"requirements.txt": load("light").requirements_txt(http_entry=True)})
    provider.deploy(SPEC, light)
    first = provider.call("echo", {}, timeout_s=30)
    assert first.ok and first.result["preloaded"] is True, first
    # a source of no runtime (functions-framework alone) preloads nothing
    provider.deploy(SPEC, make_artifact(PRELOAD_MAIN))
    plain = provider.call("echo", {}, timeout_s=30)
    assert plain.ok and plain.result["preloaded"] is False and plain.result["pid"] != first.result["pid"]
