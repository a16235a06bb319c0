"""Zygotes: per runtime, one process that has imported the runtime's heavy
modules (fedkeeper/local/prewarm.py) and forks the runtime's stem cells
from itself (worker.py --zygote). A stem cell then starts in milliseconds
with TensorFlow already loaded, instead of importing it again (tens of
seconds of CPU on a small machine, for every worker), and the pages of the
modules stay shared between the cells until one writes them.

Forking is safe here because the zygote only imports: it runs no action
code and no TensorFlow op, so it holds no session, and no lock of an action
for a child to inherit half-taken. Its imports do start threads of their
own: numpy's OpenBLAS starts its thread pool on import, and handles a fork
itself (it stops the pool before a fork; parent and child start it again
when they next need it). A zygote that cannot start or dies leaves the
fabric starting stem cells as separate processes until it is started
again (Zygotes).

A zygote is the fabric's own machinery, as an invoker's image cache is, so
its memory is not counted against the user memory (its stem cells are)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from ...runtimes.isolation import runtime_command
from ..supervisor import minimal_env
from .worker import recv_exact

log = logging.getLogger("fedkeeper.fabric")

WORKER_SCRIPT = str(Path(__file__).with_name("worker.py"))
# Longest wait for a zygote's module import, and for one fork's answer:
# past them the zygote is taken for hung, stopped, and cells are started as
# processes of their own.
LOAD_TIMEOUT_S = 600.0
FORK_TIMEOUT_S = 30.0
# Longest wait for a killed zygote to be reaped (or for a fork to let go of it).
STOP_WAIT_S = 5.0
_HDR_SIZE = 4
# a zygote's answers are a few dozen bytes of JSON
MAX_ZYGOTE_MESSAGE = 64 * 1024


class ForkedProcess:
    """The handle of a stem cell a zygote forked, in place of a Popen: its
    parent is the zygote (which reaps it), so the fabric watches it through
    a pidfd, which names this process even once its pid is reused.

    Its worker's reader, the scheduler and the fabric's stop poll and kill
    it from different threads: the pidfd is used and closed only under
    `_lock`, so no thread selects on (or signals) a descriptor another has
    just closed, or one the number was reused for since."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(pid)
        if self._pidfd is None and not _alive(pid):
            self.returncode = -signal.SIGKILL

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    gone = (select.select([self._pidfd], [], [], 0)[0] if self._pidfd is not None
                            else not _alive(self.pid))
                except (OSError, ValueError):
                    gone = True     # its pidfd is no longer usable: nothing left to watch it by
                if gone:
                    self.returncode = -signal.SIGKILL   # its status went to its parent
                    self._close_locked()
            return self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError, OSError):
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if end is None else max(0.0, end - time.monotonic())
            with self._lock:
                # a copy of the pidfd to wait on: another thread may close
                # the original meanwhile
                fd = None
                if self._pidfd is not None:
                    with contextlib.suppress(OSError):
                        fd = os.dup(self._pidfd)
            if fd is not None:
                try:
                    select.select([fd], [], [], left)
                except (OSError, ValueError):
                    pass
                finally:
                    os.close(fd)
            else:
                time.sleep(0.01)
            if end is not None and time.monotonic() >= end and self.poll() is None:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.returncode

    def _close_locked(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Zygote:
    """One runtime's zygote process. `fork` blocks until its modules are
    loaded (the first fork of a fabric waits for the import; the others
    take milliseconds); every method is thread-safe."""

    def __init__(self, runtime: str | None, modules: tuple[str, ...]):
        self.runtime = runtime
        self.modules = modules
        self.state = "starting"          # starting -> ready -> dead
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.spawned = time.time()
        self.init_ms: float | None = None
        self.forks = 0
        self.death_counted = False       # by Zygotes, once it is dead

    def start(self, log_path: Path, cwd: str) -> None:
        """Start the process (raises OSError); it loads its modules meanwhile."""
        parent, child = socket.socketpair()
        try:
            with open(log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    runtime_command(self.runtime, WORKER_SCRIPT, str(child.fileno()), "--zygote", *self.modules),
                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    cwd=cwd, close_fds=True, env=minimal_env({"PYTHONDONTWRITEBYTECODE": "1"}))
        except OSError:
            parent.close()
            self.state = "dead"
            raise
        finally:
            child.close()
        self.sock = parent

    def _recv(self) -> dict:
        hdr = recv_exact(self.sock, _HDR_SIZE)
        if hdr is None:
            raise OSError("the zygote closed its socket")
        size = int.from_bytes(hdr, "big")
        if size > MAX_ZYGOTE_MESSAGE:
            raise OSError(f"the zygote sent a {size}-byte message")
        body = recv_exact(self.sock, size)
        if body is None:
            raise OSError("the zygote closed its socket")
        msg = json.loads(body)
        if not isinstance(msg, dict):
            raise OSError("the zygote sent a message that is not an object")
        return msg

    def fork(self, cell_sock: socket.socket) -> int:
        """Fork a stem cell that serves `cell_sock` (the worker's end of its
        socket pair); its pid. Raises OSError when the zygote cannot (then
        it is dead and the caller starts the cell as its own process)."""
        with self.lock:
            try:
                if self.state == "dead" or self.sock is None:
                    raise OSError("the zygote is not running")
                if self.state == "starting":
                    self.sock.settimeout(LOAD_TIMEOUT_S)
                    msg = self._recv()
                    if msg.get("t") != "zygote":
                        raise OSError(f"unexpected message from the zygote: {msg.get('t')!r}")
                    ms = msg.get("init_ms")
                    self.init_ms = float(ms) if isinstance(ms, (int, float)) else 0.0
                    self.state = "ready"
                self.sock.settimeout(FORK_TIMEOUT_S)
                socket.send_fds(self.sock, [b"f"], [cell_sock.fileno()])
                msg = self._recv()
                pid = msg.get("pid")
                if msg.get("t") != "forked" or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
                    raise OSError(f"the zygote could not fork: {str(msg.get('error'))[:200]}")
            except (OSError, ValueError, RecursionError) as exc:
                self._stop_locked()
                raise OSError(str(exc)) from None
            self.forks += 1
            return pid

    def _stop_locked(self) -> None:
        self.state = "dead"
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_WAIT_S)   # reaped: no zombie left till the fabric stops

    def stop(self) -> None:
        """Kill the zygote, close its socket and reap it."""
        # A fork waiting for the import holds self.lock: the kill ends that
        # wait (its socket's other end closes), and the shutdown ends any
        # other, so the lock is free soon after.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.lock.acquire(timeout=STOP_WAIT_S):
            try:
                self._stop_locked()
            finally:
                self.lock.release()
        else:
            self.state = "dead"

    def ended_by(self, sig: int, wait_s: float = 0.5) -> bool:
        """Whether the process ended by signal `sig`, waiting up to wait_s
        for it to end (a dead socket may precede the process's exit)."""
        if self.proc is None:
            return False
        try:
            return self.proc.wait(timeout=wait_s) == -sig
        except subprocess.TimeoutExpired:
            return False

    def describe(self) -> dict:
        return {"runtime": self.runtime, "pid": self.proc.pid if self.proc else None, "state": self.state,
                "modules": list(self.modules), "forks": self.forks, "started": round(self.spawned, 3),
                "load_ms": round(self.init_ms, 1) if self.init_ms is not None else None}


