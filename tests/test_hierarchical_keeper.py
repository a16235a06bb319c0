"""The keeper's side of hierarchical aggregation, on a fake cluster: every
round starts a combiner that follows it, whose partial the keeper waits
for before the aggregator runs; and a session keeps the aggregation it
started with (the session spec records training.aggregation, --resume with
another setting is refused with one line naming both, before anything is
invoked)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from fedkeeper.keeper import Keeper, SessionError, SessionInterrupted
from fedkeeper.runtime import Runtime
from fedkeeper.providers import ErrorClass, Outcome
from keeper_fakes import FakeClock, FakeProvider, fake_config, fake_keeper


def _interrupted(tmp_path):
    keeper, store, _, _ = fake_keeper(tmp_path, rounds=3, clients=4, per_round=4)

    def interrupt(kind, data):
        if kind == "round" and data["report"].round == 0:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1")
    return store


def _keeper_on(tmp_path, store, training):
    folder = tmp_path / "other"
    folder.mkdir()
    rt = Runtime.open(fake_config(folder, rounds=3, clients=4, per_round=4, training=training), need_store=False)
    rt.store = store
    clock = FakeClock()
    provider = FakeProvider("c1", store, clock)
    rt.providers["c1"] = provider
    rt.deploy = lambda placements, on_done=None, max_workers=8: []
    return Keeper(rt, clock=clock, sleep=clock.sleep), provider


def test_resuming_with_another_aggregation_is_refused_in_one_line(tmp_path):
    store = _interrupted(tmp_path)
    assert store.session("s1")["spec"]["aggregation"] == "flat"
    rounds_before = store.rounds("s1")
    keeper, provider = _keeper_on(tmp_path, store, "aggregation: hierarchical\n")
    with pytest.raises(SessionError) as info:
        keeper.start(resume="s1", deploy=False)
    assert str(info.value) == ("session s1 was started with training.aggregation: flat, the config now says "
                               "hierarchical; resume it with the config it started with")
    assert store.rounds("s1") == rounds_before and provider.invoked == []


def test_resuming_with_the_same_aggregation_goes_on(tmp_path):
    store = _interrupted(tmp_path)
    keeper, _ = _keeper_on(tmp_path, store, "aggregation: flat\n")
    assert keeper.start(resume="s1", deploy=False).state == "finished"


def test_each_round_starts_a_following_combiner_and_waits_for_its_partial(tmp_path):
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    store_of: dict = {}

    def behave(function, payload, n):
        rnd = payload.get("round")
        if function == "fl_combiner":
            assert "clients" not in payload and payload["cluster_name"] == "c1"
            assert payload["follow_s"] == 150.0   # half the combiner's 300 s limit
            # A follower ends once the round lists its clients (real time, bounded).
            for _ in range(500):
                doc = store_of["store"].round(payload["session"], rnd) or {}
                if "included" in doc:
                    break
                time.sleep(0.01)
            with lock:
                seen.append(("partial", rnd))
            return Outcome("p", True, result={"round": rnd, "cluster": "c1", "combined": len(doc["included"])})
        if function == "fl_server_aggregator":
            with lock:
                seen.append(("aggregator", rnd))
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=2, clients=4, per_round=4,
                                             training="aggregation: hierarchical\n")
    store_of["store"] = store
    assert keeper.start(session_id="h1").state == "finished"
    combiner_calls = [p for f, p in provider.invoked if f == "fl_combiner"]
    assert [(p["round"], "follow_s" in p) for p in combiner_calls] == [(0, True), (1, True)]   # none after the close
    assert seen == [("partial", 0), ("aggregator", 0), ("partial", 1), ("aggregator", 1)]
    assert store.session("h1")["spec"]["aggregation"] == "hierarchical"


def _follower_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fl_combiner-follow-")]


def test_a_round_that_fails_its_quorum_leaves_no_follower_retrying(tmp_path):
    ended = threading.Event()

    def behave(function, payload, n):
        if function == "fl_client":
            return Outcome("", False, ErrorClass.DEVELOPER_ERROR, "boom")
        if function == "fl_combiner":
            ended.wait(10)   # still following when the round fails (real time, bounded)
            return Outcome("p", False, ErrorClass.PLATFORM_ERROR, "round 0 failed: there is nothing to combine")
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=2, clients=4, per_round=4,
                                             training="aggregation: hierarchical\n")
    assert keeper.start(session_id="h1").state == "failed"
    ended.set()
    for t in _follower_threads():
        t.join(10)
    assert not _follower_threads()
    # The attempt under way when the round failed ends; no other is made.
    combiner = [a for a in store.attempts("h1", 0) if a["function"] == "fl_combiner"]
    assert [a["attempt"] for a in combiner] == [1]


class _DrawsByThread(random.Random):
    def __init__(self, seed):
        super().__init__(seed)
        self.threads: set[str] = set()

    def random(self):
        self.threads.add(threading.current_thread().name)
        return super().random()


def test_a_followers_retries_draw_no_backoff_from_the_keepers_generator(tmp_path):
    def behave(function, payload, n):
        if function == "fl_combiner" and n == 1:
            return Outcome("p", False, ErrorClass.PLATFORM_ERROR, "a platform hiccup")
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1, clients=4, per_round=4,
                                             training="aggregation: hierarchical\n")
    keeper.dispatcher.rng = draws = _DrawsByThread(3)
    assert keeper.start(session_id="h1").state == "finished"
    attempts = [a["attempt"] for a in store.attempts("h1", 0) if a["function"] == "fl_combiner"]
    assert attempts[:2] == [1, 2]   # the follower retried ...
    assert not any(name.startswith("fl_combiner") for name in draws.threads)   # ... on a generator of its own
