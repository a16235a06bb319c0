"""Two keepers never run one session: a `running` session is resumed only
once the keeper recorded on it is gone (fedkeeper/keeper/session_owner.py)."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from fedkeeper.keeper import SessionError
from fedkeeper.keeper.session_owner import process_alive, resume_blocked, this_keeper
from fedkeeper.store import STALE_AFTER_S
from keeper_fakes import fake_keeper

ME = {"host": "h1", "pid": 100, "started": 5.0}


def running(keeper: dict | None, heartbeat: float | None = 1000.0) -> dict:
    return {"_id": "s1", "state": "running", "heartbeat": heartbeat, **({"keeper": keeper} if keeper else {})}


def test_a_session_not_running_may_always_be_resumed():
    for state in ("interrupted", "failed", "created"):
        doc = {"_id": "s1", "state": state, "heartbeat": 1000.0, "keeper": {"host": "h1", "pid": 7, "started": 1.0}}
        assert resume_blocked(doc, me=ME, now=1000.0, alive=lambda pid, started, boot=None: True) is None


def test_on_this_host_a_live_keeper_blocks_and_a_dead_one_does_not():
    doc = running({"host": "h1", "pid": 7, "started": 1.0})
    why = resume_blocked(doc, me=ME, now=1000.0, alive=lambda pid, started, boot=None: (pid, started) == (7, 1.0))
    assert "running in another keeper on this machine (process 7)" in why and "Ctrl-C" in why
    # killed (kill -9): resumed at once, however fresh its heartbeat
    assert resume_blocked(doc, me=ME, now=1000.0, alive=lambda pid, started, boot=None: False) is None
    # this very process ran it before
    assert resume_blocked(running(dict(ME)), me=ME, now=1000.0, alive=lambda pid, started, boot=None: True) is None


def test_elsewhere_the_heartbeat_decides():
    doc = running({"host": "h2", "pid": 7, "started": 1.0}, heartbeat=1000.0)
    why = resume_blocked(doc, me=ME, now=1010.0, alive=lambda pid, started, boot=None: False)
    assert "running in a keeper on h2 (its heartbeat is 10s old)" in why
    stale = 1000.0 + STALE_AFTER_S + 1
    assert resume_blocked(doc, me=ME, now=stale, alive=lambda pid, started, boot=None: True) is None
    # written before keepers recorded themselves: the heartbeat alone
    assert "elsewhere" in resume_blocked(running(None), me=ME, now=1001.0)
    assert resume_blocked(running(None, heartbeat=None), me=ME, now=1001.0) is None


def test_another_machine_of_the_same_host_name_is_elsewhere():
    """Cloned virtual machines, containers on the host's network: one host
    name, another boot. Its keeper's process id means nothing here, so its
    heartbeat decides; a record without a boot time is this machine's."""
    me = {**ME, "boot": 50.0}
    clone = running({"host": "h1", "boot": 60.0, "pid": 7, "started": 1.0}, heartbeat=1000.0)
    why = resume_blocked(clone, me=me, now=1010.0, alive=lambda pid, started, boot=None: False)
    assert "running in a keeper on h1 (its heartbeat is 10s old)" in why
    stale = 1000.0 + STALE_AFTER_S + 1
    assert resume_blocked(clone, me=me, now=stale, alive=lambda pid, started, boot=None: False) is None
    legacy = running({"host": "h1", "pid": 7, "started": 1.0})
    assert resume_blocked(legacy, me=me, now=1010.0, alive=lambda pid, started, boot=None: False) is None
    # this machine, its boot time read again after the clock was stepped:
    # its keeper's process is asked after, and a live one blocks
    stepped = running({"host": "h1", "boot": 51.0, "pid": 7, "started": 1.0})
    asked = []
    why = resume_blocked(stepped, me=me, now=1010.0, alive=lambda *who: asked.append(who) or True)
    assert asked == [(7, 1.0, 51.0)] and "on this machine (process 7)" in why
    assert "boot" in this_keeper() and this_keeper()["boot"] == psutil.boot_time()


def test_a_live_process_stays_alive_across_a_step_of_the_wall_clock():
    """psutil derives a process's start and the machine's boot from the
    wall clock: after a step of it both move, and a record taken before
    still names the live process, counted from boot."""
    me = this_keeper()
    step = 3.0
    assert process_alive(me["pid"], me["started"] + step, me["boot"] + step)      # recorded before the step
    assert not process_alive(me["pid"], me["started"] + step)                      # absolute times: no
    assert not process_alive(me["pid"], me["started"] + step, me["boot"])          # a reused process id
    assert this_keeper() == me and this_keeper() is not this_keeper()              # read once, handed out as copies


def test_a_process_is_alive_only_with_its_own_start_time():
    me = this_keeper()
    assert process_alive(me["pid"], me["started"])
    assert not process_alive(me["pid"], me["started"] - 100)   # a reused process id
    for pid in (None, 0, -1, True, "1", 2 ** 40):
        assert not process_alive(pid, me["started"])


def test_a_killed_process_not_yet_reaped_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        assert process_alive(proc.pid, started)
        proc.kill()
        for _ in range(100):   # bounded: the kernel marks it a zombie at once
            if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert not process_alive(proc.pid, started)   # a zombie: not waited for yet
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def other_keeper_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield {"host": this_keeper()["host"], "pid": proc.pid, "started": psutil.Process(proc.pid).create_time()}
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_resume_is_refused_while_another_keeper_runs_the_session(tmp_path, isolated_dirs, other_keeper_process):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=1)
    assert keeper.start(session_id="s1").state == "finished"
    assert store.sessions["s1"]["keeper"] == this_keeper()
    # as if another keeper on this machine had opened it and still ran it
    store.sessions["s1"].update(state="running", keeper=other_keeper_process)
    deployed = len(provider.deployed)
    with pytest.raises(SessionError, match="running in another keeper on this machine"):
        keeper.start(resume="s1")
    assert len(provider.deployed) == deployed   # refused before deploying anything
    assert store.sessions["s1"]["keeper"] == other_keeper_process
    psutil.Process(other_keeper_process["pid"]).kill()
    psutil.Process(other_keeper_process["pid"]).wait(timeout=10)
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and store.sessions["s1"]["keeper"] == this_keeper()


def test_of_two_keepers_resuming_at_once_the_second_to_claim_stops(tmp_path, isolated_dirs, other_keeper_process):
    """Both find the session's keeper gone; another claims it between this
    keeper's check and its claim: this one stops before invoking anything."""
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=2)
    assert keeper.start(session_id="s1").state == "finished"
    store.sessions["s1"].update(state="running", keeper={"host": "h", "pid": 1, "started": 1.0},
                                heartbeat=0.0)   # a keeper elsewhere, long silent: gone
    claim = store.claim_session

    def claimed_first(sid, seen, me, **fields):
        assert claim(sid, seen, other_keeper_process, **fields)   # the other keeper, a moment earlier
        return claim(sid, seen, me, **fields)
    store.claim_session = claimed_first
    invoked = len(provider.invoked)
    with pytest.raises(SessionError, match="just resumed by another keeper"):
        keeper.start(resume="s1", deploy=False)
    assert len(provider.invoked) == invoked
    assert store.sessions["s1"]["keeper"] == other_keeper_process
    assert not [e for e in store.events_ if e["session"] == "s1" and e["kind"] == "resumed"]
