"""Local Cloud Functions: requests in flight follow the function's configured
concurrency and instances, and what runs at once in the one local instance
is bounded by its memory (the rest wait at the host)."""
from __future__ import annotations

import pytest

from fedkeeper.config import GoogleCluster
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider, capacity
from fedkeeper.providers.base import FunctionSpec, ProviderContext

from test_gcf_local import make_artifact, wait_all

pytestmark = pytest.mark.timeout(120)

# Counts the requests inside the function at once. Each waits (bounded)
# until `expect` requests are inside together, so the count reaches what the
# host lets in at once, whatever the timing.
GATHER_MAIN = '''
import threading

import functions_framework

_lock = threading.Lock()
_inside = 0
_peak = 0
_arrived = threading.Condition(_lock)


@functions_framework.http
def gather(request):
    global _inside, _peak
    p = request.get_json(silent=True) or {}
    expect, wait_s = int(p.get("expect", 1)), float(p.get("wait_s", 0))
    with _arrived:
        _inside += 1
        _peak = max(_peak, _inside)
        _arrived.notify_all()
        _arrived.wait_for(lambda: _peak >= expect, timeout=wait_s)
        peak = _peak
        _inside -= 1
    return {"peak": peak}
'''


def spec(concurrency: int, memory_mb: int, **extra) -> FunctionSpec:
    return FunctionSpec(name="gather", source="gather", memory_mb=memory_mb, timeout_s=30,
                        concurrency=concurrency, extra={"entry_point": "gather", **extra},
                        bound={"FK_FUNCTION": "gather"})


@pytest.fixture
def provider(tmp_path):
    p = LocalCloudFunctionsProvider("local_gcf", GoogleCluster(kind="local"),
                                    ProviderContext(state_dir=tmp_path))
    yield p
    p.close()


def test_caps_follow_concurrency_instances_and_memory():
    # concurrency x max instances (100 by default, as v2), within the bound
    assert capacity.in_flight_cap(1, None) == 100
    assert capacity.in_flight_cap(4, 50) == 200
    assert capacity.in_flight_cap(500, 100) == capacity.MAX_IN_FLIGHT
    assert capacity.in_flight_cap(100, 10, cluster_cap=150) == 150
    # one 128 MB instance never runs 500 requests at once
    assert capacity.running_cap(500, 128) == (128 - capacity.INSTANCE_BASE_MB) // capacity.PER_REQUEST_MB
    assert capacity.running_cap(1, 1024) == capacity.MIN_RUNNING
    assert capacity.running_cap(100, 2048) == 100
    assert capacity.running_cap(8, 16) == 1


def test_more_than_64_requests_in_flight_when_configured(provider):
    n = 100
    provider.deploy(spec(concurrency=n, memory_mb=2048, max_instances=1), make_artifact(GATHER_MAIN))
    assert provider.limits()["max_in_flight"] == n
    invs = [provider.invoke("gather", {"expect": n, "wait_s": 20}) for _ in range(n)]
    outs = wait_all(provider, invs, timeout=60)
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok][:3]
    # all of them were inside the function together
    assert max(o.result["peak"] for o in outs) == n


def test_memory_bounds_what_runs_and_the_rest_waits_at_the_host(provider):
    # 500 requests allowed in flight (concurrency 500, one instance), one
    # 128 MB instance: only what its memory holds runs at once
    provider.deploy(spec(concurrency=500, memory_mb=128, max_instances=1), make_artifact(GATHER_MAIN))
    running = capacity.running_cap(500, 128)
    n = 120
    assert provider.limits()["max_in_flight"] == 500 > n
    # each waits a moment for more company than the instance lets in
    invs = [provider.invoke("gather", {"expect": n, "wait_s": 0.05}) for _ in range(n)]
    outs = wait_all(provider, invs, timeout=60)
    # queued at the host, not refused: every request ran
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok][:3]
    assert max(o.result["peak"] for o in outs) == running


def test_a_function_keeps_the_invoker_of_its_first_call(provider):
    # first called with its capacity unknown (deployed by an older keeper):
    # its calls are tracked by the cluster's invoker, so a redeploy that
    # makes the capacity known must not move later lookups to a new invoker
    # that never saw the calls still in flight
    first = provider._invoker_for("f")
    provider._caps["f"] = 100
    assert provider._invoker_for("f") is first is provider._invoker
    provider._caps["g"] = 100
    assert provider._invoker_for("g") is not provider._invoker
