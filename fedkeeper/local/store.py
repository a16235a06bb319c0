"""An embedded MongoDB-wire-protocol server (SecantusDB) for one machine.

`mongo_config.url: embedded` starts `secantusd-py` as a separate process on a
loopback port, with its data under the state directory. The port is kept in
`server.json` next to the data and reused, so function deployments that bind
the store URL stay valid across runs, and a server that is already running
(for example after the keeper was killed) is adopted rather than restarted.

The server is supervised like every local service: `server.json` records
its process identity (pid, creation time, command line), and nothing is
signalled unless the pid is still that process. Every command that uses it
holds a lease (one per process), whether it started the server or reused
it; `stop` gives the lease back, and the last live holder stops the server
unless a command kept it (`keep`, for --keep-services). `shutdown`
(`fedkeeper fabric down`) stops it regardless. A store kept outside the
keeper's `<state>/mongo` (`mongo_config.state_dir`) is recorded in the
state directory (`register_store`), so that `fabric down` finds it there.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pymongo

from . import supervisor

INFO_FILE = "server.json"
LOG_FILE = "server.log"
#: the keeper state directory's default place for the store
DEFAULT_DIR = "mongo"
#: in the keeper state directory: the stores it used outside DEFAULT_DIR
ELSEWHERE_FILE = "embedded-stores.json"
MAX_ELSEWHERE = 100
#: connections each process opens to the embedded store (see url_for)
POOL_PER_PROCESS = 8


class EmbeddedMongoError(RuntimeError):
    pass


@dataclass
class EmbeddedMongo:
    state_dir: Path
    host: str = "127.0.0.1"
    _lease: supervisor.Lease | None = field(default=None, repr=False)

    def __post_init__(self):
        self.state_dir = Path(self.state_dir)

    @property
    def info_file(self) -> Path:
        return self.state_dir / INFO_FILE

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    def _read_info(self) -> dict | None:
        try:
            info = json.loads(self.info_file.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def _process(self, info: dict | None) -> supervisor.ProcessRecord | None:
        if not info:
            return None
        rec = supervisor.ProcessRecord.from_json(info.get("process") or {})
        if rec is None and "pid" in info:
            # Written before identities were recorded: adopt the pid only if
            # it runs the store's server.
            cur = supervisor.record_of(int(info["pid"]))
            if cur is not None and any("secantusd" in part for part in cur.cmdline):
                rec = cur
        return rec

    @staticmethod
    def _answers(url: str, timeout_ms: int = 500) -> bool:
        try:
            with pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms,
                                     connectTimeoutMS=timeout_ms) as c:
                c.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False

    def url_for(self, port: int) -> str:
        # What the URL asks of every client of this store (the keeper and
        # the functions, which receive it), for this server only:
        # - no retryable writes: SecantusDB keeps a record of each and scans
        #   them all (up to 10,000, sorted once full) on every write, so a
        #   write cost more the longer a session ran. Over loopback there is
        #   no failover to retry across; the keeper's Patience retries
        #   connection failures, and every FedKeeper write is keyed, so a
        #   repeated one is refused or sets the same values;
        # - at most 8 connections a process: the server runs one thread per
        #   connection behind one lock, and a thousand clients' connections
        #   at once made each command slower. A command waits for a
        #   connection in its own process instead.
        # bench/bench_round_overhead.py --clients 1000: a round took
        # 52.7-56.4 s with neither, 22.2-26.2 s with both.
        return f"mongodb://{self.host}:{port}/?retryWrites=false&maxPoolSize={POOL_PER_PROCESS}"

    def running_url(self) -> str | None:
        info = self._read_info()
        if info and supervisor.is_running(self._process(info)) and self._answers(self.url_for(int(info["port"]))):
            return self.url_for(int(info["port"]))
        return None

    def _binary(self) -> str:
        exe = Path(sys.executable).parent / "secantusd-py"
        if exe.exists():
            return str(exe)
        found = shutil.which("secantusd-py")
        if not found:
            raise EmbeddedMongoError("secantusd-py is not installed (pip install secantusdb)")
        return found

    def start(self, timeout_s: float = 30.0) -> tuple[str, bool]:
        """Return (url, started_here). Reuses a server that is already
        running. Either way this process holds a lease on it until `stop`."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with supervisor.locked(self.state_dir):
            url = self.running_url() or self._slow_but_alive(timeout_s)
            started = url is None
            if started:
                url = self._start(timeout_s)
            # One lease per process: the runtime may replace its object
            # after a restart, and whichever object stops it gives it back.
            self._lease = supervisor.hold(self.state_dir, started=started, auto_stop=True, per_process=True)
            return url, started

    def _slow_but_alive(self, timeout_s: float) -> str | None:
        """The URL of a recorded server whose process runs but did not
        answer the quick ping (a loaded machine): waited for, since a second
        server on the same data directory would be refused. None when no
        such process runs (or it ends meanwhile)."""
        info = self._read_info()
        rec = self._process(info)
        if not supervisor.is_running(rec):
            return None
        url = self.url_for(int(info["port"]))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not supervisor.is_running(rec):
                return None
            if self._answers(url, 2000):
                return url
            time.sleep(0.2)
        raise EmbeddedMongoError(f"the embedded MongoDB (pid {rec.pid}) runs but has not answered for "
                                 f"{timeout_s:.0f}s; stop it with `fedkeeper fabric down`")

    def _start(self, timeout_s: float) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info = self._read_info() or {}
        # Leases of commands that are gone go; those of live commands stay:
        # their clients reconnect to this server on their own, and it must not
        # be stopped under them when this command is done.
        supervisor.live_holders(self.state_dir)
        try:
            port = supervisor.free_port(self.host, info.get("port"))
        except OSError as exc:
            raise EmbeddedMongoError(str(exc)) from None
        # In a session of its own: survives a killed keeper; adopted on resume.
        # Standalone: SecantusDB otherwise poses as a one-node replica set and
        # writes an oplog entry for every document written, which only change
        # streams read and FedKeeper opens none (a sixth of an update's cost).
        # Nothing of the command's environment (cloud keys, tokens) goes to a
        # server that outlives it.
        proc, rec = supervisor.spawn(
            [self._binary(), "--host", self.host, "--port", str(port),
             "--storage-path", str(self.data_dir), "--log-level", "WARNING", "--standalone"],
            log_path=self.state_dir / LOG_FILE, env=supervisor.minimal_env())
        # Recorded at once: a command interrupted while the server starts
        # leaves it findable (`fabric down`, or the next command waits for it).
        supervisor.write_private(self.info_file, json.dumps({"pid": proc.pid, "port": port,
                                                             "process": rec.to_json()}))
        url = self.url_for(port)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise EmbeddedMongoError(f"embedded MongoDB exited with status {proc.returncode}; "
                                             f"see {self.state_dir / LOG_FILE}")
                if self._answers(url, 300):
                    return url
                time.sleep(0.1)
            raise EmbeddedMongoError(f"embedded MongoDB did not answer within {timeout_s:.0f}s")
        except BaseException:   # not answering, exited, or the command interrupted meanwhile
            supervisor.stop(rec, grace_s=2.0)
            with contextlib.suppress(FileNotFoundError):
                self.info_file.unlink()
            raise

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Give this process's lease back and stop the server if that was
        the last live lease, unless the server was kept (`keep`). True when
        a server was stopped."""
        if not self.state_dir.is_dir():
            return False
        with supervisor.locked(self.state_dir):
            self._lease = None
            if not supervisor.release(supervisor.Lease(self.state_dir, per_process=True)):
                return False
            return self._stop(timeout_s)

    def keep(self) -> None:
        """Let the server outlive its last holder, until `shutdown`."""
        if self.state_dir.is_dir():
            with supervisor.locked(self.state_dir):
                supervisor.keep(self.state_dir)

    def shutdown(self, timeout_s: float = 15.0) -> bool:
        """Stop the server whoever holds it. True when one was running."""
        if not self.state_dir.is_dir():
            return False
        with supervisor.locked(self.state_dir):
            self._lease = None
            return self._stop(timeout_s)

    def _stop(self, timeout_s: float) -> bool:
        # SIGTERM lets WiredTiger checkpoint and close cleanly.
        stopped = supervisor.stop(self._process(self._read_info()), grace_s=timeout_s)
        supervisor.drop_leases(self.state_dir)
        return stopped


def shutdown_store(state_dir: Path) -> bool:
    """Stop the embedded store kept under a state directory, if any."""
    with contextlib.suppress(OSError):
        if (Path(state_dir) / INFO_FILE).is_file():
            return EmbeddedMongo(Path(state_dir)).shutdown()
    return False


def _stores_elsewhere(keeper_state: Path) -> list[str]:
    try:
        listed = json.loads((keeper_state / ELSEWHERE_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(listed, list):
        return []
    return [p for p in listed[:MAX_ELSEWHERE] if isinstance(p, str) and os.path.isabs(p)]


def register_store(keeper_state: Path, store_dir: Path) -> None:
    """Record, in the keeper's state directory, an embedded store kept
    outside its `mongo/`, so that `shutdown_stores` (`fabric down`) finds it."""
    keeper_state, store_dir = Path(keeper_state).resolve(), Path(store_dir).resolve()
    if store_dir == keeper_state / DEFAULT_DIR:
        return
    with supervisor.locked(keeper_state, f".{ELSEWHERE_FILE}.lock"):
        listed = _stores_elsewhere(keeper_state)
        if str(store_dir) not in listed:
            listed = [str(store_dir), *listed][:MAX_ELSEWHERE]
            supervisor.write_private(keeper_state / ELSEWHERE_FILE, json.dumps(listed))


def shutdown_stores(keeper_state: Path) -> bool:
    """Stop the embedded stores a keeper state directory used: its own
    `mongo/` and those recorded by `register_store`. True when any ran."""
    keeper_state = Path(keeper_state)
    stopped = shutdown_store(keeper_state / DEFAULT_DIR)
    with supervisor.locked(keeper_state, f".{ELSEWHERE_FILE}.lock"):
        for store_dir in _stores_elsewhere(keeper_state):
            stopped = shutdown_store(Path(store_dir)) or stopped
        with contextlib.suppress(FileNotFoundError):
            (keeper_state / ELSEWHERE_FILE).unlink()
    return stopped
