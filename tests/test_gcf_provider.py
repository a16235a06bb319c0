"""Cloud Functions provider against a local fake of the v2 REST API.

The official google-cloud-functions client drives every control-plane call
(the fake checks it sees the client's headers and self-signed JWTs); the
deployed source is served by a real functions-framework process behind an
ID-token check, so invocations go end to end through the real invoke path.
"""
from __future__ import annotations

import hashlib
import io
import json
import socket
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from fedkeeper.config import GoogleCluster
from fedkeeper.providers import make_provider
from fedkeeper.artifacts import build_artifact
from fedkeeper.providers.base import Artifact, ErrorClass, FunctionSpec, ProviderContext, ProviderError
from fedkeeper.providers.gcf import CloudFunctionsProvider, function_id, map_api_error
from fedkeeper.providers.gcf.provider import SHA_LABEL, memory_bytes

from flcommon.auth import signed

from fake_gcf_api import FakeCloudFunctions
from test_gcf_local import ECHO_MAIN, make_artifact, wait_all

pytestmark = pytest.mark.timeout(120)

SPEC = FunctionSpec(name="fl_echo", source="echo", memory_mb=1024, timeout_s=120,
                    bound={"FK_FUNCTION": "fl_echo", "FK_STORE_DB": "fk",
                           "FK_TOKEN_SECRET": "not-for-logs"},
                    extra={"entry_point": "echo", "max_instances": 5})


@pytest.fixture(autouse=True)
def _no_access_boundary_lookup(monkeypatch):
    # google-auth looks up a service account's "regional access boundary" at
    # iamcredentials.googleapis.com in a background thread; tests stay on
    # loopback, and the boundary plays no part in what is tested here.
    from google.auth import _regional_access_boundary_utils as rab
    monkeypatch.setattr(rab._RegionalAccessBoundaryManager, "maybe_start_refresh",
                        lambda self, credentials, request: None)


@pytest.fixture
def fake():
    f = FakeCloudFunctions().start()
    yield f
    f.stop()


def cluster_for(fake: FakeCloudFunctions, **over) -> GoogleCluster:
    kw = dict(kind="remote", project=fake.project, region=fake.region,
              api_endpoint=fake.base_url, secret_manager_endpoint=fake.base_url, auth=fake.service_account)
    kw.update(over)
    return GoogleCluster(**kw)


@pytest.fixture
def provider(fake, tmp_path):
    p = make_provider("gcf1", "google", cluster_for(fake), ProviderContext(state_dir=tmp_path))
    assert type(p) is CloudFunctionsProvider
    yield p
    p.close()


def test_deploy_creates_function_with_spec(fake, provider):
    art = make_artifact()
    res = provider.deploy(SPEC, art)
    assert not res.skipped
    fn = fake.functions["fl-echo"]
    assert fn["name"] == f"projects/{fake.project}/locations/{fake.region}/functions/fl-echo"
    assert fn["state"] == "ACTIVE" and fn["environment"] == "GEN_2"
    assert fn["buildConfig"]["runtime"] == "python311"
    assert fn["buildConfig"]["entryPoint"] == "echo"
    obj = fn["buildConfig"]["source"]["storageSource"]["object"]
    assert fake.uploads[obj] == art.data
    sc = fn["serviceConfig"]
    assert sc["availableMemory"] == "1024M" and sc["timeoutSeconds"] == 120
    assert sc["maxInstanceCount"] == 5
    # Bound configuration: none of it in the plain variables anyone who may view the function
    # reads, each value a Secret Manager secret the function names at a pinned version.
    assert not [k for k in sc.get("environmentVariables", {}) if k.startswith("FK_")]
    assert "not-for-logs" not in json.dumps(fn)
    pinned = {e["key"]: (e["secret"], e["version"]) for e in sc["secretEnvironmentVariables"]}
    assert pinned == {k: (f"fedkeeper-{fake.region}-fl-echo-{k}", "1") for k in SPEC.bound}
    for key, value in SPEC.bound.items():
        secret = fake.secrets[f"fedkeeper-{fake.region}-fl-echo-{key}"]
        assert secret["_versions"] == [value.encode()]
        assert secret["labels"] == {"fedkeeper_function": "fl_echo", "fedkeeper_region": fake.region}
    assert provider.call("fl_echo", {"n": 1}, timeout_s=30).result["fn"] == "fl_echo"   # the instance has them
    assert fn["labels"][SHA_LABEL] == art.sha256[:32] and fn["labels"]["fk-function"] == "fl_echo"
    assert res.url == sc["uri"]
    # the signed-URL upload: zip content type, no credentials attached
    (up,) = fake.upload_headers
    assert up["Content-Type"] == "application/zip" and "Authorization" not in up
    # every control-plane call came from the official client library
    assert fake.log and all("gapic/" in c["api_client"] for c in fake.log)
    assert fake.calls("POST", "functions:generateUploadUrl")
    assert fake.calls("POST", "/functions")[-1]["query"]["functionId"] == ["fl-echo"]
    assert fake.calls("GET", "/operations/")


