"""Hedged re-invocation: the threshold and the table's decisions on an
injected clock, then whole sessions on fakes (tests/keeper_fakes.py) in
every round mode."""
from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace
from typing import Any

import pytest

from fedkeeper.keeper.attempts import DELIVERED, RUNNING, AttemptTable, Hedge, HedgePolicy, RetryPolicy, Slot
from fedkeeper.keeper.hedging import Hedger
from fedkeeper.providers import ErrorClass, Invocation, Outcome, ProviderError
from keeper_fakes import fake_keeper

HEDGING = HedgePolicy(enabled=True, percentile=0.9, factor=1.5, min_peers=3)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def running_table(n: int, clock: Clock, hedging: HedgePolicy = HEDGING) -> AttemptTable:
    policy = RetryPolicy(max_attempts=3, backoff_s=1.0, jitter=0.0, grace_s=5.0, hedging=hedging)
    table = AttemptTable(policy, clock, random.Random(0), [Slot(f"client_{i}", "c1") for i in range(n)])
    for s in table.begin_due():
        table.started(s, Invocation("fl_client", f"id-{s.client}", clock()), 60.0)
    return table


def deliver(table: AttemptTable, clients: list[str]) -> None:
    for s in table:
        if s.client in clients:
            table.delivered(s)


# ---------------------------------------------------------------- the policy and the table
def test_threshold_is_factor_times_the_nearest_rank_percentile():
    assert HEDGING.threshold([1.0, 2.0, 3.0, 4.0, 10.0]) == 15.0   # rank ceil(0.9*5)=5
    assert HedgePolicy(True, 0.5, 2.0, 1).threshold([4.0, 1.0, 3.0, 2.0]) == 4.0   # rank 2 of 1,2,3,4
    assert HEDGING.threshold([1.0, 1.0]) is None                     # below min_peers
    assert HedgePolicy(False).threshold([1.0] * 10) is None          # off


def test_threshold_comes_from_the_warm_peers_once_min_peers_of_them_delivered():
    assert HEDGING.threshold([1.0, 1.0, 1.0, 8.0, 8.0], [1.0, 1.0, 1.0]) == 1.5
    assert HEDGING.threshold([1.0, 1.0, 8.0, 8.0], [1.0, 1.0]) == 12.0   # 2 warm < 3: all peers, rank 4
    assert HEDGING.threshold([1.0, 1.0], [1.0, 1.0]) is None
    assert HedgePolicy(False).threshold([1.0] * 5, [1.0] * 5) is None


def test_cold_peers_do_not_lift_the_threshold_of_a_held_attempt():
    clock = Clock()
    table = running_table(6, clock)
    clock.t += 1.0
    for s in table:
        if s.client in ("client_0", "client_1", "client_2"):
            table.delivered(s, cold=False)
    clock.t += 7.0
    for s in table:
        if s.client in ("client_3", "client_4"):
            table.delivered(s, cold=True)                  # all peers: p90 8 s, x1.5 = 12 s
    assert table.hedge_threshold(0) == 1.5                 # warm peers ran 1 s
    assert [s.client for s in table.hedge_due()] == ["client_5"]   # held 8 s


def test_too_few_warm_peers_fall_back_to_all_of_them():
    clock = Clock()
    table = running_table(5, clock)
    clock.t += 1.0
    for s in table:
        if s.client in ("client_0", "client_1"):
            table.delivered(s, cold=False)
    clock.t += 7.0
    for s in table:
        if s.client == "client_2":
            table.delivered(s, cold=True)
        if s.client == "client_3":
            table.delivered(s)                             # the platform did not say: no warm peer
    assert table.warm_durations == {0: [1.0, 1.0]}
    assert table.hedge_threshold(0) == 12.0               # all four peers: 1, 1, 8, 8
    assert table.hedge_due() == []
    clock.t += 4.1                                          # client_4 held 12.1 s
    assert [s.client for s in table.hedge_due()] == ["client_4"]


def test_a_straggler_past_the_threshold_is_hedged_exactly_once():
    clock = Clock()
    table = running_table(4, clock)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])   # peers ran 1 s: threshold 1.5 s
    assert table.hedge_due() == []
    clock.t += 0.6                                          # client_3 has run 1.6 s
    due = table.hedge_due()
    assert [s.client for s in due] == ["client_3"]
    s = due[0]
    h = table.begin_hedge(s, "c1")
    assert (h.attempt, s.attempt, s.counted) == (2, 2, 1)   # numbered after, not counted
    table.hedge_started(s, Invocation("fl_client", "id-hedge", clock()), 60.0)
    clock.t += 100
    assert table.hedge_due() == []
    table.hedge_dropped(s)                                  # it failed: still never a second one
    assert table.hedge_due() == [] and s.state == RUNNING


