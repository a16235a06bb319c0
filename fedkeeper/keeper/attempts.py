"""The attempt state machine: slots, attempts, backoff, per-attempt deadlines
and hedging decisions. Pure: no store, no provider, no sleeping. When a
round stops waiting for its slots is round_closing.py's.

The I/O layer (dispatch.py) asks it what to do and tells it what happened:

    due = table.begin_due()            # slots to invoke now (attempt numbers taken)
    table.started(slot, invocation)    # the platform accepted it
    verdict = table.failed(slot, error_class, error, retry_after)
    if verdict.redeploy: ...           # the function is missing: redeploy first
    table.delivered(slot)
    table.overdue()                    # running past function timeout + grace
    table.lost(slot)                   # the platform does not know it: at once again
    table.hedge_due()                  # stragglers that get one speculative attempt

Time comes from an injected clock (epoch seconds), jitter from a seeded rng,
so every path runs in a unit test in microseconds.

A slot's `round` is the store's round number, 0-based (see the package doc).
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from flcommon.user_code import USER_CODE_MARK

from ..providers import ErrorClass, Invocation

Clock = Callable[[], float]

WAITING, SUBMITTING, RUNNING, DELIVERED, FAILED = "waiting", "submitting", "running", "delivered", "failed"


@dataclass(frozen=True)
class HedgePolicy:
    """training.hedging as the state machine reads it: an attempt running
    past `factor` x the `percentile` of its round peers' durations, once
    `min_peers` of them delivered, gets one speculative attempt. The peers
    are those that ran on a warm worker once `min_peers` of them delivered:
    a cold start (a retry after a crash, a worker loading its code) takes
    seconds more than a warm run and would lift the threshold towards the
    function limit, so a held attempt would not be hedged in time."""

    enabled: bool = False
    percentile: float = 0.9
    factor: float = 1.5
    min_peers: int = 3

    @classmethod
    def from_training(cls, training: Any) -> "HedgePolicy":
        h = getattr(training, "hedging", None)
        if h is None:
            return cls()
        return cls(h.enabled, h.percentile, h.factor, h.min_peers)

    def threshold(self, peer_durations: list[float],
                  warm_durations: list[float] | None = None) -> float | None:
        """Seconds past which a running attempt is hedged (None: not yet,
        or hedging is off), from the warm peers' durations when at least
        min_peers of them delivered, else from all peers'. Nearest-rank
        percentile: no interpolation, so a handful of peers gives one of
        their own durations."""
        if warm_durations is not None and len(warm_durations) >= self.min_peers:
            peer_durations = warm_durations
        if not self.enabled or len(peer_durations) < self.min_peers:
            return None
        ordered = sorted(peer_durations)
        rank = max(1, math.ceil(self.percentile * len(ordered)))
        return ordered[rank - 1] * self.factor


#: Failures of the function itself: it crashed or returned an error. Nothing
#: says the platform is short of capacity, so a first retry at once costs it
#: nothing. A timeout is not one of them: HTTP platforms answer 408/504 when
#: a request queued for a cold instance too long, and a retry at once would
#: send every such client back at the same moment. Throttling, platform
#: errors and an unreachable cluster always back off.
FUNCTION_FAILURES = frozenset({ErrorClass.DEVELOPER_ERROR, ErrorClass.APPLICATION_ERROR})


@dataclass(frozen=True)
class RetryPolicy:
    """training.retries plus the attempt grace, as the state machine reads them."""

    max_attempts: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 15.0
    jitter: float = 0.5
    grace_s: float = 10.0          # on top of the function's timeout, per attempt
    hedging: HedgePolicy = HedgePolicy()
    fast_first_retry: bool = True
    fast_while_delivering: bool = True

    @classmethod
    def from_training(cls, training: Any) -> "RetryPolicy":
        r = training.retries
        return cls(r.max_attempts, r.backoff_s, r.backoff_max_s, r.jitter, training.attempt_grace_s,
                   HedgePolicy.from_training(training), r.fast_first_retry, r.fast_while_delivering)

    def backoff(self, attempt: int, rng: random.Random | None, retry_after: float | None = None) -> float:
        """Delay before the retry that follows failed attempt `attempt` (1-based):
        exponential, capped at backoff_max_s, +-jitter (none without an
        rng); never shorter than what the platform asked for (Retry-After)."""
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** max(0, attempt - 1)))
        if rng is not None:
            delay *= 1 + self.jitter * (2 * rng.random() - 1)
        return max(delay, retry_after or 0.0)

    def retry_delay(self, failures: int, ec: ErrorClass | None, rng: random.Random | None,
                    retry_after: float | None = None, delivering: bool = False) -> float:
        """Delay before the retry that follows a slot's `failures`-th
        counted attempt that did not deliver (1-based). A failure in the
        function itself (FUNCTION_FAILURES) is retried at once: the first
        one with fast_first_retry (the backoff then starts with the second:
        backoff_s, then doubling), and with it and fast_while_delivering
        every one while its cluster is `delivering` (DeliveryRecord): the failure is
        the attempt's own, not the platform's, and in a sync round a
        backoff is wall time the whole round waits for. Otherwise it backs
        off from the first. One jitter draw either way, so the rng's
        sequence, and with it every later draw, is the same whatever the
        settings. Without an rng (a hedge's successor: hedging draws
        nothing), the same delay without jitter."""
        if not (self.fast_first_retry and ec in FUNCTION_FAILURES):
            delay = self.backoff(failures, rng, retry_after)
        else:
            delay = self.backoff(max(1, failures - 1), rng, retry_after)
            if failures == 1:
                delay = retry_after or 0.0
        if delivering and self.fast_first_retry and self.fast_while_delivering and ec in FUNCTION_FAILURES:
            delay = retry_after or 0.0
        return delay


class DeliveryRecord:
    """Per cluster, whether its last WINDOW ended attempts delivered: a
    cluster that delivered at least SHARE of them, once MIN_ENDED have
    ended, is `delivering`, so that a failure of one attempt there is that
    attempt's own (RetryPolicy.retry_delay). Shared by a dispatcher's
    tables, across rounds."""

    WINDOW = 20
    MIN_ENDED = 5
    SHARE = 0.5

    def __init__(self):
        self._ended: dict[str, deque[bool]] = {}

    def ended(self, cluster: str, delivered: bool) -> None:
        self._ended.setdefault(cluster, deque(maxlen=self.WINDOW)).append(delivered)

    def delivering(self, cluster: str) -> bool:
        ended = self._ended.get(cluster, ())
        return len(ended) >= self.MIN_ENDED and sum(ended) >= self.SHARE * len(ended)


@dataclass
class Hedge:
    """A slot's speculative attempt, running beside its own."""

    cluster: str
    attempt: int
    doc_id: Any = None
    inv: Invocation | None = None
    started_at: float = 0.0
    deadline: float = 0.0


