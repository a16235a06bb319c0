"""The fabric as a service of a state directory: run it in this process
(`serve`), or start, find, share and stop its process (`fabric_up`,
`fabric_status`, `fabric_release`, `fabric_down`) through the one process
supervisor."""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from .. import supervisor
from ...runtimes.isolation import CACHE_ENV
from .api import make_server
from .entities import DEFAULT_NAMESPACE, Settings
from .core import Fabric
from .status import FabricError

log = logging.getLogger("fedkeeper.fabric")

STATE_FILE = "fabric.json"
AUTH_FILE = "auth"
LOG_FILE = "fabric.log"
LOCK_FILE = "fabric.lock"


def _auth_for(sdir: Path) -> str:
    """The fabric's key, generated once per state directory (mode 0600)."""
    p = sdir / AUTH_FILE
    if p.exists():
        value = p.read_text().strip()
        if ":" in value:
            return value
    value = f"{uuid.uuid4()}:{secrets.token_hex(32)}"
    supervisor.write_private(p, value)
    return value


def serve(state_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          settings: Settings | None = None) -> None:
    """Run the fabric in this process until SIGTERM/SIGINT."""
    sdir = Path(state_dir).resolve()
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    auth = _auth_for(sdir)
    fabric = Fabric(sdir, settings or Settings(), auth)
    httpd = make_server(fabric, host, port)
    real_port = httpd.server_address[1]
    url = f"http://{host}:{real_port}"
    fabric.api_host = url
    fabric.start_stem_cells()
    me = supervisor.record_of(os.getpid())
    info = {"url": url, "host": host, "port": real_port, "pid": os.getpid(), "auth": auth,
            "namespace": DEFAULT_NAMESPACE, "started_at": time.time(),
            "user_memory_mb": fabric.settings.user_memory_mb, "stem_cells": fabric.settings.stem_cells,
            "process": me.to_json() if me else None}
    supervisor.write_private(sdir / STATE_FILE, json.dumps(info))

    def stop(signum, frame):
        # Stopping from here on: a stop signal reaches the whole process
        # group, so the zygote may already be dead when a stem cell is
        # forked next, which must not read as the zygote failing.
        fabric.stopping = True
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("fabric listening on %s (pid %d)", url, os.getpid())
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        fabric.shutdown()
        httpd.server_close()
        with contextlib.suppress(OSError, ValueError):
            cur = json.loads((sdir / STATE_FILE).read_text())
            if cur.get("pid") == os.getpid():
                (sdir / STATE_FILE).unlink()
        log.info("fabric stopped")


def _read_state(sdir: Path) -> dict | None:
    try:
        info = json.loads((Path(sdir) / STATE_FILE).read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _process(info: dict | None) -> supervisor.ProcessRecord | None:
    if not info:
        return None
    rec = supervisor.ProcessRecord.from_json(info.get("process") or {})
    if rec is None and "pid" in info:
        # Written before identities were recorded: adopt the pid only if it
        # runs a fabric.
        with contextlib.suppress(TypeError, ValueError):
            cur = supervisor.record_of(int(info["pid"]))
            if cur is not None and "fedkeeper.local.fabric" in cur.cmdline:
                rec = cur
    return rec


def _answers(info: dict, timeout: float = 2.0) -> bool:
    try:
        conn = http.client.HTTPConnection(info["host"], int(info["port"]), timeout=timeout)
        try:
            conn.request("GET", "/api/v1/namespaces/_/limits", headers={
                "Authorization": "Basic " + base64.b64encode(info["auth"].encode()).decode()})
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, KeyError, ValueError, http.client.HTTPException):
        return False


def _capacity(info: dict, timeout: float = 2.0) -> dict | None:
    """The pool's capacity now: user memory, memory used, workers and stem
    cells, queued activations (from /_fabric/status)."""
    try:
        conn = http.client.HTTPConnection(info["host"], int(info["port"]), timeout=timeout)
        try:
            conn.request("GET", "/_fabric/status", headers={
                "Authorization": "Basic " + base64.b64encode(info["auth"].encode()).decode()})
            r = conn.getresponse()
            st = json.loads(r.read(1 << 20)) if r.status == 200 else None
        finally:
            conn.close()
    except (OSError, KeyError, ValueError, http.client.HTTPException):
        return None
    if not isinstance(st, dict):
        return None
    workers = [w for w in st.get("workers") or () if isinstance(w, dict)]
    return {"user_memory_mb": st.get("user_memory_mb"), "memory_used_mb": st.get("memory_used_mb"),
            "stem_cells": st.get("stem_cells"), "stem_memory_mb": st.get("stem_memory_mb"),
            "workers": sum(1 for w in workers if not w.get("stem_cell")),
            "idle_stem_cells": sum(1 for w in workers if w.get("stem_cell")),
            "fork_stem_cells": st.get("fork_stem_cells"), "zygotes": st.get("zygotes"),
            # per action: limits.concurrency and what its workers run now
            "actions": st.get("actions"),
            "queued": sum(v for v in (st.get("queued") or {}).values() if isinstance(v, int))}


