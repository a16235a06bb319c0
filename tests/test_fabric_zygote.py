"""Stem cells forked from their runtime's zygote (the runtime's modules
imported once per fabric), the fallback to separate processes when the
zygote is gone, and per-action intra-worker concurrency (OpenWhisk's
`limits.concurrency`): several activations in flight in one worker at
once, set from a function's config and shown by the fabric's status. Runs
the `light` runtime, the cheap one to preload."""
from __future__ import annotations

import os
import signal

import pytest

from fedkeeper.local import fabric
from fedkeeper.local.supervisor import pid_alive
from fedkeeper.runtimes.images import recipe
from fixtures_fabric import ann, fabric_dir, fabric_info, fw, make_artifact, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)

LIGHT_IMAGE = recipe("light", "openwhisk").image()
PROBE = '''
import os, sys
PRELOADED = "numpy" in sys.modules
def main(args):
    return {"pid": os.getpid(), "ppid": os.getppid(), "preloaded": PRELOADED}
'''
# Each activation waits (bounded) until `n` activations are inside this one
# process at once, and reports how many it saw: run one after another they
# would each see 1 (and wait out the bound).
RENDEZVOUS = '''
import os, threading
inside = 0
most = 0
cond = threading.Condition()
def main(args):
    global inside, most
    with cond:
        inside += 1
        most = max(most, inside)
        cond.notify_all()
        cond.wait_for(lambda: most >= args["n"], timeout=args.get("bound_s", 20))
        seen = most
        inside -= 1
    return {"pid": os.getpid(), "seen": seen}
'''


def cells(fw, runtime: str = "light") -> list[dict]:
    return [w for w in fw.admin("status")["workers"] if w["stem_cell"] and w["runtime"] == runtime]


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def pool(fw):
    before = fw.admin("status")
    yield fw
    fw.admin("limits", {"userMemoryMb": before["user_memory_mb"], "stemCells": before["stem_cells"]})


def test_stem_cells_are_forked_from_one_zygote_per_runtime(pool):
    fw = pool
    fw.admin("limits", {"stemCells": {"light": 2}})
    r = fw.put_action("zy-probe", source=PROBE, kind="blackbox", image=LIGHT_IMAGE, limits={"memory": 256})
    assert r.status_code == 200, r.text
    two = wait_for(lambda: [w for w in cells(fw) if w["state"] == "stem"][1:] and cells(fw), 60)
    st = fw.admin("status")
    assert st["fork_stem_cells"] is True
    zygote = [z for z in st["zygotes"] if z["runtime"] == "light"][0]
    assert zygote["state"] == "ready" and zygote["forks"] >= 2 and "numpy" in zygote["modules"]
    # both cells are the zygote's children, not processes started with their own import
    assert all(w["forked"] and ppid_of(w["pid"]) == zygote["pid"] for w in two)
    cold = fw.invoke("zy-probe", {}, blocking=True).json()
    assert cold["response"]["success"], cold
    assert ann(cold)["fk-start"] == "prewarmed"
    res = cold["response"]["result"]
    assert res["preloaded"] is True and res["ppid"] == zygote["pid"]
    assert res["pid"] in {w["pid"] for w in two}
    # the taken cell is replaced by another fork of the same zygote
    wait_for(lambda: len([w for w in cells(fw) if w["state"] == "stem"]) == 2, 30)
    assert [z for z in fw.admin("status")["zygotes"] if z["runtime"] == "light"][0]["forks"] >= 3


