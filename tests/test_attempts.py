"""The attempt state machine (fedkeeper/keeper/attempts.py) and the round
closing rules (round_closing.py) on their own: every failure path of a round
with an injected clock, no store, no platform."""
from __future__ import annotations

import random

import pytest

from fedkeeper.keeper.attempts import AttemptTable, DeliveryRecord, RetryPolicy, Slot
from fedkeeper.keeper.round_closing import COMPLETE, DEADLINE, QUORUM, RoundDispatch, quorum_met, quorum_needed
from fedkeeper.keeper.cluster_health import ClusterHealth
from fedkeeper.providers import ErrorClass, Invocation


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


POLICY = RetryPolicy(max_attempts=3, backoff_s=1.0, backoff_max_s=4.0, jitter=0.0, grace_s=5.0)


def table_of(n: int, clock: Clock, policy: RetryPolicy = POLICY) -> AttemptTable:
    return AttemptTable(policy, clock, random.Random(0), [Slot(f"client_{i}", "c1") for i in range(n)])


def start_all(table: AttemptTable, clock: Clock, timeout_s: float = 10.0) -> list[Slot]:
    slots = table.begin_due()
    for s in slots:
        table.started(s, Invocation("fl_client", f"id-{s.client}-{s.attempt}", clock()), timeout_s)
    return slots