def fabric_status(state_dir: str | os.PathLike, capacity: bool = False) -> dict | None:
    """The running fabric's info (url, auth, pid, port, ...) or None; with
    `capacity`, also its pool's now (info["capacity"])."""
    info = _read_state(Path(state_dir))
    if not info or not supervisor.is_running(_process(info)) or not _answers(info):
        return None
    if capacity:
        info["capacity"] = _capacity(info)
    return info


def fabric_up(state_dir: str | os.PathLike, *, port: int = 0, timeout_s: float = 30.0,
              extra_args: list[str] | None = None, hold: bool = False, auto_stop: bool = False) -> dict:
    """Start the fabric for this state directory, or reuse the running one.
    Returns its info with started=True when this call started it. With
    `hold`, the caller also gets a lease on it (info["lease"]), to give back
    with fabric_release; with `auto_stop`, its last holder stops it (else it
    runs until `fabric down`)."""
    sdir = Path(state_dir).resolve()
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with supervisor.locked(sdir, LOCK_FILE):
        info = fabric_status(sdir)
        started = info is None
        if started:
            info = _start(sdir, port, timeout_s, extra_args)
        out = {**info, "started": started}
        if hold:
            out["lease"] = supervisor.hold(sdir, started=started, auto_stop=auto_stop)
        elif not auto_stop:
            supervisor.keep(sdir)
        return out


def _start(sdir: Path, port: int, timeout_s: float, extra_args: list[str] | None) -> dict:
    # Running but not answering: stop it rather than start a second one.
    supervisor.stop(_process(_read_state(sdir)), grace_s=5.0)
    supervisor.drop_leases(sdir)
    with contextlib.suppress(FileNotFoundError):
        (sdir / STATE_FILE).unlink()
    # The fabric holds no secret of the keeper's: a minimal environment, plus
    # where the runtime sites are cached (its workers' isolation reads it).
    pkg_root = str(Path(__file__).resolve().parents[3])
    inherited = os.environ.get("PYTHONPATH")
    extra = {"PYTHONPATH": pkg_root + (os.pathsep + inherited if inherited else "")}
    extra.update({k: os.environ[k] for k in (CACHE_ENV, "XDG_CACHE_HOME") if k in os.environ})
    env = supervisor.minimal_env(extra)
    cmd = [sys.executable, "-m", "fedkeeper.local.fabric", "serve",
           "--state-dir", str(sdir), "--port", str(port)] + list(extra_args or [])
    proc, rec = supervisor.spawn(cmd, log_path=sdir / LOG_FILE, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FabricError(f"the local fabric exited at start (status {proc.returncode}); "
                              f"see {sdir / LOG_FILE}:\n{supervisor.tail(sdir / LOG_FILE)}")
        info = _read_state(sdir)
        if info and info.get("pid") == proc.pid and _answers(info, timeout=1.0):
            return info
        time.sleep(0.02)
    supervisor.stop(rec, grace_s=2.0)
    raise FabricError(f"the local fabric did not answer within {timeout_s:.0f}s; see {sdir / LOG_FILE}")


def fabric_release(state_dir: str | os.PathLike, lease: supervisor.Lease | None) -> bool:
    """Give a lease from fabric_up back; the last holder of a fabric started
    with auto_stop stops it. True when this call stopped it."""
    sdir = Path(state_dir).resolve()
    if lease is None or not sdir.is_dir():
        return False
    with supervisor.locked(sdir, LOCK_FILE):
        if not supervisor.release(lease):
            return False
        return _stop(sdir, 10.0)


def _stop(sdir: Path, grace_s: float) -> bool:
    info = _read_state(sdir)
    stopped = supervisor.stop(_process(info), grace_s=grace_s)
    with contextlib.suppress(FileNotFoundError):
        (sdir / STATE_FILE).unlink()
    supervisor.drop_leases(sdir)
    return stopped


def fabric_down(state_dir: str | os.PathLike, grace_s: float = 10.0) -> bool:
    """Stop the fabric of this state directory and its workers, whoever
    holds it. False when none was running."""
    sdir = Path(state_dir).resolve()
    if not sdir.is_dir():
        return False
    with supervisor.locked(sdir, LOCK_FILE):
        if _read_state(sdir) is None:
            return False
        return _stop(sdir, grace_s)
