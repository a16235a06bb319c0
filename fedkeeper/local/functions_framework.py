"""Serve HTTP function sources on loopback with Google's functions-framework.

Each deployed function is its own `python -m functions_framework` process
(the same server Cloud Functions builds into its images) on a free
127.0.0.1 port, started from the unpacked source zip with the function's
bound configuration as environment variables.

Processes are recorded in a state file (pid, port, content hash) so that a
keeper that restarts finds and reuses them, and so that none is left behind:
`stop`/`stop_all` end them even when another keeper process started them.

Fault injection lives here, not in the function: when faults are asked for,
a small wrapper module is written next to main.py and served instead; it
draws from a seeded generator and answers like the platform would (a crash,
408, 429) or delays the call, then hands over to the real function.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
import io
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import requests

FAULTS_ENV = "FK_FAULTS"
WRAPPER_MODULE = "_fk_faults"
ENTRY_FILE = "main.py"
STATE_FILE = "hosts.json"
LOG_FILE = "function.log"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0

# Only these variables of the keeper's environment reach a function: a
# function must not see the keeper's own secrets, as on a real platform.
_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT")

_WRAPPER_SOURCE = '''"""Fault injection of the local Cloud Functions fabric (added by the host,
never part of a function's source)."""
import json
import os
import random
import threading
import time

import flask

import main as _function_module

_cfg = json.loads(os.environ.get("FK_FAULTS") or "{}")
_target = os.environ["FUNCTION_TARGET"]
_inner = getattr(_function_module, _target)
_rng = random.Random(_cfg.get("seed", 0))
_lock = threading.Lock()


class InjectedCrash(RuntimeError):
    pass


def _draw():
    with _lock:
        return _rng.random()


def _faulty(request):
    slow = float(_cfg.get("slow_ms") or 0)
    if slow > 0:
        time.sleep(slow / 1000.0)
    x = _draw()
    crash = float(_cfg.get("crash") or 0)
    timeout = crash + float(_cfg.get("timeout") or 0)
    throttle = timeout + float(_cfg.get("throttle") or 0)
    if x < crash:
        # uncaught, so functions-framework answers 500 + X-Google-Status: crash
        raise InjectedCrash("injected crash")
    if x < timeout:
        return flask.Response("upstream request timeout", status=408,
                              content_type="text/plain")
    if x < throttle:
        return flask.Response("Rate exceeded.", status=429, content_type="text/plain",
                              headers={"Retry-After": "1"})
    return _inner(request)


_faulty.__name__ = _target
globals()[_target] = _faulty
'''


class HostError(RuntimeError):
    """A function process could not be started."""


@dataclass
class HostedFunction:
    name: str
    sha256: str
    config: str          # hash over everything that shapes the process
    pid: int
    port: int
    url: str
    directory: str
    timeout_s: float | None = None
    started_at: float = 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _safe_extract(data: bytes, dest: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            p = PurePosixPath(info.filename)
            if p.is_absolute() or ".." in p.parts:
                raise HostError(f"refusing zip member outside the source folder: {info.filename}")
        zf.extractall(dest)


def _config_hash(sha: str, target: str, env: Mapping[str, str], faults: Mapping[str, Any] | None,
                 threads: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([sha, target, sorted(env.items()), faults, threads],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _is_ours(pid: int, directory: str) -> bool:
    """The pid still runs the functions-framework process we recorded (pids
    are reused, so a live pid alone proves nothing)."""
    try:
        import psutil
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = proc.cmdline()
    except Exception:
        return False
    return "functions_framework" in cmd and any(directory in part for part in cmd)


class FrameworkHost:
    """Function processes of one local cluster, under `root`."""

    def __init__(self, root: Path, *, python: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------ state file

    @contextlib.contextmanager
    def _state(self):
        """Read-modify-write of the state file, locked against other keepers."""
        with self._lock, open(self.root / ".lock", "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            path = self.root / STATE_FILE
            try:
                raw = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                raw = {}
            state = {k: HostedFunction(**v) for k, v in raw.items()}
            yield state
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in state.items()}, indent=1))
            os.replace(tmp, path)

    def lookup(self, name: str) -> HostedFunction | None:
        with self._state() as state:
            h = state.get(name)
            if h is not None and not _is_ours(h.pid, h.directory):
                del state[name]
                return None
            return h

    def names(self) -> list[str]:
        with self._state() as state:
            return sorted(state)

    # ----------------------------------------------------------------- serve

    def serve(self, name: str, *, target: str, source_zip: bytes, sha256: str,
              env: Mapping[str, str], faults: Mapping[str, Any] | None = None,
              threads: int = 8, timeout_s: float | None = None,
              start_timeout_s: float = START_TIMEOUT_S) -> tuple[HostedFunction, bool]:
        """(hosted function, started): reuses a live process with the same
        source and configuration, else replaces it."""
        config = _config_hash(sha256, target, env, faults, threads)
        with self._state() as state:
            cur = state.get(name)
            if cur is not None and cur.config == config and _is_ours(cur.pid, cur.directory) \
                    and self._answers(cur.port, 1.0):
                return cur, False
            if cur is not None:
                self._kill(cur)
                del state[name]
            fdir = self.root / name
            src = fdir / sha256[:16]
            if not (src / ENTRY_FILE).is_file():
                tmp = fdir / f".unpack-{os.getpid()}-{threading.get_ident()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                _safe_extract(source_zip, tmp)
                if not (tmp / ENTRY_FILE).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise HostError(f"{name}: the source zip has no {ENTRY_FILE}")
                shutil.rmtree(src, ignore_errors=True)
                os.replace(tmp, src)
            # older versions of this function are of no further use
            for old in fdir.iterdir():
                if old.is_dir() and old != src and not old.name.startswith(".unpack-"):
                    shutil.rmtree(old, ignore_errors=True)
            source = ENTRY_FILE
            if faults:
                (src / f"{WRAPPER_MODULE}.py").write_text(_WRAPPER_SOURCE)
                source = f"{WRAPPER_MODULE}.py"
            hosted = self._start(name, src, source, target, env, faults, threads,
                                 config, sha256, timeout_s, start_timeout_s)
            state[name] = hosted
            return hosted, True

    def _start(self, name, src: Path, source: str, target: str, env: Mapping[str, str],
               faults, threads: int, config: str, sha256: str, timeout_s,
               start_timeout_s: float) -> HostedFunction:
        penv = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        penv.update({str(k): str(v) for k, v in env.items()})
        penv.update({
            # the bundled libraries (flcommon) come first, as in a real image
            "PYTHONPATH": str(src),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "FUNCTION_TARGET": target,
            "FUNCTION_SIGNATURE_TYPE": "http",
            "K_SERVICE": name,
            # one process with a thread per concurrent request, like one
            # instance with request concurrency
            "WORKERS": "1",
            "THREADS": str(max(1, threads)),
        })
        if faults:
            penv[FAULTS_ENV] = json.dumps(dict(faults), sort_keys=True)
        last_error = ""
        for _attempt in range(3):
            port = free_port()
            log_path = src.parent / LOG_FILE
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    [self.python, "-m", "functions_framework", "--target", target,
                     "--source", str(src / source), "--signature-type", "http",
                     "--host", "127.0.0.1", "--port", str(port)],
                    cwd=src, env=penv, stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=subprocess.STDOUT, start_new_session=True)
            self._procs[proc.pid] = proc
            hosted = HostedFunction(name=name, sha256=sha256, config=config, pid=proc.pid,
                                    port=port, url=f"http://127.0.0.1:{port}/",
                                    directory=str(src), timeout_s=timeout_s,
                                    started_at=time.time())
            deadline = time.monotonic() + start_timeout_s
            delay = 0.02
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if self._answers(port, 0.5):
                    return hosted
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)
            self._kill(hosted)
            last_error = _tail(log_path)
            if "in use" not in last_error.lower():
                break
        raise HostError(f"{name}: functions-framework did not start: {last_error or 'no output'}")

    @staticmethod
    def _answers(port: int, timeout: float) -> bool:
        # functions-framework answers /robots.txt itself with 404, without
        # running the function: a probe that cannot trigger any work.
        try:
            r = requests.get(f"http://127.0.0.1:{port}/robots.txt", timeout=timeout)
            r.close()
            return True
        except requests.exceptions.RequestException:
            return False

    # ------------------------------------------------------------------ stop

    def _kill(self, h: HostedFunction) -> None:
        proc = self._procs.pop(h.pid, None)
        if proc is None and not _is_ours(h.pid, h.directory):
            return
        # the process leads its own session: gunicorn's master and workers
        # go together. SIGINT is gunicorn's quick shutdown; SIGTERM would
        # wait for idle keep-alive connections and running calls.
        for sig, wait_s in ((signal.SIGINT, 1.5), (signal.SIGKILL, STOP_TIMEOUT_S)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(h.pid, sig)
            if proc is not None:
                try:
                    proc.wait(timeout=wait_s)
                    return
                except subprocess.TimeoutExpired:
                    continue
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _is_ours(h.pid, h.directory):
                time.sleep(0.05)
            if not _is_ours(h.pid, h.directory):
                return

    def stop(self, name: str, *, delete_files: bool = True) -> bool:
        with self._state() as state:
            h = state.pop(name, None)
            if h is None:
                return False
            self._kill(h)
        if delete_files:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return True

    def stop_all(self) -> None:
        with self._state() as state:
            for h in list(state.values()):
                self._kill(h)
            state.clear()


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()
