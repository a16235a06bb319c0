"""The OpenWhisk provider against the local fabric: as `kind: local` and as a
remote controller (base_url + key), with error classification."""
from __future__ import annotations

import json
import os
import socket
import ssl
import time

import pytest

from fedkeeper.config import FaultConfig, OpenWhiskCluster
from fedkeeper.providers import make_provider
from fedkeeper.providers.base import ErrorClass, FunctionSpec, Invocation, ProviderContext, ProviderError
from fedkeeper.local import fabric
from fedkeeper.local.openwhisk import LocalOpenWhiskProvider
from fedkeeper.providers.openwhisk import OpenWhiskProvider
from fedkeeper.providers.openwhisk import provider as owp
from fixtures_fabric import ECHO, make_artifact, wait_for
from scripted_http import json_answer, server_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)


def track_all(provider, invs, timeout_s: float = 30.0):
    pending = {i.platform_id: i for i in invs}
    out = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for o in provider.track(list(pending.values())):
            out[o.platform_id] = o
            pending.pop(o.platform_id, None)
        time.sleep(0.005)
    assert not pending, f"{len(pending)} invocations never finished"
    return [out[i.platform_id] for i in invs]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    yield d
    fabric.fabric_down(d / "fabric")


@pytest.fixture(scope="module")
def local(state):
    p = make_provider("ow-local", "openwhisk", OpenWhiskCluster(kind="local"), ProviderContext(state_dir=state))
    assert isinstance(p, LocalOpenWhiskProvider)
    p.deploy(FunctionSpec(name="echo", source="echo", timeout_s=5, bound={"FK_FUNCTION": "echo"}),
             make_artifact(ECHO))
    yield p
    p.close()


def test_local_provider_uses_its_own_namespace_and_started_the_fabric(local, state):
    assert local.namespace == "ow-local" and local.started_fabric
    assert fabric.fabric_status(state / "fabric")["url"] == local.api_host


def test_deploy_is_skipped_when_the_hash_matches(local):
    spec = FunctionSpec(name="dep", source="dep", memory_mb=128, timeout_s=3, concurrency=2,
                        bound={"FK_STORE_URL": "mongodb://x", "FK_TOKEN_SECRET": "s3cret"})
    art = make_artifact(ECHO)
    first = local.deploy(spec, art)
    assert not first.skipped and first.url.endswith("/actions/dep")
    assert local.deploy(spec, art).skipped
    changed = make_artifact(ECHO + "\n# changed\n")
    assert not local.deploy(spec, changed).skipped
    got = local._session.get(local._url("/actions/dep"), params={"code": "false"}).json()
    assert got["limits"]["memory"] == 128 and got["limits"]["timeout"] == 3000
    assert got["limits"]["concurrency"] == 2
    assert {p["key"] for p in got["parameters"]} == {"FK_STORE_URL", "FK_TOKEN_SECRET"}
    keys = {a["key"]: a["value"] for a in got["annotations"]}
    assert keys["fk-sha256"] == changed.sha256 and keys["final"] is True
    assert local.exists("dep")
    assert local.remove("dep") is True
    assert not local.exists("dep")
    assert local.remove("dep") is False


def test_a_new_runtime_image_is_deployed_though_the_zip_is_the_same(local, monkeypatch):
    """The image follows the runtime's pins, the base image and the
    cluster's registry, which the zip does not hold: a changed image is a
    deploy, never a skip that leaves the action on the old one."""
    from fedkeeper.providers.openwhisk import packaging
    spec = FunctionSpec(name="img", source="img", timeout_s=3, bound={"FK_FUNCTION": "img"})
    art = make_artifact(ECHO)
    image = ["registry.example/fedkeeper/runtime-openwhisk-aaaa"]
    monkeypatch.setattr(packaging, "image_for", lambda spec, artifact, prefix: image[0])
    assert not local.deploy(spec, art).skipped
    assert local.deploy(spec, art).skipped
    image[0] = "registry.example/fedkeeper/runtime-openwhisk-bbbb"
    assert not local.deploy(spec, art).skipped
    got = local._session.get(local._url("/actions/img"), params={"code": "false"}).json()
    assert got["exec"]["image"] == image[0]
    assert {a["key"]: a["value"] for a in got["annotations"]}["fk-exec"] == f"blackbox {image[0]}"
    assert local.deploy(spec, art).skipped


