"""Cloud Functions on one machine: `provider` (the `google` provider of
`kind: local`, the real provider's code path over loopback), `host` (the
function processes of a cluster: start, reuse, lease, stop), `capacity`
(requests in flight and running at once, from the function's configuration)
and `function_host` (one function's process: functions-framework behind a
threaded server, with injected faults)."""
from __future__ import annotations

from . import capacity
from .host import FrameworkHost, HostedFunction, HostError
from .provider import LocalCloudFunctionsProvider

__all__ = ["FrameworkHost", "HostError", "HostedFunction", "LocalCloudFunctionsProvider", "capacity"]