@dataclass
class Slot:
    """One client (or one helper call) in one round, across its attempts."""

    client: str
    cluster: str
    round: int = 0                  # the model round the client trains from
    attempt: int = 0                # the last attempt number taken
    state: str = WAITING            # waiting | submitting | running | delivered | failed
    next_try: float = 0.0
    inv: Invocation | None = None
    doc_id: Any = None
    deadline: float = 0.0           # per attempt: function timeout + grace
    last_error: str | None = None
    result: dict[str, Any] | None = None
    function: str = "fl_client"
    # Attempts that do not count against max_attempts: made by an earlier
    # keeper (helper calls continue its numbering) or that never reached
    # the platform / were lost by it.
    uncounted: int = 0
    started_at: float = 0.0         # when the running attempt was accepted
    hedge: Hedge | None = None      # a speculative attempt still running
    hedges: int = 0                 # speculative attempts that leave no further one (see hedge_failed)
    running_attempt: int = 0        # the number of the slot's own running attempt

    @property
    def counted(self) -> int:
        return self.attempt - self.uncounted


@dataclass(frozen=True)
class Verdict:
    """What a failed attempt leads to."""

    retry: bool                     # waiting for another attempt (at slot.next_try)
    redeploy: bool = False          # redeploy the function before that attempt


