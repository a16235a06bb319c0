"""One contract, every provider implementation that can run here.

The same tests drive:
  openwhisk   the OpenWhisk provider (remote code path) against the local fabric
  gcf-v2      the Cloud Functions provider against the fake v2 API (official
              client; the uploaded zip served by functions-framework)
  gcf-local   the Cloud Functions provider's local host (functions-framework)
  knative     the Knative provider against the emulated Kubernetes API server,
              a stand-in controller and a functions-framework kubelet

Covered: deploy, an unchanged redeploy skipped by hash, invoke, tracking many
at once, remove, and the classified errors (auth, missing function, payload
too large, throttled, timeout). Where a platform has no such failure (the
local host has no credentials; Knative sets no request size limit), its
harness says so and the test is generated only for the others: a new
platform passes every test that applies to it, or it is not done.
"""
from __future__ import annotations

import hashlib
import io
import time
import zipfile
from typing import Any, Callable

import pytest

from fedkeeper.config import GoogleCluster, KnativeCluster, OpenWhiskCluster
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider
from fedkeeper.providers import make_provider
from fedkeeper.providers.base import (Artifact, ErrorClass, FunctionSpec, Outcome, Provider, ProviderContext,
                                      ProviderError)
from fedkeeper.providers.gcf import CloudFunctionsProvider
from fedkeeper.providers.knative import KnativeProvider
from fedkeeper.providers.openwhisk import OpenWhiskProvider

from fixtures_fabric import fabric_dir, fabric_info  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.timeout(180)

ENTRY = "fk_probe"

OW_MAIN = '''
import time
VERSION = %r
def main(args):
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return {"echo": args.get("n"), "version": VERSION}
'''

HTTP_MAIN = '''
import time
import flask
import functions_framework
VERSION = %r
@functions_framework.http
def fk_probe(request):
    p = request.get_json(silent=True) or {}
    if p.get("throttle"):
        # what a front end answers when it sheds load
        return flask.Response("rate exceeded", status=429, headers={"Retry-After": "2"})
    if p.get("sleep"):
        time.sleep(float(p["sleep"]))
    return {"echo": p.get("n"), "version": VERSION}
'''


def probe(entry: str, version: str = "v1") -> Artifact:
    name, src = ("__main__.py", OW_MAIN) if entry == "openwhisk" else ("main.py", HTTP_MAIN)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), src % version)
    data = buf.getvalue()
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry=entry)


def spec(name: str, **kw) -> FunctionSpec:
    base = dict(name=name, source=name, memory_mb=256, timeout_s=30, concurrency=4,
                bound={"FK_FUNCTION": name}, extra={"entry_point": ENTRY})
    base.update(kw)
    return FunctionSpec(**base)


class Harness:
    """One implementation: how to make its provider, and what of the
    contract's failures its platform has."""

    name = ""
    has_auth = True             # the platform checks credentials
    payload_limit: int | None = None  # request bytes the platform refuses beyond

    def provider(self) -> Provider: ...

    def bad_credentials(self, p: Provider) -> Callable[[], Any]:
        """A call that must fail with AUTH."""
        raise NotImplementedError

    def throttle(self, p: Provider, name: str) -> Callable[[], Any]:
        """A call that must come back THROTTLED."""
        return lambda: p.call(name, {"throttle": True}, timeout_s=30)

    def expect_timeout(self, p: Provider) -> None:
        """HTTP platforms: the keeper gives up at the function's timeout
        plus a grace; keep the grace short here."""
        p.invoke_grace_s = 0.5

    def close(self) -> None: ...


class OpenWhiskFabric(Harness):
    name = "openwhisk"
    payload_limit = 1024 * 1024

    def __init__(self, info: dict, tmp):
        self.info, self.tmp = info, tmp

    def _cluster(self, auth: str) -> OpenWhiskCluster:
        return OpenWhiskCluster(base_url=self.info["url"], auth={"ow_auth": auth})

    def provider(self) -> Provider:
        p = make_provider("ow", "openwhisk", self._cluster(self.info["auth"]), ProviderContext(state_dir=self.tmp))
        assert type(p) is OpenWhiskProvider
        return p

    def bad_credentials(self, p):
        user = self.info["auth"].split(":", 1)[0]
        wrong = OpenWhiskProvider("ow-wrong", self._cluster(f"{user}:not-the-key"),
                                  ProviderContext(state_dir=self.tmp))
        return lambda: wrong.deploy(spec("probe_auth"), probe("openwhisk"))

    def throttle(self, p, name):
        def limit(per_minute: int) -> None:
            # the fabric's admin API, beside the OpenWhisk API it serves
            r = p._session.put(f"{p.api_host}/_fabric/limits", params={"namespace": p.namespace},
                               json={"invocationsPerMinute": per_minute}, timeout=10)
            assert r.status_code == 200, r.text

        def go():
            limit(1)
            try:
                for _ in range(3):
                    p.invoke(name, {"n": 0})
            finally:
                limit(60000)
        return go

    def expect_timeout(self, p):
        pass  # the fabric ends the activation at the action's limit