def test_redeploy_same_hash_is_skipped_and_changes_update(fake, provider):
    art = make_artifact()
    provider.deploy(SPEC, art)
    n_uploads = len(fake.calls("POST", "generateUploadUrl"))
    again = provider.deploy(SPEC, art)
    assert again.skipped and len(fake.calls("POST", "generateUploadUrl")) == n_uploads
    assert not fake.calls("PATCH")

    changed = make_artifact(ECHO_MAIN.replace('"echo": p.get("n")', '"echo": -1'))
    res = provider.deploy(SPEC, changed)
    assert not res.skipped
    (patch,) = fake.calls("PATCH")
    mask = patch["query"]["updateMask"][0].split(",")
    assert "buildConfig.source" in mask and "labels" in mask
    assert fake.functions["fl-echo"]["labels"][SHA_LABEL] == changed.sha256[:32]
    out = provider.call("fl_echo", {"n": 3}, timeout_s=30)
    assert out.ok and out.result["echo"] == -1

    # a configuration change alone is deployed too
    bigger = FunctionSpec(**{**SPEC.__dict__, "memory_mb": 2048})
    assert not provider.deploy(bigger, changed).skipped
    assert fake.functions["fl-echo"]["serviceConfig"]["availableMemory"] == "2048M"
    assert provider.deploy(bigger, changed).skipped


def test_invoke_end_to_end_with_cached_id_token(fake, provider):
    provider.deploy(SPEC, make_artifact())
    invs = [provider.invoke("fl_echo", {"n": i}) for i in range(25)]
    outs = wait_all(provider, invs)
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    assert sorted(o.result["echo"] for o in outs) == list(range(25))
    assert all(o.result["fn"] == "fl_echo" for o in outs)
    # one token for the function's audience, not one per call
    assert fake.token_exchanges == 1
    assert all(o.platform_id == i.platform_id for o, i in zip(outs, invs))


def test_a_token_endpoint_outage_is_unreachable_and_refused_credentials_are_auth(fake, provider):
    """google-auth marks a 5xx from the token endpoint retryable (after its
    own tries): the clients invoked meanwhile are not failed for good, as
    with credentials the endpoint refuses."""
    provider.deploy(SPEC, make_artifact())
    fake.inject_error("POST", "/token", 503, "backend unavailable", times=10)
    (out,) = wait_all(provider, [provider.invoke("fl_echo", {"n": 1})])
    assert out.error_class is ErrorClass.UNREACHABLE and "token endpoint unavailable" in out.error
    fake._injected.clear()
    (ok,) = wait_all(provider, [provider.invoke("fl_echo", {"n": 2})])
    assert ok.ok and ok.result["echo"] == 2
    from google.auth import exceptions as auth_exc
    from fedkeeper.providers.gcf.errors import map_api_error
    assert map_api_error(auth_exc.RefreshError("invalid_grant"), "list").error_class is ErrorClass.AUTH
    assert map_api_error(auth_exc.RefreshError("503", retryable=True), "list").error_class is ErrorClass.UNREACHABLE


