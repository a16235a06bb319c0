"""Serve HTTP function sources on loopback with Google's functions-framework.

Each deployed function is its own process (function_host.py: the app
functions-framework builds, the same Cloud Functions builds into its
images, behind a threaded server with read timeouts) on a free 127.0.0.1
port, started from the unpacked source zip with the function's bound
configuration as environment variables, and nothing else of the keeper's
environment but what a process needs (PATH, HOME, LANG, ...).

Processes are recorded in a state file (port, content hash, and the process
identity the supervisor checks before it signals anything) so that a keeper
that restarts finds and reuses them, and so that none is left behind:
`stop`/`stop_all` end them even when another keeper process started them.

Each function is one instance running `threads` requests at once (Cloud
Functions' instance concurrency, bounded by its memory: capacity.py) and
accepting up to `in_flight` (the others wait at the host for a slot),
started at deploy and kept (a minimum instance): it imports its runtime's heavy modules from the start
(fedkeeper/local/prewarm.py), so its first request is not a cold import.

Fault injection lives in the host process, not in the function: the local
platforms' fault model draws per request and answers like the platform
would (a crash, 408, 429) or delays the call, then hands over to the
function.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import requests

from ...runtimes import Pin, RuntimeDeclarationError, parse_pins
from ...runtimes.isolation import IsolationError, source_command
from .. import supervisor
from ..prewarm import preload_for, runtime_of_pins
from ..archive import ArchiveError, compile_python, extract_zip

HOST_SCRIPT = str(Path(__file__).with_name("function_host.py"))
ENTRY_FILE = "main.py"
STATE_FILE = "hosts.json"
LOG_FILE = "function.log"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
# Requests the keeper sends a function at once when it does not know the
# function's own capacity (capacity.py).
DEFAULT_IN_FLIGHT = 64
# Connections kept free beside the keeper's requests for liveness probes.
PROBE_CONNECTIONS = 8
# Requests a function accepts at once unless its deployer says otherwise.
DEFAULT_ACCEPTED = 256 - PROBE_CONNECTIONS


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
    in_flight: int = 0   # requests it accepts at once (0: recorded before it was)
    process: dict = field(default_factory=dict)   # supervisor.ProcessRecord of the host

    def record(self) -> supervisor.ProcessRecord | None:
        return supervisor.ProcessRecord.from_json(self.process)

    def running(self) -> bool:
        return supervisor.is_running(self.record())


def _config_hash(sha: str, target: str, env: Mapping[str, str], faults: Mapping[str, Any] | None,
                 threads: int, in_flight: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([sha, target, sorted(env.items()), faults, threads, in_flight],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _source_pins(src: Path) -> list[Pin]:
    """The pins of the source's requirements.txt (none when it has none or
    they do not parse: source_command has refused those already)."""
    try:
        return list(parse_pins("requirements", (src / "requirements.txt").read_text(), "requirements.txt"))
    except (OSError, RuntimeDeclarationError):
        return []


class FrameworkHost:
    """Function processes of one local cluster, under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # ------------------------------------------------------------ state file

    @contextlib.contextmanager
    def _state(self):
        """Read-modify-write of the state file, locked against other keepers."""
        with self._lock, supervisor.locked(self.root):
            path = self.root / STATE_FILE
            try:
                raw = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                raw = {}
            state = {}
            for k, v in raw.items():
                with contextlib.suppress(TypeError):
                    state[k] = HostedFunction(**v)
            yield state
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in state.items()}, indent=1))
            os.replace(tmp, path)

    def lookup(self, name: str) -> HostedFunction | None:
        with self._state() as state:
            h = state.get(name)
            if h is not None and not h.running():
                del state[name]
                return None
            return h

    def names(self) -> list[str]:
        with self._state() as state:
            return sorted(state)

    # ----------------------------------------------------------------- serve

    def serve(self, name: str, *, target: str, source_zip: bytes, sha256: str,
              env: Mapping[str, str], faults: Mapping[str, Any] | None = None,
              threads: int = 8, in_flight: int = DEFAULT_ACCEPTED, timeout_s: float | None = None,
              start_timeout_s: float = START_TIMEOUT_S) -> tuple[HostedFunction, bool]:
        """(hosted function, started): reuses a live process with the same
        source and configuration, else replaces it. `threads` requests run
        the function at once, up to `in_flight` are accepted."""
        in_flight = max(1, int(in_flight))
        config = _config_hash(sha256, target, env, faults, threads, in_flight)
        with self._state() as state:
            cur = state.get(name)
            if cur is not None and cur.config == config and cur.running() \
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
                try:
                    extract_zip(source_zip, tmp)
                except ArchiveError as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise HostError(f"{name}: the source zip is refused: {exc}") from None
                if not (tmp / ENTRY_FILE).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise HostError(f"{name}: the source zip has no {ENTRY_FILE}")
                compile_python(tmp)
                shutil.rmtree(src, ignore_errors=True)
                os.replace(tmp, src)
            # older versions of this function are of no further use
            for old in fdir.iterdir():
                if old.is_dir() and old != src and not old.name.startswith(".unpack-"):
                    shutil.rmtree(old, ignore_errors=True)
            hosted = self._start(name, src, target, env, faults, threads, in_flight,
                                 config, sha256, timeout_s, start_timeout_s)
            state[name] = hosted
            return hosted, True

    def _start(self, name, src: Path, target: str, env: Mapping[str, str],
               faults, threads: int, in_flight: int, config: str, sha256: str, timeout_s,
               start_timeout_s: float) -> HostedFunction:
        # The function's bound configuration and what a process needs:
        # nothing else of the keeper's environment.
        penv = supervisor.minimal_env(env)
        penv.update({
            # the bundled libraries (flcommon) come first, as in a real image
            "PYTHONPATH": str(src),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "FUNCTION_TARGET": target,
            "FUNCTION_SIGNATURE_TYPE": "http",
            "K_SERVICE": name,
        })
        last_error = ""
        for _attempt in range(3):
            port = supervisor.free_port()
            log_path = src.parent / LOG_FILE
            # what the source's requirements.txt pins, as the buildpack installs
            # (fedkeeper/runtimes): an undeclared import fails here as there
            try:
                cmd = source_command(src, HOST_SCRIPT, "--source", str(src / ENTRY_FILE), "--target", target,
                                     "--name", name, "--port", str(port), "--threads", str(max(1, threads)),
                                     # the keeper's requests and the host's liveness probes
                                     "--max-connections", str(in_flight + PROBE_CONNECTIONS),
                                     "--timeout-s", str(float(timeout_s or 60.0)))
            except IsolationError as exc:
                raise HostError(f"{name}: {exc}") from None
            if faults:
                cmd += ["--faults", json.dumps(dict(faults), sort_keys=True)]
            # a prewarmed instance: its runtime's heavy modules load from the start
            preload = preload_for(runtime_of_pins(_source_pins(src)))
            if preload:
                cmd += ["--preload", ",".join(preload)]
            proc, rec = supervisor.spawn(cmd, log_path=log_path, env=penv, cwd=src)
            hosted = HostedFunction(name=name, sha256=sha256, config=config, pid=proc.pid,
                                    port=port, url=f"http://127.0.0.1:{port}/",
                                    directory=str(src), timeout_s=timeout_s,
                                    started_at=time.time(), process=rec.to_json(),
                                    in_flight=in_flight)
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
            last_error = supervisor.tail(log_path, 30)
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
        # SIGINT first: the server stops at once, without waiting for idle
        # keep-alive connections.
        supervisor.stop(h.record(), first=signal.SIGINT, grace_s=1.5)

    def stop(self, name: str, *, delete_files: bool = True) -> bool:
        with self._state() as state:
            h = state.pop(name, None)
            if h is None:
                return False
            self._kill(h)
        if delete_files:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return True

    def hold(self, *, auto_stop: bool) -> supervisor.Lease:
        """A lease on this cluster's processes for one open provider: the
        last holder to release it stops them (unless one held them with
        auto_stop=False, which keeps them for a later command)."""
        with self._state():
            return supervisor.hold(self.root, started=True, auto_stop=auto_stop)

    def release(self, lease: supervisor.Lease | None) -> bool:
        """Give a lease back; True when that stopped the processes."""
        with self._state() as state:
            if not supervisor.release(lease):
                return False
            for h in list(state.values()):
                self._kill(h)
            state.clear()
            return True

    def stop_all(self) -> None:
        """Stop every function of the cluster, whoever holds them."""
        with self._state() as state:
            for h in list(state.values()):
                self._kill(h)
            state.clear()
            supervisor.drop_leases(self.root)

