"""Knative provider against an emulated Kubernetes API server (kmock,
extended in kube_emulator.py) driven through the official `kubernetes`
client, with a stand-in Knative controller. The data-plane tests serve the
very zip and env the provider wrote to the ConfigMap and Secret with
Google's functions-framework on loopback."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from fedkeeper.config import KnativeCluster
from fedkeeper.providers.kube import map_api_error
from fedkeeper.providers import make_provider
from fedkeeper.providers.base import Artifact, ErrorClass, FunctionSpec, ProviderContext, ProviderError
from fedkeeper.providers.knative import KnativeProvider, service_name
from fedkeeper.providers.knative import manifests as m
from kube_emulator import EmulatedCluster, FakeKnativeController, FrameworkKubelet

NS = "fl"
IMAGE = "registry.example/fedkeeper-python:3.11"
SECRET = "s3cr3t-token-value-0123456789abcdef"

ECHO_MAIN = '''
import os

import flask
import functions_framework


@functions_framework.http
def fl_echo(request):
    body = request.get_json(silent=True) or {}
    if body.get("mode") == "crash":
        raise RuntimeError("boom")
    if body.get("mode") == "refuse":
        return flask.jsonify({"error": "refused"}), 400
    return {"echo": body.get("x"), "function": os.environ.get("FK_FUNCTION"),
            "secret_ok": os.environ.get("FK_TOKEN_SECRET") == %r}
''' % SECRET


def make_artifact(main: str = ECHO_MAIN, extra: bytes = b"") -> Artifact:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("main.py", date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, main)
        if extra:
            zf.writestr(zipfile.ZipInfo("blob.bin", date_time=(1980, 1, 1, 0, 0, 0)), extra,
                        compress_type=zipfile.ZIP_STORED)
    data = buf.getvalue()
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry="http")


def spec(name: str = "fl_echo", **kw) -> FunctionSpec:
    base = dict(name=name, source=name, memory_mb=512, timeout_s=30, concurrency=4,
                bound={"FK_FUNCTION": name, "FK_TOKEN_SECRET": SECRET,
                       "FK_STORE_URL": "mongodb://u:pw@db:27017", "FK_STORE_DB": "fl"},
                extra={"cpu": "500m", "min_scale": 1, "max_scale": 5})
    base.update(kw)
    return FunctionSpec(**base)


@pytest.fixture
def cluster():
    c = EmulatedCluster()
    yield c
    c.stop()


@pytest.fixture
def provider(cluster, tmp_path):
    p = KnativeProvider("kn", KnativeCluster(api_server=cluster.url, image=IMAGE, namespace=NS,
                                             ready_timeout_s=5),
                        ProviderContext(state_dir=tmp_path))
    yield p
    p.close()


def ready_at(url: str):
    return lambda svc: {"ready": True, "url": url}


def api(cluster):
    a = cluster.api_client()
    return client.CustomObjectsApi(a), client.CoreV1Api(a)


def writes(cluster) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in cluster.emulator._requests
            if str(r.method) in ("POST", "PATCH", "PUT", "DELETE")]


# ------------------------------------------------------------------ manifests

def test_service_names_are_dns1035_and_distinct():
    assert service_name("fl_client") == "fl-client"
    assert service_name("fl_server_aggregator") == "fl-server-aggregator"
    assert service_name("9lives") == "fn-9lives"
    assert service_name("Node__Info_") == "node-info"
    long_a, long_b = "a" * 70 + "_x", "a" * 70 + "_y"
    assert len(service_name(long_a)) <= 57 and service_name(long_a) != service_name(long_b)
    for name in ("fl_client", "9lives", long_a):
        s = service_name(name)
        assert s[0].isalpha() and s[-1].isalnum() and set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_desired_service_shape():
    art = make_artifact()
    body = m.desired_service(spec(), art, namespace=NS, generic_image=IMAGE)
    meta, tmpl = body["metadata"], body["spec"]["template"]
    assert body["apiVersion"] == "serving.knative.dev/v1" and body["kind"] == "Service"
    assert meta["name"] == "fl-echo" and meta["namespace"] == NS
    assert meta["labels"]["fedkeeper.io/function"] == "fl_echo"
    assert meta["annotations"][m.SOURCE_ANNOTATION] == art.sha256
    ann = tmpl["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "1"
    assert ann["autoscaling.knative.dev/max-scale"] == "5"
    assert ann[m.CONFIG_ANNOTATION] == meta["annotations"][m.CONFIG_ANNOTATION]
    pod = tmpl["spec"]
    assert pod["containerConcurrency"] == 4 and pod["timeoutSeconds"] == 30
    (c,) = pod["containers"]
    assert c["image"] == IMAGE
    assert c["resources"] == {"requests": {"memory": "512Mi", "cpu": "500m"},
                              "limits": {"memory": "512Mi"}}
    assert "functions_framework" in c["command"][-1] and "zipfile -e" in c["command"][-1]
    assert c["volumeMounts"][0]["mountPath"] == m.SOURCE_MOUNT
    # named by their content: a new zip or new values are new objects only the new revision names
    assert pod["volumes"] == [{"name": "fk-source", "configMap": {"name": f"fl-echo-source-{art.sha256[:12]}"}}]
    env = {e["name"]: e for e in c["env"]}
    assert env["FUNCTION_TARGET"]["value"] == "fl_echo"
    assert env["FK_TOKEN_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": m.secret_name("fl-echo", spec().bound), "key": "FK_TOKEN_SECRET"}}
    assert m.secret_name("fl-echo", spec().bound).startswith("fl-echo-bound-")
    text = json.dumps(body)
    assert SECRET not in text and "pw@db" not in text  # secrets only by reference
    # a different secret value gives a different hash (a new revision)
    other = m.desired_service(spec(bound={**spec().bound, "FK_TOKEN_SECRET": "x" * 32}), art,
                              namespace=NS, generic_image=IMAGE)
    assert other["metadata"]["annotations"][m.CONFIG_ANNOTATION] != meta["annotations"][m.CONFIG_ANNOTATION]


def test_manifest_refusals():
    with pytest.raises(ProviderError) as e:
        m.desired_service(spec(), make_artifact(), namespace=NS, generic_image=None)
    assert e.value.error_class is ErrorClass.DEVELOPER_ERROR and "image" in str(e.value)
    with pytest.raises(ProviderError):
        m.desired_service(spec(extra={"cpu": "lots"}), make_artifact(), namespace=NS,
                          generic_image=IMAGE)
    with pytest.raises(ProviderError):
        m.desired_service(spec(bound={"BAD-NAME": "v"}), make_artifact(), namespace=NS,
                          generic_image=IMAGE)


def test_registry_maps_knative_remote(cluster, tmp_path):
    p = make_provider("kn", "knative", KnativeCluster(api_server=cluster.url, image=IMAGE),
                      ProviderContext(state_dir=tmp_path))
    assert isinstance(p, KnativeProvider) and p.platform == "knative" and p.entry == "http"
    p.close()


# ---------------------------------------------------------------- control plane

def test_deploy_creates_service_configmap_secret_then_skips_same_hash(cluster, provider, caplog):
    caplog.set_level(logging.DEBUG)
    art = make_artifact()
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        res = provider.deploy(spec(), art)
        assert not res.skipped and res.url == "http://fl-echo.fl.example.com"
        custom, core = api(cluster)
        svc = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
        c = svc["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["memory"] == "512Mi"
        assert svc["spec"]["template"]["metadata"]["annotations"][m.MIN_SCALE] == "1"
        cm = core.read_namespaced_config_map(m.configmap_name("fl-echo", art.sha256), NS)
        assert base64.b64decode(cm.binary_data["source.zip"]) == art.data and cm.immutable
        sec = core.read_namespaced_secret(m.secret_name("fl-echo", spec().bound), NS)
        assert base64.b64decode(sec.data["FK_TOKEN_SECRET"]).decode() == SECRET and sec.immutable
        assert provider.exists("fl_echo") and provider.list_functions() == ["fl_echo"]

        before = len(writes(cluster))
        again = provider.deploy(spec(), art)
        assert again.skipped and again.url == res.url
        assert len(writes(cluster)) == before  # nothing written for an unchanged function

        # new code: a new revision (generation 2), the zip replaced
        art2 = make_artifact(ECHO_MAIN + "\n# v2\n")
        third = provider.deploy(spec(), art2)
        assert not third.skipped
        svc = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
        assert svc["metadata"]["generation"] == 2
        assert svc["metadata"]["annotations"][m.SOURCE_ANNOTATION] == art2.sha256
        cm = core.read_namespaced_config_map(m.configmap_name("fl-echo", art2.sha256), NS)
        assert base64.b64decode(cm.binary_data["source.zip"]) == art2.data
        # the earlier zip, which only the earlier revision named, went once the new one was Ready
        names = [c.metadata.name for c in core.list_namespaced_config_map(NS).items]
        assert names == [m.configmap_name("fl-echo", art2.sha256)]

        # dropping max_scale removes the annotation instead of keeping the old one
        provider.deploy(spec(extra={"min_scale": 1}), art2)
        svc = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
        assert m.MAX_SCALE not in svc["spec"]["template"]["metadata"]["annotations"]
    assert SECRET not in caplog.text and "pw@db" not in caplog.text


def test_remove_deletes_service_configmap_and_secret(cluster, provider):
    art = make_artifact()
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        provider.deploy(spec(), art)
    assert provider.remove("fl_echo") is True
    custom, core = api(cluster)
    for read in (lambda: custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL,
                                                             "fl-echo"),
                 lambda: core.read_namespaced_config_map(m.configmap_name("fl-echo", art.sha256), NS),
                 lambda: core.read_namespaced_secret(m.secret_name("fl-echo", spec().bound), NS)):
        with pytest.raises(client.ApiException) as e:
            read()
        assert e.value.status == 404
    assert not provider.exists("fl_echo")
    assert provider.remove("fl_echo") is False


def test_ready_false_is_a_classified_error_with_knatives_reason(cluster, provider):
    decide = lambda svc: {"ready": False, "reason": "RevisionFailed",  # noqa: E731
                          "message": "Revision \"fl-echo-00001\" failed with message: "
                                     "ModuleNotFoundError: No module named 'numpy'."}
    with FakeKnativeController(cluster, NS, decide):
        with pytest.raises(ProviderError) as e:
            provider.deploy(spec(), make_artifact())
    assert e.value.error_class is ErrorClass.DEVELOPER_ERROR
    assert "RevisionFailed" in str(e.value) and "No module named 'numpy'" in str(e.value)
    # invoking it says the same (no URL was cached by the failed deploy)
    with pytest.raises(ProviderError) as e2:
        provider.invoke("fl_echo", {"x": 1})
    assert "Ready=False" in str(e2.value) and "RevisionFailed" in str(e2.value)


def test_a_rollout_that_never_becomes_ready_leaves_the_serving_revision_its_code(cluster, provider):
    """Pods of the revision still serving (a cold start during the rollout)
    read the ConfigMap and Secret their revision names: a new zip is a new
    object, and the old ones stay until a new revision is Ready."""
    old_art, new_art = make_artifact(), make_artifact(ECHO_MAIN + "\n# v2\n")
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        provider.deploy(spec(), old_art)
    failing = lambda svc: {"ready": False, "reason": "RevisionFailed", "message": "ImagePullBackOff"}  # noqa: E731
    with FakeKnativeController(cluster, NS, failing):
        with pytest.raises(ProviderError):
            provider.deploy(spec(bound={**spec().bound, "FK_TOKEN_SECRET": "y" * 32}), new_art)
    _, core = api(cluster)
    old_cm = core.read_namespaced_config_map(m.configmap_name("fl-echo", old_art.sha256), NS)
    assert base64.b64decode(old_cm.binary_data["source.zip"]) == old_art.data   # not overwritten
    old_secret = core.read_namespaced_secret(m.secret_name("fl-echo", spec().bound), NS)
    assert base64.b64decode(old_secret.data["FK_TOKEN_SECRET"]).decode() == SECRET
    assert len(core.list_namespaced_config_map(NS).items) == 2 and len(core.list_namespaced_secret(NS).items) == 2


def test_a_failed_rollout_of_an_unchanged_configuration_is_tried_again_by_a_redeploy(cluster, provider):
    """An image pull that failed once leaves Ready=False with the same
    configuration hash: a redeploy must roll a new revision, not report the
    old failure for ever."""
    art = make_artifact()
    failing = lambda svc: {"ready": False, "reason": "RevisionFailed", "message": "ImagePullBackOff"}  # noqa: E731
    with FakeKnativeController(cluster, NS, failing):
        with pytest.raises(ProviderError):
            provider.deploy(spec(), art)
    custom, _ = api(cluster)
    first = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        res = provider.deploy(spec(), art)
    assert not res.skipped and res.url == "http://fl-echo.fl.example.com"
    svc = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
    assert svc["metadata"]["generation"] == first["metadata"]["generation"] + 1
    assert m.RETRY_ANNOTATION in svc["spec"]["template"]["metadata"]["annotations"]
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        assert provider.deploy(spec(), art).skipped   # Ready now: nothing to write


def test_ready_wait_is_bounded(cluster, provider):
    provider.ready_timeout_s = 0.4
    with FakeKnativeController(cluster, NS, lambda svc: {"ready": None, "reason": "Deploying"}):
        t0 = time.monotonic()
        with pytest.raises(ProviderError) as e:
            provider.deploy(spec(), make_artifact())
        assert time.monotonic() - t0 < 60     # the controller never says Ready: only the bound ends the wait
    assert e.value.error_class is ErrorClass.TIMEOUT
    assert "Ready=Unknown" in str(e.value) and "Deploying" in str(e.value)


def test_source_larger_than_a_configmap_is_refused_before_any_write(cluster, provider):
    import os
    big = make_artifact(extra=os.urandom(1100 * 1024))
    with pytest.raises(ProviderError) as e:
        provider.deploy(spec(), big)
    assert e.value.error_class is ErrorClass.PAYLOAD_TOO_LARGE
    assert "ConfigMap" in str(e.value) and "docker_image" in str(e.value)
    assert writes(cluster) == []


def test_emulated_api_server_refuses_oversized_configmap(cluster):
    import os
    _custom, core = api(cluster)
    blob = base64.b64encode(os.urandom(1024 * 1024 + 10)).decode()
    with pytest.raises(client.ApiException) as e:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "big"},
                                               "binaryData": {"z": blob}})
    assert e.value.status == 422


def test_prebuilt_image_needs_no_configmap(cluster, provider):
    with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
        provider.deploy(spec(image="registry.example/fl-echo:1"), make_artifact())
    custom, core = api(cluster)
    svc = custom.get_namespaced_custom_object(m.GROUP, m.VERSION, NS, m.PLURAL, "fl-echo")
    c = svc["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/fl-echo:1" and "command" not in c
    assert "volumes" not in svc["spec"]["template"]["spec"]
    assert core.list_namespaced_config_map(NS).items == []


def test_unreachable_api_server_is_classified(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = KnativeProvider("kn", KnativeCluster(api_server=f"http://127.0.0.1:{port}", image=IMAGE),
                        ProviderContext(state_dir=tmp_path))
    try:
        with pytest.raises(ProviderError) as e:
            p.deploy(spec(), make_artifact())
        assert e.value.error_class is ErrorClass.UNREACHABLE
    finally:
        p.close()


def test_api_errors_map_onto_error_classes():
    def exc(status, message="m"):
        e = client.ApiException(status=status, reason="r")
        e.body = json.dumps({"kind": "Status", "message": message})
        e.headers = {"Retry-After": "3"}
        return e
    assert map_api_error(exc(403, "forbidden: User cannot create"), "x").error_class is ErrorClass.AUTH
    assert "User cannot create" in str(map_api_error(exc(403, "forbidden: User cannot create"), "x"))
    assert map_api_error(exc(404), "x").error_class is ErrorClass.FUNCTION_MISSING
    t = map_api_error(exc(429), "x")
    assert t.error_class is ErrorClass.THROTTLED and t.retry_after == 3
    assert map_api_error(exc(500), "x").error_class is ErrorClass.PLATFORM_ERROR


def test_kubeconfig_problems_are_auth_errors(tmp_path):
    p = KnativeProvider("kn", KnativeCluster(kubeconfig=str(tmp_path / "missing"), image=IMAGE),
                        ProviderContext(state_dir=tmp_path))
    try:
        with pytest.raises(ProviderError) as e:
            p.exists("fl_echo")
        assert e.value.error_class is ErrorClass.AUTH
    finally:
        p.close()


# ------------------------------------------------------------------- data plane

def test_end_to_end_through_functions_framework(cluster, provider, tmp_path):
    kubelet = FrameworkKubelet(cluster, NS, tmp_path / "kubelet")
    try:
        with FakeKnativeController(cluster, NS, kubelet) as ctl:
            res = provider.deploy(spec(), make_artifact())
            assert res.url.startswith("http://127.0.0.1:")
            ok = provider.call("fl_echo", {"x": 41}, timeout_s=20)
            assert ok.ok, ok.error
            assert ok.result == {"echo": 41, "function": "fl_echo", "secret_ok": True}
            assert ok.duration_ms is not None and ok.result_bytes > 0

            invs = [provider.invoke("fl_echo", {"x": i}) for i in range(6)]
            outs = []
            deadline = time.monotonic() + 20
            while len(outs) < len(invs) and time.monotonic() < deadline:
                outs += provider.track([i for i in invs
                                        if i.platform_id not in {o.platform_id for o in outs}])
                time.sleep(0.02)
            assert sorted(o.result["echo"] for o in outs) == list(range(6))

            refused = provider.call("fl_echo", {"mode": "refuse"}, timeout_s=20)
            assert refused.error_class is ErrorClass.APPLICATION_ERROR and "refused" in refused.error
            crashed = provider.call("fl_echo", {"mode": "crash"}, timeout_s=20)
            assert crashed.error_class is ErrorClass.DEVELOPER_ERROR
            assert not ctl.errors
    finally:
        kubelet.stop()


class _Stub(BaseHTTPRequestHandler):
    """The Knative data path's own answers: activator 503s, ingress 404s,
    queue-proxy overload, a slow revision."""

    hosts: list[str] = []

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).hosts.append(self.headers.get("Host"))
        path = self.path.rstrip("/")
        if path.endswith("/slow"):
            time.sleep(1.5)
        status, body, headers = {
            "/unavailable": (503, b"activator request timeout", {}),
            "/overload": (503, b"pending request queue full (overload)", {}),
            "/gone": (404, b"", {}),
            "/throttle": (429, b"Too Many Requests", {"Retry-After": "2"}),
        }.get(path, (200, b'{"ok": true}', {"Content-Type": "application/json"}))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Stub.hosts = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_data_plane_errors_are_classified(cluster, provider, stub):
    routes = {"fl-unavailable": "/unavailable", "fl-overload": "/overload", "fl-gone": "/gone",
              "fl-throttle": "/throttle", "fl-slow": "/slow"}
    decide = lambda svc: {"ready": True, "url": stub + routes[svc["metadata"]["name"]]}  # noqa: E731
    provider.invoke_grace_s = 0.0
    with FakeKnativeController(cluster, NS, decide) as ctl:
        for name in routes:
            fn = name.replace("-", "_")
            provider.deploy(spec(fn, timeout_s=0.5 if fn == "fl_slow" else 30), make_artifact())
        got = {fn: provider.call(fn, {"x": 1}, timeout_s=10)
               for fn in ("fl_unavailable", "fl_overload", "fl_throttle", "fl_slow")}
        assert got["fl_unavailable"].error_class is ErrorClass.PLATFORM_ERROR
        assert "activator" in got["fl_unavailable"].error
        assert got["fl_overload"].error_class is ErrorClass.THROTTLED
        assert got["fl_throttle"].error_class is ErrorClass.THROTTLED
        assert got["fl_throttle"].retry_after == 2
        assert got["fl_slow"].error_class is ErrorClass.TIMEOUT

        # the revision went away: the 404 names Knative's reason, and the
        # next invoke reads the Service again instead of the cached URL
        ctl.set_status("fl-gone", {"ready": False, "reason": "RevisionMissing",
                                   "message": "Configuration \"fl-gone\" does not have any "
                                              "ready Revision."})
        gone = provider.call("fl_gone", {"x": 1}, timeout_s=10)
        assert gone.error_class is ErrorClass.FUNCTION_MISSING
        assert "RevisionMissing" in gone.error and "ready Revision" in gone.error
        with pytest.raises(ProviderError) as e:
            provider.invoke("fl_gone", {"x": 1})
        assert e.value.error_class is ErrorClass.PLATFORM_ERROR and "RevisionMissing" in str(e.value)

    with pytest.raises(ProviderError) as e:
        provider.invoke("never_deployed", {"x": 1})
    assert e.value.error_class is ErrorClass.FUNCTION_MISSING


def test_ingress_routes_by_host_header(cluster, tmp_path, stub):
    p = KnativeProvider("kn", KnativeCluster(api_server=cluster.url, image=IMAGE, namespace=NS,
                                             ingress=stub, ready_timeout_s=5),
                        ProviderContext(state_dir=tmp_path))
    try:
        with FakeKnativeController(cluster, NS, ready_at("http://fl-echo.fl.example.com")):
            p.deploy(spec(), make_artifact())
        out = p.call("fl_echo", {"x": 1}, timeout_s=10)
        assert out.ok and out.result == {"ok": True}
        assert _Stub.hosts == ["fl-echo.fl.example.com"]
    finally:
        p.close()
