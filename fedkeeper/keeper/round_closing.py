"""When a sync or semi_async round stops waiting: quorum, the round
deadline, and what becomes of the attempts still running or waiting. Pure,
over an attempt table (attempts.py): no store, no provider, no sleeping."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .attempts import DELIVERED, FAILED, RUNNING, WAITING, AttemptTable, Slot

COMPLETE, QUORUM, DEADLINE = "complete", "quorum", "deadline"


def quorum_needed(fraction: float, selected: int) -> int:
    return math.ceil(fraction * selected)


def quorum_met(included: int, stale: int, needed: int) -> bool:
    """Stale updates count towards the quorum as they count in the
    aggregate; a round with nothing to aggregate never meets it."""
    return included + stale >= needed and included + stale > 0


@dataclass
class Closing:
    """How a round stopped waiting, and what becomes of its slots."""

    why: str                                           # complete | quorum | deadline
    abandoned: list[Slot] = field(default_factory=list)  # running attempts given up
    stragglers: list[Slot] = field(default_factory=list)  # running attempts left to run


class RoundDispatch:
    """The closing rules of one sync or semi_async round over its table.

    sync (`close_at` None): the round waits until every slot delivered or
    failed for good, or the round deadline passes; then running attempts are
    abandoned. semi_async: it also closes once `close_at` slots delivered,
    and running attempts then straggle on (tracked in later rounds)."""

    def __init__(self, table: AttemptTable, deadline_s: float, close_at: int | None = None):
        self.table = table
        self.deadline = table.clock() + deadline_s
        self.close_at = close_at

    def past_deadline(self) -> bool:
        return self.table.clock() >= self.deadline

    def to_invoke(self) -> list[Slot]:
        """Due slots, their attempt numbers taken; none once the deadline passed."""
        return [] if self.past_deadline() else self.table.begin_due()

    def verdict(self) -> str | None:
        c = self.table.counts()
        if c[RUNNING] == 0 and c[WAITING] == 0:
            return COMPLETE
        if self.close_at is not None and c[DELIVERED] >= self.close_at:
            return QUORUM
        if self.past_deadline():
            return DEADLINE
        return None

    def close(self, why: str) -> Closing:
        closing = Closing(why)
        for s in self.table:
            if s.state == RUNNING:
                if self.close_at is None:
                    closing.abandoned.append(s)
                    s.state, s.inv = FAILED, None
                    s.last_error = s.last_error or "round deadline passed"
                else:
                    closing.stragglers.append(s)
            elif s.state == WAITING:
                s.state = FAILED
                s.last_error = s.last_error or ("round deadline passed" if why == DEADLINE
                                                else "round closed before a retry")
        return closing

    def delivered_clients(self, order: Callable[[str], Any]) -> list[str]:
        return sorted((s.client for s in self.table if s.state == DELIVERED), key=order)