class AttemptTable:
    """The slots one dispatch drives (a round, or async's jobs)."""

    KEEP_PEER_ROUNDS = 16   # rounds of peer durations kept (older stragglers are not hedged)

    def __init__(self, policy: RetryPolicy, clock: Clock, rng: random.Random | None = None,
                 slots: Iterable[Slot] = (), peer_durations: dict[int, list[float]] | None = None,
                 warm_durations: dict[int, list[float]] | None = None, deliveries: DeliveryRecord | None = None):
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        # Keyed by (client, round): a straggler of an earlier round and the
        # same client's slot in this one are different slots.
        self.slots: dict[tuple[str, int], Slot] = {(s.client, s.round): s for s in slots}
        # How long each round's delivered attempts ran, as this keeper saw
        # it: the peers a straggler is measured against. Shared by the
        # tables of one dispatcher, so a semi_async straggler moved to
        # another table is still measured against its round.
        self.peer_durations: dict[int, list[float]] = {} if peer_durations is None else peer_durations
        # The same, of the attempts the platform said ran warm (HedgePolicy.threshold).
        self.warm_durations: dict[int, list[float]] = {} if warm_durations is None else warm_durations
        # Whether each cluster's recent attempts delivered (shared likewise).
        self.deliveries = DeliveryRecord() if deliveries is None else deliveries

    def add(self, slot: Slot) -> Slot:
        self.slots[(slot.client, slot.round)] = slot
        return slot

    def remove(self, slot: Slot) -> None:
        self.slots.pop((slot.client, slot.round), None)

    def keep_only(self, *states: str) -> list[Slot]:
        """Drop the slots in other states; returns the dropped ones."""
        dropped = [s for s in self.slots.values() if s.state not in states]
        for s in dropped:
            self.remove(s)
        return dropped

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self):
        return iter(list(self.slots.values()))

    def in_state(self, *states: str) -> list[Slot]:
        return [s for s in self.slots.values() if s.state in states]

    # -------------------------------------------------------------- attempts
    def due(self) -> list[Slot]:
        now = self.clock()
        return [s for s in self.slots.values() if s.state == WAITING and s.next_try <= now]

    def begin(self, slots: Iterable[Slot]) -> list[Slot]:
        """Take the next attempt number for each slot (its record is written
        before the invocation, so a killed keeper leaves a trace)."""
        out = []
        for s in slots:
            s.attempt += 1
            s.running_attempt = s.attempt
            s.state, s.inv, s.result = SUBMITTING, None, None
            out.append(s)
        return out

    def begin_due(self) -> list[Slot]:
        return self.begin(self.due())

    def started(self, s: Slot, inv: Invocation, timeout_s: float) -> None:
        s.inv, s.state = inv, RUNNING
        s.started_at = self.clock()
        s.deadline = s.started_at + timeout_s + self.policy.grace_s

    def adopted(self, s: Slot, inv: Invocation, timeout_s: float, attempt: int | None = None) -> None:
        """A running attempt made by an earlier keeper (`attempt`: its
        number, when not the slot's last): its deadline runs from when it
        was submitted."""
        s.inv, s.state = inv, RUNNING
        s.running_attempt = s.attempt if attempt is None else attempt
        s.started_at = inv.submitted_at
        s.deadline = inv.submitted_at + timeout_s + self.policy.grace_s

    def delivered(self, s: Slot, result: dict[str, Any] | None = None, cold: bool | None = None) -> None:
        """`cold`: whether the platform started a worker for the attempt
        (None: it did not say; such a duration is no warm peer's)."""
        if s.state == RUNNING and s.started_at:
            took = self.clock() - s.started_at
            kept_in = [self.peer_durations] + ([self.warm_durations] if cold is False else [])
            for durations in kept_in:
                if s.round not in durations:
                    for old in [r for r in durations if r < s.round - self.KEEP_PEER_ROUNDS]:
                        del durations[old]
                durations.setdefault(s.round, []).append(took)
            self.deliveries.ended(s.cluster, True)
        s.state, s.inv, s.result = DELIVERED, None, result

    # -------------------------------------------------------------- hedging
    def hedge_threshold(self, round: int) -> float | None:
        return self.policy.hedging.threshold(self.peer_durations.get(round, []),
                                             self.warm_durations.get(round, []))

    def hedge_due(self) -> list[Slot]:
        """Running attempts past the hedging threshold of their round that
        have had no speculative attempt yet, and may have another attempt
        (max_attempts). Draws nothing from the rng:
        selections and backoffs stay what they are without hedging."""
        if not self.policy.hedging.enabled:
            return []
        now = self.clock()
        due = []
        limits: dict[int, float | None] = {}  # one sort of a round's peers per call, not one per slot
        for s in self.slots.values():
            # A slot on its last allowed attempt gets none: should that
            # attempt fail, the hedge would carry on as one attempt too many.
            if s.state != RUNNING or s.inv is None or s.hedges or s.hedge is not None or self.exhausted(s):
                continue
            if s.round not in limits:
                limits[s.round] = self.hedge_threshold(s.round)
            limit = limits[s.round]
            if limit is not None and now - s.started_at > limit:
                due.append(s)
        return due

    def begin_hedge(self, s: Slot, cluster: str) -> Hedge:
        """Take an attempt number for a slot's speculative attempt; it does
        not count against max_attempts."""
        s.attempt += 1
        s.uncounted += 1
        s.hedges += 1
        s.hedge = Hedge(cluster, s.attempt)
        return s.hedge

    def hedge_started(self, s: Slot, inv: Invocation, timeout_s: float) -> None:
        h = s.hedge
        h.inv, h.started_at = inv, self.clock()
        h.deadline = h.started_at + timeout_s + self.policy.grace_s

    def hedge_dropped(self, s: Slot) -> Hedge | None:
        """The speculative attempt is over without winning (refused, failed,
        or its slot's own attempt delivered first)."""
        h, s.hedge = s.hedge, None
        return h

    def hedge_not_started(self, s: Slot) -> Hedge | None:
        """The speculative attempt never reached its cluster (unreachable):
        it counts against nothing, and the straggler may be hedged again."""
        h = self.hedge_dropped(s)
        s.hedges -= 1
        return h

    def hedge_won(self, s: Slot, result: dict[str, Any] | None = None, cold: bool | None = None) -> Any:
        """The speculative attempt delivered first: it becomes the slot's
        attempt; returns the record id of the attempt it beat."""
        h, s.hedge = s.hedge, None
        loser = s.doc_id
        s.doc_id, s.cluster, s.started_at = h.doc_id, h.cluster, h.started_at
        self.delivered(s, result, cold)
        return loser

    def promote_hedge(self, s: Slot) -> bool:
        """The slot's own attempt ended without an update while its
        speculative one runs: that one carries on as the slot's attempt."""
        h = s.hedge
        if h is None or h.inv is None:
            return False
        s.hedge = None
        s.inv, s.doc_id, s.cluster, s.running_attempt = h.inv, h.doc_id, h.cluster, h.attempt
        s.started_at, s.deadline, s.state = h.started_at, h.deadline, RUNNING
        self._hedge_counts(s)   # it is the slot's retry now
        return True

    def stored_by_untracked(self, s: Slot, stored_by: Any) -> bool:
        """Whether the update a hedge found was stored by an attempt of the
        slot that is no longer tracked (given up for a younger one): an
        older attempt than the hedge, and not the running one, which would
        report it soon. `stored_by` comes from the function's answer:
        anything but such an attempt number leaves the running attempt
        tracked to its report."""
        if isinstance(stored_by, bool) or not isinstance(stored_by, int) or s.hedge is None:
            return False
        return 1 <= stored_by < s.hedge.attempt and stored_by != s.running_attempt

    def delivered_untracked(self, s: Slot, result: dict[str, Any] | None = None) -> None:
        """The client's update is stored, by an attempt whose run was not
        seen end (one no longer tracked, or one that never reported):
        delivered, with no duration to learn from."""
        s.state, s.inv, s.result = DELIVERED, None, result

    def hedge_failed(self, s: Slot) -> Hedge | None:
        """The speculative attempt failed on its own (crashed, refused, no
        outcome in time) while the slot's attempt runs on."""
        h = self.hedge_dropped(s)
        self._hedge_counts(s)
        if h is not None:
            self.deliveries.ended(h.cluster, False)
        return h

    def _hedge_counts(self, s: Slot) -> None:
        """A hedge that did not end its slot counts against max_attempts;
        while attempts remain, the straggler may be hedged again."""
        s.uncounted -= 1
        if not self.exhausted(s):
            s.hedges -= 1

    def overdue_hedges(self) -> list[Slot]:
        now = self.clock()
        return [s for s in self.slots.values() if s.hedge is not None and s.hedge.inv is not None
                and now > s.hedge.deadline]

    def failed(self, s: Slot, ec: ErrorClass | None, error: str, retry_after: float | None = None,
               *, reached: bool = True) -> Verdict:
        """An attempt failed. Non-retryable classes (auth, payload too large)
        end the slot at once; otherwise it waits for a retry while attempts
        remain (RetryPolicy.retry_delay: at once, or backed off). A missing
        function asks for a redeploy first.
        `reached=False`: the attempt never reached the platform (it was
        unreachable): it does not count against max_attempts, the caller
        bounds such waits per cluster (ClusterHealth)."""
        s.inv = None
        s.last_error = f"{ec.value if ec else 'error'}: {error}"
        if not reached:
            s.uncounted += 1
        else:
            self.deliveries.ended(s.cluster, False)
        redeploy = ec == ErrorClass.FUNCTION_MISSING
        # An error in the user's module (flcommon.user_code) fails the same way every time.
        if (ec is not None and not ec.retryable) or USER_CODE_MARK in error \
                or s.counted >= self.policy.max_attempts:
            s.state = FAILED
            return Verdict(retry=False, redeploy=False)
        s.state = WAITING
        s.next_try = self.clock() + self.policy.retry_delay(max(1, s.counted), ec, self.rng, retry_after,
                                                            delivering=self.deliveries.delivering(s.cluster))
        return Verdict(retry=True, redeploy=redeploy)

    def lost(self, s: Slot, why: str) -> None:
        """The platform does not know this running attempt (its service
        restarted since): invoke again at once, without counting it."""
        s.inv, s.state, s.next_try = None, WAITING, self.clock()
        s.uncounted += 1
        s.last_error = why

    def give_up(self, s: Slot, why: str) -> None:
        if s.state in (WAITING, RUNNING, SUBMITTING):
            s.state, s.inv = FAILED, None
            s.last_error = s.last_error or why

    def overdue(self) -> list[Slot]:
        """Running attempts past their own deadline (no outcome within the
        function timeout plus grace)."""
        now = self.clock()
        return [s for s in self.slots.values() if s.state == RUNNING and now > s.deadline]

    def exhausted(self, s: Slot) -> bool:
        return s.counted >= self.policy.max_attempts

    # -------------------------------------------------------------- summary
    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in (DELIVERED, FAILED, RUNNING, WAITING)}
        for s in self.slots.values():
            key = RUNNING if s.state == SUBMITTING else s.state
            c[key] = c.get(key, 0) + 1
        c["retrying"] = sum(1 for s in self.slots.values() if s.attempt > 1 and s.state in (RUNNING, WAITING))
        return c

    def sleep_hint(self, poll_s: float = 0.02) -> float:
        """How long the loop may sleep: poll while anything runs, else until
        the next retry is due (bounded)."""
        if any(s.state == RUNNING for s in self.slots.values()):
            return poll_s
        waits = [s.next_try for s in self.slots.values() if s.state == WAITING]
        if not waits:
            return poll_s
        return min(0.2, max(0.005, min(waits) - self.clock()))