def test_invoke_and_track_many(local):
    invs = [local.invoke("echo", {"i": i}) for i in range(60)]
    assert len({i.platform_id for i in invs}) == 60 and invs[0].payload_bytes > 0
    outs = track_all(local, invs)
    assert all(o.ok and o.error_class is None for o in outs)
    assert [o.result["args"]["i"] for o in outs] == list(range(60))
    # bound configuration reaches the function as args
    assert all(o.result["args"]["FK_FUNCTION"] == "echo" for o in outs)
    assert all(o.start and o.end and o.end >= o.start and o.duration_ms is not None for o in outs)
    assert all(o.wait_ms is not None and o.result_bytes > 0 for o in outs)
    assert any(o.cold_start for o in outs)  # echo had never run before
    # An invocation made elsewhere (e.g. by a keeper before a restart) is found too.
    other = LocalOpenWhiskProvider("ow-local", OpenWhiskCluster(kind="local"), local.ctx)
    try:
        inv = local.invoke("echo", {"late": 1})
        adopted = Invocation("echo", inv.platform_id, inv.submitted_at)
        assert track_all(other, [adopted])[0].result["args"]["late"] == 1
    finally:
        other.close()
    assert not other.started_fabric


def test_outcomes_are_classified(local):
    local.deploy(FunctionSpec(name="echo-short", source="echo", timeout_s=0.5), make_artifact(ECHO))
    cases = {"fail": ({"fail": "x"}, ErrorClass.APPLICATION_ERROR, "refused: x"),
             "raise": ({"raise": "bad"}, ErrorClass.DEVELOPER_ERROR, "bad"),
             "exit": ({"exit": 1}, ErrorClass.DEVELOPER_ERROR, "exited unexpectedly"),
             "timeout": ({"sleep": 30}, ErrorClass.TIMEOUT, "exceeded its time limits of 500 ")}
    invs = {k: local.invoke("echo-short", args) for k, (args, _, _) in cases.items()}
    outs = dict(zip(invs, track_all(local, list(invs.values()))))
    for k, (_, ec, text) in cases.items():
        assert not outs[k].ok and outs[k].error_class == ec, k
        assert text in outs[k].error, k


def test_invoke_errors_are_classified(local):
    with pytest.raises(ProviderError) as e:
        local.invoke("no-such-action", {})
    assert e.value.error_class == ErrorClass.FUNCTION_MISSING and e.value.status == 404
    with pytest.raises(ProviderError) as e:
        local.invoke("echo", {"blob": "x" * (1024 * 1024 + 1)})
    assert e.value.error_class == ErrorClass.PAYLOAD_TOO_LARGE and not e.value.error_class.retryable
    local.fabric_admin("limits", {"invocationsPerMinute": 1})
    try:
        with pytest.raises(ProviderError) as e:
            for _ in range(3):
                local.invoke("echo", {})
        assert e.value.error_class == ErrorClass.THROTTLED
        assert "Too many requests in the last minute" in str(e.value)
    finally:
        local.fabric_admin("limits", {"invocationsPerMinute": 60000})


def test_limits_and_round_warning(local):
    lim = local.limits()
    assert lim["concurrentInvocations"] == 1000 and lim["maxPayloadSize"] == 1048576
    assert local.capacity_warning(10) is None
    assert "concurrentInvocations limit of 1000" in local.capacity_warning(1001)


