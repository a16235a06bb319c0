"""The keeper's client of the fl_insights function: a signed query, a small
answer or the id of a GridFS blob holding a larger one."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from flcommon import store as fs
from flcommon.auth import signed
from flcommon.blobs import BlobError

from ..providers import ErrorClass, ProviderError
from ..runtime import Placement, Runtime

FUNCTION = "fl_insights"
WHATS = ("contributions", "clusters", "reliability")


class InsightsError(RuntimeError):
    """A query could not be answered (unknown session, function failure)."""


class InsightsClient:
    """Queries fl_insights on the scenario's insights cluster."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.cluster = rt.insights_cluster()
        section = rt.cfg.providers.clusters()[self.cluster][0]
        self.placement = Placement(self.cluster, section, rt.function_spec(FUNCTION, section))
        self._deployed = False

    @property
    def platform(self) -> str:
        return self.rt.provider(self.cluster).platform

    def deploy(self) -> None:
        """Deploy fl_insights as configured; unchanged deployments are skipped."""
        self.rt.phase(f"deploying {FUNCTION} on {self.cluster} (skipped when unchanged)")
        (_, _, err), = self.rt.deploy([self.placement])
        if err is not None:
            raise InsightsError(f"deploying {FUNCTION} on {self.cluster} failed: {err}")
        self._deployed = True

    def query(self, session: str, what: str, rounds: tuple[int, int] | None = None, k: int | None = None,
              cache: bool | str = True) -> dict[str, Any]:
        """The function's answer, with `data` filled in (read from the store
        when it came as a reference), `result_fetched_bytes` (what that read
        cost), `wall_seconds` (keeper side, end to end), `cluster` and `platform`."""
        if what not in WHATS:
            raise InsightsError(f"unknown query {what!r}; expected one of {', '.join(WHATS)}")
        if not self._deployed:
            self.deploy()
        payload: dict[str, Any] = {"function": FUNCTION, "session": session, "what": what}
        if rounds is not None:
            payload["rounds"] = [int(rounds[0]), int(rounds[1])]
        if k is not None:
            payload["k"] = int(k)
        if cache is not True:
            payload["cache"] = cache
        t0 = time.perf_counter()
        self.rt.phase(f"asking {FUNCTION} on {self.cluster} (a cold start takes seconds)")
        result, cold = self._call(signed(self.rt.secret, payload))
        fetched = 0
        if "result_ref" in result:
            result["data"], fetched = self._fetch(result)
        result.update(result_fetched_bytes=fetched, wall_seconds=time.perf_counter() - t0,
                      cluster=self.cluster, platform=self.platform, cold_start=cold)
        return result

    def _call(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
        provider = self.rt.provider(self.cluster)
        timeout = self.placement.spec.timeout_s + self.rt.scenario.training.attempt_grace_s
        for attempt in (1, 2):
            try:
                # Polled closely at first: a warm answer takes milliseconds.
                out = provider.call(FUNCTION, body, timeout_s=timeout, poll_s=0.01)
            except ProviderError as exc:
                if exc.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                    self.deploy()  # removed behind our back: put it back once
                    continue
                raise InsightsError(f"{FUNCTION} on {self.cluster}: {exc}") from None
            result = out.result or {}
            if out.ok and "error" not in result:
                return dict(result), out.cold_start
            if out.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                self.deploy()
                continue
            raise InsightsError(str(result.get("error") or out.error or f"{FUNCTION} failed"))
        raise InsightsError(f"{FUNCTION} is missing on {self.cluster} even after deploying it")

    def _fetch(self, result: dict[str, Any]) -> tuple[Any, int]:
        """A large answer: a uint8 array blob holding its JSON, checked against its hash."""
        try:
            arrays = fs.get_arrays(self.rt.store.db, ObjectId(result["result_ref"]))
        except (BlobError, InvalidId, TypeError) as exc:
            raise InsightsError(f"the answer's blob {result.get('result_ref')} cannot be read: {exc}") from None
        raw = arrays[0].tobytes() if len(arrays) == 1 else b""
        if hashlib.sha256(raw).hexdigest() != result.get("result_sha256"):
            raise InsightsError(f"the answer's blob {result['result_ref']} does not match its hash")
        return json.loads(raw), len(raw)

