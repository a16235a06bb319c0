"""The one process supervisor of the local services (the fabric, the
functions-framework hosts, the embedded store).

A service process is recorded as its pid together with what makes that pid
that process: its creation time and its command line. Pids are reused, so
nothing is ever signalled on the pid alone: `stop` first checks that the
process behind the pid is still the one recorded.

Services shared between commands are held by leases: one small file per
holder under the service's directory, naming the holder process the same
way. A service is stopped by its last holder (a lease whose holder has died
does not count), and `force` stops it whatever holds it (`fabric down`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import psutil

# psutil's creation times are clock ticks (1/100 s) since boot plus the boot
# time, which the kernel derives from the wall clock and which moves by a
# second or so when the clock is stepped: a live service must not be taken
# for gone then. The command line is compared too, so a reused pid still
# does not pass for the service.
_CREATE_TIME_TOLERANCE_S = 2.0
LEASE_DIR = "leases"

# Processes started by this process, so that they are reaped, not left as zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ProcessRecord:
    """Who a pid was when it was recorded."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]

    def to_json(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: Mapping) -> "ProcessRecord | None":
        try:
            return cls(int(data["pid"]), float(data["create_time"]),
                       tuple(str(x) for x in data["cmdline"]))
        except (KeyError, TypeError, ValueError):
            return None


def record_of(pid: int) -> ProcessRecord | None:
    """The identity of a running process, or None when there is none."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return ProcessRecord(pid, p.create_time(), tuple(p.cmdline()))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_running(rec: ProcessRecord | None) -> bool:
    """Is the recorded process still running (and is it still that process)?"""
    if rec is None or rec.pid <= 0:
        return False
    child = _CHILDREN.get(rec.pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(rec.pid, None)
        return False
    try:
        p = psutil.Process(rec.pid)
        with p.oneshot():
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            return (abs(p.create_time() - rec.create_time) <= _CREATE_TIME_TOLERANCE_S
                    and tuple(p.cmdline()) == rec.cmdline)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False  # not ours to signal in any case


def pid_alive(pid: int) -> bool:
    """Is any process running under this pid? A zombie is not. (For tests
    and reports; never a reason to signal anything.)"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def spawn(cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None,
          cwd: str | Path | None = None) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start a service process in a session (and process group) of its own,
    so that it outlives a killed command and its children stop with it."""
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=cwd,
                                env=dict(env) if env is not None else None)
    _CHILDREN[proc.pid] = proc
    # Just after exec the kernel may still show an empty command line.
    deadline = time.monotonic() + 2.0
    rec = record_of(proc.pid)
    while rec is not None and not rec.cmdline and time.monotonic() < deadline:
        time.sleep(0.005)
        rec = record_of(proc.pid)
    if rec is None or not rec.cmdline:  # it died at once; the caller sees that through proc.poll()
        rec = ProcessRecord(proc.pid, rec.create_time if rec else 0.0, tuple(cmd))
    return proc, rec


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(rec: ProcessRecord, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # A service leads its own process group (its workers are in it).
        if os.getpgid(rec.pid) == rec.pid:
            os.killpg(rec.pid, sig)
        else:
            os.kill(rec.pid, sig)


def stop(rec: ProcessRecord | None, *, first: int = signal.SIGTERM, grace_s: float = 10.0) -> bool:
    """Stop the recorded process (and its process group): `first`, then
    SIGKILL after `grace_s`. False when the record no longer names a running
    process, in which case nothing is signalled."""
    if not is_running(rec):
        return False
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 5.0)):
        if not is_running(rec):
            break
        _signal(rec, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(rec.pid)
            if not is_running(rec):
                break
            time.sleep(0.02)
    child = _CHILDREN.pop(rec.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


@contextlib.contextmanager
def locked(directory: Path, name: str = ".lock") -> Iterator[None]:
    """An exclusive lock on a directory, across processes."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a key), atomically."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- leases

class Lease:
    """One holder's claim on a shared service directory: one per object by
    default, or one for the whole process (`per_process`), which any object
    of the process then gives back."""

    def __init__(self, service_dir: Path, per_process: bool = False):
        self.service_dir = Path(service_dir)
        key = "process" if per_process else uuid.uuid4().hex[:12]
        self.path = self.service_dir / LEASE_DIR / f"{os.getpid()}-{key}.json"
        me = record_of(os.getpid())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, json.dumps(me.to_json() if me else {"pid": os.getpid()}))
        self.held = True

    def release(self) -> bool:
        """Give the claim up. True when no other live holder remains."""
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return live_holders(self.service_dir) == 0


AUTO_STOP_MARKER = "auto_stop"


def hold(service_dir: Path, *, started: bool, auto_stop: bool, per_process: bool = False) -> Lease:
    """Claim a shared service (call under the service's lock). A holder that
    does not want it stopped automatically (`fabric up`, --keep-services)
    makes it permanent; one that started it with auto_stop marks it to be
    stopped by its last holder, whoever that is."""
    lease = Lease(service_dir, per_process=per_process)
    if not auto_stop:
        keep(service_dir)
    elif started:
        (Path(service_dir) / LEASE_DIR / AUTO_STOP_MARKER).touch()
    return lease


def keep(service_dir: Path) -> None:
    """Let the service run until it is stopped explicitly."""
    with contextlib.suppress(FileNotFoundError):
        (Path(service_dir) / LEASE_DIR / AUTO_STOP_MARKER).unlink()


def release(lease: Lease | None) -> bool:
    """Give a claim up (call under the service's lock). True when the caller
    should stop the service now: it was the last live holder and the service
    is marked to stop with its last holder."""
    if lease is None or not lease.held:
        return False
    last = lease.release()
    return last and (lease.service_dir / LEASE_DIR / AUTO_STOP_MARKER).exists()


def live_holders(service_dir: Path) -> int:
    """Leases whose holder still runs; the others are removed."""
    d = Path(service_dir) / LEASE_DIR
    n = 0
    for p in d.glob("*.json") if d.is_dir() else ():
        try:
            rec = ProcessRecord.from_json(json.loads(p.read_text()))
        except (OSError, ValueError):
            rec = None
        if is_running(rec):
            n += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return n


def drop_leases(service_dir: Path) -> None:
    """Forget every holder (the service was stopped whatever held it)."""
    d = Path(service_dir) / LEASE_DIR
    for p in list(d.glob("*.json")) + [d / AUTO_STOP_MARKER] if d.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """A port free on `host`: `preferred` when it can be bound, else any.
    Probed with SO_REUSEADDR, as servers bind: a port used a moment ago
    sits in TIME_WAIT and is still usable."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


#: How much of a log's end `tail` reads: a function may have written
#: hundreds of megabytes before it failed.
TAIL_BYTES = 64 * 1024


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log, read from its last TAIL_BYTES."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])




# --------------------------------------------------------------------------- environment

# What a process minimally needs from the keeper's environment; nothing
# else of it (tokens, passwords, FEDKEEPER_*) reaches a function or action.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT")


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


__all__ = ["ProcessRecord", "Lease", "hold", "keep", "release", "record_of", "is_running", "pid_alive", "spawn", "stop", "locked",
           "write_private", "free_port", "live_holders", "drop_leases", "tail", "minimal_env", "PASS_ENV"]