def test_no_hedge_below_min_peers_or_when_off():
    clock = Clock()
    table = running_table(3, clock)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1"])                 # 2 peers < min_peers 3
    clock.t += 50
    assert table.hedge_due() == []
    off = running_table(5, clock, HedgePolicy(enabled=False))
    clock.t += 1.0
    deliver(off, ["client_0", "client_1", "client_2", "client_3"])
    clock.t += 50
    assert off.hedge_due() == []


def test_the_winning_hedge_becomes_the_slot_and_names_the_loser():
    clock = Clock()
    table = running_table(4, clock)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])
    clock.t += 1.0
    s = table.hedge_due()[0]
    s.doc_id = "own"
    table.begin_hedge(s, "c2").doc_id = "spec"
    table.hedge_started(s, Invocation("fl_client", "id-hedge", clock()), 60.0)
    assert table.hedge_won(s) == "own"
    assert (s.state, s.doc_id, s.cluster, s.hedge) == (DELIVERED, "spec", "c2", None)


def test_a_failed_own_attempt_hands_over_to_its_running_hedge():
    clock = Clock()
    table = running_table(4, clock)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])
    clock.t += 1.0
    s = table.hedge_due()[0]
    table.begin_hedge(s, "c1").doc_id = "spec"
    table.hedge_started(s, Invocation("fl_client", "id-hedge", clock()), 60.0)
    assert table.promote_hedge(s)
    assert (s.state, s.doc_id, s.inv.platform_id, s.hedge) == (RUNNING, "spec", "id-hedge", None)


# ---------------------------------------------------------------- sessions on fakes
HEDGE_ON = "hedging: {enabled: true, percentile: 0.9, factor: 1.5, min_peers: 3}\n"


def straggler(slow_s: float, hedge_s: float, who: str = "client_3"):
    """Every client runs 1 s, `who`'s first invocation of a round `slow_s`
    and its second (the hedge) `hedge_s`."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        if p["client"] == who:
            return ("after", slow_s if n == 1 else hedge_s)
        return ("after", 1.0)
    return behave


def client_attempts(store, sid, client=None):
    return [a for a in store.attempts(sid) if a["function"] == "fl_client"
            and (client is None or a["client"] == client)]


def test_the_hedge_wins_is_counted_once_and_the_straggler_is_recorded_hedged(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, straggler(100.0, 1.0), rounds=1, training=HEDGE_ON)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "succeeded", True)]
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["accepted"] == 4 and rd["failed"] == 0
    # The straggler still lands later: its update is refused by the key, never counted twice.
    assert list(store.updates_).count(("s1", 0, "client_3")) == 1
    # Everyone else ran once; exactly one hedge.
    assert sum(1 for a in client_attempts(store, "s1") if a.get("hedge")) == 1


def test_semi_async_hedges_a_straggler_after_its_round_closed(tmp_path):
    # Round 1 closes at quorum without client_3; hedged while it straggles,
    # its update joins a later round once, as a stale one.
    keeper, store, provider, _ = fake_keeper(tmp_path, straggler(100.0, 1.0), rounds=3, mode="semi_async",
                                             training=HEDGE_ON)
    assert keeper.start(session_id="s1").state == "finished"
    first = [a for a in client_attempts(store, "s1", "client_3") if a["round"] == 0]
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in first] == [
        (1, "hedged", False), (2, "succeeded", True)]
    assert "client_3" not in store.rounds_[("s1", 0)]["included"]
    stale = [u for r in (1, 2) for u in store.rounds_[("s1", r)].get("stale_included") or []]
    assert stale.count({"client": "client_3", "round": 0}) == 1
    assert store.updates_[("s1", 0, "client_3")]["status"] == "accepted"


def test_the_own_attempt_wins_and_the_hedge_is_recorded_hedged(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, straggler(3.0, 100.0), rounds=1, training=HEDGE_ON)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "succeeded", False), (2, "hedged", True)]
    assert store.rounds_[("s1", 0)]["failed"] == 0


def test_a_hedge_whose_update_was_refused_as_a_duplicate_loses(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_3":
            if n == 1:
                return ("after", 20.0)
            return Outcome("", True, result={"num_examples": 10, "duplicate": True})
        return ("after", 1.0) if fn == "fl_client" else "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON)
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "succeeded", False), (2, "hedged", True)]
    assert store.rounds_[("s1", 0)]["included"].count("client_3") == 1


def test_async_hedges_a_straggling_job(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, straggler(100.0, 1.0), rounds=4, mode="async",
                                             clients=6, per_round=6, training=HEDGE_ON)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished"
    hedges = [a for a in client_attempts(store, "s1") if a.get("hedge")]
    assert hedges and all(a["client"] == "client_3" for a in hedges)
    # One hedge per straggling job, and each job's update stored once.
    assert len({(a["round"], a["client"]) for a in hedges}) == len(hedges)
    won = [a for a in hedges if a["state"] == "succeeded"]
    assert won
    for a in won:
        own = [b for b in client_attempts(store, "s1", "client_3")
               if b["round"] == a["round"] and not b.get("hedge")]
        assert [b["state"] for b in own] == ["hedged"]


def retried_straggler(tmp_path, warm: list[str], cold: list[str]):
    """`warm` clients run 2 s on warm workers, `cold` ones 3 s on cold
    workers (as the platform reports); client_4 crashes at once and its
    retry (after the 0.5 s backoff) is held. Returns the store and the gap
    between client_4's retry and its hedge, on the fake clock."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        if p["client"] == "client_4":
            if n == 1:
                return Outcome("", False, ErrorClass.APPLICATION_ERROR, "the worker died")
            return ("after", 100.0 if n == 2 else 1.0)
        return ("after", 3.0 if p["client"] in cold else 2.0)

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1, clients=5, per_round=5,
                                             training=HEDGE_ON)
    track = provider.track

    def track_with_cold_flags(pending):
        client_of = {f"act-{k}": p.get("client") for k, (_, p) in enumerate(provider.invoked, 1)}
        return [dataclasses.replace(o, cold_start=client_of.get(o.platform_id) in cold) for o in track(pending)]

    provider.track = track_with_cold_flags
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_4")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "failed", False), (2, "hedged", False), (3, "succeeded", True)]
    assert store.rounds_[("s1", 0)]["included"].count("client_4") == 1
    return store, mine[2]["submitted"] - mine[1]["submitted"]


