"""A Kubernetes API server on loopback for tests: kmock's KubernetesEmulator,
extended where kmock 0.8 answers differently from a real API server
(every difference is listed in docs/knative.md), plus a stand-in for the
Knative controller.

  ApiServerEmulator   the emulator with the fixes below
  EmulatedCluster     runs it with kmock.Server in a background event loop
                      and hands out official-client ApiClients pointed at it
  FakeKnativeController
                      watches Services through the official client and
                      writes their status (URL, Ready condition) the way
                      Knative's controller does; what it reports is decided
                      by a callable per test
  FrameworkKubelet    a `decide` that behaves like the cluster running the
                      Service: it reads the source zip from the ConfigMap and
                      the env from the Secret, serves them with Google's
                      functions-framework (FrameworkHost) on loopback and
                      reports that URL
"""
from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
from kmock._internal import enums
from kubernetes import client

#: resources whose status is a subresource: the main resource ignores status
#: in writes, /status ignores everything else (as the real API server does)
STATUS_SUBRESOURCES = {"serving.knative.dev/v1/services", "v1/pods", "v1/nodes"}
#: what the API server accepts in one ConfigMap or Secret (data + binaryData)
OBJECT_DATA_LIMIT = 1024 * 1024
#: the API server's own request body limit (3 MiB); aiohttp's default is 1 MiB
REQUEST_BODY_LIMIT = 3 * 1024 * 1024
DECLARED = ("serving.knative.dev/v1/services", "v1/configmaps", "v1/secrets", "v1/nodes",
            "v1/pods", "v1/namespaces")


def _res_key(resource) -> str:
    group = resource.group or ""
    return f"{group}/{resource.version}/{resource.plural}" if group else \
        f"{resource.version}/{resource.plural}"


def _status_error(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details={})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `application/merge-patch+json` means)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _match_selector(labels: dict[str, str], selector: str) -> bool:
    """Equality- and set-based label selectors (k=v, k==v, k!=v, k, !k,
    k in (a,b), k notin (a,b)), comma = AND."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        if " notin " in raw or " in " in raw:
            neg = " notin " in raw
            key, _, vals = raw.partition(" notin " if neg else " in ")
            options = {v.strip() for v in vals.strip().strip("()").split(",")}
            inside = labels.get(key.strip()) in options
            if inside == neg:
                return False
        elif "!=" in raw:
            key, _, val = raw.partition("!=")
            if labels.get(key.strip()) == val.strip():
                return False
        elif "=" in raw:
            key, _, val = raw.replace("==", "=").partition("=")
            if labels.get(key.strip()) != val.strip():
                return False
        elif raw.startswith("!"):
            if raw[1:].strip() in labels:
                return False
        elif raw not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator answering like a real API server where FedKeeper
    depends on it."""

    _rv: int = attrs.field(default=0, init=False)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _current(self, request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(dict(self.objects[key].raw))

    def _prepare(self, request):
        """Rewrite the request body as the API server's own logic would
        before storing it: server-set metadata, generation, status rules."""
        res = _res_key(request.resource)
        data = copy.deepcopy(request.data) if isinstance(request.data, dict) else request.data
        if request.action == enums.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_rv()
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC) \
                .strftime("%Y-%m-%dT%H:%M:%SZ")
            if res in STATUS_SUBRESOURCES:
                data.pop("status", None)
            self._check_size(res, data)
        elif request.action == enums.action.UPDATE and isinstance(data, dict):
            current = self._current(request)
            if current is None:
                return request, data
            meta = data.setdefault("metadata", {})
            for server_set in ("uid", "creationTimestamp", "generation"):
                meta.pop(server_set, None)
            meta["resourceVersion"] = self._next_rv()
            if res in STATUS_SUBRESOURCES:
                if request.subresource == "status":
                    data = {"metadata": {"resourceVersion": meta["resourceVersion"]},
                            "status": data.get("status")}
                else:
                    data.pop("status", None)
            if "spec" in data and request.subresource != "status":
                if merge_patch(current.get("spec"), data["spec"]) != current.get("spec"):
                    meta["generation"] = int((current.get("metadata") or {})
                                             .get("generation") or 1) + 1
            self._check_size(res, merge_patch(current, data))
        if data is not request.data:
            # kmock routes requests by identity (the recorded request must be
            # this very object), so the frozen request is rewritten in place
            object.__setattr__(request, "data", data)
        return request, data

    @staticmethod
    def _check_size(res: str, obj: dict[str, Any]) -> None:
        if res not in ("v1/configmaps", "v1/secrets"):
            return
        total = 0
        for field in ("data", "binaryData"):
            for k, v in (obj.get(field) or {}).items():
                if v is None:
                    continue
                raw = base64.b64decode(v) if (field == "binaryData" or res == "v1/secrets") \
                    else str(v).encode()
                total += len(k) + len(raw)
        if total > OBJECT_DATA_LIMIT:
            kind = "ConfigMap" if res == "v1/configmaps" else "Secret"
            raise _status_error(422, "Invalid", f"{kind} is invalid: []: Too long: must have at "
                                f"most {OBJECT_DATA_LIMIT} bytes")

    async def _handle(self, request):
        try:
            if request.resource is not None and request.action in (enums.action.CREATE,
                                                                   enums.action.UPDATE):
                request, _ = self._prepare(request)
            response = await super()._handle(request)
        except kmock.KubernetesError as exc:
            # kmock raises these before its own error rendering when the
            # emulator is not entered as a context manager (-> plain 500)
            return await self._render_error(exc)
        if request.action == enums.action.CREATE and isinstance(response, aiohttp.web.Response) \
                and response.status == 200:
            # a real API server answers a create with 201 Created; kubernetes
            # >= 31 deserializes only the documented 201 body (else: None)
            response.set_status(201)
        return response

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [i for i in result["items"]
                               if _match_selector((i.get("metadata") or {}).get("labels") or {},
                                                  selector)]
        result["metadata"]["resourceVersion"] = str(self._rv)
        return result