def test_backoff_doubles_and_is_capped_and_retry_after_wins():
    rng = random.Random(0)
    assert [POLICY.backoff(a, rng) for a in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    # The platform's Retry-After is honoured when it asks for longer...
    assert POLICY.backoff(1, rng, retry_after=30.0) == 30.0
    # ...and never shortens the backoff.
    assert POLICY.backoff(3, rng, retry_after=0.5) == 4.0


def test_jitter_stays_within_its_band_and_is_seeded():
    policy = RetryPolicy(backoff_s=2.0, backoff_max_s=100.0, jitter=0.5)
    delays = [policy.backoff(1, random.Random(seed)) for seed in range(200)]
    assert all(1.0 <= d <= 3.0 for d in delays)
    assert len(set(delays)) > 100
    assert delays == [policy.backoff(1, random.Random(seed)) for seed in range(200)]


def test_a_crash_is_retried_at_once_then_with_backoff_until_attempts_run_out():
    clock = Clock()
    table = table_of(1, clock)
    (s,) = start_all(table, clock)
    assert s.attempt == 1 and s.state == "running"
    v = table.failed(s, ErrorClass.DEVELOPER_ERROR, "crash")
    assert v.retry and not v.redeploy and s.state == "waiting"
    assert table.due() == [s]                # the function's own first failure: retried at once
    (s,) = start_all(table, clock)
    assert s.attempt == 2
    assert table.failed(s, ErrorClass.APPLICATION_ERROR, "store unavailable").retry
    assert table.due() == []                 # from the second failure on, it backs off: backoff_s first
    clock.advance(1.0)
    start_all(table, clock)
    v = table.failed(s, ErrorClass.PLATFORM_ERROR, "500")
    assert not v.retry and s.state == "failed" and s.attempt == 3
    assert s.last_error == "platform_error: 500"


@pytest.mark.parametrize("ec", [ErrorClass.THROTTLED, ErrorClass.PLATFORM_ERROR, ErrorClass.UNREACHABLE,
                                ErrorClass.FUNCTION_MISSING, ErrorClass.TIMEOUT, None])
def test_what_may_be_a_platform_short_of_capacity_is_backed_off_from_the_first_failure(ec):
    clock = Clock()
    table = table_of(1, clock)
    (s,) = start_all(table, clock)
    assert table.failed(s, ec, "busy").retry
    assert table.due() == []
    clock.advance(1.0)
    assert table.due() == [s]


def test_without_fast_first_retry_every_failure_backs_off_on_the_same_jitter_draws():
    schedule = {}
    for fast in (True, False):
        policy = RetryPolicy(max_attempts=5, backoff_s=1.0, backoff_max_s=100.0, jitter=0.5,
                             fast_first_retry=fast)
        rng = random.Random(7)
        schedule[fast] = [policy.retry_delay(n, ErrorClass.DEVELOPER_ERROR, rng) for n in (1, 2, 3, 4)]
        schedule[fast, "next draw"] = rng.random()
    assert schedule[True][0] == 0.0 and 0.5 <= schedule[True][1] <= 1.5      # backoff_s +- jitter
    assert 0.5 <= schedule[False][0] <= 1.5 and schedule[False][3] >= 4.0    # 8 s +- jitter
    # On, the backoff starts one failure later (half as long, same draw); the
    # rng ends where it would with it off.
    assert schedule[True][1:] == pytest.approx([d / 2 for d in schedule[False][1:]])
    assert schedule[True, "next draw"] == schedule[False, "next draw"]
    # Retry-After still wins over an at-once retry.
    assert POLICY.retry_delay(1, ErrorClass.DEVELOPER_ERROR, random.Random(0), retry_after=3.0) == 3.0


def test_function_failures_are_retried_at_once_while_the_cluster_delivers():
    """Every failure of the function itself goes again at once while the
    cluster delivers at least half its recent attempts; a timeout still
    backs off; the rng is drawn as often either way."""
    policy = RetryPolicy(max_attempts=5, backoff_s=1.0, backoff_max_s=100.0, jitter=0.5)
    draws = {}
    for delivering in (True, False):
        rng = random.Random(7)
        delays = [policy.retry_delay(n, ErrorClass.DEVELOPER_ERROR, rng, delivering=delivering) for n in (1, 2, 3)]
        draws[delivering] = (delays, rng.random())
    assert draws[True][0] == [0.0, 0.0, 0.0] and min(draws[False][0][1:]) >= 0.5
    assert draws[True][1] == draws[False][1]
    assert policy.retry_delay(2, ErrorClass.TIMEOUT, random.Random(0), delivering=True) >= 1.0
    assert policy.retry_delay(2, ErrorClass.APPLICATION_ERROR, None, 2.5, delivering=True) == 2.5   # Retry-After
    # Either rule off: backed off as before (from the second failure, or from the first).
    for off, delay in ((RetryPolicy(max_attempts=5, backoff_s=1.0, jitter=0.0, fast_while_delivering=False), 1.0),
                       (RetryPolicy(max_attempts=5, backoff_s=1.0, jitter=0.0, fast_first_retry=False), 2.0)):
        assert off.retry_delay(2, ErrorClass.DEVELOPER_ERROR, None, delivering=True) == delay


def test_a_cluster_delivers_once_half_its_recent_attempts_did():
    record = DeliveryRecord()
    for _ in range(DeliveryRecord.MIN_ENDED - 1):
        record.ended("c1", True)
    assert not record.delivering("c1")            # too few ended to tell
    record.ended("c1", False)
    assert record.delivering("c1") and not record.delivering("c2")
    for _ in range(DeliveryRecord.WINDOW):        # only the last WINDOW count
        record.ended("c1", False)
    assert not record.delivering("c1")
    for _ in range(DeliveryRecord.WINDOW // 2):
        record.ended("c1", True)
    assert record.delivering("c1")


def test_the_table_backs_off_on_a_failing_cluster_and_not_on_a_delivering_one():
    clock = Clock()
    table = table_of(6, clock)
    slots = start_all(table, clock)
    for s in slots[1:]:
        table.delivered(s)
    first = slots[0]
    table.failed(first, ErrorClass.DEVELOPER_ERROR, "crash")       # the first: at once anyway
    assert first.next_try == clock()
    start_all(table, clock)
    table.failed(first, ErrorClass.DEVELOPER_ERROR, "crash")       # the second: 5 of 7 delivered
    assert first.next_try == clock()
    failing = table_of(6, clock)
    for s in start_all(failing, clock):
        failing.failed(s, ErrorClass.DEVELOPER_ERROR, "crash")
    again = start_all(failing, clock)
    failing.failed(again[0], ErrorClass.DEVELOPER_ERROR, "crash")   # none delivered: backoff_s
    assert again[0].next_try == clock() + 1.0


@pytest.mark.parametrize("ec", [ErrorClass.AUTH, ErrorClass.PAYLOAD_TOO_LARGE])
def test_a_non_retryable_error_ends_retries_at_once(ec):
    clock = Clock()
    table = table_of(1, clock)
    (s,) = start_all(table, clock)
    v = table.failed(s, ec, "refused")
    assert not v.retry and s.state == "failed" and s.attempt == 1
    clock.advance(100)
    assert table.due() == []


def test_a_missing_function_asks_for_a_redeploy_before_the_retry():
    clock = Clock()
    table = table_of(1, clock)
    (s,) = start_all(table, clock)
    v = table.failed(s, ErrorClass.FUNCTION_MISSING, "404")
    assert v.retry and v.redeploy and s.state == "waiting"
    # Out of attempts, nothing is redeployed for it.
    s.attempt = POLICY.max_attempts
    v = table.failed(s, ErrorClass.FUNCTION_MISSING, "404")
    assert not v.retry and not v.redeploy


def test_a_throttled_attempt_waits_as_long_as_retry_after_says():
    clock = Clock()
    table = table_of(1, clock)
    (s,) = start_all(table, clock)
    table.failed(s, ErrorClass.THROTTLED, "429", retry_after=12.0)
    clock.advance(11.9)
    assert table.due() == []
    clock.advance(0.2)
    assert table.due() == [s]


def test_an_attempt_without_outcome_is_overdue_after_timeout_plus_grace():
    clock = Clock()
    table = table_of(2, clock)
    start_all(table, clock, timeout_s=10.0)
    clock.advance(15.0)
    assert table.overdue() == []
    clock.advance(0.01)
    assert len(table.overdue()) == 2


def test_an_adopted_attempt_runs_out_from_when_it_was_submitted():
    clock = Clock()
    table = table_of(1, clock)
    (s,) = list(table)
    s.attempt = 1
    table.adopted(s, Invocation("fl_client", "old", submitted_at=clock() - 14.0), timeout_s=10.0)
    clock.advance(1.01)
    assert table.overdue() == [s]


def test_lost_and_unreached_attempts_do_not_count_against_max_attempts():
    clock = Clock()
    table = table_of(1, clock, RetryPolicy(max_attempts=1, backoff_s=1.0, jitter=0.0))
    (s,) = start_all(table, clock)
    table.lost(s, "unknown to the platform")
    assert s.state == "waiting" and table.due() == [s]      # at once, no backoff
    (s,) = start_all(table, clock)
    assert s.attempt == 2 and s.counted == 1
    v = table.failed(s, ErrorClass.UNREACHABLE, "connection refused", reached=False)
    assert v.retry and s.counted == 0
    clock.advance(5)
    (s,) = start_all(table, clock)
    assert not table.failed(s, ErrorClass.DEVELOPER_ERROR, "crash").retry


def test_quorum():
    assert quorum_needed(0.8, 10) == 8
    assert quorum_needed(0.5, 3) == 2
    assert quorum_met(7, 1, 8)                 # stale updates count
    assert not quorum_met(7, 0, 8)
    assert not quorum_met(0, 0, 0)             # nothing to aggregate


def test_sync_round_completes_when_every_slot_ended():
    clock = Clock()
    table = table_of(3, clock)
    rd = RoundDispatch(table, deadline_s=60)
    slots = rd.to_invoke()
    assert [s.attempt for s in slots] == [1, 1, 1]
    for s in slots:
        table.started(s, Invocation("fl_client", s.client, clock()), 10)
    assert rd.verdict() is None
    table.delivered(slots[0])
    table.delivered(slots[1])
    table.failed(slots[2], ErrorClass.AUTH, "no")
    assert rd.verdict() == COMPLETE
    closing = rd.close(COMPLETE)
    assert closing.abandoned == [] and rd.delivered_clients(lambda c: c) == ["client_0", "client_1"]


def test_sync_round_deadline_abandons_running_attempts_and_fails_waiting_ones():
    clock = Clock()
    table = table_of(3, clock)
    rd = RoundDispatch(table, deadline_s=30)
    slots = start_all(table, clock, timeout_s=100)
    table.delivered(slots[0])
    table.failed(slots[1], ErrorClass.DEVELOPER_ERROR, "crash")
    clock.advance(30)
    assert rd.to_invoke() == []                # no new attempt after the deadline
    assert rd.verdict() == DEADLINE
    closing = rd.close(DEADLINE)
    assert closing.abandoned == [slots[2]] and closing.stragglers == []
    assert [s.state for s in slots] == ["delivered", "failed", "failed"]
    assert slots[2].last_error == "round deadline passed"
    assert slots[1].last_error == "developer_error: crash"


def test_semi_async_round_closes_at_quorum_and_leaves_stragglers_running():
    clock = Clock()
    table = table_of(4, clock)
    rd = RoundDispatch(table, deadline_s=30, close_at=2)
    slots = start_all(table, clock)
    table.delivered(slots[0])
    assert rd.verdict() is None
    table.delivered(slots[1])
    table.failed(slots[2], ErrorClass.DEVELOPER_ERROR, "crash")
    assert rd.verdict() == QUORUM
    closing = rd.close(QUORUM)
    assert closing.stragglers == [slots[3]] and slots[3].state == "running"
    assert slots[2].state == "failed" and slots[2].last_error == "developer_error: crash"


def test_counts_and_sleep_hint():
    clock = Clock()
    table = table_of(2, clock)
    slots = start_all(table, clock)
    assert table.counts()["running"] == 2
    assert table.sleep_hint(0.02) == 0.02
    table.failed(slots[0], ErrorClass.DEVELOPER_ERROR, "x")
    table.failed(slots[1], ErrorClass.DEVELOPER_ERROR, "x")
    assert 0.005 <= table.sleep_hint() <= 0.2
    c = table.counts()
    assert c["waiting"] == 2 and c["retrying"] == 0


def test_an_unreachable_cluster_is_asked_again_with_capped_backoff_and_logged_sparingly():
    clock = Clock()
    health = ClusterHealth(clock, patience_s=60, backoff_s=0.25, backoff_max_s=8, log_every_s=10)
    logged = 0
    gaps = []
    for _ in range(40):
        v = health.failed("ow", "refused", can_restart=False)
        assert not v.restart
        if v.give_up:
            break
        logged += v.log
        gap = health.next_probe("ow") - clock()
        gaps.append(gap)
        assert not health.may_probe("ow")
        clock.advance(gap)
        assert health.may_probe("ow")
    else:
        pytest.fail("never gave up")
    assert gaps[:4] == [0.25, 0.5, 1.0, 2.0] and max(gaps) == 8
    # Once at first, then at most every 10 s over about a minute.
    assert 1 < logged <= 1 + 60 // 10
    assert clock() - 1000.0 >= 60
    assert health.ok("ow") is not None and health.may_probe("ow")


def test_a_cluster_with_a_local_service_is_restarted_once_per_outage():
    clock = Clock()
    health = ClusterHealth(clock, patience_s=60, restart_after=2)
    assert not health.failed("ow", "refused", can_restart=True).restart
    clock.advance(1)
    assert health.failed("ow", "refused", can_restart=True).restart
    health.restarted("ow")
    assert health.may_probe("ow")
    clock.advance(1)
    assert not health.failed("ow", "refused", can_restart=True).restart
    clock.advance(60)
    assert health.failed("ow", "refused", can_restart=True).give_up