class Zygotes:
    """The fabric's zygotes, one per runtime, started on first need. A
    zygote that died (a fork answered late on a loaded machine is enough)
    is started again on a later need, RESTART_DELAYS_S[n] seconds after its
    n-th death, stem cells starting as their own processes meanwhile; once
    those are spent, the runtime's stem cells stay processes of their own."""
    RESTART_DELAYS_S = (10.0, 60.0, 300.0)

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.by_runtime: dict[str | None, Zygote] = {}
        self.lock = threading.Lock()
        self._clock = clock
        self._deaths: dict[str | None, int] = {}          # zygotes of the runtime seen dead
        self._retry_at: dict[str | None, float] = {}      # when the last one died, plus its delay

    def get(self, runtime: str | None, modules: tuple[str, ...], log_path: Path, cwd: str) -> Zygote | None:
        """The runtime's zygote, started now if there is none running; None
        when it cannot start, or died and is not due to start again yet (the
        fabric then starts stem cells as their own processes)."""
        with self.lock:  # held while it starts: another caller must not fork a zygote not yet started
            z = self.by_runtime.get(runtime)
            if z is not None and z.state == "dead" and not self._restart_due_locked(runtime, z):
                return None
            if z is not None and z.state != "dead":
                return z
            if z is not None:
                z.stop()
                log.info("starting the %s zygote again", runtime)
            z = self.by_runtime[runtime] = Zygote(runtime, modules)
            try:
                z.start(log_path, cwd)
            except OSError as exc:
                log.warning("the %s zygote did not start (%s): stem cells start as their own processes",
                            runtime, exc)
                self._restart_due_locked(runtime, z)
                return None
        return z

    def _restart_due_locked(self, runtime: str | None, dead: Zygote) -> bool:
        """Whether the runtime's dead zygote `dead` is to be started again
        now; counts its death the first time it is seen."""
        if not dead.death_counted:
            dead.death_counted = True
            n = self._deaths[runtime] = self._deaths.get(runtime, 0) + 1
            if n <= len(self.RESTART_DELAYS_S):
                self._retry_at[runtime] = self._clock() + self.RESTART_DELAYS_S[n - 1]
            else:
                self._retry_at[runtime] = float("inf")
                log.warning("the %s zygote died %d times: its stem cells start as their own processes",
                            runtime, n)
            return False
        return self._clock() >= self._retry_at[runtime]

    def stop(self, runtime: str | None = None) -> None:
        """Stop one runtime's zygote (a running one is started again on next
        need), or every one (None)."""
        with self.lock:
            if runtime is None:
                gone = list(self.by_runtime.values())
                self.by_runtime.clear()
            else:
                z = self.by_runtime.pop(runtime, None)
                gone = [z] if z is not None else []
        for z in gone:
            z.stop()

    def describe(self) -> list[dict]:
        with self.lock:
            return [z.describe() for z in self.by_runtime.values()]