def test_a_retry_held_past_the_warm_peers_is_hedged_although_cold_peers_ran_longer(tmp_path):
    # Warm peers ran 2 s (threshold 3 s); with the cold ones (3 s) it would be 4.5 s.
    _, gap = retried_straggler(tmp_path, ["client_0", "client_1", "client_2"], ["client_3"])
    assert 3.0 <= gap < 4.5


def test_with_too_few_warm_peers_a_retry_is_hedged_against_all_of_them(tmp_path):
    _, gap = retried_straggler(tmp_path, ["client_0", "client_1"], ["client_2", "client_3"])
    assert gap >= 4.5                                        # all peers: 2, 2, 3, 3 -> 3 s x 1.5


def test_no_hedge_while_fewer_than_min_peers_delivered(tmp_path):
    keeper, store, provider, _ = fake_keeper(
        tmp_path, straggler(30.0, 1.0, who="client_2"), rounds=1, clients=3, per_round=3,
        training="hedging: {enabled: true, min_peers: 3}\n")
    assert keeper.start(session_id="s1").state == "finished"
    assert not any(a.get("hedge") for a in client_attempts(store, "s1"))
    # Two peers delivered, the straggler ran its 30 s alone.
    assert [a["state"] for a in client_attempts(store, "s1", "client_2")] == ["succeeded"]


def test_selection_is_the_same_with_hedging_on_and_off(tmp_path):
    def selected(sub: str, training: str) -> list[list[str]]:
        d = tmp_path / sub
        d.mkdir()
        keeper, store, _, _ = fake_keeper(d, straggler(30.0, 1.0, who="client_5"), rounds=4, clients=10,
                                          per_round=5, training=training)
        assert keeper.start(session_id="s1").state == "finished"
        hedges.append(sum(1 for a in client_attempts(store, "s1") if a.get("hedge")))
        return [store.rounds_[("s1", r)]["selected"] for r in range(4)]

    hedges: list[int] = []
    on, off = selected("on", HEDGE_ON), selected("off", "")
    assert on == off
    assert hedges[0] > 0 and hedges[1] == 0   # the straggler was picked and hedged only with hedging on


def test_training_hedging_reaches_the_policy_and_is_off_by_default(tmp_path):
    for sub in ("on", "off"):
        (tmp_path / sub).mkdir()
    on, _, _, _ = fake_keeper(tmp_path / "on", training=HEDGE_ON)
    assert on.dispatcher.policy.hedging == HEDGING
    off, _, _, _ = fake_keeper(tmp_path / "off")
    assert off.dispatcher.policy.hedging.enabled is False


