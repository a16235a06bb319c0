"""A real SecantusDB server for the function tests (and the aggregation bench).

`secantusd-py` speaks the MongoDB wire protocol; it runs as a subprocess on a
free loopback port with its data in a temporary directory. Test modules
import the fixtures by name (`from fixtures_store import fn_mongo_url, fn_db`);
the server is shared by every module that does, through a reference count,
because a session fixture imported into two modules is two fixtures.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pymongo
import pytest

from flcommon import store as fs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    exe = Path(sys.executable).parent / "secantusd-py"
    found = str(exe) if exe.exists() else shutil.which("secantusd-py")
    if not found:
        raise RuntimeError("secantusd-py is not installed (pip install secantusdb)")
    return found


class SecantusServer:
    """One secantusd-py process; `start()` returns its mongodb:// URL."""

    def __init__(self, storage: Path | None = None):
        self._tmp = None if storage else tempfile.TemporaryDirectory(prefix="fk-secantus-")
        self.storage = Path(storage or self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        port = _free_port()
        self.url = f"mongodb://127.0.0.1:{port}/"
        self.log = open(self.storage / "server.log", "ab")
        self.proc = subprocess.Popen(
            [_binary(), "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(self.storage / "data"),
             "--log-level", "WARNING"], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"secantusd-py exited with {self.proc.returncode}; see {self.storage}/server.log")
            try:
                with pymongo.MongoClient(self.url, serverSelectionTimeoutMS=300, connectTimeoutMS=300) as c:
                    c.admin.command("ping")
                return self.url
            except pymongo.errors.PyMongoError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"secantusd-py did not answer within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean WiredTiger shutdown
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc:
            self.log.close()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


_shared: dict[str, object] = {"server": None, "users": 0}
_shared_lock = threading.Lock()


@pytest.fixture(scope="session")
def fn_mongo_url():
    with _shared_lock:
        if _shared["server"] is None:
            server = SecantusServer()
            server.start()
            _shared["server"] = server
        _shared["users"] = int(_shared["users"]) + 1
        url = _shared["server"].url
    yield url
    with _shared_lock:
        _shared["users"] = int(_shared["users"]) - 1
        if _shared["users"] == 0:
            _shared["server"].stop()
            _shared["server"] = None


@pytest.fixture
def fn_db(fn_mongo_url):
    """A fresh database with the indexes the functions rely on."""
    name = f"fn_{uuid.uuid4().hex[:10]}"
    db = fs.database(fn_mongo_url, name)
    fs.ensure_function_indexes(db)
    yield db
    db.client.drop_database(name)
