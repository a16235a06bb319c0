"""The fabric's capacity model, as an OpenWhisk invoker's container pool:
a user-memory budget (2048 MB by default), activations queued (never
refused) while it is full, and prewarmed stem cells per runtime, taken by
a cold start so that it is only the action's code load. Runs the `light`
runtime (numpy, pymongo), the cheap one to preload."""
from __future__ import annotations

import pytest

from fedkeeper.local import fabric
from fedkeeper.local.fabric.entities import DEFAULT_USER_MEMORY_MB
from fedkeeper.local.supervisor import pid_alive
from fedkeeper.runtimes.images import recipe
from fixtures_fabric import ann, fabric_dir, fabric_info, fw, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)

LIGHT_IMAGE = recipe("light", "openwhisk").image()
# Whether numpy was already imported when the action's code was loaded:
# in a stem cell of `light` it was, in a worker started for the action not.
PRELOAD_PROBE = '''
import os, sys, time
PRELOADED = "numpy" in sys.modules
def main(args):
    if args.get("sleep"):
        time.sleep(args["sleep"])
    return {"pid": os.getpid(), "preloaded": PRELOADED}
'''


def put_light(fw, name: str, memory: int = 256):
    r = fw.put_action(name, source=PRELOAD_PROBE, kind="blackbox", image=LIGHT_IMAGE, limits={"memory": memory})
    assert r.status_code == 200, r.text


def stem_cells(fw, runtime: str = "light") -> list[dict]:
    return [w for w in fw.admin("status")["workers"] if w["stem_cell"] and w["runtime"] == runtime]


@pytest.fixture
def pool(fw):
    """Each test sets the pool it needs; afterwards the fabric's defaults."""
    before = fw.admin("status")
    yield fw
    fw.admin("limits", {"userMemoryMb": before["user_memory_mb"], "stemCells": before["stem_cells"]})


def test_default_user_memory_is_openwhisk_invokers_and_fabric_status_shows_it(fw, fabric_dir):
    st = fw.admin("status")
    assert st["user_memory_mb"] == DEFAULT_USER_MEMORY_MB == 2048
    assert st["stem_cells"] == {"tensorflow": 1}
    info = fabric.fabric_status(fabric_dir, capacity=True)
    assert info["user_memory_mb"] == 2048 and info["capacity"]["user_memory_mb"] == 2048
    assert info["capacity"]["queued"] == 0


def test_cold_start_takes_a_stem_cell_and_another_replaces_it(pool):
    fw = pool
    pool.admin("limits", {"stemCells": {"light": 1}})
    put_light(fw, "st-probe")   # a stem cell of its runtime starts once an action of it is deployed
    first = wait_for(lambda: [w for w in stem_cells(fw) if w["state"] == "stem"], 60)[0]
    assert first["memory_mb"] == fw.admin("status")["stem_memory_mb"]
    cold = fw.invoke("st-probe", {}, blocking=True).json()
    assert cold["response"]["success"], cold
    assert ann(cold)["fk-start"] == "prewarmed" and "initTime" in ann(cold)
    # the action runs in the stem cell's process, whose modules were loaded before its code
    assert cold["response"]["result"] == {"pid": first["pid"], "preloaded": True}
    replacement = wait_for(lambda: [w for w in stem_cells(fw) if w["pid"] and w["pid"] != first["pid"]], 30)
    assert len(replacement) == 1
    warm = fw.invoke("st-probe", {}, blocking=True).json()
    assert "initTime" not in ann(warm) and warm["response"]["result"]["pid"] == first["pid"]
    taken = [w for w in fw.admin("status")["workers"] if w["pid"] == first["pid"]][0]
    assert taken["from_stem_cell"] and taken["action"] == "st-probe" and not taken["stem_cell"]
    # a redeploy beside an untaken stem cell retires the old worker, not the stem cell
    put_light(fw, "st-probe")
    wait_for(lambda: not pid_alive(first["pid"]), 10)
    assert [w["pid"] for w in stem_cells(fw)] == [replacement[0]["pid"]]


def test_without_stem_cells_a_cold_start_starts_a_process(pool):
    fw = pool
    pool.admin("limits", {"stemCells": {}})
    assert not stem_cells(fw)
    put_light(fw, "st-plain")
    cold = fw.invoke("st-plain", {}, blocking=True).json()
    assert ann(cold)["fk-start"] == "cold"
    assert cold["response"]["result"]["preloaded"] is False