def test_a_failed_source_upload_does_not_quote_its_signed_url(fake, provider, monkeypatch):
    import requests
    from fedkeeper.providers.gcf import provider as gcf_provider

    def refused(url, **kw):
        raise requests.exceptions.ConnectionError(f"HTTPConnectionPool: Max retries exceeded with url: {url}")
    monkeypatch.setattr(gcf_provider.requests, "put", refused)
    with pytest.raises(ProviderError) as ei:
        provider.deploy(SPEC, make_artifact())
    assert ei.value.error_class is ErrorClass.UNREACHABLE and "source upload failed" in str(ei.value)
    assert "upload/" not in str(ei.value) and "?" not in str(ei.value), str(ei.value)


def test_fresh_provider_finds_the_url(fake, provider, tmp_path):
    provider.deploy(SPEC, make_artifact())
    other = CloudFunctionsProvider("gcf1", cluster_for(fake), ProviderContext(state_dir=tmp_path))
    try:
        assert other.call("fl_echo", {"n": 9}, timeout_s=30).result["echo"] == 9
    finally:
        other.close()


def test_data_plane_classes(fake, provider):
    provider.deploy(SPEC, make_artifact())
    crash, refused = wait_all(provider, [provider.invoke("fl_echo", {"crash": True}),
                                         provider.invoke("fl_echo", {"refuse": True})])
    assert crash.error_class is ErrorClass.DEVELOPER_ERROR
    assert refused.error_class is ErrorClass.APPLICATION_ERROR
    fake.reject_invocations = True
    (denied,) = wait_all(provider, [provider.invoke("fl_echo", {"n": 1})])
    assert denied.error_class is ErrorClass.AUTH
    fake.reject_invocations = False
    # the function vanished behind the keeper's back
    fake.functions.pop("fl-echo")
    (gone,) = wait_all(provider, [provider.invoke("fl_echo", {"n": 1})])
    assert gone.error_class is ErrorClass.FUNCTION_MISSING


def test_remove_and_exists(fake, provider):
    assert not provider.exists("fl_echo")
    provider.deploy(SPEC, make_artifact())
    assert provider.exists("fl_echo")
    assert provider.list_functions() == ["fl-echo"]
    assert provider.remove("fl_echo")
    assert "fl-echo" not in fake.functions and fake.calls("DELETE")
    assert not provider.exists("fl_echo")
    assert not provider.remove("fl_echo")
    with pytest.raises(ProviderError) as ei:
        provider.invoke("fl_echo", {"n": 1})
    assert ei.value.error_class is ErrorClass.FUNCTION_MISSING


@pytest.mark.parametrize("code,expected", [(403, ErrorClass.AUTH), (401, ErrorClass.AUTH),
                                           (429, ErrorClass.THROTTLED),
                                           (500, ErrorClass.PLATFORM_ERROR),
                                           (400, ErrorClass.PLATFORM_ERROR)])
def test_control_plane_errors_map_to_classes(fake, provider, code, expected):
    # times=3: on a 401 the client refreshes its credentials and tries again
    fake.inject_error("GET", "/functions/fl-echo", code, "injected", times=3,
                      headers={"Retry-After": "7"})
    with pytest.raises(ProviderError) as ei:
        provider.deploy(SPEC, make_artifact())
    assert ei.value.error_class is expected
    assert ei.value.status == code
    if expected is ErrorClass.THROTTLED:
        assert ei.value.retry_after == 7


def test_create_throttled(fake, provider):
    fake.inject_error("POST", "/functions", 429, "Quota exceeded for quota metric 'Write requests'")
    with pytest.raises(ProviderError) as ei:
        provider.deploy(SPEC, make_artifact())
    assert ei.value.error_class is ErrorClass.THROTTLED and "Quota" in str(ei.value)


def test_failed_operation(fake, provider):
    fake.fail_next_operation(3, "Build failed: missing dependency")
    with pytest.raises(ProviderError) as ei:
        provider.deploy(SPEC, make_artifact())
    assert "Build failed" in str(ei.value)
    # a FAILED function is redeployed, never skipped
    assert fake.functions["fl-echo"]["state"] == "FAILED"
    assert not provider.deploy(SPEC, make_artifact()).skipped


