"""The provider base of every platform whose functions are HTTP endpoints
(Cloud Functions 2nd gen, Knative): a URL and timeout per deployed
function, and invocation and tracking through one HttpInvoker."""
from __future__ import annotations

import uuid
from typing import Any, Callable, ClassVar, Mapping, Sequence

from .base import Invocation, Outcome, Provider, ProviderContext
from .http_invoke import HttpInvoker


class HttpFunctionProvider(Provider):
    """What every platform whose functions are HTTP endpoints shares: a URL
    and timeout per deployed function, invocation through one HttpInvoker
    with a keeper-generated execution id, and tracking of those calls.

    A subclass says how to find a function's URL (`_lookup_url`), may add
    headers (`_auth_headers`), route requests (`_target`) and classify its
    platform's own answers (`status_hook`)."""

    #: header carrying the keeper's execution id (functions-framework adopts it)
    execution_id_header: ClassVar[str] = "Function-Execution-Id"
    #: platform-specific HTTP answer rules (http_answers.StatusHook)
    status_hook: ClassVar[Callable | None] = None
    #: added to a function's timeout for the HTTP read timeout
    invoke_grace_s: ClassVar[float] = 10.0
    #: largest request body the platform accepts (None: no check)
    max_request_bytes: ClassVar[int | None] = None
    default_workers: ClassVar[int] = 64

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self._urls: dict[str, str] = {}
        self._timeouts: dict[str, float] = {}
        hook = type(self).status_hook
        self._invoker = HttpInvoker(max_workers=self._max_workers(), auth_headers=self._auth_headers,
                                    status_hook=hook, execution_id_header=self.execution_id_header,
                                    name=f"{self.platform}-{cluster_name}")

    def _max_workers(self) -> int:
        """Requests in flight at most: the cluster's `configurations.concurrency`."""
        conf = getattr(self.cluster, "configurations", None)
        n = getattr(conf, "concurrency", None) if conf is not None else None
        try:
            return max(1, min(256, int(n))) if n else self.default_workers
        except (TypeError, ValueError):
            return self.default_workers

    def _auth_headers(self, url: str) -> Mapping[str, str]:
        return {}

    def _target(self, url: str) -> tuple[str, dict[str, str]]:
        """Where to send a request for `url`, and extra headers."""
        return url, {}

    def _remember(self, name: str, url: str, timeout_s: float | None) -> None:
        self._urls[name] = url
        if timeout_s:
            self._timeouts[name] = float(timeout_s)

    def _lookup_url(self, name: str) -> tuple[str, float | None]:
        """(URL, timeout) of a deployed function, from the platform; raises
        ProviderError(FUNCTION_MISSING) when it is not deployed."""
        raise NotImplementedError

    def function_url(self, name: str) -> str:
        url = self._urls.get(name)
        if not url:
            url, timeout = self._lookup_url(name)
            self._remember(name, url, timeout)
        return url

    def invoke(self, name: str, payload: dict[str, Any]) -> Invocation:
        url, headers = self._target(self.function_url(name))
        # The execution id is ours, so the Invocation is known before any answer.
        execution_id = uuid.uuid4().hex
        headers[self.execution_id_header] = execution_id
        timeout = self._timeouts.get(name, 60.0) + self.invoke_grace_s
        return self._invoker.submit(name, url, payload, timeout_s=timeout, headers=headers,
                                    platform_id=execution_id, max_bytes=self.max_request_bytes)

    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        return self._invoker.done(pending)

    def wait(self, inv: Invocation, timeout_s: float, poll_s: float = 0.05) -> Outcome:
        """An HTTP function answers the request itself: a helper call waits
        for that answer, seen the moment it comes, instead of polling."""
        done = self.track([inv]) if self._invoker_of(inv).wait_for(inv, timeout_s) else []
        return done[0] if done else self.timed_out(inv, timeout_s)

    def _invoker_of(self, inv: Invocation) -> HttpInvoker:
        """The invoker that sent `inv`."""
        return self._invoker

    def close(self) -> None:
        self._invoker.close()