# ---------------------------------------------------------------- failed hedges and where hedges run
def test_a_failed_hedge_counts_and_the_straggler_may_be_hedged_again_while_attempts_remain():
    clock = Clock()
    table = running_table(4, clock)               # max_attempts 3
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])
    clock.t += 1.0
    s = table.hedge_due()[0]
    table.begin_hedge(s, "c1")
    table.hedge_started(s, Invocation("fl_client", "h1", clock()), 60.0)
    table.hedge_failed(s)
    assert (s.attempt, s.counted) == (2, 2)       # the crashed hedge is one of its attempts
    assert table.hedge_due() == [s]
    table.begin_hedge(s, "c1")
    table.hedge_started(s, Invocation("fl_client", "h2", clock()), 60.0)
    table.hedge_failed(s)
    assert (s.attempt, s.counted, table.exhausted(s)) == (3, 3, True)
    assert table.hedge_due() == []                # no attempts left: no third hedge
    assert s.state == RUNNING                     # its own attempt runs on


def test_a_promoted_hedge_is_the_slots_retry():
    clock = Clock()
    table = running_table(4, clock)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])
    clock.t += 1.0
    s = table.hedge_due()[0]
    table.begin_hedge(s, "c1")
    table.hedge_started(s, Invocation("fl_client", "h1", clock()), 60.0)
    assert table.promote_hedge(s)
    assert (s.attempt, s.counted) == (2, 2)
    clock.t += 2.0                                # the promoted attempt straggles too
    assert table.hedge_due() == [s]


def client_3_runs(runs: dict[int, Any]):
    """client_3's n-th invocation runs runs[n] seconds (1 s when not given)
    or ends as runs[n] (an Outcome, or a ProviderError raised at invoke);
    every other client runs 1 s."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        run = runs.get(n, 1.0) if p["client"] == "client_3" else 1.0
        return ("after", run) if isinstance(run, float) else run
    return behave


def first_hedge_fails(how):
    """client_3's own attempt runs 100 s, its first hedge ends as `how`."""
    return client_3_runs({1: 100.0, 2: how})


@pytest.mark.parametrize("fast_first_retry", [True, False])
def test_a_crashed_hedge_is_followed_by_another_when_a_retry_would_be(tmp_path, fast_first_retry):
    behave = first_hedge_fails(Outcome("", False, ErrorClass.APPLICATION_ERROR, "the worker died"))
    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON,
                                                 fast_first_retry=fast_first_retry)
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "hedged", True), (3, "succeeded", True)]
    assert mine[1]["error"] == "the worker died"
    gap = mine[2]["submitted"] - mine[1]["finished"]
    if fast_first_retry:   # the client's first failure: the next hedge at the keeper's next look
        assert gap < 0.5
    else:                  # after the backoff of a first failure (backoff_s 0.5 s, no jitter)
        assert 0.5 <= gap < 1.0
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0


class _Dispatcher:
    """What Hedger.where reads: the placement, the config's cluster order,
    cluster health and invocation modes."""

    def __init__(self, placement: dict[str, str], order: list[str], down=(), via_invoker=()):
        rt = SimpleNamespace(client_clusters=lambda: placement,
                             cfg=SimpleNamespace(providers=SimpleNamespace(clusters=lambda: {c: None for c in order})))
        self.platforms = SimpleNamespace(rt=rt, via_invoker=lambda c: c in via_invoker)
        self.clusters = SimpleNamespace(may_probe=lambda c: c not in down)


def test_a_hedge_goes_to_the_least_busy_other_client_cluster_else_its_own():
    placement = {"client_0": "c1", "client_1": "c2", "client_2": "c3"}
    order = ["server", "c3", "c1", "c2"]          # config order; the server's cluster has no clients
    s = Slot("client_0", "c1")
    hedger = Hedger(_Dispatcher(placement, order))
    assert hedger.client_clusters() == ["c3", "c1", "c2"]
    assert hedger.where(s, {"c3": 2, "c2": 1}) == "c2"
    assert hedger.where(s, {"c3": 1, "c2": 1}) == "c3"     # equals: config order
    assert Hedger(_Dispatcher(placement, order, down={"c3"}, via_invoker={"c2"})).where(s) == "c1"
    assert Hedger(_Dispatcher({"client_0": "c1"}, ["c1", "c2"])).where(s) == "c1"   # c2 hosts no clients


