"""semi_async: a round closes at quorum; attempts still running go on as
stragglers and their updates join a later round as stale updates,
down-weighted by the aggregator, while at most `staleness_tolerance` rounds
old. A straggler's client is not selected again until it ends, and an ended
straggler is not retried: its round has closed."""
from __future__ import annotations

from typing import Any

from ..attempts import RUNNING, AttemptTable
from ..round_closing import Closing
from ..events import RoundReport
from .sync import ClosingRounds


class SemiAsyncRounds(ClosingRounds):
    name = "semi_async"
    ABANDONS_AT_CLOSE = False   # they straggle on, tracked (closed())

    def __init__(self, ctx):
        super().__init__(ctx)
        self.stragglers: AttemptTable = self.dispatch.table()

    def run(self, session: str, first_round: int, reports: list[RoundReport]) -> None:
        self.stragglers = self.dispatch.table(self.adopt_running(session, first_round))
        try:
            super().run(session, first_round, reports)
        finally:
            self.stragglers = self.dispatch.table()

    def candidates(self, session: str) -> list[str]:
        """The clients not busy with a straggling attempt. When every client
        is busy, waits (at most the round deadline) for one."""
        deadline = self.ctx.clock() + self.training.round_deadline_s
        while True:
            busy = {s.client for s in self.stragglers}
            free = [c for c in self.ctx.clients() if c not in busy]
            if free or self.ctx.clock() >= deadline:
                return free
            self.dispatch.track(session, [self.stragglers])
            self.after_tracking()
            self.dispatch.sleep(0.05)

    def close_at(self, quorum: int) -> int:
        return quorum

    def stale_for(self, session: str, rnd: int) -> list[dict[str, Any]]:
        return self.stale_updates(session, rnd)

    def closed(self, closing: Closing) -> None:
        for s in closing.stragglers:
            self.stragglers.add(s)

    def resumed_while_aggregating(self, table: AttemptTable) -> None:
        # The round closed before the keeper stopped: its running attempts straggle.
        for s in table:
            if s.state == RUNNING:
                self.stragglers.add(s)

    def before_aggregating(self, session: str, rnd: int, included: list[str],
                           stale: list[dict[str, Any]]) -> None:
        self.mark_stale(session, rnd)
        # The next aggregation is round rnd + 1's: stragglers older than its tolerance are not hedged.
        self.dispatch.hedger.oldest_useful_round = rnd + 1 - self.training.staleness_tolerance
        self.store.upsert_round(session, rnd, state="aggregating", included=included, stale_included=stale)

    def aggregator_args(self, included: list[str], stale: list[dict[str, Any]]) -> dict[str, Any]:
        return {"clients": included, "stale": stale}

    def extra_fields(self, res: dict[str, Any]) -> dict[str, Any]:
        return {"stale_accepted": res.get("stale_accepted")}

    def also_tracked(self) -> list[AttemptTable]:
        return [self.stragglers]

    def after_tracking(self) -> None:
        # An ended straggler is not retried: its round has closed.
        self.stragglers.keep_only(RUNNING)