class CloudFunctionsV2Fake(Harness):
    name = "gcf-v2"
    payload_limit = CloudFunctionsProvider.max_request_bytes

    def __init__(self, tmp):
        from fake_gcf_api import FakeCloudFunctions
        self.fake = FakeCloudFunctions().start()
        self.tmp = tmp

    def provider(self) -> Provider:
        f = self.fake
        c = GoogleCluster(kind="remote", project=f.project, region=f.region, api_endpoint=f.base_url,
                          secret_manager_endpoint=f.base_url, auth=f.service_account)
        p = make_provider("gcf", "google", c, ProviderContext(state_dir=self.tmp))
        assert type(p) is CloudFunctionsProvider
        return p

    def bad_credentials(self, p):
        p.deploy(spec("probe_auth"), probe("http"))

        def go():
            self.fake.reject_invocations = True
            try:
                return p.call("probe_auth", {"n": 1}, timeout_s=30)
            finally:
                self.fake.reject_invocations = False
        return go

    def close(self):
        self.fake.stop()


class CloudFunctionsLocal(Harness):
    name = "gcf-local"
    has_auth = False  # functions-framework on loopback takes no credentials
    payload_limit = CloudFunctionsProvider.max_request_bytes

    def __init__(self, tmp):
        self.tmp = tmp

    def provider(self) -> Provider:
        return LocalCloudFunctionsProvider("gcf-local", GoogleCluster(kind="local"),
                                           ProviderContext(state_dir=self.tmp))


class KnativeEmulated(Harness):
    name = "knative"
    has_auth = False  # the emulated API server takes no credentials
    payload_limit = None  # Knative sets no request size limit of its own

    def __init__(self, tmp):
        from kube_emulator import EmulatedCluster, FakeKnativeController, FrameworkKubelet
        self.cluster = EmulatedCluster()
        self.kubelet = FrameworkKubelet(self.cluster, "fl", tmp / "kubelet")
        self.ctl = FakeKnativeController(self.cluster, "fl", self.kubelet).__enter__()
        self.tmp = tmp

    def provider(self) -> Provider:
        c = KnativeCluster(api_server=self.cluster.url, image="registry.example/python:3.11", namespace="fl",
                           ready_timeout_s=30)
        p = make_provider("kn", "knative", c, ProviderContext(state_dir=self.tmp))
        assert type(p) is KnativeProvider
        return p

    def close(self):
        self.ctl.__exit__(None, None, None)
        self.kubelet.stop()
        self.cluster.stop()


HARNESSES = ("openwhisk", "gcf-v2", "gcf-local", "knative")


@pytest.fixture(scope="module")
def _google_boundary():
    # google-auth looks a service account's access boundary up at Google in a
    # background thread; these tests stay on loopback.
    from google.auth import _regional_access_boundary_utils as rab
    mp = pytest.MonkeyPatch()
    mp.setattr(rab._RegionalAccessBoundaryManager, "maybe_start_refresh", lambda self, c, r: None)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def harnesses(request, tmp_path_factory, _google_boundary):
    made: dict[str, Harness] = {}

    def get(name: str) -> Harness:
        if name not in made:
            tmp = tmp_path_factory.mktemp(name)
            made[name] = {"openwhisk": lambda: OpenWhiskFabric(request.getfixturevalue("fabric_info"), tmp),
                          "gcf-v2": lambda: CloudFunctionsV2Fake(tmp),
                          "gcf-local": lambda: CloudFunctionsLocal(tmp),
                          "knative": lambda: KnativeEmulated(tmp)}[name]()
        return made[name]
    yield get
    for h in made.values():
        h.close()


@pytest.fixture
def impl(request, harnesses):
    h = harnesses(request.param)
    p = h.provider()
    yield h, p
    p.close()


def entry(p: Provider) -> str:
    return p.entry


def wait_all(p: Provider, invs, timeout_s: float = 60.0) -> list[Outcome]:
    pending = {i.platform_id: i for i in invs}
    done: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for o in p.track(list(pending.values())):
            done[o.platform_id] = o
            pending.pop(o.platform_id, None)
        if pending:
            time.sleep(0.02)
    assert not pending, f"{len(pending)} invocations never finished"
    return [done[i.platform_id] for i in invs]


