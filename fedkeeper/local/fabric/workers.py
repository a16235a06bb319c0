"""Warm worker processes: one per container OpenWhisk would run. A worker is
`worker.py` run as a plain script with a socket to the fabric; it loads the
action's code once and serves many activations (see worker.py for the
protocol)."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from ...runtimes.isolation import action_runtime, runtime_command
from ..supervisor import minimal_env
from .entities import Action, Activation, annotation
# The worker runs as a plain script (stdlib only); its framing helper is shared.
from .worker import recv_exact
from .zygotes import WORKER_SCRIPT, ForkedProcess, Zygote

log = logging.getLogger("fedkeeper.fabric")

_HDR = struct.Struct(">I")
# A worker's message is a result (at most 1 MB of JSON) plus its framing.
MAX_WORKER_MESSAGE = 4 * 1024 * 1024


class Worker:
    """One worker process: an action's, or a stem cell of a runtime (no
    action yet: `action` is None until `specialize`)."""
    _ids = itertools.count(1)

    def __init__(self, action: Action | None, *, runtime: str | None = None, memory_mb: int = 0):
        self.id = next(Worker._ids)
        self.runtime = runtime if action is None else action_runtime(action.exec)  # once per process
        self.stem = action is None        # started as a stem cell
        self.state = "starting"          # starting -> (stem ->) ready -> dead
        self.assigned: dict[str, Activation] = {}
        self.pending: list[Activation] = []   # assigned before the worker was ready
        self.spawned = time.time()
        self.last_used = self.spawned
        self.init_ms: float | None = None
        self.stem_ms: float | None = None    # a stem cell's module load
        self.init_error: str | None = None
        self.kill_reason: str | None = None
        self.retired = False
        self.proc: subprocess.Popen | None = None   # or a zygotes.ForkedProcess
        self.forked = False               # forked from its runtime's zygote
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.psutil_proc = None
        self.runs = 0
        self.action: Action | None = None
        self.key: tuple[str, str] | None = None
        self.version = 0
        self.capacity = 1
        self.memory_mb = memory_mb
        if action is not None:
            self.specialize(action)

    def specialize(self, action: Action) -> None:
        """Make this worker the given action's (a stem cell taken for it)."""
        self.action = action
        self.key = (action.namespace, action.name)
        self.version = action.version
        self.capacity = max(1, int(action.limits.get("concurrency", 1)))
        self.memory_mb = int(action.limits["memory"])
        # its code load is timed from now, not from the stem cell's start
        self.spawned = time.time()

    @property
    def is_stem(self) -> bool:
        """A stem cell no action has taken yet."""
        return self.action is None

    @property
    def free(self) -> int:
        return self.capacity - len(self.assigned)

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        with self.send_lock:
            if self.sock is None:
                raise OSError("worker has no socket")
            self.sock.sendall(_HDR.pack(len(data)) + data)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def held_bytes(self) -> int | None:
        """The memory the worker holds and could not give back: its
        anonymous (and shared-memory) pages, as a container's memory limit
        counts them. The pages of its libraries are page cache, shared by
        every worker of the runtime and reclaimable, so they are not
        charged to each (the resident set size would count TensorFlow's
        450 MB of shared libraries once per worker). None once it is gone."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            return sum(int(fields[k].split()[0]) for k in (b"RssAnon", b"RssShmem")) * 1024
        except FileNotFoundError:
            return None
        except (OSError, KeyError, ValueError, IndexError):
            pass
        try:  # no such fields here: the resident set size
            import psutil
            if self.psutil_proc is None:
                self.psutil_proc = psutil.Process(self.proc.pid)
            return self.psutil_proc.memory_info().rss
        except Exception:  # the process is gone; its reader reports that
            return None

    def describe(self) -> dict:
        key = self.key or (None, None)
        return {"id": self.id, "namespace": key[0], "action": key[1],
                "version": f"0.0.{self.version}" if self.action else None,
                "pid": self.proc.pid if self.proc else None, "runtime": self.runtime,
                "stem_cell": self.is_stem, "from_stem_cell": self.stem and not self.is_stem,
                "forked": self.forked,
                "state": self.state, "assigned": len(self.assigned), "capacity": self.capacity,
                "memory_mb": self.memory_mb, "runs": self.runs, "retired": self.retired,
                "idle_s": round(time.time() - self.last_used, 3) if not self.assigned else 0.0}

    def start_process(self, log_path: Path, cwd: str, preload: tuple[str, ...] = ()) -> None:
        """Start the worker process (raises OSError) and its socket: the
        action's worker, or (no action yet) a stem cell loading `preload`."""
        a = self.action
        parent, child = socket.socketpair()
        if a is not None:
            args = (a.code_dir, str(a.exec.get("main") or "main"), str(self.capacity))
        else:
            args = ("--stem", *preload)
        try:
            with open(log_path, "ab") as logf:
                # Only what a process needs: the action sees none of the
                # fabric's (or the keeper's) environment.
                # ... and only its runtime's packages (fedkeeper/runtimes).
                self.proc = subprocess.Popen(
                    runtime_command(self.runtime, WORKER_SCRIPT, str(child.fileno()), *args),
                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    cwd=cwd, close_fds=True, env=minimal_env({"PYTHONDONTWRITEBYTECODE": "1"}))
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock = parent

    def start_forked(self, zygote: Zygote) -> None:
        """Start this stem cell as a fork of its runtime's zygote
        (zygotes.py); raises OSError when the zygote cannot fork it."""
        parent, child = socket.socketpair()
        try:
            pid = zygote.fork(child)
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        self.proc = ForkedProcess(pid)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock = parent
        self.forked = True

    def read_messages(self, on_message: Callable[[dict], None]) -> None:
        """Hand every message of the worker to `on_message` until its socket
        closes (the process died or was killed)."""
        sock = self.sock
        try:
            while True:
                hdr = recv_exact(sock, 4)
                if hdr is None:
                    break
                size = _HDR.unpack(hdr)[0]
                if size > MAX_WORKER_MESSAGE:
                    log.warning("worker %s sent a %d-byte message; stopping it", self.id, size)
                    break
                body = recv_exact(sock, size)
                if body is None:
                    break
                try:
                    msg = json.loads(body)
                except (ValueError, RecursionError):
                    break
                if isinstance(msg, dict):
                    on_message(msg)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            self.kill()
            if self.proc is not None:
                with contextlib.suppress(Exception):
                    self.proc.wait(timeout=5)


def activation_env(act: Activation, api_host: str, api_key: str) -> dict[str, str]:
    """The __OW_* variables OpenWhisk gives an activation, and nothing else."""
    a = act.action
    env = {"__OW_ACTIVATION_ID": act.id, "__OW_DEADLINE": str(int(act.deadline * 1000)),
           "__OW_ACTION_NAME": f"/{a.namespace}/{a.name}", "__OW_ACTION_VERSION": a.semver,
           "__OW_NAMESPACE": a.namespace, "__OW_API_HOST": api_host,
           "__OW_TRANSACTION_ID": act.id}
    # Newer OpenWhisk hands the key to an action only when it is annotated
    # provide-api-key.
    if annotation(a.annotations, "provide-api-key") is True:
        env["__OW_API_KEY"] = api_key
    return env