def test_faults_from_the_cluster_config_reach_the_fabric(state):
    cfg = OpenWhiskCluster(kind="local", faults=FaultConfig(throttle=1.0, functions=["echo"]))
    p = LocalOpenWhiskProvider("ow-faulty", cfg, ProviderContext(state_dir=state))
    try:
        p.deploy(FunctionSpec(name="echo", source="echo"), make_artifact(ECHO))
        p.deploy(FunctionSpec(name="echo2", source="echo"), make_artifact(ECHO))
        with pytest.raises(ProviderError) as e:
            p.invoke("echo", {})
        assert e.value.error_class == ErrorClass.THROTTLED
        assert track_all(p, [p.invoke("echo2", {})])[0].ok
        crash = OpenWhiskCluster(kind="local", faults=FaultConfig(crash=1.0, seed=3))
        p2 = LocalOpenWhiskProvider("ow-faulty", crash, ProviderContext(state_dir=state))
        out = track_all(p2, [p2.invoke("echo", {})])[0]
        assert out.error_class == ErrorClass.DEVELOPER_ERROR
        p2.close()
        # A cluster without faults clears them.
        p3 = LocalOpenWhiskProvider("ow-faulty", OpenWhiskCluster(kind="local"), ProviderContext(state_dir=state))
        assert track_all(p3, [p3.invoke("echo", {})])[0].ok
        p3.close()
    finally:
        p.close()


def test_remote_provider_against_the_fabric(local, state):
    info = fabric.fabric_status(state / "fabric")
    cfg = OpenWhiskCluster(base_url=info["url"], auth={"ow_auth": info["auth"]}, namespace="ow-local")
    p = make_provider("ow-remote", "openwhisk", cfg, ProviderContext(state_dir=state))
    assert type(p) is OpenWhiskProvider
    try:
        assert p.exists("echo")
        invs = [p.invoke("echo", {"i": i}) for i in range(20)]
        assert p._clock.offset_lo is not None and p._clock.offset_lo <= 0.001  # learnt from Date headers
        outs = track_all(p, invs)
        assert [o.result["args"]["i"] for o in outs] == list(range(20))
    finally:
        p.close()


def test_per_id_fallback_finds_what_the_list_missed(local, monkeypatch):
    monkeypatch.setattr(owp, "FALLBACK_AFTER_S", 0.0)
    monkeypatch.setattr(local, "_poll_list", lambda want, out: None)
    inv = local.invoke("echo", {"fb": 1})
    out = wait_for(lambda: local.track([inv]), 10)
    assert out[0].result["args"]["fb"] == 1


def test_bad_auth_is_auth(state, local):
    info = fabric.fabric_status(state / "fabric")
    cfg = OpenWhiskCluster(base_url=info["url"], auth={"ow_auth": "someone:wrong"})
    p = OpenWhiskProvider("ow-bad", cfg, ProviderContext(state_dir=state))
    try:
        for call in (lambda: p.invoke("echo", {}), lambda: p.exists("echo"),
                     lambda: p.deploy(FunctionSpec(name="x", source="x"), make_artifact(ECHO))):
            with pytest.raises(ProviderError) as e:
                call()
            assert e.value.error_class == ErrorClass.AUTH and not e.value.error_class.retryable
            assert "wrong" not in str(e.value)
    finally:
        p.close()


