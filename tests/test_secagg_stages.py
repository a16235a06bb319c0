"""The keeper's secure-aggregation stages (fedkeeper.privacy.secagg_stages,
secagg_dispatch) driven by the keeper's real Dispatcher and attempt state
machine, against a real store, with a scripted platform that runs
fl_secagg_client in process when an attempt is invoked and a clock that
moves only when the keeper sleeps: retries within bounds (a failed, a
throttled and a timed-out attempt), a stage deadline that drops a client
still running, Shamir recovery above the threshold and a clear refusal
below it, every attempt recorded, and a resumed keeper that adopts what an
earlier one left running and repeats nothing that is done. The rounds end
with the aggregator's unmasking, which must equal plain FedAvg."""
from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedkeeper.cost import session_cost
from fedkeeper.keeper.attempts import RetryPolicy
from fedkeeper.keeper.dispatch import Dispatcher
from fedkeeper.keeper.events import RoundEvents
from fedkeeper.privacy.secagg_stages import SecAggStages, StageError, bound_for, client_secret
from fedkeeper.providers import ErrorClass, Outcome, ProviderError
from flcommon import store as fs
from flcommon.auth import signed
from flcommon.entry import BadRequest, openwhisk_main
from flcommon.secagg import error_bound, relay
from flcommon.secagg.client import masked_update
from flcommon.secagg.server import secure_aggregate
from flcommon.strategies import get_strategy
from keeper_fakes import FakeClock, FakeProvider
from reference_fedavg import fedavg

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"
TOKEN = "token-secret-for-stage-tests"
SHAPES = [(6, 4), (4,)]
HANG = "hang"


