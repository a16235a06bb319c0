"""The fabric's handling of its workers' I/O, in process (no worker runs):
what a worker's death implies is done, a reader that cannot take a message
still reports the worker gone, and the numbers a worker reports are
bounded before use."""
from __future__ import annotations

import math

import pytest

from fedkeeper.local.fabric.core import Fabric
from fedkeeper.local.fabric.entities import Settings
from fedkeeper.local.fabric.scheduler import MAX_REPORTED_MS, _millis
from fedkeeper.local.fabric.workers import Worker


@pytest.fixture
def fabric(tmp_path):
    f = Fabric(tmp_path / "fabric", Settings(stem_cells={}), "user:key")
    yield f
    f.stopping = True


def test_what_a_dead_never_started_worker_implies_is_done(fabric, monkeypatch):
    """A worker killed before its process started: nothing will report its
    death, so the kill reports it, and the I/O that implies (a worker for
    what it held, a stem cell in its place) is done too, not dropped."""
    s = fabric.scheduler
    gone, replacement = Worker(None, runtime=None, memory_mb=128), Worker(None, runtime=None, memory_mb=128)
    spawned = []
    monkeypatch.setattr(s, "_worker_died", lambda w: [("spawn", replacement)] if w is gone else [])
    monkeypatch.setattr(s.launcher, "spawn", spawned.append)
    s.run_ops([("kill", gone)])
    assert spawned == [replacement]


def test_a_worker_that_failed_to_start_has_what_its_death_implies_done(fabric, monkeypatch):
    s = fabric.scheduler
    w, replacement = Worker(None, runtime=None, memory_mb=128), Worker(None, runtime=None, memory_mb=128)
    spawned = []
    monkeypatch.setattr(s, "_worker_died", lambda dead: [("spawn", replacement)] if dead is w else [])
    monkeypatch.setattr(s.launcher, "spawn", spawned.append)
    s._start_failed(w, "cannot start: EAGAIN")
    assert w.init_error == "cannot start: EAGAIN" and spawned == [replacement]


def test_a_message_the_reader_cannot_take_still_reports_the_worker_gone(fabric, monkeypatch):
    s = fabric.scheduler
    w = Worker(None, runtime=None, memory_mb=128)
    died = []

    def unreadable(on_message):
        on_message({"t": "done", "id": 7})
        raise ValueError("a message no reader expects")
    monkeypatch.setattr(w, "read_messages", unreadable)
    monkeypatch.setattr(s, "_worker_died", lambda dead: died.append(dead) or [])
    s._serve_worker(w)
    assert died == [w]


@pytest.mark.parametrize("value, expected", [
    (12.5, 12.5), (0, 0.0), (MAX_REPORTED_MS, MAX_REPORTED_MS), (10 ** 400, 0.0), (math.inf, 0.0),
    (math.nan, 0.0), (-5.0, 0.0), (True, 0.0), ("12", 0.0), (None, 0.0),
])
def test_a_workers_reported_milliseconds_are_a_bounded_finite_number(value, expected):
    assert _millis(value) == expected


def test_a_worker_evicted_while_its_process_starts_is_killed_once_started(fabric, monkeypatch):
    """The eviction saw no process to kill; the process that then started
    would hold its memory, uncounted, until the fabric stopped."""
    launcher = fabric.scheduler.launcher
    w = Worker(None, runtime=None, memory_mb=128)
    killed = []

    class Started:
        def poll(self):
            return None

        def kill(self):
            killed.append(w)

    def start_process(*args):
        w.kill_reason = "evicted"   # what an eviction does meanwhile, under the lock
        w.proc = Started()
    monkeypatch.setattr(w, "start_process", start_process)
    monkeypatch.setattr(launcher, "_serve_in_thread", lambda worker: None)
    launcher._spawn_process(w)
    assert killed == [w]


def test_status_waits_for_a_starting_zygote_without_holding_the_fabric(fabric):
    """A zygote that starts holds the zygotes' lock while its runtime's site
    is built (minutes, the first time): a status request asking about it
    meanwhile must not hold the fabric's lock, which every invoke, reader
    and the watchdog need."""
    import threading

    from fedkeeper.local.fabric.admin import status
    class Watched:
        """The zygotes' lock, telling when someone asks for it."""
        def __init__(self, lock):
            self.lock, self.asked = lock, threading.Event()

        def acquire(self, *args, **kwargs):
            self.asked.set()
            return self.lock.acquire(*args, **kwargs)

        def release(self):
            self.lock.release()

        __enter__ = acquire

        def __exit__(self, *exc):
            self.release()

    zygotes = fabric.scheduler.zygotes
    starting = zygotes.lock
    zygotes.lock = Watched(starting)
    starting.acquire()
    asking = threading.Thread(target=status, args=(fabric,), daemon=True)
    try:
        asking.start()
        assert zygotes.lock.asked.wait(10)    # status is waiting for the zygotes now
        free = fabric.lock.acquire(timeout=2)
        if free:
            fabric.lock.release()
    finally:
        starting.release()
        zygotes.lock = starting
    asking.join(5)
    assert free and not asking.is_alive()


def test_a_run_of_workers_that_fail_to_start_is_a_loop_not_a_recursion(fabric, monkeypatch):
    """Each failed start places what its worker held on a new worker, whose
    start fails too (the system refuses new processes): the follow-up I/O
    is done in turn by the run_ops already at work, however long the run."""
    import sys
    s = fabric.scheduler
    workers = [Worker(None, runtime=None, memory_mb=128) for _ in range(sys.getrecursionlimit() // 2)]
    following = dict(zip(workers, workers[1:]))
    depth = []

    def failing_spawn(w):
        import inspect
        depth.append(len(inspect.stack(0)))
        s._start_failed(w, "EAGAIN")
    monkeypatch.setattr(s.launcher, "spawn", failing_spawn)
    monkeypatch.setattr(s, "_worker_died", lambda w: [("spawn", following[w])] if w in following else [])
    s.run_ops([("spawn", workers[0])])
    assert len(depth) == len(workers) and max(depth) == min(depth)