def test_closed_port_is_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = OpenWhiskCluster(base_url=f"http://127.0.0.1:{port}", auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-gone", cfg, ProviderContext(state_dir=tmp_path))
    try:
        for call in (lambda: p.invoke("echo", {}), lambda: p.exists("echo"),
                     lambda: p.track([Invocation("echo", "0" * 32, time.time())])):
            with pytest.raises(ProviderError) as e:
                call()
            assert e.value.error_class == ErrorClass.UNREACHABLE
            assert "connection refused" in str(e.value) and "secretkey" not in str(e.value)
    finally:
        p.close()


def test_tls_is_verified_unless_insecure(tmp_path):
    cfg = OpenWhiskCluster(base_url="https://127.0.0.1:1", auth={"ow_auth": "u:k"})
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    assert p._verify and p._session.verify is True
    ctx = p._pool.ssl_context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    p.close()
    cfg = OpenWhiskCluster(base_url="https://127.0.0.1:1", auth={"ow_auth": "u:k"}, insecure=True)
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    assert not p._verify and p._session.verify is False
    assert p._pool.ssl_context.verify_mode == ssl.CERT_NONE
    p.close()


def test_closing_the_provider_that_started_the_fabric_stops_it(tmp_path):
    p = LocalOpenWhiskProvider("solo", OpenWhiskCluster(kind="local"), ProviderContext(state_dir=tmp_path))
    pid = fabric.fabric_status(tmp_path / "fabric")["pid"]
    assert p.started_fabric
    p.close()
    assert fabric.fabric_status(tmp_path / "fabric") is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_code_over_the_size_limit_is_refused_before_upload(local, monkeypatch):
    from fedkeeper.providers.openwhisk import packaging
    spec = FunctionSpec(name="too_big", source="too_big", timeout_s=3)
    art = make_artifact(ECHO + "\n# " + "x" * 4096 + "\n")
    # the namespace's own limit wins where GET /limits reports one (in MB)
    assert packaging.namespace_code_limit({"codeSize": 2}) == 2 * 1024 * 1024
    assert packaging.namespace_code_limit({"concurrentInvocations": 30}) is None
    monkeypatch.setattr(local, "_code_limit_value", 1000, raising=False)
    puts = []
    real = local._control

    def control(method, path, **kw):
        if method == "PUT":
            puts.append(path)
        return real(method, path, **kw)
    monkeypatch.setattr(local, "_control", control)
    with pytest.raises(ProviderError) as e:
        local.deploy(spec, art)
    assert e.value.error_class is ErrorClass.PAYLOAD_TOO_LARGE and not puts
    text = str(e.value)
    assert "too_big" in text and str(packaging.encoded_size(len(art.data))) in text and "1000 bytes" in text
    plan = OpenWhiskProvider.plan_upload("c", OpenWhiskCluster(kind="local"), spec, art)
    assert plan.limit_bytes == packaging.DEFAULT_CODE_SIZE_LIMIT and plan.within_limit


def test_actions_run_on_the_runtime_image_named_by_the_cluster(local):
    from fedkeeper.artifacts import build_artifact
    from fedkeeper.runtimes.images import runtime_image
    spec = FunctionSpec(name="nodeinfo", source="nodeinfo", timeout_s=30,
                        bound={"FK_FUNCTION": "nodeinfo", "FK_TOKEN_SECRET": "s"})
    local.deploy(spec, build_artifact("nodeinfo", "openwhisk"))
    got = local._session.get(local._url("/actions/nodeinfo"), params={"code": "false"}).json()
    assert got["exec"]["kind"] == "blackbox" and got["exec"]["image"] == runtime_image("light", "openwhisk")
    local.remove("nodeinfo")


def test_a_helper_call_is_answered_by_one_blocking_invoke(local, monkeypatch):
    """call() gets the record in the invoke's answer: no activation is
    listed or fetched, and failures are classified as when tracked."""
    polled = []
    monkeypatch.setattr(local, "track", lambda pending: polled.append(pending) or [])
    out = local.call("echo", {"i": 7}, timeout_s=10)
    assert out.ok and out.result["args"]["i"] == 7 and out.duration_ms is not None and out.platform_id
    failed = local.call("echo", {"fail": "x"}, timeout_s=10)
    assert not failed.ok and failed.error_class == ErrorClass.APPLICATION_ERROR and "refused: x" in failed.error
    assert polled == []
    with pytest.raises(ProviderError) as e:
        local.call("no-such-action", {}, timeout_s=10)
    assert e.value.error_class == ErrorClass.FUNCTION_MISSING


def test_a_helper_call_longer_than_the_blocking_wait_is_polled_to_its_end(local, monkeypatch):
    monkeypatch.setattr(owp, "BLOCKING_WAIT_S", 0.2)   # OpenWhisk answers 202 after its blocking wait
    tracked = []
    track = local.track
    monkeypatch.setattr(local, "track", lambda pending: tracked.append(pending) or track(pending))
    t0 = time.monotonic()
    out = local.call("echo", {"sleep": 1, "i": 3}, timeout_s=10)
    assert out.ok and out.result["args"]["i"] == 3 and time.monotonic() - t0 >= 1
    assert tracked and tracked[0][0].function == "echo"
    # The whole call stays within its timeout: past it, a timeout outcome.
    late = local.call("echo", {"sleep": 3}, timeout_s=0.5)
    assert not late.ok and late.error_class == ErrorClass.TIMEOUT


def test_a_blocking_answer_is_an_outcome_only_when_it_is_a_record(server_factory, tmp_path):
    """OpenWhisk answers a whisk error with 500 and the record; a 500
    without one is the controller's own error."""
    record = {"activationId": "a" * 32, "start": 1, "end": 2, "duration": 1,
              "response": {"status": "whisk internal error", "statusCode": 3, "result": {"error": "lost"}}}
    answers = [json_answer(500, json.dumps(record).encode()), json_answer(500, b'{"error": "The server is down"}'),
               json_answer(503, json.dumps(record).encode())]
    srv = server_factory(lambda conn, req: answers.pop(0))
    p = OpenWhiskProvider("ow-scripted", OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:p"}, namespace="ns"),
                          ProviderContext(state_dir=tmp_path))
    try:
        out = p.call("f", {}, timeout_s=5)
        assert not out.ok and out.error_class == ErrorClass.PLATFORM_ERROR and out.error == "lost"
        for _ in range(2):   # no record; a record under a status that never carries one
            with pytest.raises(ProviderError):
                p.call("f", {}, timeout_s=5)
        assert all("blocking=true" in line for _, line in srv.requests)
    finally:
        p.close()


def test_an_insecure_clusters_invoker_is_told_not_to_verify_the_controller(local, state):
    """`insecure: true` covers the keeper's calls to the controller; the
    invoker, which calls the same controller from inside the cluster, gets
    FK_OW_INSECURE, and only it (and a change of it redeploys)."""
    info = fabric.fabric_status(state / "fabric")

    def deployed(p, name, platform_api):
        p.deploy(FunctionSpec(name=name, source="echo", bound={"FK_FUNCTION": name}, platform_api=platform_api),
                 make_artifact(ECHO))
        got = local._session.get(local._url(f"/actions/{name}"), params={"code": "false"}).json()
        return {x["key"]: x["value"] for x in got["parameters"]}, {a["key"]: a["value"] for a in got["annotations"]}

    for insecure in (True, False):
        cfg = OpenWhiskCluster(base_url=info["url"], auth={"ow_auth": info["auth"]}, namespace="ow-local",
                               insecure=insecure)
        p = make_provider("ow-remote", "openwhisk", cfg, ProviderContext(state_dir=state))
        try:
            params, marks = deployed(p, "inv", True)
            assert params.get("FK_OW_INSECURE") == ("1" if insecure else None)
            assert marks["fk-exec"].endswith(" insecure") is insecure
            params, _ = deployed(p, "plain", False)
            assert "FK_OW_INSECURE" not in params
        finally:
            p.close()


def test_the_invoker_verifies_the_controllers_certificate_unless_told_not_to(server_factory, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    from scripted_http import self_signed_tls
    path = Path(__file__).resolve().parent.parent / "functions" / "fl_invoker" / "fl_invoker.py"
    spec = importlib.util.spec_from_file_location("_fn_fl_invoker_tls", path)
    invoker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(invoker)
    srv = server_factory(lambda conn, req: json_answer(202, b'{"activationId": "a1"}'), tls=self_signed_tls(tmp_path))
    monkeypatch.setenv("__OW_API_HOST", srv.url)
    monkeypatch.setenv("__OW_API_KEY", "u:k")
    with pytest.raises(Exception) as e:
        invoker._invoke_openwhisk("fl_client", {"client": "c"}, timeout=5)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)
    assert invoker._invoke_openwhisk("fl_client", {"client": "c"}, timeout=5,
                                     context=ssl._create_unverified_context()) == "a1"
