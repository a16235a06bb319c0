"""Shared fixtures: a real MongoDB-wire-protocol server (SecantusDB, started
exactly as `mongo_config.url: embedded` starts it) and isolated state/log
directories."""
from __future__ import annotations

import os
import uuid

import pytest

from fedkeeper.store import connect
from fedkeeper.local.store import EmbeddedMongo


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    server = EmbeddedMongo(tmp_path_factory.mktemp("mongo"))
    url, started = server.start()
    assert started
    yield server, url
    server.stop()


@pytest.fixture(scope="session")
def mongo_url(mongo_server):
    return mongo_server[1]


@pytest.fixture
def store(mongo_url):
    s = connect(mongo_url, f"t_{uuid.uuid4().hex[:10]}")
    yield s
    s.client.drop_database(s.db.name)
    s.close()


def _own_dirs(monkeypatch, root) -> None:
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(root / "state"))
    monkeypatch.setenv("FEDKEEPER_LOG_DIR", str(root / "logs"))


@pytest.fixture(autouse=True)
def _state_of_its_own(request, monkeypatch):
    """Every test gets state and log directories of its own, so that none
    writes into the work tree (the defaults `.state` and `logs` are relative
    to the current directory) or shares a token secret or run log with
    another run; and no config is taken from the environment. Tests of a
    module that shares one state directory on purpose (`fabric_state`, for
    warm workers) keep that one."""
    monkeypatch.delenv("FEDKEEPER_CONFIG", raising=False)
    if "fabric_state" not in request.fixturenames:
        _own_dirs(monkeypatch, request.getfixturevalue("tmp_path"))


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """Keeper state and logs under tmp_path, named where a test relies on it
    (every test but fabric_state's gets them anyway)."""
    _own_dirs(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture
def fn_db(mongo_url):
    """A fresh database with only the indexes the functions create themselves
    (as on a store the keeper never touched)."""
    from flcommon import store as fs
    name = f"fn_{uuid.uuid4().hex[:10]}"
    db = fs.database(mongo_url, name)
    fs.ensure_function_indexes(db)
    yield db
    db.client.drop_database(name)


@pytest.fixture(scope="module")
def fabric_state(tmp_path_factory):
    """One state directory (fabric, functions-framework hosts, token secret,
    logs) per test module, so the module's sessions share warm workers; the
    local services are stopped when the module ends. The one deliberate
    exception to a state directory per test: these modules' tests run one
    after another and look their sessions up by id."""
    sdir = tmp_path_factory.mktemp("state")
    old = {k: os.environ.get(k) for k in ("FEDKEEPER_STATE_DIR", "FEDKEEPER_LOG_DIR")}
    os.environ["FEDKEEPER_STATE_DIR"] = str(sdir)
    os.environ["FEDKEEPER_LOG_DIR"] = str(sdir / "logs")
    yield sdir
    from fedkeeper.local import shutdown_local_services
    shutdown_local_services(sdir)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