def test_a_hedge_that_straggles_too_replaces_the_older_attempt_and_is_hedged_in_turn(tmp_path):
    behave = client_3_runs({1: 100.0, 2: 100.0})   # the own attempt and the first hedge are both held
    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON)
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "hedged", True), (3, "succeeded", True)]
    assert "given up for a younger attempt" in mine[0]["error"]
    assert mine[1]["error"] == "another attempt of this client delivered first"
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0
    assert clock() - mine[0]["submitted"] < 20     # neither held attempt was waited for


@pytest.mark.parametrize("stored_by, untracked", [
    (1, True),                                    # older than the hedge, not the running attempt
    (2, False), (3, False),                       # the running attempt, the hedge itself
    (0, False), (-5, False), (4, False), (10 ** 9, False),   # no attempt of the slot's before the hedge
    (None, False), (True, False), ("1", False), (1.0, False)])
def test_only_an_older_untracked_attempt_number_settles_a_duplicate(stored_by, untracked):
    table = AttemptTable(RetryPolicy(), lambda: 0.0)
    s = table.add(Slot("client_0", "c1", attempt=3, running_attempt=2))
    s.hedge = Hedge("c1", 3)
    assert table.stored_by_untracked(s, stored_by) is untracked


@pytest.mark.parametrize("stored_by", [1, 2])
def test_a_duplicate_stored_by_a_given_up_attempt_settles_its_client_at_once(tmp_path, stored_by):
    # #1 and its hedge #2 are held; #1 is given up for #2, which is hedged
    # by #3. #3 finds the client's update stored and says by which attempt.
    store_of = {}

    def behave(fn, p, n):
        if fn != "fl_client" or p["client"] != "client_3":
            return "ok" if fn != "fl_client" else ("after", 1.0)
        if n < 3:
            return ("after", 100.0)
        store_of["store"].add_update(p["session"], p["round"], p["client"], stored_by)
        return Outcome("", True, result={"num_examples": 10, "duplicate": True, "stored_by": stored_by})

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON, deadline_s=300)
    store_of["store"] = store
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    # stored by the running #2: delivered at once, #2 tracked on for its record till the session ended
    assert [a["state"] for a in mine] == ["hedged", "hedged" if stored_by == 1 else "abandoned", "hedged"]
    assert "given up for a younger attempt" in mine[0]["error"]
    assert mine[2]["error"] == "another attempt of this client delivered first"
    assert (mine[0].get("stored_update") is True) == (stored_by == 1)
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0
    if stored_by == 1:
        # Stored by the given-up #1: the held #2 is no longer waited for,
        # and #1's record says its update is the one counted.
        assert "an attempt given up earlier stored" in mine[1]["error"]
        assert clock() - mine[0]["submitted"] < 20
        assert mine[0]["stored_update"] is True and "is the one counted" in mine[0]["error"]
        assert not any(a.get("stored_update") for a in mine[1:])
    else:
        # Stored by the running #2 itself: its client is delivered then
        # (held, #2 would have held the round to its deadline), and its
        # record says its update is the one counted.
        assert clock() - mine[0]["submitted"] < 20
        assert mine[1]["stored_update"] is True and not mine[0].get("stored_update")


def with_two_attempts_at_most(tmp_path, behave, shared: dict | None = None, rounds: int = 1
                              ) -> tuple[Any, list[dict]]:
    """(store, client_3's attempt records) of a hedged session whose
    clients have two attempts at most: a running hedge is never given up
    for a third. `shared["store"]` and `shared["clock"]` are the store and
    the clock, for `behave`."""
    keeper, store, _, clock = fake_keeper(tmp_path, behave, rounds=rounds, training=HEDGE_ON)
    if shared is not None:
        shared.update(store=store, clock=clock)
    keeper.dispatcher.policy = dataclasses.replace(keeper.dispatcher.policy, max_attempts=2)
    assert keeper.start(session_id="s1").state == "finished"
    return store, [a for a in client_attempts(store, "s1", "client_3") if a["round"] == 0]


def test_no_attempt_is_given_up_when_no_further_hedge_would_be_allowed(tmp_path):
    _, mine = with_two_attempts_at_most(tmp_path, client_3_runs({1: 30.0, 2: 100.0}))
    # With max_attempts 2 the held hedge would leave no attempt for another one:
    # the own attempt is kept, and wins.
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "succeeded", False), (2, "hedged", True)]