class _ApiServerHttp(aiohttp.test_utils.RawTestServer):
    """aiohttp's raw test server with the API server's body limit, so that
    an oversized ConfigMap reaches the validation (422) as on a real
    cluster instead of aiohttp's 413."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        srv = aiohttp.web.Server(self._handler, loop=self._loop, debug=debug, **kwargs)

        def factory(message, payload, protocol, writer, task):
            return aiohttp.web.BaseRequest(message, payload, protocol, writer, task, srv._loop,
                                           client_max_size=REQUEST_BODY_LIMIT)

        srv.request_factory = factory
        return aiohttp.web.ServerRunner(srv, debug=debug, **kwargs)


class EmulatedCluster:
    """The emulator behind kmock.Server on 127.0.0.1, in its own thread."""

    def __init__(self, resources=DECLARED):
        self.emulator = ApiServerEmulator()
        for r in resources:
            self.emulator.resources[r] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the emulated API server did not start")
        if self._error is not None:
            raise self._error
        self._apis: list[client.ApiClient] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator, server_cls=_ApiServerHttp) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def api_client(self) -> client.ApiClient:
        conf = client.Configuration()
        conf.host = self.url
        api = client.ApiClient(conf)
        self._apis.append(api)
        return api

    def stop(self) -> None:
        for api in self._apis:
            api.close()
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # ---------------------------------------------------------- seeding

    def add_node(self, name: str, *, cpu: str = "4", memory: str = "16Gi",
                 allocatable_cpu: str | None = None, allocatable_memory: str | None = None,
                 gpus: int = 0, labels: dict[str, str] | None = None, ready: bool = True,
                 unschedulable: bool = False, taints: list[dict[str, str]] | None = None) -> None:
        core = client.CoreV1Api(self.api_client())
        spec: dict[str, Any] = {"unschedulable": unschedulable}
        if taints:
            spec["taints"] = taints
        core.create_node({"apiVersion": "v1", "kind": "Node",
                          "metadata": {"name": name, "labels": dict(labels or {})},
                          "spec": spec})
        cap = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            cap["nvidia.com/gpu"] = str(gpus)
        alloc = dict(cap, cpu=allocatable_cpu or cpu, memory=allocatable_memory or memory)
        core.patch_node_status(name, {"status": {
            "capacity": cap, "allocatable": alloc,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "reason": "KubeletReady" if ready else "KubeletNotReady"}]}})

    def add_pod(self, namespace: str, name: str, *, labels: dict[str, str], ready: bool = True,
                node: str | None = None, phase: str = "Running") -> None:
        core = client.CoreV1Api(self.api_client())
        core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]}})
        core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


# ----------------------------------------------------------- Knative stand-in

Decision = dict  # {"ready": bool, "url": str, "reason": str, "message": str} or None (pending)


class FakeKnativeController:
    """Plays Knative's controller: for every Service whose generation it has
    not yet observed, asks `decide(service)` and writes the outcome to the
    Service's status subresource through the official client."""

    def __init__(self, cluster: EmulatedCluster, namespace: str,
                 decide: Callable[[dict[str, Any]], Decision | None], poll_s: float = 0.02):
        self.cluster, self.namespace, self.decide, self.poll_s = cluster, namespace, decide, poll_s
        self.api = client.CustomObjectsApi(cluster.api_client())
        self.errors: list[BaseException] = []
        self.seen: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-knative", daemon=True)

    def __enter__(self) -> "FakeKnativeController":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                items = self.api.list_namespaced_custom_object(
                    "serving.knative.dev", "v1", self.namespace, "services")["items"]
            except Exception as exc:  # keep reconciling, as a controller does
                self.errors.append(exc)
                continue
            for svc in items:
                gen = int(svc["metadata"].get("generation") or 1)
                if int((svc.get("status") or {}).get("observedGeneration") or 0) >= gen:
                    continue
                try:
                    decision = self.decide(svc)
                    if decision is None:
                        continue
                    self._write(svc, gen, decision)
                    self.seen.append((svc["metadata"]["name"], gen))
                except Exception as exc:
                    self.errors.append(exc)

    def _write(self, svc: dict[str, Any], gen: int, d: Decision) -> None:
        name = svc["metadata"]["name"]
        ready = d.get("ready")
        cond = {"type": "Ready", "status": "True" if ready else ("False" if ready is False
                                                                  else "Unknown"),
                "lastTransitionTime": datetime.datetime.now(datetime.UTC)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}
        if d.get("reason"):
            cond["reason"] = d["reason"]
        if d.get("message"):
            cond["message"] = d["message"]
        status: dict[str, Any] = {"observedGeneration": gen, "conditions": [cond],
                                  "latestCreatedRevisionName": f"{name}-{gen:05d}"}
        if ready:
            status["url"] = d["url"]
            status["address"] = {"url": f"http://{name}.{self.namespace}.svc.cluster.local"}
            status["latestReadyRevisionName"] = f"{name}-{gen:05d}"
        self.api.patch_namespaced_custom_object_status(
            "serving.knative.dev", "v1", self.namespace, "services", name, {"status": status})

    def set_status(self, name: str, decision: Decision) -> None:
        """Report a later change (e.g. the revision failing), as the
        controller would without any spec change."""
        svc = self.api.get_namespaced_custom_object("serving.knative.dev", "v1", self.namespace,
                                                    "services", name)
        self._write(svc, int(svc["metadata"].get("generation") or 1), decision)


