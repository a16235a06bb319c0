"""How many requests a local Cloud Functions function takes, from what it is
configured for.

Two numbers, on two sides of the loopback:

* in flight (the keeper's side): what Cloud Functions v2 would accept for
  the function at once, its instance concurrency (`concurrency`,
  max_instance_request_concurrency) times its instances (`max_instances`,
  100 when unset, v2's default), bounded by MAX_IN_FLIGHT: one keeper
  thread and one host connection per request must stay affordable on one
  machine. The keeper queues what is over it.
* running (the host's side): the one local instance stands in for all of
  the function's instances but has one instance's memory, so the requests
  that run the function at once are bounded by that memory as well; the
  others are accepted and wait at the host for a slot. Without that bound
  500 requests let into one 128 MB instance ran it out of memory.
"""
from __future__ import annotations

from typing import Any

#: Cloud Functions v2's max instances when a function does not set it
DEFAULT_MAX_INSTANCES = 100
#: requests in flight to one function at most, whatever it is configured for
MAX_IN_FLIGHT = 1000
#: requests one local instance runs at once even at concurrency 1: it stands
#: in for several single-request instances of the cloud
MIN_RUNNING = 8
#: what the instance's process takes before any request (interpreter,
#: functions-framework, numpy, the store client), and what each request
#: running in it may add (a decoded model, its update, buffers)
INSTANCE_BASE_MB = 64
PER_REQUEST_MB = 8


def _positive(value: Any, default: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return default
    return n if n > 0 else default


def in_flight_cap(concurrency: Any, max_instances: Any, cluster_cap: Any = None) -> int:
    """Requests the keeper may have in flight to the function: concurrency x
    max instances, within MAX_IN_FLIGHT and the cluster's own cap
    (`configurations.concurrency`) when it sets one."""
    cap = _positive(concurrency, 1) * _positive(max_instances, DEFAULT_MAX_INSTANCES)
    if cluster_cap is not None:
        cap = min(cap, _positive(cluster_cap, cap))
    return max(1, min(MAX_IN_FLIGHT, cap))


def running_cap(concurrency: Any, memory_mb: Any) -> int:
    """Requests the local instance runs at once: its concurrency (at least
    MIN_RUNNING), no more than its memory holds."""
    wanted = max(MIN_RUNNING, _positive(concurrency, 1))
    by_memory = (_positive(memory_mb, 256) - INSTANCE_BASE_MB) // PER_REQUEST_MB
    return max(1, min(wanted, by_memory, MAX_IN_FLIGHT))