def test_each_further_give_up_of_a_client_waits_twice_as_long(tmp_path):
    behave = client_3_runs({1: 40.0, 2: 40.0, 3: 40.0})     # three held attempts in a row
    keeper, store, _, clock = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON)
    keeper.dispatcher.policy = dataclasses.replace(keeper.dispatcher.policy, max_attempts=8)
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    # own #1 given up for hedge #2, #2 given up for hedge #3, which is hedged
    # by #4 (1 s): no held attempt is waited for.
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "hedged", True), (3, "hedged", True), (4, "succeeded", True)]
    assert all("given up for a younger attempt" in a["error"] for a in mine[:2])
    assert clock() - mine[0]["submitted"] < 20
    # The peers ran 1 s: threshold 1.5 s. #2 was given up (and #4 started)
    # once #3 had run twice that, not once.
    assert mine[3]["submitted"] - mine[2]["submitted"] >= 3.0
    assert mine[1]["finished"] >= mine[2]["submitted"] + 3.0


def test_give_ups_stop_where_no_attempt_would_be_left(tmp_path):
    behave = client_3_runs({1: 40.0, 2: 40.0, 3: 40.0})
    keeper, store, _, _ = fake_keeper(tmp_path, behave, rounds=1, training=HEDGE_ON)
    keeper.dispatcher.policy = dataclasses.replace(keeper.dispatcher.policy, max_attempts=3)
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    # own #1 given up for #2, which is hedged by #3; giving #2 up too would
    # leave no attempt for a fourth: #2 (held 40 s) delivers first.
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "succeeded", True), (3, "hedged", True)]


def test_a_hedge_its_cluster_did_not_answer_costs_no_attempt(tmp_path):
    # The first hedge is refused as unreachable: nothing ran, so it is no
    # attempt of the client's; the straggler is hedged again and still has
    # the attempts to win.
    behave = first_hedge_fails(ProviderError(ErrorClass.UNREACHABLE, "connection refused"))
    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1,
                                                 training=HEDGE_ON)   # max_attempts: 3
    assert keeper.start(session_id="s1").state == "finished"
    mine = client_attempts(store, "s1", "client_3")
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "hedged", False), (2, "hedged", True), (3, "succeeded", True)]
    assert mine[1]["error_class"] == "unreachable" and mine[1].get("hedge")
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0


def test_a_straggler_on_its_last_allowed_attempt_is_not_hedged():
    """Should that attempt fail, its hedge would carry on as one attempt
    more than max_attempts allows."""
    clock = Clock()
    policy = RetryPolicy(max_attempts=1, backoff_s=1.0, jitter=0.0, grace_s=5.0, hedging=HEDGING)
    table = AttemptTable(policy, clock, random.Random(0), [Slot(f"client_{i}", "c1") for i in range(4)])
    for s in table.begin_due():
        table.started(s, Invocation("fl_client", f"id-{s.client}", clock()), 60.0)
    clock.t += 1.0
    deliver(table, ["client_0", "client_1", "client_2"])
    clock.t += 10.0                                 # client_3 runs far past the threshold
    assert table.exhausted(table.slots[("client_3", 0)]) and table.hedge_due() == []


HEDGE_REPORTS = pytest.mark.parametrize("reports_at,record", [(20.5, "succeeded"), (60.0, "abandoned")],
                                        ids=["it reports in the next round", "it has not reported at the end"])