def _handle():
    path = FUNCTIONS / "fl_secagg_client" / "fl_secagg_client.py"
    spec = importlib.util.spec_from_file_location("_fn_fl_secagg_client_stages", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.handle


class StagePlatform(FakeProvider):
    """fl_secagg_client through its OpenWhisk entry, run when an attempt is
    invoked; `script` maps (stage, client) to what its next attempts do: an
    ErrorClass (the attempt fails with it), a ProviderError (refused at
    invoke), "hang" (never answers) or ("after", s) (answers s seconds later)."""

    def __init__(self, store, clock, script=None):
        super().__init__("local", store, clock, self._behave)
        host, port = store.db.client.address
        self.bound = {"FK_STORE_URL": f"mongodb://{host}:{port}/", "FK_STORE_DB": store.db.name,
                      "FK_TOKEN_SECRET": TOKEN, "FK_CLIENT_SECRET": "c" * 32}
        self.handle = _handle()
        self.script = script or {}
        self.calls: list[tuple[str, str]] = []

    def _behave(self, fn, payload, n):
        key = (payload["stage"], payload["client"])
        self.calls.append(key)
        queue = self.script.get(key) or []
        what = queue.pop(0) if queue else "ok"
        if isinstance(what, ErrorClass):
            return Outcome("", False, what, f"injected {what.value}")
        return what

    def _run(self, name, payload):
        return openwhisk_main(self.handle, {**self.bound, **payload})


def keeper_parts(store, platform, clock, *, timeout_s=10.0, max_attempts=3):
    platforms = SimpleNamespace(
        provider=lambda cluster: platform,
        spec=lambda cluster, fn: SimpleNamespace(memory_mb=256, timeout_s=timeout_s),
        payload=lambda **ids: signed(TOKEN, ids),
        via_invoker=lambda cluster: False,
        redeploy=lambda cluster, fn: platform.deployed.append(fn))
    policy = RetryPolicy(max_attempts, backoff_s=0.5, backoff_max_s=2.0, jitter=0.0, grace_s=1.0)
    return Dispatcher(platforms, store, policy, RoundEvents(), clock=clock, sleep=clock.sleep, rng=random.Random(0))


def stages_for(store, platform, clock, clients, deadline_s=20.0, neighbours=None, **kw):
    return SecAggStages(keeper_parts(store, platform, clock, **kw), store, {c: "local" for c in clients},
                        deadline_s=deadline_s, neighbours=neighbours)


def session(store, n, neighbours=None):
    sid = f"st-{store.db.name}"
    clients = [f"client_{i}" for i in range(n)]
    sa = {"neighbours": neighbours} if neighbours else True
    store.db[fs.SESSIONS].insert_one({"_id": sid, "spec": {"model": "small", "clients": clients,
                                                           "strategy": "fedavg", "secure_aggregation": sa}})
    rng = np.random.default_rng(0)
    global_weights = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    deltas = {c: [rng.normal(0, 0.05, s).astype(np.float32) for s in SHAPES] for c in clients}
    examples = {c: int(rng.integers(10, 90)) for c in clients}
    store.db[fs.PARTITIONS].insert_many([{"session": sid, "client": c, "num_examples": examples[c]}
                                         for c in clients])
    return sid, clients, (global_weights, deltas, examples)


def train(store, platform, sid, rnd, trainers, data):
    """fl_client's part in a secure round: upload a masked update."""
    _, deltas, examples = data
    spec = store.db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    for c in trainers:
        blob, clipped = masked_update(store.db, platform.bound, spec, sid, rnd, c, 1, deltas[c], examples[c])
        assert clipped == 0
        store.db[fs.UPDATES].insert_one({"session": sid, "round": rnd, "client": c, "attempt": 1, "blob_id": blob,
                                         "num_examples": examples[c], "masked": True, "status": "received",
                                         "created": time.time()})


def assert_equals_fedavg(store, sid, rnd, u3, data):
    global_weights, deltas, examples = data
    strategy = get_strategy("fedavg")
    spec = store.db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    accepted, rejected = secure_aggregate(store.db, sid, rnd, [(c, rnd) for c in u3],
                                          [w.copy() for w in global_weights], strategy, spec)
    assert [a["client"] for a in accepted] == u3 and rejected == []
    new, _ = strategy.finish([w.copy() for w in global_weights])
    plain = fedavg([([g + d for g, d in zip(global_weights, deltas[c])], examples[c]) for c in u3],
                   [(s, np.dtype(np.float32)) for s in SHAPES])
    bound = error_bound(len(u3), sum(examples[c] for c in u3))
    for a, b in zip(new, plain):
        assert np.abs(a.astype(np.float64) - b.astype(np.float64)).max() <= bound + 1e-6


def records(store, sid, stage, client):
    return sorted((a for a in store.attempts(sid, 0) if a["client"] == f"_secagg_{stage}/{client}"),
                  key=lambda a: a["attempt"])


def test_failed_throttled_and_timed_out_stage_attempts_are_retried_and_the_round_equals_fedavg(store):
    sid, clients, data = session(store, 5)
    clock = FakeClock()
    platform = StagePlatform(store, clock, {
        ("advertise", "client_1"): [ErrorClass.DEVELOPER_ERROR],                       # crashes once
        ("share", "client_2"): [ProviderError(ErrorClass.THROTTLED, "429", retry_after=3.0)],
        ("unmask", "client_3"): [HANG],                                                # no outcome once
    })
    stages = stages_for(store, platform, clock, clients, deadline_s=60.0)
    u2 = stages.before_training(sid, 0, clients)
    assert u2 == clients
    train(store, platform, sid, 0, u2, data)
    u3 = stages.before_aggregating(sid, 0, u2)
    assert u3 == clients
    assert_equals_fedavg(store, sid, 0, u3, data)

    crashed = records(store, sid, "advertise", "client_1")
    assert [(a["attempt"], a["state"]) for a in crashed] == [(1, "failed"), (2, "succeeded")]
    assert crashed[0]["error_class"] == "developer_error"
    throttled = records(store, sid, "share", "client_2")
    assert [(a["attempt"], a["state"], a["error_class"]) for a in throttled][0] == (1, "failed", "throttled")
    assert throttled[1]["state"] == "succeeded" and throttled[1]["submitted"] - throttled[0]["submitted"] >= 3.0
    hung = records(store, sid, "unmask", "client_3")
    assert [(a["attempt"], a["state"]) for a in hung] == [(1, "timed_out"), (2, "succeeded")]
    every = store.attempts(sid, 0)
    assert len(every) == 3 * 5 + 3      # one per client and stage, and the three retries
    assert all(a["function"] == "fl_secagg_client" and a["stage"] in ("advertise", "share", "unmask")
               for a in every)
    # The cost estimate bills them as it bills training attempts (the refused 429 never ran).
    assert session_cost(store, sid)["invocations"] == len(every) - 1


@pytest.mark.parametrize("silent_at, n, neighbours", [("share", 5, None), ("unmask", 5, None), ("unmask", 9, 4)])
def test_a_client_silent_past_the_stage_deadline_is_dropped_and_recovered_above_the_threshold(
        store, silent_at, n, neighbours):
    sid, clients, data = session(store, n, neighbours)
    last = clients[-1]
    clock = FakeClock()
    platform = StagePlatform(store, clock, {(silent_at, last): [HANG] * 5})
    # A function timeout past the stage deadline: the attempt is still running when the stage closes.
    stages = stages_for(store, platform, clock, clients, deadline_s=20.0, timeout_s=100.0, neighbours=neighbours)
    u2 = stages.before_training(sid, 0, clients)
    trainers = [c for c in u2 if c != "client_0"]     # client_0 also drops after sharing its keys
    train(store, platform, sid, 0, trainers, data)
    u3 = stages.before_aggregating(sid, 0, trainers)
    if silent_at == "share":
        assert u2 == clients[:-1] and u3 == clients[1:-1]
    else:
        assert u2 == clients and u3 == clients[1:]
        assert relay.done(store.db, sid, 0, "reveal", u3) == clients[1:-1]
    # client_0's masks (and the silent client's pairwise ones) are rebuilt from the others' Shamir shares.
    assert_equals_fedavg(store, sid, 0, u3, data)
    silent = records(store, sid, silent_at, last)
    assert [(a["attempt"], a["state"]) for a in silent] == [(1, "abandoned")]
    assert "deadline" in silent[0]["error"]
    assert platform.calls.count((silent_at, last)) == 1


def test_a_stage_below_the_threshold_is_refused_naming_who_dropped_and_why(store):
    sid, clients, _ = session(store, 5)
    clock = FakeClock()
    platform = StagePlatform(store, clock, {("advertise", c): [HANG] * 5 for c in clients[:2]}
                             | {("advertise", "client_2"): [ErrorClass.AUTH]})
    stages = stages_for(store, platform, clock, clients, deadline_s=20.0, timeout_s=100.0)
    with pytest.raises(StageError) as info:
        stages.before_training(sid, 0, clients)
    message = str(info.value)
    assert message.startswith("round 1: secure aggregation's advertise stage reached 2 of 5 client(s), "
                              "below its threshold of 3")
    assert "client_0: no answer within the stage deadline (20s)" in message
    assert "client_2: auth: injected auth (after 1 attempt(s))" in message
    assert message.endswith("the round cannot be aggregated securely")
    assert "u1" not in relay.sets(store.db, sid, 0)


def test_attempts_are_bounded_and_a_client_out_of_a_stage_is_out_of_the_sets(store):
    sid, clients, _ = session(store, 5)
    clock = FakeClock()
    platform = StagePlatform(store, clock, {
        ("share", "client_2"): [ErrorClass.PLATFORM_ERROR] * 3,      # out of attempts: not in u2
        ("advertise", "client_4"): [ErrorClass.AUTH],                # not retryable: not in u1
    })
    u2 = stages_for(store, platform, clock, clients).before_training(sid, 0, clients)
    sets = relay.sets(store.db, sid, 0)
    assert sets["u1"] == clients[:4]
    assert u2 == sets["u2"] == ["client_0", "client_1", "client_3"]
    assert platform.calls.count(("share", "client_2")) == 3
    assert platform.calls.count(("advertise", "client_4")) == 1
    assert [a["state"] for a in records(store, sid, "share", "client_2")] == ["failed"] * 3


def test_a_resumed_keeper_adopts_a_running_stage_attempt_and_repeats_nothing_done(store):
    sid, clients, data = session(store, 4)
    clock = FakeClock()
    platform = StagePlatform(store, clock, {("share", "client_3"): [("after", 8.0)]})
    stop_at = clock() + 3.0

    def interrupting_sleep(dt):
        clock.sleep(dt)
        if clock() > stop_at:
            raise KeyboardInterrupt   # the keeper is killed while client_3 shares its keys
    first = stages_for(store, platform, clock, clients)
    first.dispatch.sleep = interrupting_sleep
    with pytest.raises(KeyboardInterrupt):
        first.before_training(sid, 0, clients)
    # What the interrupted keeper's session does on its way out
    # (modes/base.tracking_until_the_end): the running marks it holds.
    first.dispatch.write_running_marks()
    assert [a["state"] for a in records(store, sid, "share", "client_3")] == ["running"]

    second = stages_for(store, platform, clock, clients)
    u2 = second.before_training(sid, 0, clients)
    assert u2 == clients
    assert platform.calls.count(("share", "client_3")) == 1      # tracked to its end, not invoked again
    assert sum(1 for stage, _ in platform.calls if stage == "advertise") == 4
    assert [(a["attempt"], a["state"]) for a in records(store, sid, "share", "client_3")] == [(1, "succeeded")]
    train(store, platform, sid, 0, clients[:3], data)
    u3 = second.before_aggregating(sid, 0, clients[:3])
    before = len(platform.calls)
    third = stages_for(store, platform, clock, clients)
    assert third.before_training(sid, 0, clients) == u2
    assert third.before_aggregating(sid, 0, clients) == u3 == clients[:3]   # u3 fixed once
    assert len(platform.calls) == before
    assert_equals_fedavg(store, sid, 0, u3, data)


def test_the_client_secret_is_bound_to_client_functions_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDKEEPER_CLIENT_SECRET", raising=False)
    secret = client_secret(tmp_path)
    assert len(secret) == 64 and client_secret(tmp_path) == secret
    assert (tmp_path / "client_secret").stat().st_mode & 0o077 == 0
    assert bound_for("fl_client", tmp_path) == {"FK_CLIENT_SECRET": secret}
    assert bound_for("fl_secagg_client", tmp_path) == {"FK_CLIENT_SECRET": secret}
    assert bound_for("fl_server_aggregator", tmp_path) == {}
    assert bound_for("fl_insights", tmp_path) == {}


def test_dropouts_that_split_the_survivors_in_the_neighbour_graph_end_the_round_before_any_reveal(store):
    from flcommon.secagg import graph
    from flcommon.secagg.session import context
    sid, clients, data = session(store, 10, neighbours=2)
    clock = FakeClock()
    platform = StagePlatform(store, clock)
    stages = stages_for(store, platform, clock, clients, neighbours=2)
    u2 = stages.before_training(sid, 0, clients)
    g = graph.neighbours(context(sid, 0), u2, 2)
    ring = [u2[0]]
    while len(ring) < len(u2):
        ring.append(next(c for c in sorted(g[ring[-1]]) if c not in ring))
    delivered = [c for c in u2 if c not in {ring[0], ring[3], ring[6]}]
    train(store, platform, sid, 0, delivered, data)
    with pytest.raises(StageError, match="fall into 3 unconnected parts of the neighbour graph"):
        stages.before_aggregating(sid, 0, delivered)
    assert not any(stage == "unmask" for stage, _ in platform.calls)


def test_stage_documents_whose_client_is_not_one_id_are_nobodys(fn_db):
    """MongoDB's `$in` also finds `client: ["c3"]` for c3: such a document,
    which any holder of the store's credentials can write, is skipped by the
    relay's readers instead of crashing them (an unhashable key)."""
    key = bytes(range(32))
    assert relay.put(fn_db, "s", 0, "c1", "keys", {"c_pk": key, "s_pk": key})
    fn_db[relay.SECAGG].insert_many([
        {"session": "s", "round": 0, "client": ["c3"], "stage": "keys", "c_pk": b"x", "s_pk": b"x"},
        {"session": "s", "round": 0, "client": ["c3"], "stage": "shares", "to": {"c2": b"x"}},
        {"session": "s", "round": 0, "client": ["c3"], "stage": "reveal", "b": {}, "s": {}},
        {"session": "s", "round": 0, "client": "c1", "stage": "shares", "to": ["c2"]}])
    assert relay.public_keys(fn_db, "s", 0, ["c1"]) == {"c1": {"c_pk": key, "s_pk": key}}
    with pytest.raises(BadRequest, match="no public keys of c3"):
        relay.public_keys(fn_db, "s", 0, ["c1", "c3"])
    assert relay.done(fn_db, "s", 0, "keys") == ["c1"]
    assert relay.inbox(fn_db, "s", 0, "c2", ["c1", "c3"]) == {}
    assert relay.revealed(fn_db, "s", 0, ["c1", "c3"]) == {}