def error_class(call: Callable[[], Any]) -> ErrorClass:
    """The class of the failure, raised at once or reported as the outcome."""
    try:
        out = call()
    except ProviderError as exc:
        return exc.error_class
    assert isinstance(out, Outcome) and not out.ok, out
    return out.error_class


def _params(applies: Callable[[type[Harness]], bool] = lambda h: True):
    classes = {"openwhisk": OpenWhiskFabric, "gcf-v2": CloudFunctionsV2Fake, "gcf-local": CloudFunctionsLocal,
               "knative": KnativeEmulated}
    return pytest.mark.parametrize("impl", [n for n in HARNESSES if applies(classes[n])], indirect=True)


# ------------------------------------------------------------------ lifecycle

@_params()
def test_deploy_skip_invoke_remove(impl):
    h, p = impl
    name = "probe_life"
    first = p.deploy(spec(name), probe(entry(p)))
    assert not first.skipped and p.exists(name)
    assert p.deploy(spec(name), probe(entry(p))).skipped  # same content hash: nothing uploaded
    out = p.call(name, {"n": 7}, timeout_s=60)
    assert out.ok, out.error
    assert out.result == {"echo": 7, "version": "v1"}
    changed = p.deploy(spec(name), probe(entry(p), "v2"))
    assert not changed.skipped
    assert p.call(name, {"n": 8}, timeout_s=60).result == {"echo": 8, "version": "v2"}
    assert p.remove(name) is True
    assert not p.exists(name)
    assert p.remove(name) is False
    assert error_class(lambda: p.call(name, {"n": 1}, timeout_s=30)) is ErrorClass.FUNCTION_MISSING


@_params()
def test_tracks_many_invocations_at_once(impl):
    h, p = impl
    name = "probe_many"
    p.deploy(spec(name), probe(entry(p)))
    invs = [p.invoke(name, {"n": i}) for i in range(24)]
    assert len({i.platform_id for i in invs}) == len(invs)
    outs = wait_all(p, invs)
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    assert [o.result["echo"] for o in outs] == list(range(24))
    p.remove(name)


# ------------------------------------------------------------------ classified errors

@_params()
def test_missing_function(impl):
    h, p = impl
    assert error_class(lambda: p.call("probe_never_deployed", {"n": 1}, timeout_s=30)) \
        is ErrorClass.FUNCTION_MISSING


@_params(lambda h: h.has_auth)
def test_wrong_credentials_are_auth_errors(impl):
    h, p = impl
    assert error_class(h.bad_credentials(p)) is ErrorClass.AUTH


@_params(lambda h: h.payload_limit is not None)
def test_payload_too_large(impl):
    h, p = impl
    name = "probe_big"
    p.deploy(spec(name), probe(entry(p)))
    big = {"n": 1, "pad": "x" * (h.payload_limit + 1024)}
    assert error_class(lambda: p.call(name, big, timeout_s=60)) is ErrorClass.PAYLOAD_TOO_LARGE
    assert p.call(name, {"n": 2}, timeout_s=60).ok  # a normal call still goes through
    p.remove(name)


@_params(lambda h: h.payload_limit is None)
def test_no_request_limit_means_large_payloads_arrive(impl):
    h, p = impl
    name = "probe_big"
    p.deploy(spec(name), probe(entry(p)))
    out = p.call(name, {"n": 3, "pad": "x" * (2 * 1024 * 1024)}, timeout_s=60)
    assert out.ok and out.result["echo"] == 3, out.error
    p.remove(name)


@_params()
def test_throttled(impl):
    h, p = impl
    name = "probe_throttle"
    p.deploy(spec(name), probe(entry(p)))
    assert error_class(h.throttle(p, name)) is ErrorClass.THROTTLED
    p.remove(name)


@_params()
def test_timeout(impl):
    h, p = impl
    name = "probe_slow"
    p.deploy(spec(name, timeout_s=1), probe(entry(p)))
    h.expect_timeout(p)
    assert error_class(lambda: p.call(name, {"n": 1, "sleep": 4}, timeout_s=60)) is ErrorClass.TIMEOUT
    p.remove(name)



@_params()
def test_upload_plan_needs_no_provider_and_states_its_limit(impl):
    h, p = impl
    art = probe(entry(p))
    plan = type(p).plan_upload(p.cluster_name, p.cluster, spec("probe_plan"), art)
    assert plan.function == "probe_plan" and plan.platform == p.platform and plan.target
    assert plan.bytes >= len(art.data) and plan.within_limit
    assert plan.limit_bytes is not None and plan.limit_source  # every platform here has an upload limit
    assert not p.exists("probe_plan")  # nothing was deployed