def stored_by_the_hedge_first(own: Any, reports_at: float):
    """behave: in round 1, client_3's own attempt ends 20 s after its
    start as `own` says; its hedge (attempt 2) stores the update at once
    and reports `reports_at` s after that start. Every other run takes 1 s."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        if p["client"] != "client_3" or p["round"] > 0:
            return ("after", 1.0)
        if n == 1:
            shared["own_start"] = shared["clock"]()
            return ("after", 20.0, own)
        shared["store"].add_update(p["session"], p["round"], p["client"], 2)
        return ("after", shared["own_start"] + reports_at - shared["clock"]())
    shared: dict[str, Any] = {}
    return behave, shared


def assert_the_hedge_won_without_holding_the_round(store, mine, own_state: str, record: str) -> None:
    """client_3's round counted it once, ended at 20 s, when its own
    attempt ended, not when the hedge reported; the hedge's record is its
    outcome or, when the session ended first, abandoned, and says its
    update is the one counted."""
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, own_state, False), (2, record, True)]
    assert mine[1]["stored_update"] is True and not mine[0].get("stored_update")
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0
    assert rd["duration_s"] < 20.5


@HEDGE_REPORTS
def test_a_hedge_that_stored_first_wins_though_the_own_attempt_reports_first(tmp_path, reports_at, record):
    """The hedge stores client_3's update, then the own attempt reports
    its own refused as a duplicate the hedge stored, before the hedge
    reports: the hedge is the winner and the own attempt is the one
    recorded as having lost the race."""
    behave, shared = stored_by_the_hedge_first({"num_examples": 10, "duplicate": True, "stored_by": 2}, reports_at)
    store, mine = with_two_attempts_at_most(tmp_path, behave, shared, rounds=2)
    assert_the_hedge_won_without_holding_the_round(store, mine, "hedged", record)
    assert mine[0]["error"] == "another attempt of this client delivered first"


def past_the_threshold(clients: int, held: set[str], other_cluster=None):
    """(dispatcher, table, store, provider) of a round on fake cluster c1
    whose `held` clients never finish, the others in 1 s, 5 s later: the
    held ones are past the threshold (1.5 s) and due a hedge.
    `other_cluster(store, clock)`: a provider for a second cluster, c2."""
    from fedkeeper.keeper.dispatch import Dispatcher
    from fedkeeper.keeper.events import RoundEvents
    from keeper_fakes import FakeClock, FakePlatforms, FakeProvider, FakeStore
    store, clock = FakeStore(), FakeClock()
    provider = FakeProvider("c1", store, clock, lambda fn, p, n: "hang" if p["client"] in held else ("after", 1.0))
    providers = {"c1": provider, **({"c2": other_cluster(store, clock)} if other_cluster else {})}
    d = Dispatcher(FakePlatforms(providers), store, RetryPolicy(hedging=HEDGING), RoundEvents(),
                   clock=clock, sleep=clock.sleep)
    table = d.table(Slot(f"client_{i}", "c1", 0) for i in range(clients))
    d.submit("s", 0, table, table.begin(list(table)))
    clock.sleep(1.0)
    d.track("s", [table])                        # the peers delivered in 1 s
    clock.sleep(5.0)
    return d, table, store, provider


def test_no_hedge_is_started_in_a_pass_told_not_to(tmp_path):
    """A sync round past its deadline abandons what runs: a hedge started in
    that pass would be an invocation abandoned at once."""
    d, table, store, _ = past_the_threshold(4, {"client_3"})
    d.track("s", [table], start_hedges=False)
    straggler = table.slots[("client_3", 0)]
    assert straggler.hedge is None and not [a for a in store.invocations.values() if a.get("hedge")]
    d.track("s", [table])
    assert straggler.hedge is not None and [a["client"] for a in store.invocations.values() if a.get("hedge")] == [
        "client_3"]
    d.close()


@HEDGE_REPORTS
def test_a_failed_own_attempt_whose_hedge_stored_the_update_leaves_the_win_to_the_hedge(tmp_path, reports_at,
                                                                                       record):
    """client_3's own attempt fails at 20 s, when its hedge has stored the
    update (the update document says which attempt did) but not reported:
    the hedge is the winner."""
    behave, shared = stored_by_the_hedge_first(Outcome("", False, ErrorClass.APPLICATION_ERROR, "crashed"),
                                               reports_at)
    store, mine = with_two_attempts_at_most(tmp_path, behave, shared, rounds=2)
    assert_the_hedge_won_without_holding_the_round(store, mine, "failed", record)


def test_a_failed_own_attempt_that_stored_the_update_first_delivers_at_once_and_its_hedge_lost(tmp_path):
    """client_3's own attempt stores the update, then fails at 20 s while
    its hedge runs on (to 30 s): the client is delivered at once and the
    hedge lost the race."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        if p["client"] != "client_3":
            return ("after", 1.0)
        if n == 1:
            shared["store"].add_update(p["session"], p["round"], p["client"], 1)
            return ("after", 20.0, Outcome("", False, ErrorClass.APPLICATION_ERROR, "crashed after storing"))
        return ("after", 30.0, {"num_examples": 10, "duplicate": True, "stored_by": 1})
    shared: dict[str, Any] = {}
    store, mine = with_two_attempts_at_most(tmp_path, behave, shared)
    rd = store.rounds_[("s1", 0)]
    assert rd["included"].count("client_3") == 1 and rd["failed"] == 0
    assert [(a["attempt"], a["state"], a.get("hedge", False)) for a in mine] == [
        (1, "failed", False), (2, "hedged", True)]
    assert mine[1]["error"] == "another attempt of this client delivered first"
    assert mine[1]["finished"] - mine[0]["submitted"] < 30    # not waited for