class FrameworkKubelet:
    """A `decide` that runs the Service's function like the cluster would:
    source zip from the mounted ConfigMap, env (plain and from the Secret)
    from the container spec, served by functions-framework on loopback."""

    def __init__(self, cluster: EmulatedCluster, namespace: str, root: Path):
        from fedkeeper.local.cloud_functions.host import FrameworkHost
        self.core = client.CoreV1Api(cluster.api_client())
        self.namespace = namespace
        self.host = FrameworkHost(root)
        self.started: list[str] = []

    def __call__(self, svc: dict[str, Any]) -> Decision:
        name = svc["metadata"]["name"]
        pod = svc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        zip_bytes = None
        for mount in container.get("volumeMounts") or []:
            vol = volumes.get(mount["name"]) or {}
            if "configMap" in vol:
                cm = self.core.read_namespaced_config_map(vol["configMap"]["name"], self.namespace)
                zip_bytes = base64.b64decode((cm.binary_data or {})["source.zip"])
        if zip_bytes is None:
            return {"ready": False, "reason": "ContainerMissing",
                    "message": f"image {container['image']} cannot be run by this test kubelet"}
        env: dict[str, str] = {}
        secrets: dict[str, dict[str, str]] = {}
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
                continue
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["name"] not in secrets:
                sec = self.core.read_namespaced_secret(ref["name"], self.namespace)
                secrets[ref["name"]] = {k: base64.b64decode(v).decode()
                                        for k, v in (sec.data or {}).items()}
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        env.pop("PYTHONPATH", None)  # the host points it at the unpacked source itself
        target = env.get("FUNCTION_TARGET", name)
        hosted, _started = self.host.serve(
            name, target=target, source_zip=zip_bytes,
            sha256=hashlib.sha256(zip_bytes).hexdigest(), env=env,
            threads=max(1, int(pod.get("containerConcurrency") or 4)),
            timeout_s=pod.get("timeoutSeconds"))
        self.started.append(name)
        return {"ready": True, "url": hosted.url.rstrip("/"), "reason": None}

    def stop(self) -> None:
        self.host.stop_all()


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
