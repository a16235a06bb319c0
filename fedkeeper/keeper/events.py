"""Round events and what a session reports, as plain data.

The round loop emits events; everything a user sees (the progress callback,
the run log, the per-round CSVs) is an observer of them (output.py).

Event kinds and their data (all round numbers in `round` are the store's,
0-based; `round_number` is the same round counted from 1, as shown):
  deployed     cluster, function, skipped, error
  session      session, resumed
  warning      message
  init         session
  tick         round, round_number, delivered, failed, running, waiting, retrying
               (async also buffered, buffer_size)
  aggregating  round, round_number, included
  round        report (RoundReport), rounds, attempts, mode
  round_failed round, round_number, attempts, message
  service      service, state ("waiting" | "back" | "restarted" | "gone"), message
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

Progress = Callable[[str, dict[str, Any]], None]


def new_session_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def client_index(client: str) -> int:
    return int(client.split("_")[1])


def shown(rnd: int) -> int:
    """The round number a user sees for store round `rnd`."""
    return rnd + 1


@dataclass
class RoundReport:
    round: int                      # the store's round number, 0-based
    selected: int
    delivered: int
    failed: int
    retries: int
    seconds: float
    accuracy: float | None = None
    loss: float | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stale: int = 0                  # updates of earlier rounds aggregated in this one
    epsilon: float | None = None    # DP: epsilon spent once this round is done

    @property
    def round_number(self) -> int:
        """The round as a user counts it, from 1."""
        return shown(self.round)


@dataclass
class SessionSummary:
    session: str
    state: str
    rounds: list[RoundReport]       # every finished round of the session, earlier runs included
    message: str = ""
    rounds_this_run: int = 0

    @property
    def final_accuracy(self) -> float | None:
        for r in reversed(self.rounds):
            if r.accuracy is not None:
                return r.accuracy
        return None


def report_from_doc(doc: dict[str, Any]) -> RoundReport:
    """A finished round of an earlier run, from its round document."""
    return RoundReport(int(doc["round"]), len(doc.get("selected") or []), int(doc.get("delivered") or 0),
                       int(doc.get("failed") or 0), int(doc.get("retries") or 0),
                       float(doc.get("duration_s") or 0.0), doc.get("accuracy"), doc.get("loss"),
                       list(doc.get("rejected") or []), len(doc.get("stale_included") or []),
                       doc.get("epsilon"))


class RoundEvents:
    """Fans events out to observers, in order. An observer's exception
    propagates (a KeyboardInterrupt from the terminal must stop the loop)."""

    def __init__(self) -> None:
        self.observers: list[Progress] = []

    def subscribe(self, observer: Progress) -> None:
        self.observers.append(observer)

    def emit(self, kind: str, **data: Any) -> None:
        if "round" in data and isinstance(data["round"], int):
            data.setdefault("round_number", shown(data["round"]))
        for observer in list(self.observers):
            observer(kind, data)
