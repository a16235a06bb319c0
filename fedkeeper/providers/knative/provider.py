"""Knative Serving provider: functions as Knative Services, driven through
the official `kubernetes` client, invoked over HTTP.

Control plane (CustomObjectsApi / CoreV1Api):
  deploy   Secret (bound config) -> ConfigMap (source zip, generic image
           only) -> Service create or merge-patch -> bounded wait for the
           Ready condition of the current generation -> status.url.
           Skipped when the Service carries the same config hash and is
           Ready.
  remove   delete the Service, its ConfigMap and its Secret.
Data plane: one HTTP POST per invocation through the shared HttpInvoker,
exactly as for Cloud Functions; the answer is the outcome.

The manifests themselves are built in `manifests.py`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from .. import kube
from ..base import (Artifact, DeployResult, ErrorClass, FunctionSpec, Invocation, Outcome,
                    ProviderContext, ProviderError, UploadPlan)
from ..http_answers import error_snippet
from ..http_provider import HttpFunctionProvider
from . import manifests as m
from . import metrics
from ..prometheus import ClusterMetrics
from .prices import DEFAULT_PRICES

log = logging.getLogger(__name__)

#: Knative's default max-revision-timeout-seconds (config-defaults)
DEFAULT_MAX_TIMEOUT_S = 600
READY_TIMEOUT_S = 300.0
#: the answer may arrive a little after the revision's own timeout (the
#: queue-proxy answers 504 then); keep listening that much longer
INVOKE_GRACE_S = 10.0
FUNCTIONS_FRAMEWORK_CRASH = "X-Google-Status"


def knative_status_hook(status: int, headers: Mapping[str, str], body: bytes):
    """Knative-specific answers; the generic rules of http_answers do the rest."""
    if status == 500 and (headers.get(FUNCTIONS_FRAMEWORK_CRASH) or "").strip().lower() == "crash":
        # functions-framework marks an uncaught exception in the function
        text = error_snippet(body) or "function crashed"
        return ErrorClass.DEVELOPER_ERROR, f"crash: {text}"
    if status == 503:
        text = error_snippet(body)
        if "overload" in text.lower() or "queue full" in text.lower():
            # the queue-proxy's or activator's breaker is full: back off
            return ErrorClass.THROTTLED, f"HTTP 503 (Knative overload): {text}"
        return ErrorClass.PLATFORM_ERROR, (f"HTTP 503 from the Knative activator/queue-proxy "
                                           f"(no ready revision?): {text or 'service unavailable'}")
    return None


class KnativeProvider(HttpFunctionProvider):
    platform = "knative"
    entry = "http"
    default_prices = DEFAULT_PRICES  # prices.py
    status_hook = staticmethod(knative_status_hook)

    ready_timeout_s = READY_TIMEOUT_S
    invoke_grace_s = INVOKE_GRACE_S

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self._api = None
        self._api_lock = threading.Lock()
        configured = getattr(cluster, "ready_timeout_s", None)
        if configured:
            self.ready_timeout_s = float(configured)

    @classmethod
    def cluster_metrics(cls, cluster_name: str, cluster: Any, window: str | None, actions,
                        timeout_s: float = 10.0) -> ClusterMetrics:
        return metrics.cluster_metrics(cluster_name, cluster, window, actions, timeout_s)

    @classmethod
    def plan_upload(cls, cluster_name: str, cluster: Any, spec: FunctionSpec,
                    artifact: Artifact) -> UploadPlan:
        return m.upload_plan(spec, artifact, cluster=cluster_name,
                             namespace=getattr(cluster, "namespace", None) or "default",
                             generic_image=getattr(cluster, "image", None),
                             image_prefix=getattr(cluster, "image_registry", None))

    @property
    def namespace(self) -> str:
        return getattr(self.cluster, "namespace", None) or "default"

    def api(self):
        """The shared ApiClient, created on first use (thread-safe)."""
        with self._api_lock:
            if self._api is None:
                self._api = kube.api_client(self.cluster)
            return self._api

    def _custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self.api())

    def _core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api())

    # ------------------------------------------------------- API primitives

    def _get_service(self, svc: str) -> dict[str, Any] | None:
        try:
            return self._custom().get_namespaced_custom_object(
                m.GROUP, m.VERSION, self.namespace, m.PLURAL, svc,
                _request_timeout=kube.REQUEST_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise kube.map_api_error(exc, f"read Knative service {svc}") from None

    def _create_core(self, kind: str, body: dict[str, Any]) -> None:
        """Create a ConfigMap or Secret named by its content (manifests.py):
        one that exists already holds the same content, and is kept."""
        name = body["metadata"]["name"]
        try:
            getattr(self._core(), f"create_namespaced_{kind}")(
                self.namespace, body, _request_timeout=kube.REQUEST_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "status", None) == 409:   # AlreadyExists
                return
            # never the body: a Secret's data would end up in a log line
            raise kube.map_api_error(exc, f"write {kind} {name}") from None

    def _delete_function_objects(self, kind: str, function: str, keep: str | None = None) -> int:
        """Delete the function's ConfigMaps or Secrets, all but `keep`."""
        try:
            found = getattr(self._core(), f"list_namespaced_{kind}")(
                self.namespace, label_selector=m.function_selector(function),
                _request_timeout=kube.REQUEST_TIMEOUT).items
        except Exception as exc:
            raise kube.map_api_error(exc, f"list {kind}s of {function}") from None
        names = [o.metadata.name for o in found if o.metadata.name != keep]
        return sum(1 for name in names if self._delete_core(kind, name))

    def _delete_core(self, kind: str, name: str) -> bool:
        try:
            getattr(self._core(), f"delete_namespaced_{kind}")(
                name, self.namespace, _request_timeout=kube.REQUEST_TIMEOUT)
            return True
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return False
            raise kube.map_api_error(exc, f"delete {kind} {name}") from None

    # -------------------------------------------------------------- deploy

    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        t0 = time.monotonic()
        self._require_entry(artifact)
        desired = m.desired_service(spec, artifact, namespace=self.namespace,
                                    generic_image=getattr(self.cluster, "image", None),
                                    image_prefix=getattr(self.cluster, "image_registry", None))
        if not spec.image:  # checked before anything is written
            m.check_source_size(artifact, spec.name, self.cluster_name)
        svc = desired["metadata"]["name"]
        want_hash = desired["metadata"]["annotations"][m.CONFIG_ANNOTATION]
        current = self._get_service(svc)
        if current is not None:
            owner = ((current.get("metadata") or {}).get("labels") or {}).get(m.FUNCTION_LABEL)
            if owner is not None and owner != m.label_value(spec.name):
                raise ProviderError(ErrorClass.DEVELOPER_ERROR,
                                    f"Knative service {svc} belongs to function {owner!r}, not "
                                    f"{spec.name!r} (their names map to the same service name)")
            have_hash = ((current.get("metadata") or {}).get("annotations") or {}).get(
                m.CONFIG_ANNOTATION)
            cond = m.ready_condition(current)
            failed = m.observed_current(current) and cond is not None and cond.get("status") == "False"
            if have_hash == want_hash and failed:
                # Its last rollout failed (an image pull that failed then, say): a
                # new revision of the same configuration is the retry, as a redeploy asks.
                desired["spec"]["template"]["metadata"]["annotations"][m.RETRY_ANNOTATION] = str(time.time_ns())
            elif have_hash == want_hash:
                # unchanged: nothing to write; a rollout still under way is
                # waited for, a failed one is reported
                ready = self._wait_ready(svc, spec.name, current)
                url = self._service_url(ready)
                self._remember(spec.name, url, spec.timeout_s)
                return DeployResult(spec.name, skipped=True, seconds=time.monotonic() - t0,
                                    url=url)
        secret = m.bound_secret(spec, namespace=self.namespace) if spec.bound else None
        source = None if spec.image else m.source_configmap(spec, artifact, namespace=self.namespace)
        for kind, body in (("secret", secret), ("config_map", source)):
            if body is not None:
                self._create_core(kind, body)
        custom = self._custom()
        try:
            if current is None:
                custom.create_namespaced_custom_object(
                    m.GROUP, m.VERSION, self.namespace, m.PLURAL, desired,
                    _request_timeout=kube.REQUEST_TIMEOUT)
            else:
                custom.patch_namespaced_custom_object(
                    m.GROUP, m.VERSION, self.namespace, m.PLURAL, svc,
                    m.service_patch(current, desired), _request_timeout=kube.REQUEST_TIMEOUT)
        except Exception as exc:
            raise kube.map_api_error(exc, f"deploy {spec.name} as Knative service {svc}") from None
        ready = self._wait_ready(svc, spec.name, None)
        # The new revision serves: the code and values earlier ones named can
        # go. Left behind, they cost a little room; the deploy itself stands.
        for kind, body in (("secret", secret), ("config_map", source)):
            try:
                self._delete_function_objects(kind, spec.name, keep=body["metadata"]["name"] if body else None)
            except ProviderError as exc:
                log.warning("deployed %s on %s, but its earlier %ss were not deleted: %s", spec.name,
                            self.cluster_name, kind.replace("_", ""), exc)
        url = self._service_url(ready)
        self._remember(spec.name, url, spec.timeout_s)
        log.info("deployed %s on %s as Knative service %s (%s)", spec.name, self.cluster_name,
                 svc, "created" if current is None else "updated")
        return DeployResult(spec.name, skipped=False, seconds=time.monotonic() - t0, url=url)

    def _wait_ready(self, svc: str, function: str, current: dict[str, Any] | None
                    ) -> dict[str, Any]:
        """The Service once Ready=True for its current generation. Ends on
        Ready=False (Knative's reason and message in the error) or after
        `ready_timeout_s`."""
        deadline = time.monotonic() + self.ready_timeout_s
        started = time.monotonic()
        delay = 0.05
        obj = current
        while True:
            if obj is None:
                obj = self._get_service(svc)
                if obj is None:
                    raise ProviderError(ErrorClass.FUNCTION_MISSING,
                                        f"Knative service {svc} disappeared during deployment",
                                        status=404)
            cond = m.ready_condition(obj)
            if m.observed_current(obj) and cond is not None:
                if cond.get("status") == "True" and self._service_url(obj, strict=False):
                    return obj
                if cond.get("status") == "False":
                    raise m.not_ready_error(function, cond)
            if time.monotonic() >= deadline:
                raise m.not_ready_error(function, cond if m.observed_current(obj) else None,
                                        waited=time.monotonic() - started)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)
            obj = None

    def _service_url(self, obj: Mapping[str, Any], strict: bool = True) -> str | None:
        status = obj.get("status") or {}
        url = status.get("url") or (status.get("address") or {}).get("url")
        if not url and strict:
            name = (obj.get("metadata") or {}).get("name")
            raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                f"Knative service {name} is ready but reports no URL")
        return url

    # -------------------------------------------------------- remove/exists

    def remove(self, name: str) -> bool:
        self._urls.pop(name, None)
        svc = m.service_name(name)
        try:
            self._custom().delete_namespaced_custom_object(
                m.GROUP, m.VERSION, self.namespace, m.PLURAL, svc,
                _request_timeout=kube.REQUEST_TIMEOUT)
            existed = True
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                raise kube.map_api_error(exc, f"remove Knative service {svc}") from None
            existed = False
        self._delete_function_objects("config_map", name)
        self._delete_function_objects("secret", name)
        return existed

    def exists(self, name: str) -> bool:
        return self._get_service(m.service_name(name)) is not None

    def list_functions(self) -> list[str]:
        """Logical names of the functions FedKeeper deployed in the namespace."""
        try:
            res = self._custom().list_namespaced_custom_object(
                m.GROUP, m.VERSION, self.namespace, m.PLURAL,
                label_selector="app.kubernetes.io/managed-by=fedkeeper",
                _request_timeout=kube.REQUEST_TIMEOUT)
        except Exception as exc:
            raise kube.map_api_error(exc, "list Knative services") from None
        out = []
        for item in res.get("items") or []:
            labels = (item.get("metadata") or {}).get("labels") or {}
            out.append(labels.get(m.FUNCTION_LABEL) or item["metadata"]["name"])
        return sorted(out)

    # -------------------------------------------------------------- invoke

    def _lookup_url(self, name: str) -> tuple[str, float | None]:
        obj = self._get_service(m.service_name(name))
        if obj is None:
            raise ProviderError(ErrorClass.FUNCTION_MISSING,
                                f"function {name} is not deployed on {self.cluster_name}",
                                status=404)
        cond = m.ready_condition(obj)
        if cond is None or cond.get("status") != "True":
            raise m.not_ready_error(name, cond)
        timeout = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}) \
            .get("timeoutSeconds")
        return self._service_url(obj), float(timeout) if timeout else None

    def _target(self, url: str) -> tuple[str, dict[str, str]]:
        """Where to send the request. With `ingress` configured (the
        gateway's address, when the Service's host name does not resolve
        from the keeper), the request goes there with the Service's host in
        the Host header, which is how Knative's ingress routes."""
        ingress = getattr(self.cluster, "ingress", None)
        if not ingress:
            return url, {}
        u, g = urlsplit(url), urlsplit(ingress if "://" in ingress else f"http://{ingress}")
        return urlunsplit((g.scheme, g.netloc, u.path or "/", u.query, "")), {"Host": u.netloc}

    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        done = super().track(pending)
        if not done:
            return done
        by_id = {inv.platform_id: inv.function for inv in pending}
        checked: dict[str, str | None] = {}
        for out in done:
            if out.ok or out.error_class not in (ErrorClass.FUNCTION_MISSING,
                                                 ErrorClass.PLATFORM_ERROR,
                                                 ErrorClass.UNREACHABLE):
                continue
            fn = by_id.get(out.platform_id)
            if fn is None:
                continue
            # the route may be gone or the revision broken: forget the URL
            # so the next invoke reads the Service again, and say why
            self._urls.pop(fn, None)
            if fn not in checked:
                checked[fn] = self._service_diagnosis(fn)
            if checked[fn]:
                out.error = f"{out.error} ({checked[fn]})"
        return done

    def _service_diagnosis(self, function: str) -> str | None:
        try:
            obj = self._get_service(m.service_name(function))
        except ProviderError:
            return None
        if obj is None:
            return "the Knative service does not exist"
        cond = m.ready_condition(obj)
        if cond is None or cond.get("status") == "True":
            return None
        return str(m.not_ready_error(function, cond).args[0])

    def limits(self) -> dict[str, Any]:
        return {"max_timeout_s": DEFAULT_MAX_TIMEOUT_S, "max_in_flight": self._max_workers()}

    def close(self) -> None:
        super().close()
        with self._api_lock:
            api, self._api = self._api, None
        if api is not None:
            try:
                api.close()
            except Exception:  # closing must never mask the keeper's own error
                pass
