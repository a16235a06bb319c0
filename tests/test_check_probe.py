"""`fedkeeper check`'s probe on a scripted provider: it is removed whatever
happened once its deploy was tried (a failed check must not leave it on a
cluster CI checks again and again), except where the deploy reached nothing
(an unreachable endpoint, a refused key: then on real clusters too), and the
JUnit report stays well-formed XML whatever text the errors carry."""
from __future__ import annotations

import socket
import textwrap
import xml.dom.minidom
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fedkeeper.check import PROBE, ClusterCheck, check_cluster, junit_xml
from fedkeeper.cli import main as cli
from fedkeeper.local import fabric
from fedkeeper.providers import ErrorClass, Outcome, ProviderError
from fedkeeper.providers.base import Artifact, FunctionSpec


class ScriptedProvider:
    platform = "openwhisk"

    def __init__(self, deploy_error=None, outcome=None, remove_error=None):
        self.deploy_error, self.outcome, self.remove_error = deploy_error, outcome, remove_error
        self.removed = []

    def deploy(self, spec, artifact):
        if self.deploy_error:
            raise self.deploy_error

    def call(self, name, payload, timeout_s):
        return self.outcome or Outcome("a1", True, result={"cpu_count": 2}, duration_ms=5.0)

    def remove(self, name):
        self.removed.append(name)
        if self.remove_error:
            raise self.remove_error
        return True


def runtime_for(provider):
    return SimpleNamespace(
        provider=lambda cluster: provider, secret="s" * 32,
        cfg=SimpleNamespace(providers=SimpleNamespace(clusters=lambda: {"c1": ("openwhisk", None)})),
        function_spec=lambda fn, section: FunctionSpec(name=fn, source=fn),
        artifact_for=lambda pl: Artifact(data=b"zip", sha256="0" * 64, entry="openwhisk"))


@pytest.mark.parametrize("provider, stage", [
    (ScriptedProvider(outcome=Outcome("a1", False, ErrorClass.DEVELOPER_ERROR, "boom")), "invoke"),
    (ScriptedProvider(deploy_error=ProviderError(ErrorClass.PLATFORM_ERROR, "half made")), "deploy"),
])
def test_a_failed_check_removes_its_probe(provider, stage):
    res = check_cluster(runtime_for(provider), "c1", keep=False)
    assert not res.ok and res.stage == stage and provider.removed == [PROBE]


def test_a_passing_check_removes_its_probe_and_a_failed_removal_fails_it(monkeypatch):
    import fedkeeper.check as check
    monkeypatch.setattr(check, "_introspect", lambda rt, cluster, res: None)
    good = ScriptedProvider()
    res = check_cluster(runtime_for(good), "c1", keep=False)
    assert res.ok and res.stage == "" and good.removed == [PROBE]
    stuck = ScriptedProvider(remove_error=ProviderError(ErrorClass.AUTH, "may not delete"))
    res = check_cluster(runtime_for(stuck), "c1", keep=False)
    assert not res.ok and res.stage == "remove" and "may not delete" in res.error
    kept = ScriptedProvider(outcome=Outcome("a1", False, ErrorClass.DEVELOPER_ERROR, "boom"))
    assert check_cluster(runtime_for(kept), "c1", keep=True).stage == "invoke" and kept.removed == []


def test_the_junit_report_is_well_formed_whatever_the_error_text():
    bad = ClusterCheck("c<1>&", platform="openwhisk", stage="invoke", error_class="developer_error",
                       error="\x1b[31mred\x1b[0m \x00 nul \udcff lone surrogate & <tag>")
    doc = xml.dom.minidom.parseString(junit_xml([bad, ClusterCheck("ok", platform="gcf", ok=True)]))
    failure = doc.getElementsByTagName("failure")[0]
    assert "red" in failure.getAttribute("message") and "<tag>" in failure.firstChild.data
    assert doc.getElementsByTagName("testcase")[0].getAttribute("name") == "c<1>&"


def test_a_failed_check_whose_probe_cannot_be_removed_says_so():
    provider = ScriptedProvider(outcome=Outcome("a1", False, ErrorClass.DEVELOPER_ERROR, "boom"),
                                remove_error=ProviderError(ErrorClass.AUTH, "may not delete"))
    res = check_cluster(runtime_for(provider), "c1", keep=False)
    assert res.stage == "invoke" and res.error.startswith("boom; nodeinfo may be left on the cluster")
    assert "may not delete" in res.error


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_deploy_refused_as_unreachable_or_unauthorised_reports_its_failure_once(tmp_path):
    """An endpoint that does not answer, and a platform that refuses the
    key (the local fabric, given a wrong one): the probe's removal is still
    tried (such a deploy may have made part of it on other platforms: Cloud
    Functions' secrets come first), fails the same way, and the reason is
    given once."""
    fab = fabric.fabric_up(tmp_path / "fab")
    try:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            providers:
              openwhisk:
                dead_ow:
                  base_url: http://127.0.0.1:{closed_port()}/api/v1/namespaces/guest/actions/
                  auth: {{ow_auth: "user:key"}}
                denied_ow:
                  base_url: {fab["url"]}/api/v1/namespaces/guest/actions/
                  auth: {{ow_auth: "nobody:wrong-key"}}
            scenarios:
              test: {{}}
            """))
        res = CliRunner().invoke(cli, ["check", "-c", str(cfg), "-s", "test"])
        assert res.exit_code == 1, res.output
        failed = {ln.split()[1]: ln for ln in res.stderr.splitlines() if ln.startswith("cluster ")}
        dead, denied = failed["dead_ow"], failed["denied_ow"]
        assert dead.startswith("cluster dead_ow failed at deploy: endpoint unreachable: ")
        assert denied.startswith("cluster denied_ow failed at deploy: authentication failed: ")
        assert dead.count("connection refused") == 1 and denied.count("401") == 1, failed
        for line in (dead, denied):
            assert line.endswith("; nodeinfo may be left on the cluster (removing it failed the same way)"), line
    finally:
        fabric.fabric_down(tmp_path / "fab")


def test_a_removal_failing_like_the_check_is_not_reported_twice():
    """The platform went away after the deploy: the probe may be left, and
    the reason is the one already given."""
    provider = ScriptedProvider(outcome=Outcome("a1", False, ErrorClass.UNREACHABLE, "connection refused"),
                                remove_error=ProviderError(ErrorClass.UNREACHABLE, "connection refused"))
    res = check_cluster(runtime_for(provider), "c1", keep=False)
    assert res.stage == "invoke" and provider.removed == [PROBE]
    assert res.error == f"connection refused; {PROBE} may be left on the cluster (removing it failed the same way)"
