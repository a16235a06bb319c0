"""`fedkeeper check`: can every cluster deploy and run a function?

Deploys `nodeinfo` to each selected cluster concurrently, invokes it twice
(the first call is cold, the second warm), removes it unless asked to keep it,
and reports one row per cluster. Failures are classified by the provider
(unreachable, auth, TLS, ...) and named per cluster.
"""
from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from flcommon.auth import signed

from .providers import ErrorClass, ProviderError
from .runtime import Placement, Runtime

PROBE = "nodeinfo"


@dataclass
class ClusterCheck:
    cluster: str
    platform: str = ""
    ok: bool = False
    stage: str = ""                  # where it failed: deploy / invoke / remove
    error_class: str | None = None
    error: str | None = None
    deploy_s: float | None = None
    cold_ms: float | None = None
    warm_ms: float | None = None
    host: dict[str, Any] = field(default_factory=dict)
    # For clusters on Kubernetes: nodes and ready invoker/activator pods as
    # the kubernetes client reads them, and mismatches with `configurations`.
    kube: dict[str, Any] = field(default_factory=dict)


def _explain(exc: BaseException) -> tuple[str | None, str]:
    if isinstance(exc, ProviderError):
        hint = {
            ErrorClass.UNREACHABLE: "endpoint unreachable",
            ErrorClass.AUTH: "authentication failed",
            ErrorClass.FUNCTION_MISSING: "function not found",
            ErrorClass.THROTTLED: "throttled by the platform",
        }.get(exc.error_class, exc.error_class.value.replace("_", " "))
        if exc.error_class == ErrorClass.UNREACHABLE and "TLS" in exc.args[0]:
            hint = "TLS failure"
        return exc.error_class.value, f"{hint}: {exc.args[0]}"
    return None, f"{type(exc).__name__}: {exc}"


def check_cluster(rt: Runtime, cluster: str, keep: bool, timeout_s: float = 120.0) -> ClusterCheck:
    res = ClusterCheck(cluster)
    provider = None
    try:
        provider = rt.provider(cluster)
        res.platform = provider.platform
        section = rt.cfg.providers.clusters()[cluster][0]
        pl = Placement(cluster, section, rt.function_spec(PROBE, section))
        artifact = rt.artifact_for(pl)   # built here: deploy_s is the platform's time
        res.stage = "deploy"
        t0 = time.perf_counter()
        provider.deploy(pl.spec, artifact)
        res.deploy_s = time.perf_counter() - t0
        res.stage = "invoke"
        for which in ("cold_ms", "warm_ms"):
            payload = signed(rt.secret, {"function": PROBE, "session": "check", "round": 0,
                                         "client": None, "attempt": 1 if which == "cold_ms" else 2})
            t0 = time.perf_counter()
            out = provider.call(PROBE, payload, timeout_s=timeout_s)
            elapsed = (time.perf_counter() - t0) * 1000
            if not out.ok or (out.result or {}).get("error"):
                res.error_class = out.error_class.value if out.error_class else "application_error"
                res.error = out.error or (out.result or {}).get("error") or "invocation failed"
                return res
            setattr(res, which, out.duration_ms if out.duration_ms is not None else elapsed)
            res.host = {k: v for k, v in (out.result or {}).items() if k != "error"}
        res.ok = True
    except Exception as exc:  # reported per cluster; the others go on
        res.error_class, res.error = _explain(exc)
    finally:
        # The probe goes whatever happened once its deploy was tried (a
        # failed check must not leave it on the cluster), unless kept: even
        # a deploy refused as unreachable or unauthorised may have made part
        # of it (Cloud Functions' secrets, Knative's Secret come first).
        if provider is not None and res.stage in ("deploy", "invoke") and not keep:
            _remove_probe(provider, res)
    if res.ok:
        res.stage = ""
        _introspect(rt, cluster, res)
    return res


def _remove_probe(provider, res: ClusterCheck) -> None:
    try:
        provider.remove(PROBE)
    except Exception as exc:
        error_class, why = _explain(exc)
        if res.ok:   # the check itself passed: its failing clean-up is the failure
            res.ok, res.stage = False, "remove"
            res.error_class, res.error = error_class, why
        elif (error_class is not None and error_class == res.error_class) or (res.error and why in res.error):
            # the report says the probe may still be there, once, not its error twice
            res.error = f"{res.error}; {PROBE} may be left on the cluster (removing it failed the same way)"
        else:
            res.error = f"{res.error}; {PROBE} may be left on the cluster: {why}"


def _introspect(rt: Runtime, cluster: str, res: ClusterCheck) -> None:
    from .providers import kube
    ccfg = kube.kube_clusters(rt.cfg).get(cluster)
    if ccfg is None:
        return
    try:
        info = kube.cluster_info(ccfg)
    except Exception as exc:  # the function check passed; report, don't fail
        res.kube = {"error": _explain(exc)[1]}
        return
    res.kube = {k: info.get(k) for k in ("configurations", "openwhisk", "knative", "warnings")}


def run_checks(rt: Runtime, clusters: list[str], keep: bool) -> list[ClusterCheck]:
    for c in clusters:  # create providers (and local services) before fanning out
        try:
            rt.provider(c)
        except Exception:
            pass
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(clusters)))) as ex:
        return list(ex.map(lambda c: check_cluster(rt, c, keep), clusters))


# What XML 1.0 cannot carry (control characters but tab, newline and carriage
# return; lone surrogates): an error text may hold them (ANSI colour codes
# from a platform's log), and a report holding them is not well-formed.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def junit_xml(results: list[ClusterCheck]) -> bytes:
    suite = ET.Element("testsuite", name="fedkeeper.check", tests=str(len(results)),
                       failures=str(sum(not r.ok for r in results)))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=_xml_text(f"fedkeeper.check.{r.platform or 'unknown'}"),
                             name=_xml_text(r.cluster),
                             time=f"{(r.deploy_s or 0) + ((r.cold_ms or 0) + (r.warm_ms or 0)) / 1000:.3f}")
        if not r.ok:
            f = ET.SubElement(case, "failure", type=r.error_class or "error",
                              message=_xml_text(f"{r.stage}: {r.error}"))
            f.text = _xml_text(f"cluster {r.cluster} failed at {r.stage}: {r.error}")
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)


def as_dicts(results: list[ClusterCheck]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
