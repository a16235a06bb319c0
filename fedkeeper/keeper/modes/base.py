"""What every round mode shares: the session context, rebuilding slots from
the store on a (re)start, stale-update bookkeeping, aggregation and the
round's closing record."""
from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ...privacy.rounds import stored_epsilon
from ...providers import ErrorClass, Invocation
from ...store import StoreUnavailable
from ..aggregation import Following, combine_clusters, follow_round
from ..attempts import DELIVERED, FAILED, RUNNING, AttemptTable, Slot
from ..dispatch import Dispatcher
from ..errors import SessionError, SessionTakenOver
from ..events import RoundEvents, RoundReport, client_index
from ..selection import Selector

log = logging.getLogger("fedkeeper.keeper")


def paused_s(round_doc: dict[str, Any] | None) -> float:
    """How long the round stood still between a stopped keeper and the one
    that resumed it (`paused_s`, Store.pause_open_rounds): its duration
    leaves that out."""
    paused = (round_doc or {}).get("paused_s")
    ok = isinstance(paused, (int, float)) and not isinstance(paused, bool) and math.isfinite(paused)
    return float(paused) if ok and paused > 0 else 0.0


#: Why an older attempt still running at a resume is not tracked on.
STRAY = "no longer tracked after the keeper stopped: a younger attempt of its client runs"


def uncounted(attempt: dict[str, Any]) -> bool:
    """Whether a recorded attempt does not count against max_attempts, as
    the keeper that made it judged (AttemptTable): it never reached its
    platform (unreachable, or left unsent by a stopped keeper), or the
    platform lost it. A resumed keeper that counted them found a client
    refused by a cluster since given up out of attempts, and never invoked it."""
    return attempt.get("unsent") is True or attempt.get("lost") is True \
        or attempt.get("error_class") == ErrorClass.UNREACHABLE.value


def youngest_running(attempts: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], dict[str, Any]],
                                                               list[dict[str, Any]]]:
    """Of attempt records a stopped keeper left: per (client, round) the
    youngest one running with a platform id, which a resume tracks on
    (invoking the client again would run it twice), and the older ones
    running beside it (a hedge ran too), which it no longer tracks."""
    youngest: dict[tuple[str, int], dict[str, Any]] = {}
    older: list[dict[str, Any]] = []
    for a in attempts:
        if a.get("state") != "running" or not a.get("platform_id"):
            continue
        key = (a["client"], a["round"])
        cur = youngest.get(key)
        if cur is not None and cur["attempt"] > a["attempt"]:
            older.append(a)
            continue
        if cur is not None:
            older.append(cur)
        youngest[key] = a
    return youngest, older


@dataclass
class RoundContext:
    """What a round mode works with."""

    store: Any
    dispatcher: Dispatcher
    selector: Selector
    events: RoundEvents
    training: Any
    client_cluster: dict[str, str]
    server: str
    per_round: int
    privacy: Any = None   # fedkeeper.privacy.rounds.RoundPrivacy, or None

    @property
    def clock(self) -> Callable[[], float]:
        return self.dispatcher.clock

    def clients(self) -> list[str]:
        return sorted(self.client_cluster, key=client_index)

    def reached_target(self, acc: float | None) -> bool:
        t = self.training.target_accuracy
        return t is not None and acc is not None and acc >= t


