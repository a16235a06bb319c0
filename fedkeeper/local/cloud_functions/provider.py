"""Cloud Functions on one machine: the same HTTP function sources, served by
Google's functions-framework on loopback, invoked through exactly the code
path of the real provider (minus the ID token, which loopback does not
need)."""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any, Mapping, Sequence

from ...providers.base import (Artifact, DeployResult, ErrorClass, FunctionSpec, Invocation, Outcome,
                               ProviderContext, ProviderError)
from ...providers.gcf.provider import CloudFunctionsProvider
from ...providers.http_invoke import ANSWER_LOST, HttpInvoker
from . import capacity
from .host import DEFAULT_IN_FLIGHT, FrameworkHost, HostError


def _instance_may_be_gone(out: Outcome) -> bool:
    """Whether an outcome may mean the function's process died: no
    connection, or one lost after the request was sent (http_invoke), not
    an answer the function gave (whose host is asked nothing)."""
    return out.error_class is ErrorClass.UNREACHABLE or (
        out.error_class is ErrorClass.PLATFORM_ERROR and (out.error or "").startswith(ANSWER_LOST))


class LocalCloudFunctionsProvider(CloudFunctionsProvider):
    """Each function has its own invoker, as many requests in flight as the
    function is configured for (capacity.in_flight_cap: what Cloud Functions
    v2 would accept for it); the cluster's invoker serves functions whose
    capacity is not known (deployed by an older keeper)."""

    # Priced like the platform it stands in for, so that a sweep on
    # loopback estimates what the same run would cost there.
    default_prices = CloudFunctionsProvider.default_prices

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self.host = FrameworkHost(ctx.state_dir / "gcf" / cluster_name)
        self._lease = self.host.hold(auto_stop=not ctx.keep_local_services)
        self._caps: dict[str, int] = {}
        self._invokers: dict[str, HttpInvoker] = {}
        self._invokers_lock = threading.Lock()

    def _max_workers(self) -> int:
        # the cluster's invoker: loopback calls are cheap, what limits them
        # is the function side
        return DEFAULT_IN_FLIGHT

    def _cluster_cap(self) -> int | None:
        conf = getattr(self.cluster, "configurations", None)
        return getattr(conf, "concurrency", None) if conf is not None else None

    def _invoker_for(self, name: str) -> HttpInvoker:
        cap = self._caps.get(name)
        with self._invokers_lock:
            # Fixed at the function's first call: its calls are tracked by
            # the invoker that made them, so a function first called with an
            # unknown capacity stays on the cluster's invoker, and a redeploy
            # with another capacity takes effect for the next provider (the
            # next keeper command).
            inv = self._invokers.get(name)
            if inv is None and not cap:
                inv = self._invokers[name] = self._invoker
            if inv is None:
                inv = self._invokers[name] = HttpInvoker(
                    max_workers=cap, auth_headers=self._auth_headers,
                    status_hook=type(self).status_hook, execution_id_header=self.execution_id_header,
                    name=f"{self.platform}-{self.cluster_name}-{name}")
            return inv

    def invoke(self, name: str, payload: dict[str, Any]) -> Invocation:
        url, headers = self._target(self.function_url(name))   # learns the function's capacity
        invoker = self._invoker_for(name)
        if invoker is self._invoker:
            return super().invoke(name, payload)
        execution_id = uuid.uuid4().hex
        headers[self.execution_id_header] = execution_id
        timeout = self._timeouts.get(name, 60.0) + self.invoke_grace_s
        return invoker.submit(name, url, payload, timeout_s=timeout, headers=headers,
                              platform_id=execution_id, max_bytes=self.max_request_bytes)

    def _invoker_of(self, inv: Invocation) -> HttpInvoker:
        return self._invokers.get(inv.function, self._invoker)

    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        by_invoker: dict[int, tuple[HttpInvoker, list[Invocation]]] = {}
        for inv in pending:
            invoker = self._invoker_of(inv)
            by_invoker.setdefault(id(invoker), (invoker, []))[1].append(inv)
        out: list[Outcome] = []
        for invoker, invs in by_invoker.values():
            out += invoker.done(invs)
        function_of = {inv.platform_id: inv.function for inv in pending}
        return [self._instance_gone(o, function_of[o.platform_id]) if _instance_may_be_gone(o) else o
                for o in out]

    def _instance_gone(self, out: Outcome, name: str) -> Outcome:
        """A call that could not reach its function, or lost its answer,
        because the function's process is gone (killed, out of memory):
        FUNCTION_MISSING, so that the keeper deploys it again (which starts
        a new process) and retries, where Cloud Functions would start a new
        instance itself. While the process lives, the outcome stands."""
        if self.host.lookup(name) is not None:
            return out
        self._urls.pop(name, None)
        return dataclasses.replace(
            out, error_class=ErrorClass.FUNCTION_MISSING,
            error=f"function {name}'s process on {self.cluster_name} is gone ({out.error})")

    def _auth_headers(self, url: str) -> Mapping[str, str]:
        return {}

    def _faults_for(self, name: str) -> dict[str, Any] | None:
        faults = getattr(self.cluster, "faults", None)
        if faults is None or not faults.applies_to(name):
            return None
        plan = faults.plan()
        if not (plan.draws_faults or plan.slow_ms):
            return None
        # The host draws with the local platforms' one fault model; the
        # function's name is part of each draw, so functions do not fail in
        # lockstep.
        return plan.to_json()

    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        t0 = time.monotonic()
        self._require_entry(artifact)
        in_flight = capacity.in_flight_cap(spec.concurrency, spec.extra.get("max_instances"),
                                           self._cluster_cap())
        try:
            hosted, started = self.host.serve(
                spec.name, target=spec.extra.get("entry_point") or spec.name,
                source_zip=artifact.data, sha256=artifact.sha256, env=spec.bound,
                faults=self._faults_for(spec.name),
                threads=capacity.running_cap(spec.concurrency, spec.memory_mb),
                in_flight=in_flight, timeout_s=spec.timeout_s)
        except HostError as exc:
            # the function's own import error, for example: it cannot run
            raise ProviderError(ErrorClass.DEVELOPER_ERROR, str(exc)) from None
        self._remember(spec.name, hosted.url, spec.timeout_s)
        self._caps[spec.name] = hosted.in_flight or in_flight
        return DeployResult(spec.name, skipped=not started, seconds=time.monotonic() - t0,
                            url=hosted.url)

    def remove(self, name: str) -> bool:
        self._urls.pop(name, None)
        return self.host.stop(name)

    def exists(self, name: str) -> bool:
        return self.host.lookup(name) is not None

    def list_functions(self) -> list[str]:
        return self.host.names()

    def function_url(self, name: str) -> str:
        url = self._urls.get(name)
        if url:
            return url
        hosted = self.host.lookup(name)
        if hosted is None:
            raise ProviderError(ErrorClass.FUNCTION_MISSING,
                                f"function {name} is not deployed on {self.cluster_name}", status=404)
        self._remember(name, hosted.url, hosted.timeout_s)
        if hosted.in_flight:
            self._caps[name] = hosted.in_flight
        return hosted.url

    def limits(self) -> dict[str, Any]:
        return {"max_request_bytes": 32 * 1024 * 1024,
                "max_in_flight": max([self._max_workers(), *self._caps.values()])}

    def close(self) -> None:
        super().close()
        with self._invokers_lock:
            invokers, self._invokers = list(self._invokers.values()), {}
        for invoker in invokers:
            if invoker is not self._invoker:     # super().close() closed it
                invoker.close()
        # The last open provider of the cluster stops its processes, unless
        # local services are kept (ctx.keep_local_services): a later keeper
        # process reuses them then, and `remove` or `fedkeeper fabric down`
        # ends them.
        self.host.release(self._lease)
        self._lease = None
