"""Cloud Functions on one machine: the same HTTP function sources, served by
Google's functions-framework on loopback, invoked through exactly the code
path of the real provider (minus the ID token, which loopback does not
need)."""
from __future__ import annotations

import time
import zlib
from typing import Any, Mapping

from ..providers.base import Artifact, DeployResult, ErrorClass, FunctionSpec, ProviderContext, ProviderError
from ..providers.gcf.provider import CloudFunctionsProvider
from .functions_framework import FrameworkHost, HostError


class LocalCloudFunctionsProvider(CloudFunctionsProvider):
    # Priced like the platform it stands in for, so that a sweep on
    # loopback estimates what the same run would cost there.
    default_prices = CloudFunctionsProvider.default_prices

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self.host = FrameworkHost(ctx.state_dir / "gcf" / cluster_name)

    def _max_workers(self) -> int:
        # loopback calls are cheap; what limits them is the function side
        return 64

    def _auth_headers(self, url: str) -> Mapping[str, str]:
        return {}

    def _faults_for(self, name: str) -> dict[str, Any] | None:
        faults = getattr(self.cluster, "faults", None)
        if faults is None or not faults.applies_to(name):
            return None
        if not (faults.crash or faults.timeout or faults.throttle or faults.slow_ms):
            return None
        # one seeded sequence per function, so functions do not fail in lockstep
        seed = (int(faults.seed) * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF
        return {"crash": faults.crash, "timeout": faults.timeout, "throttle": faults.throttle,
                "slow_ms": faults.slow_ms, "seed": seed}

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
        # ctx.keep_local_services leaves the processes running so a later
        # keeper process reuses them (their state file lets `remove`, or
        # `fedkeeper fabric down`, end them then). Off by default.
        if not self.ctx.keep_local_services:
            self.host.stop_all()