class RoundMode(ABC):
    """One way of running a session's rounds (training.mode)."""

    name: ClassVar[str]
    #: whether this mode finds the updates still waiting for an aggregation
    #: by their status (received), so the aggregator must mark those it
    #: counted; otherwise the model's contributions are the only record.
    finds_waiting_updates: ClassVar[bool] = True

    def __init__(self, ctx: RoundContext):
        self.ctx = ctx
        self.store = ctx.store
        self.dispatch = ctx.dispatcher
        self.training = ctx.training
        self.following: dict[int, Following] = {}   # hierarchical: combiners started with their round

    @abstractmethod
    def run(self, session: str, first_round: int, reports: list[RoundReport]) -> None:
        """Run rounds `first_round` .. training.rounds - 1 (store numbering),
        appending a report for each, stopping early at the target accuracy."""

    @abstractmethod
    def running(self) -> list[Slot]:
        """Attempts this mode still tracks (abandoned when the session ends)."""

    def finish(self, session: str) -> None:
        """After the last round no aggregation follows: every update still
        waiting for one is stale (mark_stale would keep those of the last
        `staleness_tolerance` rounds waiting, for rounds that never come)."""
        self.store.mark_updates_stale(session, math.inf)

    # ------------------------------------------------------------------ the end of a session
    @contextlib.contextmanager
    def tracking_until_the_end(self):
        """Abandon the attempts still running when the session ends, finished
        or failed. An interrupted keeper (Ctrl-C, a crash, a lost cluster)
        leaves them `running`: it writes the marks it still holds and folds
        every batch of marks into the attempts (running_marks.py), so that
        --resume adopts them instead of invoking their clients again while
        they still run.
        Combiners still following a round (one that failed, or any when the
        keeper is interrupted) make no further attempt, whatever ends it."""
        try:
            yield
        except SessionError:
            self.stop_tracking("the session ended")
            raise
        except (StoreUnavailable, SessionTakenOver):
            raise    # nothing more can be written, or may be: the session is another keeper's
        except BaseException:
            # With the running marks the dispatcher still holds, so that
            # --resume adopts those attempts too (running_marks.py).
            self.dispatch.write_running_marks()
            raise
        else:
            self.stop_tracking("the session ended")
        finally:
            self.stop_following()

    def stop_following(self) -> None:
        while self.following:
            self.following.popitem()[1].abandon()

    def stop_tracking(self, why: str) -> None:
        slots = [s for s in self.running() if s.state == RUNNING]
        self.dispatch.abandon(slots, why)
        self.dispatch.hedger.stop_reporting(why)
        for s in slots:
            s.state, s.inv = FAILED, None

    # ------------------------------------------------------------------ slots from the store
    def _timeout(self, cluster: str) -> float:
        return self.dispatch.platforms.spec(cluster, "fl_client").timeout_s

    def adopt(self, session: str, rnd: int, selected: list[str], fresh: bool = False) -> AttemptTable:
        """Rebuild a round's slots from the store (a resume), or start them
        (`fresh`: a round that had no round document, so none of its
        clients was invoked and the store has nothing to say about it)."""
        table = self.dispatch.table(Slot(c, self.ctx.client_cluster[c], rnd) for c in selected)
        if fresh:
            return table
        by_client = {s.client: s for s in table}
        delivered = self.store.delivered_clients(session, rnd)
        now = self.ctx.clock()
        attempts = [a for a in self.store.attempts(session, rnd) if a["client"] in by_client]
        # a client's youngest running attempt is tracked on, whatever came after it
        tracked, older = youngest_running(attempts)
        for a in attempts:
            s = by_client[a["client"]]
            s.attempt = max(s.attempt, a["attempt"])
            if uncounted(a):
                s.uncounted += 1
        for a in attempts:
            s = by_client[a["client"]]
            mine = tracked.get((s.client, rnd))
            if mine is not None and a is not mine:
                continue
            if mine is None and a["attempt"] != s.attempt:
                continue
            s.doc_id = a["_id"]
            if mine is not None:
                # tracked where it runs: a hedge may run on another cluster than the client's own
                s.cluster = a.get("cluster") or s.cluster
                self.dispatch.remember(a["_id"], a["cluster"], a.get("platform", ""), a.get("function", ""))
                inv = Invocation("fl_client", a["platform_id"], a.get("submitted", now))
                table.adopted(s, inv, self._timeout(s.cluster), attempt=a["attempt"])
            elif a.get("state") == "succeeded":
                s.state = DELIVERED
            elif a.get("error"):
                s.last_error = f"{a.get('error_class') or 'error'}: {a['error']}"
        self._close_stray(older, now)
        for c in delivered:
            # A running attempt is still tracked to its end (its record is
            # wanted); anything else with a stored update has delivered.
            if c in by_client and by_client[c].state != RUNNING:
                by_client[c].state = DELIVERED
        for s in table:
            if s.state == "waiting" and table.exhausted(s):
                s.state = FAILED
        return table

    def _close_stray(self, attempts: list[dict[str, Any]], now: float) -> None:
        """Record older running attempts no longer tracked; should one of
        them have stored its client's update, the younger one that finds it
        refused says so (Hedger.own_attempt_refused), as for an attempt
        given up for a hedge."""
        if attempts:
            # stray: the keeper's own bookkeeping, not the client's doing (reliability leaves it out)
            self.dispatch.update_attempts([(a["_id"], {"state": "abandoned", "finished": now, "error": STRAY,
                                                       "stray": True}) for a in attempts])
        for a in attempts:
            self.dispatch.hedger.given_up(a["client"], a["round"], a["attempt"], a["_id"])

    def adopt_running(self, session: str, before_round: int) -> list[Slot]:
        """Client attempts of rounds before `before_round` still running (a
        resumed semi_async or async session): tracked on to their end."""
        out = []
        now = self.ctx.clock()
        table = self.dispatch.table()
        youngest, older = youngest_running(self.store.running_client_attempts(session, before_round))
        self._close_stray(older, now)
        # Each straggler is numbered after every attempt recorded for its
        # client (a hedge may have come after it): one read per round they
        # come from, not one per straggler.
        last: dict[tuple[str, int], int] = {}
        not_counted: dict[tuple[str, int], int] = {}
        for r in sorted({a["round"] for a in youngest.values()}):
            for d in self.store.attempts(session, r):
                key = (d["client"], r)
                last[key] = max(last.get(key, 0), int(d["attempt"]))
                not_counted[key] = not_counted.get(key, 0) + uncounted(d)
        for a in youngest.values():
            key = (a["client"], a["round"])
            numbered = max(a["attempt"], last.get(key, 0))
            s = Slot(a["client"], a["cluster"], a["round"], attempt=numbered, doc_id=a["_id"],
                     uncounted=not_counted.get(key, 0))
            table.adopted(s, Invocation("fl_client", a["platform_id"], a.get("submitted", now)),
                          self._timeout(s.cluster), attempt=a["attempt"])
            self.dispatch.remember(a["_id"], a["cluster"], a.get("platform", ""), "fl_client")
            out.append(s)
        return out

    # ------------------------------------------------------------------ updates
    def stale_updates(self, session: str, rnd: int) -> list[dict[str, Any]]:
        """Received, never aggregated updates of the `staleness_tolerance`
        rounds before `rnd`, as the aggregator's `stale` list."""
        lo = rnd - self.training.staleness_tolerance
        return sorted(({"client": c, "round": r} for c, r in self.store.received_updates(session, lo, rnd)),
                      key=lambda u: (u["round"], client_index(u["client"])))

    def fresh_updates(self, session: str, rnd: int) -> list[str]:
        return sorted((c for c, _ in self.store.received_updates(session, rnd, rnd + 1)), key=client_index)

    def mark_stale(self, session: str, rnd: int) -> None:
        """Updates too old to join the aggregation of round `rnd` (or any
        later one) are marked stale: they are never aggregated."""
        self.store.mark_updates_stale(session, rnd - self.training.staleness_tolerance)

    # ------------------------------------------------------------------ aggregation
    def follow(self, session: str, rnd: int, selected: list[str]) -> None:
        """hierarchical: combiners start with the round and fold its updates as they arrive."""
        if getattr(self.training, "aggregation", "flat") == "hierarchical":
            self.following[rnd] = follow_round(self.dispatch, session, rnd, selected, self.ctx.client_cluster)

    def aggregate(self, session: str, rnd: int, *, selected: list[str], included: list[str],
                  stale: list[dict[str, Any]], failed: int, started: float, t0: float,
                  args: dict[str, Any], extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda res: {}
                  ) -> RoundReport:
        """Run the aggregator on the round's updates, close the round's
        document and emit its `round` event."""
        self.ctx.events.emit("aggregating", round=rnd, included=len(included) + len(stale))
        if getattr(self.training, "aggregation", "flat") == "hierarchical":
            # Combiners first: the aggregator uses the partials they stored.
            combine_clusters(self.dispatch, session, rnd, list(args.get("clients", [])), self.ctx.client_cluster,
                             following=self.following.pop(rnd, None))
        res = self.dispatch.call(self.ctx.server, session, rnd, "fl_server_aggregator", **args,
                                 **({"mark_counted": True} if self.finds_waiting_updates else {}))
        attempts = self.dispatch.round_records.take(session, rnd)
        if attempts is None:   # a round this keeper resumed
            attempts = self.store.attempts(session, rnd)
        # A hedge takes the slot's next attempt number but is not a retry.
        retries = sum(1 for a in attempts if a["attempt"] > 1 and not a.get("hedge"))
        ended = self.ctx.clock()
        epsilon = stored_epsilon(self.ctx.privacy.epsilon_after(rnd + 1)) if self.ctx.privacy else None
        clipped = res.get("quantization_clipped")
        clipped = clipped if isinstance(clipped, int) and not isinstance(clipped, bool) and clipped > 0 else 0
        if clipped:
            log.warning("round %d: secure aggregation clipped %s value(s) to the field's bound, so the sum is off "
                        "by them: lower secure_aggregation.scale", rnd + 1, clipped)
        self.store.upsert_round(session, rnd, state="done", ended=ended,
                                accuracy=res.get("accuracy"), loss=res.get("loss"),
                                accepted=res.get("accepted"), rejected=res.get("rejected", []),
                                retries=retries, failed=failed, delivered=len(included),
                                duration_s=ended - started,
                                **({"epsilon": epsilon} if epsilon is not None else {}),
                                **({"quantization_clipped": clipped} if clipped else {}), **extra(res))
        rep = RoundReport(rnd, len(selected), len(included), failed, retries, ended - t0,
                          res.get("accuracy"), res.get("loss"), res.get("rejected", []), stale=len(stale),
                          epsilon=epsilon)
        self.ctx.events.emit("round", report=rep, rounds=self.training.rounds, attempts=attempts,
                             mode=self.name)
        return rep