def test_bad_credentials_are_auth(fake, tmp_path):
    other = FakeCloudFunctions()  # a different key the API does not know
    try:
        p = CloudFunctionsProvider("x", cluster_for(fake, auth=other.service_account),
                                   ProviderContext(state_dir=tmp_path))
        with pytest.raises(ProviderError) as ei:
            p.exists("fl_echo")
        assert ei.value.error_class is ErrorClass.AUTH
        p.close()
    finally:
        other._server.server_close()
        other._tmp.cleanup()


def test_unreachable_endpoint(fake, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = CloudFunctionsProvider("x", cluster_for(fake, api_endpoint=f"http://127.0.0.1:{port}"),
                               ProviderContext(state_dir=tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        p.exists("fl_echo")
    assert ei.value.error_class is ErrorClass.UNREACHABLE
    assert time.monotonic() - t0 < 15
    p.close()


def test_helpers():
    assert function_id("fl_server_aggregator") == "fl-server-aggregator"
    with pytest.raises(ProviderError):
        function_id("1bad")
    assert memory_bytes("1024M") == memory_bytes("1024000k") and memory_bytes("1Gi") == 2**30
    assert map_api_error(TimeoutError(), "x").error_class is ErrorClass.TIMEOUT


def _nodeinfo_spec(secret: str) -> FunctionSpec:
    return FunctionSpec(name="nodeinfo", source="nodeinfo", memory_mb=256, timeout_s=60,
                        bound={"FK_FUNCTION": "nodeinfo", "FK_TOKEN_SECRET": secret, "FK_STORE_URL": "",
                               "FK_STORE_DB": "fk"})


def test_the_uploaded_zip_is_what_runs_with_its_requirements(fake, provider):
    """Cloud Functions' buildpack contract, as the fake follows it: the zip
    the v2 client uploads is unpacked, its requirements.txt is what the
    process gets (nothing else of the keeper's environment), and
    functions-framework serves its main.py."""
    art = build_artifact("nodeinfo", "http")
    provider.deploy(_nodeinfo_spec("s3cret"), art)
    obj = fake.functions["nodeinfo"]["buildConfig"]["source"]["storageSource"]["object"]
    assert fake.uploads[obj] == art.data
    out = provider.call("nodeinfo", signed("s3cret", {"function": "nodeinfo", "session": "t", "round": 0,
                                                      "client": None, "attempt": 1}), timeout_s=60)
    assert out.ok, out.error
    proc = psutil.Process(out.result["pid"])
    members = zipfile.ZipFile(io.BytesIO(art.data)).namelist()
    cwd = Path(proc.cwd())
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
        == sorted(members)
    cmd = proc.cmdline()
    assert cmd[1:3] == ["-I", "-S"] and any(c.endswith("function_host.py") for c in cmd)
    site = Path(cmd[cmd.index(next(c for c in cmd if c.endswith("bootstrap.py"))) + 1])
    pins = json.loads((site / "fedkeeper-runtime.json").read_text())["pins"]
    reqs = [line for line in zipfile.ZipFile(io.BytesIO(art.data)).read("requirements.txt").decode().splitlines()
            if line and not line.startswith("#")]
    assert pins == reqs


def test_an_import_the_requirements_do_not_declare_fails_the_deploy(fake, provider):
    base = build_artifact("nodeinfo", "http")
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base.data)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "main.py":
                data = b"import yaml  # installed for the keeper, not in the runtime\n" + data
            dst.writestr(info, data)
    art = Artifact(data=buf.getvalue(), sha256=hashlib.sha256(buf.getvalue()).hexdigest(), entry="http",
                   runtime="light")
    with pytest.raises(ProviderError) as e:
        provider.deploy(_nodeinfo_spec("s3cret"), art)
    assert "No module named 'yaml'" in str(e.value)


def test_source_over_the_size_limit_is_refused_before_upload(fake, provider, monkeypatch):
    from fedkeeper.providers.gcf import packaging
    monkeypatch.setattr(packaging, "SOURCE_LIMIT", 100)
    art = make_artifact()
    with pytest.raises(ProviderError) as e:
        provider.deploy(SPEC, art)
    assert e.value.error_class is ErrorClass.PAYLOAD_TOO_LARGE
    assert "fl_echo" in str(e.value) and str(len(art.data)) in str(e.value) and "100 bytes" in str(e.value)
    assert not fake.uploads and not fake.calls("POST", "generateUploadUrl")


def test_bound_values_are_versioned_secrets_kept_while_unchanged_and_removed_with_the_function(fake, provider):
    art = make_artifact()
    name = f"fedkeeper-{fake.region}-fl-echo-FK_FUNCTION"
    provider.deploy(SPEC, art)
    assert provider.deploy(SPEC, art).skipped   # same values: no new version, nothing updated
    assert all(len(s["_versions"]) == 1 for s in fake.secrets.values())
    # a changed value is a new version, a changed pin, an update the instance reads; the
    # version it replaced is destroyed once the function runs on the new one
    rotated = FunctionSpec(**{**SPEC.__dict__, "bound": {**SPEC.bound, "FK_FUNCTION": "fl_echo_2"}})
    assert not provider.deploy(rotated, art).skipped
    assert fake.secrets[name]["_versions"] == [None, b"fl_echo_2"]
    pinned = {e["key"]: e["version"]
              for e in fake.functions["fl-echo"]["serviceConfig"]["secretEnvironmentVariables"]}
    assert pinned == {"FK_FUNCTION": "2", "FK_STORE_DB": "1", "FK_TOKEN_SECRET": "1"}
    assert provider.call("fl_echo", {"n": 1}, timeout_s=30).result["fn"] == "fl_echo_2"
    # a function an earlier version deployed with its bound values in plain variables is updated
    fake.functions["fl-echo"]["serviceConfig"]["environmentVariables"]["FK_TOKEN_SECRET"] = "not-for-logs"
    assert not provider.deploy(rotated, art).skipped
    assert "FK_TOKEN_SECRET" not in fake.functions["fl-echo"]["serviceConfig"]["environmentVariables"]
    # an empty value is no secret (and no secret can hold it): a plain, empty variable
    empty = FunctionSpec(**{**SPEC.__dict__, "bound": {**SPEC.bound, "FK_STORE_URL": ""}})
    assert not provider.deploy(empty, art).skipped
    sc = fake.functions["fl-echo"]["serviceConfig"]
    assert sc["environmentVariables"]["FK_STORE_URL"] == ""
    assert "FK_STORE_URL" not in {e["key"] for e in sc["secretEnvironmentVariables"]}
    assert provider.deploy(empty, art).skipped
    # removing the function removes its secrets, and nobody else's: not another region's
    fake.secrets["someone-elses"] = {"name": "x", "labels": {}, "_versions": [b"v"]}
    fake.secrets["fedkeeper-us-east1-fl-echo-FK_FUNCTION"] = {
        "name": "y", "labels": {"fedkeeper_function": "fl_echo", "fedkeeper_region": "us-east1"}, "_versions": [b"v"]}
    assert provider.remove("fl_echo")
    assert set(fake.secrets) == {"someone-elses", "fedkeeper-us-east1-fl-echo-FK_FUNCTION"}
    assert not provider.remove("fl_echo")


@pytest.mark.parametrize("memory_mb, cpus", [(512, "1"), (2048, "1"), (8192, "2"), (16384, "4"), (32768, "8")])
def test_concurrency_asks_for_the_vcpus_the_memory_needs(fake, provider, memory_mb, cpus):
    """Several requests per instance need a whole vCPU, and more memory
    needs more: 1 vCPU with 8 GiB is refused by the service."""
    spec = FunctionSpec(**{**SPEC.__dict__, "memory_mb": memory_mb, "concurrency": 4})
    provider.deploy(spec, make_artifact())
    sc = fake.functions["fl-echo"]["serviceConfig"]
    assert sc["availableCpu"] == cpus and sc["maxInstanceRequestConcurrency"] == 4


def test_a_secret_whose_latest_version_was_destroyed_gets_a_new_one(fake, provider):
    art = make_artifact()
    provider.deploy(SPEC, art)
    name = f"fedkeeper-{fake.region}-fl-echo-FK_TOKEN_SECRET"
    fake.secrets[name]["_versions"][-1] = None   # an operator destroyed it: reading it fails
    assert not provider.deploy(SPEC, art).skipped
    assert fake.secrets[name]["_versions"] == [None, b"not-for-logs"]
    assert provider.call("fl_echo", {"n": 1}, timeout_s=30).ok
