"""An embedded MongoDB-wire-protocol server (SecantusDB) for one machine.

`mongo_config.url: embedded` starts `secantusd-py` as a separate process on a
loopback port, with its data under the state directory. The port is kept in
`server.json` next to the data and reused, so function deployments that bind
the store URL stay valid across runs, and a server that is already running
(for example after the keeper was killed) is adopted rather than restarted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pymongo

from ..procs import pid_alive


class EmbeddedMongoError(RuntimeError):
    pass


@dataclass
class EmbeddedMongo:
    state_dir: Path
    host: str = "127.0.0.1"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    def _read_info(self) -> dict | None:
        try:
            return json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        return pid_alive(pid)

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
        return f"mongodb://{self.host}:{port}"

    def running_url(self) -> str | None:
        info = self._read_info()
        if info and self._alive(int(info["pid"])) and self._answers(self.url_for(int(info["port"]))):
            return self.url_for(int(info["port"]))
        return None

    def _free_port(self, preferred: int | None) -> int:
        for port in ([preferred] if preferred else []) + [0]:
            with socket.socket() as s:
                # A port we used a moment ago sits in TIME_WAIT; servers bind it
                # with SO_REUSEADDR, so probe the same way.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.host, port))
                except OSError:
                    continue
                return s.getsockname()[1]
        raise EmbeddedMongoError("no free loopback port")

    def _binary(self) -> str:
        exe = Path(sys.executable).parent / "secantusd-py"
        if exe.exists():
            return str(exe)
        found = shutil.which("secantusd-py")
        if not found:
            raise EmbeddedMongoError("secantusd-py is not installed (pip install secantusdb)")
        return found

    def start(self, timeout_s: float = 30.0) -> tuple[str, bool]:
        """Return (url, started_here). Reuses a server that is already running."""
        url = self.running_url()
        if url:
            return url, False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info = self._read_info() or {}
        port = self._free_port(info.get("port"))
        log = open(self.state_dir / "server.log", "ab")
        proc = subprocess.Popen(
            [self._binary(), "--host", self.host, "--port", str(port),
             "--storage-path", str(self.data_dir), "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # survives a killed keeper; adopted on resume
        url = self.url_for(port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EmbeddedMongoError(f"embedded MongoDB exited with status {proc.returncode}; "
                                         f"see {self.state_dir / 'server.log'}")
            if self._answers(url, 300):
                self.info_file.write_text(json.dumps({"pid": proc.pid, "port": port}))
                return url, True
            time.sleep(0.1)
        proc.kill()
        raise EmbeddedMongoError(f"embedded MongoDB did not answer within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 15.0) -> bool:
        info = self._read_info()
        if not info or not self._alive(int(info["pid"])):
            return False
        pid = int(info["pid"])
        os.kill(pid, signal.SIGTERM)  # lets WiredTiger checkpoint and close cleanly
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if self._alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True
