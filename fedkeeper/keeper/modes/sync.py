"""sync: a round waits for its clients, until quorum plus the round deadline.

`ClosingRounds` is the round loop sync and semi_async share; what differs
(which clients may be selected, when a round closes, what happens to
attempts still running then, and whether stale updates join) is a method
each overrides.
"""
from __future__ import annotations

from typing import Any

from ..attempts import FAILED, AttemptTable, Slot
from ..round_closing import Closing, RoundDispatch, quorum_met, quorum_needed
from ..errors import SessionError
from ..events import RoundReport, client_index, shown
from .base import RoundMode, log, paused_s


class ClosingRounds(RoundMode):
    """Rounds that each select clients, dispatch them and close."""

    #: whether the attempts still running when a round closes are abandoned (closed())
    ABANDONS_AT_CLOSE = True

    def run(self, session: str, first_round: int, reports: list[RoundReport]) -> None:
        rnd = first_round
        with self.tracking_until_the_end():
            while rnd < self.training.rounds:
                if self.ctx.privacy and self.ctx.privacy.stop_before(session, rnd):
                    break
                rep = self.run_round(session, rnd)
                reports.append(rep)
                if self.ctx.reached_target(rep.accuracy):
                    break
                rnd += 1

    # ------------------------------------------------------------------ what the modes override
    def candidates(self, session: str) -> list[str] | None:
        """Clients that may be selected (None: all)."""
        return None

    def close_at(self, quorum: int) -> int | None:
        """Close the round once this many clients delivered (None: wait for all)."""
        return None

    def stale_for(self, session: str, rnd: int) -> list[dict[str, Any]]:
        return []

    def closed(self, closing: Closing) -> None:
        """sync: attempts still running at the deadline are abandoned."""
        self.dispatch.abandon(closing.abandoned, "round deadline passed")

    def resumed_while_aggregating(self, table: AttemptTable) -> None:
        """The keeper stopped after the round closed. sync abandoned the
        round's running attempts as it closed; semi_async tracks them on."""

    def before_aggregating(self, session: str, rnd: int, included: list[str],
                           stale: list[dict[str, Any]]) -> None:
        self.store.upsert_round(session, rnd, state="aggregating", included=included)

    def aggregator_args(self, included: list[str], stale: list[dict[str, Any]]) -> dict[str, Any]:
        return {"clients": included}

    def extra_fields(self, res: dict[str, Any]) -> dict[str, Any]:
        return {}

    def also_tracked(self) -> list[AttemptTable]:
        """Tables tracked alongside the round's own (semi_async: stragglers)."""
        return []

    # ------------------------------------------------------------------ one round
    def run_round(self, session: str, rnd: int) -> RoundReport:
        t0 = self.ctx.clock()
        existing = self.store.round(session, rnd)
        if existing:
            selected = existing["selected"]
        else:
            selected = self.ctx.selector.select(session, rnd, self.candidates(session))
        started = existing.get("started", t0) if existing else t0
        stale: list[dict[str, Any]] = []
        if existing and existing.get("state") == "aggregating":
            included = existing["included"]
            stale = existing.get("stale_included") or []
            table = self.adopt(session, rnd, selected)
            self.resumed_while_aggregating(table)
        else:
            if not existing and rnd > 0:   # none of its attempts exists (round 0: the session's start)
                self.dispatch.round_records.begin(session, rnd)
            self.store.upsert_round(session, rnd, selected=selected, state="running", mode=self.name,
                                    started=started)
            self.follow(session, rnd, selected)
            # Secure aggregation: only the clients that shared their keys train.
            trainers = self.ctx.privacy.before_training(session, rnd, selected) if self.ctx.privacy else selected
            table = self.adopt(session, rnd, trainers, fresh=not existing)
            quorum = quorum_needed(self.training.quorum, len(selected))
            included = self.dispatch_round(session, rnd, table, self.close_at(quorum))
            stale = self.stale_for(session, rnd)
            if not quorum_met(len(included), len(stale), quorum):
                self.quorum_failed(session, rnd, table, selected, included, stale, quorum)
            if self.ctx.privacy:  # secure aggregation: the masked set and its reveals
                included = self.ctx.privacy.before_aggregating(session, rnd, included)
            self.before_aggregating(session, rnd, included, stale)
        failed = sum(1 for s in table if s.state == FAILED)
        return self.aggregate(session, rnd, selected=selected, included=included, stale=stale, failed=failed,
                              started=started + paused_s(existing), t0=t0, args=self.aggregator_args(included, stale),
                              extra=self.extra_fields)

    def quorum_failed(self, session: str, rnd: int, table: AttemptTable, selected: list[str],
                      included: list[str], stale: list[dict[str, Any]], quorum: int) -> None:
        self.dispatch.clusters.check()
        failures = "; ".join(f"{s.client}: {s.last_error}" for s in table if s.state != "delivered")
        self.store.upsert_round(session, rnd, state="failed", ended=self.ctx.clock(), included=included)
        extra = f" and {len(stale)} stale update(s) arrived" if self.close_at(quorum) is not None else ""
        message = (f"round {shown(rnd)}: only {len(included)} of {len(selected)} clients delivered{extra}, "
                   f"quorum needs {quorum} ({failures})")
        self.ctx.events.emit("round_failed", round=rnd, attempts=self.store.attempts(session, rnd),
                             message=message)
        raise SessionError(message)

    def dispatch_round(self, session: str, rnd: int, table: AttemptTable, close_at: int | None) -> list[str]:
        """Invoke, track and retry until the round closes (RoundDispatch)."""
        rd = RoundDispatch(table, self.training.round_deadline_s, close_at)
        while True:
            self.dispatch.submit(session, rnd, table, rd.to_invoke())
            # Past the deadline the round closes this pass; where its running
            # attempts are abandoned then (sync), a hedge started now would be too.
            self.dispatch.track(session, [table] + self.also_tracked(),
                                start_hedges=not (self.ABANDONS_AT_CLOSE and rd.past_deadline()))
            self.after_tracking()
            self.ctx.events.emit("tick", round=rnd, **table.counts())
            why = rd.verdict()
            if why is not None:
                break
            self.dispatch.sleep(table.sleep_hint())
        if why == "deadline":
            c = table.counts()
            log.warning("round %d deadline passed with %d running, %d waiting", shown(rnd),
                        c["running"], c["waiting"])
        self.closed(rd.close(why))
        return rd.delivered_clients(client_index)

    def after_tracking(self) -> None:
        pass

    def running(self) -> list[Slot]:
        return [s for t in self.also_tracked() for s in t]


class SyncRounds(ClosingRounds):
    name = "sync"
    finds_waiting_updates = False   # a round lists only its own updates

    def finish(self, session: str) -> None:
        """Nothing in sync is ever aggregated late."""