def test_an_action_given_less_than_a_stem_cell_starts_its_own_process(pool):
    """As OpenWhisk matches prewarm containers by memory: a cell that already
    holds its runtime's modules would break a smaller action's limit."""
    fw = pool
    pool.admin("limits", {"stemCells": {"light": 1}})
    cell_mb = fw.admin("status")["stem_memory_mb"]
    put_light(fw, "st-small", memory=cell_mb // 2)
    cell = wait_for(lambda: [w for w in stem_cells(fw) if w["state"] == "stem"], 60)[0]
    cold = fw.invoke("st-small", {}, blocking=True).json()
    assert cold["response"]["success"], cold
    assert ann(cold)["fk-start"] == "cold"
    assert cold["response"]["result"]["pid"] != cell["pid"]
    assert [w["pid"] for w in stem_cells(fw)] == [cell["pid"]]  # the cell is still there, untaken


def test_stem_cells_count_against_the_user_memory(pool):
    fw = pool
    pool.admin("limits", {"stemCells": {}})
    put_light(fw, "st-mem", memory=512)
    fw.put_action("st-other", limits={"memory": 256})
    # room for the action's worker only (the others' idle workers evicted):
    # no stem cell is started beside it
    pool.admin("limits", {"userMemoryMb": 512})
    pid = fw.invoke("st-mem", {}, blocking=True, result=True).json()["pid"]
    pool.admin("limits", {"stemCells": {"light": 1}})
    st = fw.admin("status")
    assert st["memory_used_mb"] == 512 and not stem_cells(fw)
    # more memory: a stem cell fills it, and is counted
    pool.admin("limits", {"userMemoryMb": 1024})
    wait_for(lambda: stem_cells(fw), 10)
    assert fw.admin("status")["memory_used_mb"] == 512 + fw.admin("status")["stem_memory_mb"]
    # an action of another runtime needing the memory: the idle warm worker
    # goes first (least recently used), the stem cell stays
    pool.admin("limits", {"userMemoryMb": 512 + 256})
    fw.invoke("st-other", {}, blocking=True, result=True)
    wait_for(lambda: not pid_alive(pid), 10)
    assert stem_cells(fw) and fw.admin("status")["memory_used_mb"] <= 768


def test_activations_queue_while_the_pool_is_full(pool):
    fw = pool
    pool.admin("limits", {"stemCells": {}})
    fw.put_action("st-q", limits={"memory": 256})
    pool.admin("limits", {"userMemoryMb": 256})
    # far more than the pool runs at once: every one is accepted and waits its turn
    resp = [fw.invoke("st-q", {"sleep": 0.2}) for _ in range(4)]
    assert [r.status_code for r in resp] == [202] * 4
    wait_for(lambda: fw.admin("status")["queued"].get("guest/st-q", 0) >= 1, 5, 0.005)
    recs = [fw.activation(r.json()["activationId"]) for r in resp]
    assert all(r["response"]["success"] for r in recs)
    assert len({r["response"]["result"]["pid"] for r in recs}) == 1   # one worker fits, reused
    assert sorted(ann(r)["waitTime"] for r in recs)[-1] >= 450        # the last waited for three others


def test_bad_stem_cell_settings_are_400(fw):
    for bad in ({"light": -1}, {"light": 99}, ["light"], {"light": True}):
        r = fw.s.put(f"{fw.url}/_fabric/limits", json={"stemCells": bad})
        assert r.status_code == 400, bad
    assert fabric.Settings().stem_cells == {"tensorflow": 1}


def test_a_local_cluster_config_sets_the_fabrics_capacity(tmp_path):
    from types import SimpleNamespace

    from fedkeeper.local.openwhisk import LocalOpenWhiskProvider
    from fedkeeper.providers.base import ProviderContext
    # the keys a local OpenWhisk cluster's config may carry for its fabric
    cluster = SimpleNamespace(kind="local", namespace=None, faults=None, user_memory_mb=3072,
                              stem_cells={"light": 0})
    p = LocalOpenWhiskProvider("capacity", cluster, ProviderContext(state_dir=tmp_path))
    try:
        st = p.fabric_admin("status")
        assert st["user_memory_mb"] == 3072 and st["stem_cells"] == {"light": 0}
    finally:
        p.close()
        fabric.fabric_down(tmp_path / "fabric")