def test_without_its_zygote_a_runtime_starts_stem_cells_as_processes(pool):
    fw = pool
    fw.admin("limits", {"stemCells": {"light": 1}})
    r = fw.put_action("zy-fallback", source=PROBE, kind="blackbox", image=LIGHT_IMAGE, limits={"memory": 256})
    assert r.status_code == 200, r.text
    wait_for(lambda: [w for w in cells(fw) if w["state"] == "stem"], 60)
    zygote = wait_for(lambda: [z for z in fw.admin("status")["zygotes"]
                               if z["runtime"] == "light" and z["state"] == "ready"], 30)[0]
    os.kill(zygote["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(zygote["pid"]), 10)
    # the forked cell outlives its zygote and still serves its action
    first = fw.invoke("zy-fallback", {}, blocking=True).json()
    assert first["response"]["success"] and first["response"]["result"]["preloaded"] is True
    # its replacement cannot be forked: it is started with its own import
    fresh = wait_for(lambda: [w for w in cells(fw) if w["state"] == "stem" and not w["forked"]], 60)[0]
    assert ppid_of(fresh["pid"]) == fw.admin("status")["pid"]
    assert [z["state"] for z in fw.admin("status")["zygotes"] if z["runtime"] == "light"] == ["dead"]


def test_several_activations_are_in_flight_in_one_worker(pool):
    fw = pool
    fw.admin("limits", {"stemCells": {}})
    fw.put_action("zy-conc", source=RENDEZVOUS, limits={"concurrency": 3, "memory": 256})
    ids = [fw.invoke("zy-conc", {"n": 3}).json()["activationId"] for _ in range(3)]
    # the fabric's status shows the action's concurrency and the three in its one worker
    pools = wait_for(lambda: (p := fw.admin("status")["actions"]["guest/zy-conc"])["max_in_one_worker"] == 3
                     and p, 30)
    assert pools["concurrency"] == 3 and pools["workers"] == 1 and pools["in_flight"] == 3
    results = [fw.activation(i, timeout_s=40)["response"]["result"] for i in ids]
    assert {r["pid"] for r in results} == {results[0]["pid"]}
    assert [r["seen"] for r in results] == [3, 3, 3]


def test_a_functions_concurrency_from_the_config_reaches_the_fabric(tmp_path):
    from types import SimpleNamespace

    from fedkeeper.local.openwhisk import LocalOpenWhiskProvider
    from fedkeeper.providers.base import FunctionSpec, ProviderContext
    cluster = SimpleNamespace(kind="local", namespace=None, faults=None, user_memory_mb=None, stem_cells={})
    p = LocalOpenWhiskProvider("conc", cluster, ProviderContext(state_dir=tmp_path))
    try:
        spec = FunctionSpec(name="noop", source="nodeinfo", memory_mb=256, timeout_s=30, concurrency=8)
        p.deploy(spec, make_artifact(PROBE))
        assert p.fabric_admin("status")["actions"]["conc/noop"]["concurrency"] == 8
    finally:
        p.close()
        fabric.fabric_down(tmp_path / "fabric")


def test_prewarm_starts_a_zygote_before_any_deploy_and_hands_its_lease_over(tmp_path):
    from types import SimpleNamespace

    from fedkeeper.local.openwhisk import LocalOpenWhiskProvider
    from fedkeeper.providers.base import ProviderContext
    # tensorflow gets no stem cells in this cluster: no zygote is started for it
    cluster = SimpleNamespace(kind="local", namespace=None, faults=None, user_memory_mb=None,
                              stem_cells={"light": 1, "tensorflow": 0})
    ctx = ProviderContext(state_dir=tmp_path)
    LocalOpenWhiskProvider.prewarm("early", cluster, ctx, ["light", "tensorflow"])
    fdir = tmp_path / "fabric"
    try:
        assert fabric.fabric_status(fdir) is not None
        p = LocalOpenWhiskProvider("early", cluster, ctx)
        st = p.fabric_admin("status")
        assert [z["runtime"] for z in st["zygotes"]] == ["light"] and not st["workers"]
        zygote_pid = st["zygotes"][0]["pid"]
        # the provider took the fabric over: when it lets go, the fabric it
        # started for this command stops (the early lease was given back)
        p.close()
        assert fabric.fabric_status(fdir) is None
    finally:
        fabric.fabric_down(fdir)
    wait_for(lambda: not pid_alive(zygote_pid), 10)


def test_the_main_jobs_clusters_and_runtimes_ahead_of_its_deploy():
    from pathlib import Path

    from fedkeeper.config.loading import load_config
    from fedkeeper.local.prewarm import runtimes_by_cluster
    from fedkeeper.runtime import SERVER_FUNCTIONS, Runtime
    cfg = load_config(Path(__file__).resolve().parent.parent / "config-local.yaml")
    name, scen = cfg.scenario("federated_learning")
    rt = Runtime(cfg=cfg, scenario_name=name, scenario=scen, state=Path("/nonexistent"))
    assert runtimes_by_cluster(rt, SERVER_FUNCTIONS) == {"local_ow": ["tensorflow"], "local_gcf": ["tensorflow"]}



def test_forked_cells_draw_from_their_own_entropy():
    """Forks of one zygote do not share numpy's global generator state (a
    process started on its own seeds it from the OS; TensorFlow's import
    loads numpy.random in the zygote)."""
    import numpy.random

    from fedkeeper.local.fabric.worker import _fresh_entropy
    draws = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # a cell: reseeded as the zygote's children are, then one draw
            os.close(r)
            _fresh_entropy()
            os.write(w, repr(float(numpy.random.random())).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            draws.append(float(f.read()))
        os.waitpid(pid, 0)
    assert draws[0] != draws[1]


@pytest.fixture
def sleeper():
    """A process to watch as a forked cell is watched (by its pid only)."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait(timeout=10)


def test_a_cell_whose_pidfd_another_thread_closed_is_taken_for_gone_and_its_reader_ends(sleeper):
    import socket

    from fedkeeper.local.fabric.workers import Worker
    from fedkeeper.local.fabric.zygotes import ForkedProcess
    cell = ForkedProcess(sleeper.pid)
    assert cell.poll() is None
    # the descriptor is closed under the handle, as by another thread
    # between its check of the handle and its select
    os.close(cell._pidfd)
    assert cell.poll() is not None
    # a worker's reader still ends (the scheduler then frees what it held)
    w = Worker(None, runtime="light")
    w.proc = ForkedProcess(sleeper.pid)
    os.close(w.proc._pidfd)
    w.sock, fabric_end = socket.socketpair()
    fabric_end.close()
    w.read_messages(lambda msg: None)
    assert w.proc.returncode is not None


def test_a_dead_zygote_is_started_again_after_a_growing_delay_a_bounded_number_of_times(monkeypatch, tmp_path):
    from fedkeeper.local.fabric import zygotes
    started = []

    def start(z, log_path, cwd):   # a zygote that starts without a process
        started.append(z)
        z.state = "ready"
    monkeypatch.setattr(zygotes.Zygote, "start", start)
    now = [0.0]
    zs = zygotes.Zygotes(clock=lambda: now[0])
    get = lambda: zs.get("light", ("numpy",), tmp_path / "z.log", str(tmp_path))  # noqa: E731
    first = get()
    assert first is started[0] and get() is first
    for delay in zs.RESTART_DELAYS_S:
        started[-1].state = "dead"          # a fork answered too late
        assert get() is None                # stem cells start as their own processes meanwhile
        assert [z["state"] for z in zs.describe()] == ["dead"]
        now[0] += delay - 1
        assert get() is None
        now[0] += 1
        again = get()
        assert again is started[-1] and again.state == "ready" and len(started) >= 2
    assert len(started) == 1 + len(zs.RESTART_DELAYS_S)
    # one death more than it has restarts for: the runtime keeps plain processes
    started[-1].state = "dead"
    now[0] += 10 ** 6
    assert get() is None and get() is None
    assert len(started) == 1 + len(zs.RESTART_DELAYS_S)


def test_a_stopped_zygote_ends_a_waiting_fork_is_reaped_and_its_socket_closed(sleeper):
    import socket
    import threading

    from fedkeeper.local.fabric.zygotes import Zygote
    # a fork waiting for the import when the zygote is stopped
    z = Zygote("light", ("numpy",))
    z.proc = sleeper
    z.sock, zygote_end = socket.socketpair()
    errors = []

    def fork():
        cell, other = socket.socketpair()
        try:
            z.fork(cell)
        except OSError as exc:
            errors.append(exc)
        finally:
            cell.close()
            other.close()
    t = threading.Thread(target=fork, daemon=True)
    t.start()
    wait_for(lambda: z.lock.locked(), 10)
    sock = z.sock
    z.stop()
    t.join(timeout=20)
    assert not t.is_alive() and errors and z.state == "dead"
    assert sock.fileno() == -1 and z.sock is None
    assert sleeper.returncode == -signal.SIGKILL    # reaped, not left a zombie
    zygote_end.close()


def test_a_zygote_whose_fork_fails_is_reaped():
    import socket
    import subprocess
    import sys

    from fedkeeper.local.fabric.zygotes import Zygote
    z = Zygote("light", ("numpy",))
    z.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        z.state = "ready"
        z.sock, zygote_end = socket.socketpair()
        zygote_end.close()          # the zygote hung up
        cell, other = socket.socketpair()
        with pytest.raises(OSError):
            z.fork(cell)
        cell.close()
        other.close()
        assert z.state == "dead" and z.sock is None
        assert z.proc.returncode == -signal.SIGKILL
    finally:
        z.proc.kill()
        z.proc.wait(timeout=10)


@pytest.mark.parametrize("sig, by_stop", [(signal.SIGTERM, True), (signal.SIGKILL, False)])
def test_a_zygote_killed_by_the_stop_signal_is_told_from_one_that_failed(tmp_path, sig, by_stop):
    # The fabric's stop signal reaches its whole process group; a stem cell
    # forked in between meets a dead zygote, which must not read as failing.
    from fedkeeper.local.fabric.zygotes import Zygote
    z = Zygote(None, ())
    z.start(tmp_path / "zygote.log", str(tmp_path))
    try:
        os.kill(z.proc.pid, sig)
        assert z.ended_by(signal.SIGTERM, wait_s=10) is by_stop
    finally:
        z.stop()
