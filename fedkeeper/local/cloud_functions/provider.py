"""Cloud Functions on one machine: the same HTTP function sources, served by
Google's functions-framework on loopback, invoked through exactly the code
path of the real provider (minus the ID token, which loopback does not
need)."""
from __future__ import annotations

import time
from typing import Any, Mapping

from ...providers.base import Artifact, DeployResult, ErrorClass, FunctionSpec, ProviderContext, ProviderError
from ...providers.gcf.provider import CloudFunctionsProvider
from .host import FrameworkHost, HostError


class LocalCloudFunctionsProvider(CloudFunctionsProvider):
    # Priced like the platform it stands in for, so that a sweep on
    # loopback estimates what the same run would cost there.
    default_prices = CloudFunctionsProvider.default_prices

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self.host = FrameworkHost(ctx.state_dir / "gcf" / cluster_name)
        self._lease = self.host.hold(auto_stop=not ctx.keep_local_services)

    def _max_workers(self) -> int:
        # loopback calls are cheap; what limits them is the function side
        return 64

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
        try:
            hosted, started = self.host.serve(
                spec.name, target=spec.extra.get("entry_point") or spec.name,
                source_zip=artifact.data, sha256=artifact.sha256, env=spec.bound,
                faults=self._faults_for(spec.name), threads=max(8, int(spec.concurrency)),
                timeout_s=spec.timeout_s)
        except HostError as exc:
            # the function's own import error, for example: it cannot run
            raise ProviderError(ErrorClass.DEVELOPER_ERROR, str(exc)) from None
        self._remember(spec.name, hosted.url, spec.timeout_s)
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
        return hosted.url

    def limits(self) -> dict[str, Any]:
        return {"max_request_bytes": 32 * 1024 * 1024, "max_in_flight": self._max_workers()}

    def close(self) -> None:
        super().close()
        # The last open provider of the cluster stops its processes, unless
        # local services are kept (ctx.keep_local_services): a later keeper
        # process reuses them then, and `remove` or `fedkeeper fabric down`
        # ends them.
        self.host.release(self._lease)
        self._lease = None