def test_stragglers_due_at_once_are_hedged_in_one_write_and_in_parallel(tmp_path):
    """Four stragglers due in the same pass: their records are written at
    once and their hedges invoked side by side, as a round's first
    attempts are, not one after another on the keeper's loop."""
    import threading
    held = {f"client_{i}" for i in range(4, 8)}
    d, table, store, provider = past_the_threshold(8, held)

    together = threading.Barrier(2, timeout=10.0)
    side_by_side: list[bool] = []
    invoke = provider.invoke

    def hedge_invoke(name, payload):
        try:
            together.wait()                      # returns only when another invoke runs meanwhile
            side_by_side.append(True)
        except threading.BrokenBarrierError:
            side_by_side.append(False)
        return invoke(name, payload)
    provider.invoke = hedge_invoke
    writes = []
    for name in ("insert_attempts", "update_attempts"):
        method = getattr(store, name)
        setattr(store, name, lambda docs, _m=method, _n=name: (writes.append((_n, len(docs))), _m(docs))[1])
    d.track("s", [table])
    hedges = sorted(a["client"] for a in store.invocations.values() if a.get("hedge"))
    assert hedges == sorted(held)
    assert ("insert_attempts", 4) in writes and sum(1 for n, k in writes if n == "insert_attempts") == 1
    assert side_by_side and all(side_by_side[:2]), side_by_side
    assert all(table.slots[(c, 0)].hedge.inv is not None for c in held)
    d.close()


def test_hedges_refused_by_an_unreachable_cluster_count_once_and_are_recorded_before_it_is_judged(tmp_path):
    """Four hedges sent to a cluster that does not answer, in one pass: the
    cluster's health hears of it once (as for a round's first attempts),
    and only after every hedge's record is written, so that a cluster
    given up then leaves none of them `submitting`."""
    from keeper_fakes import FakeProvider
    held = {f"client_{i}" for i in range(4, 8)}
    refusing = lambda store, clock: FakeProvider(   # noqa: E731
        "c2", store, clock, lambda fn, p, n: ProviderError(ErrorClass.UNREACHABLE, "connection refused"))
    d, table, store, _ = past_the_threshold(8, held, refusing)
    judged = []

    def failed(cluster, error):
        judged.append((cluster, [a["state"] for a in store.invocations.values() if a.get("hedge")]))
        raise RuntimeError("given up")   # as ClusterLost would
    d.clusters.failed = failed
    with pytest.raises(RuntimeError, match="given up"):
        d.track("s", [table])
    assert [c for c, _ in judged] == ["c2"]
    assert judged[0][1] == ["hedged"] * 4             # every hedge recorded, none left `submitting`
    assert all(table.slots[(c, 0)].hedge is None and table.slots[(c, 0)].hedges == 0 for c in held)
    d.close()


def test_an_own_attempt_its_hedge_finds_had_stored_delivers_its_client_at_once(tmp_path):
    """client_3's first attempt stores its update and is then held; its
    hedge answers that attempt 1 stored it. The client is delivered then,
    not when attempt 1 reports (the round used to wait to its deadline and
    leave the stored update out), and attempt 1 is tracked on for its record."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        if p["client"] == "client_3":
            if n == 1:   # stores its update at once, then its answer is held for 100 s
                store.add_update(p["session"], p["round"], "client_3", 1)
                return ("after", 100.0, {"num_examples": 10})
            return Outcome("", True, result={"num_examples": 10, "duplicate": True, "stored_by": 1})
        return ("after", 1.0)

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, deadline_s=600, training=HEDGE_ON)
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished"
    assert summary.rounds[0].seconds < 30
    assert store.rounds_[("s1", 0)]["included"] == [f"client_{i}" for i in range(4)]
    own, hedge = sorted((a for a in store.attempts("s1") if a["client"] == "client_3"), key=lambda a: a["attempt"])
    assert own["stored_update"] is True and hedge["state"] == "hedged"
    assert own["state"] == "abandoned"    # still held when the session ended: recorded, update counted


@pytest.mark.parametrize("mode,extra", [("async", "buffer_size: 3\nstaleness_tolerance: 0\n"),
                                        ("semi_async", "staleness_tolerance: 0\n")])
def test_a_straggler_whose_update_can_no_longer_count_is_not_hedged(tmp_path, mode, extra):
    """With no staleness tolerated, client_5's round-0 attempt, held past
    its round, can only end stale: a hedge of it was an invocation (and a
    worker on another cluster) for nothing."""
    def behave(fn, p, n):
        if fn != "fl_client":
            return "ok"
        return ("after", 30.0 if p["client"] == "client_5" and p["round"] == 0 and n == 1 else 1.0)

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, mode=mode, rounds=6, clients=6, per_round=6,
                                                 training=HEDGE_ON + extra)
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    assert not [(a["client"], a["round"]) for a in store.attempts("s1") if a.get("hedge") and a["round"] == 0
                and a["client"] == "client_5"]
