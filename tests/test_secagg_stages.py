"""The keeper's secure-aggregation stages (fedkeeper.privacy.secagg_stages)
against a real store, with a provider that runs fl_secagg_client in
process: retries with the training's policy, clients failed for good left
out of the sets, the threshold enforced, every attempt recorded, and a
resumed keeper invoking nothing that is done and reading back the sets."""
from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedkeeper.keeper.attempts import RetryPolicy
from fedkeeper.privacy.secagg_stages import SecAggStages, StageError, bound_for, client_secret
from fedkeeper.providers import ErrorClass, Outcome
from flcommon import store as fs
from flcommon.auth import signed
from flcommon.entry import openwhisk_main
from flcommon.secagg import relay

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"
TOKEN = "token-secret-for-stage-tests"


def _handle():
    path = FUNCTIONS / "fl_secagg_client" / "fl_secagg_client.py"
    spec = importlib.util.spec_from_file_location("_fn_fl_secagg_client_stages", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.handle


class InProcessProvider:
    """Runs fl_secagg_client through its OpenWhisk entry; `faults` maps
    (stage, client) to the error classes of its next attempts."""

    platform = "openwhisk"

    def __init__(self, store, faults=None):
        host, port = store.db.client.address
        self.bound = {"FK_STORE_URL": f"mongodb://{host}:{port}/", "FK_STORE_DB": store.db.name,
                      "FK_TOKEN_SECRET": TOKEN, "FK_CLIENT_SECRET": "c" * 32}
        self.handle = _handle()
        self.faults = faults or {}
        self.calls = []

    def call(self, name, payload, timeout_s):
        key = (payload["stage"], payload["client"])
        self.calls.append(key)
        queue = self.faults.get(key) or []
        if queue:
            ec = queue.pop(0)
            return Outcome(platform_id=f"p{len(self.calls)}", ok=False, error_class=ec, error=f"injected {ec.value}")
        out = openwhisk_main(self.handle, {**self.bound, **payload})
        ok = "error" not in out
        return Outcome(platform_id=f"p{len(self.calls)}", ok=ok, result=out,
                       error_class=None if ok else ErrorClass.APPLICATION_ERROR)


def dispatcher(store, provider, max_attempts=3):
    platforms = SimpleNamespace(
        provider=lambda cluster: provider,
        spec=lambda cluster, fn: SimpleNamespace(memory_mb=256, timeout_s=30.0),
        payload=lambda **ids: signed(TOKEN, ids),
        redeploy=lambda cluster, fn: None)
    return SimpleNamespace(platforms=platforms, policy=RetryPolicy(max_attempts, 0.001, 0.002, 0.0, 1.0),
                           clock=time.time, sleep=time.sleep, rng=random.Random(0),
                           insert_attempts=store.insert_attempts, update_attempts=store.update_attempts)


def session(store, n):
    sid = f"st-{store.db.name}"
    clients = [f"client_{i}" for i in range(n)]
    store.db[fs.SESSIONS].insert_one({"_id": sid, "spec": {"model": "small", "clients": clients,
                                                           "secure_aggregation": True}})
    return sid, clients


def stages_for(store, provider, clients, **kw):
    return SecAggStages(dispatcher(store, provider, **kw), store, {c: "local" for c in clients}, deadline_s=60.0)


def test_stages_retry_and_leave_out_clients_that_fail_for_good(store):
    sid, clients = session(store, 5)
    provider = InProcessProvider(store, {
        ("advertise", "client_1"): [ErrorClass.TIMEOUT],                 # retried, then fine
        ("share", "client_2"): [ErrorClass.PLATFORM_ERROR] * 3,           # out of attempts: not in u2
        ("advertise", "client_4"): [ErrorClass.AUTH],                     # not retryable: not in u1
    })
    stages = stages_for(store, provider, clients)
    u2 = stages.before_training(sid, 0, clients)
    sets = relay.sets(store.db, sid, 0)
    assert sets["u1"] == ["client_0", "client_1", "client_2", "client_3"]
    assert u2 == sets["u2"] == ["client_0", "client_1", "client_3"]
    assert provider.calls.count(("advertise", "client_1")) == 2
    assert provider.calls.count(("share", "client_2")) == 3
    assert provider.calls.count(("advertise", "client_4")) == 1
    attempts = store.attempts(sid, 0)
    assert {a["client"] for a in attempts} >= {"_secagg_advertise/client_1", "_secagg_share/client_2"}
    assert all(a["function"] == "fl_secagg_client" and a["state"] in ("succeeded", "failed") for a in attempts)
    assert sorted(a["attempt"] for a in attempts if a["client"] == "_secagg_share/client_2") == [1, 2, 3]


def test_unmask_fixes_u3_and_a_resumed_keeper_repeats_nothing(store):
    sid, clients = session(store, 4)
    provider = InProcessProvider(store)
    u2 = stages_for(store, provider, clients).before_training(sid, 0, clients)
    assert u2 == clients
    # Pretend three clients uploaded masked vectors (fl_client's part).
    u3 = stages_for(store, provider, clients).before_aggregating(sid, 0, clients[:3])
    assert u3 == clients[:3] == relay.sets(store.db, sid, 0)["u3"]
    assert relay.done(store.db, sid, 0, "reveal", clients) == clients[:3]
    before = len(provider.calls)
    again = stages_for(store, provider, clients)
    assert again.before_training(sid, 0, clients) == u2
    # A late upload does not widen u3 once fixed.
    assert again.before_aggregating(sid, 0, clients) == clients[:3]
    assert len(provider.calls) == before


def test_a_stage_below_the_threshold_ends_the_round(store):
    sid, clients = session(store, 4)
    provider = InProcessProvider(store, {("advertise", c): [ErrorClass.AUTH] for c in clients[:2]})
    with pytest.raises(StageError, match="advertise stage reached 2 client"):
        stages_for(store, provider, clients).before_training(sid, 0, clients)


def test_the_client_secret_is_bound_to_client_functions_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDKEEPER_CLIENT_SECRET", raising=False)
    secret = client_secret(tmp_path)
    assert len(secret) == 64 and client_secret(tmp_path) == secret
    assert (tmp_path / "client_secret").stat().st_mode & 0o077 == 0
    assert bound_for("fl_client", tmp_path) == {"FK_CLIENT_SECRET": secret}
    assert bound_for("fl_secagg_client", tmp_path) == {"FK_CLIENT_SECRET": secret}
    assert bound_for("fl_server_aggregator", tmp_path) == {}
    assert bound_for("fl_insights", tmp_path) == {}
