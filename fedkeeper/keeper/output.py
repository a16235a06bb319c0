"""What a session writes for people: run-log lines and the per-round CSVs,
as observers of round events (events.py). Rounds are shown from 1:
store round 0 is `round 1` in the log and `round_001.csv`."""
from __future__ import annotations

import csv
import logging
from typing import Any

from ..logs import log_dir
from .events import shown

log = logging.getLogger("fedkeeper.keeper")

CSV_COLUMNS = ["client_id", "cluster", "platform", "platform_id", "attempt", "start", "end",
               "duration_ms", "status", "error_class", "cold_start"]


def round_csv_name(rnd: int) -> str:
    """The CSV file of store round `rnd` (0-based): round_001.csv for round 0."""
    return f"round_{shown(rnd):03d}.csv"


def write_round_csv(session: str, rnd: int, attempts: list[dict[str, Any]]) -> None:
    d = log_dir() / session
    d.mkdir(parents=True, exist_ok=True)
    with open(d / round_csv_name(rnd), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for a in attempts:
            w.writerow([a.get("client"), a.get("cluster"), a.get("platform"), a.get("platform_id"),
                        a.get("attempt"), a.get("start"), a.get("end"), a.get("duration_ms"),
                        a.get("state"), a.get("error_class"), a.get("cold_start")])


class RoundCsv:
    """Writes logs/<session>/round_NNN.csv when a round ends (done or failed)."""

    def __init__(self, session: str):
        self.session = session

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in ("round", "round_failed"):
            return
        rnd = data["report"].round if kind == "round" else data["round"]
        try:
            write_round_csv(self.session, rnd, data.get("attempts") or [])
        except OSError as exc:  # the CSV is a convenience; the store has the records
            log.warning("could not write %s: %s", round_csv_name(rnd), exc)


class RunLog:
    """One run-log line per finished round, in the numbering users see."""

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "round":
            rep = data["report"]
            if data.get("mode") == "async":
                log.info("server step %d: %d fresh + %d stale updates, %d invoked, %d retries, accuracy %s",
                         rep.round_number, rep.delivered, rep.stale, rep.selected, rep.retries, rep.accuracy)
            else:
                log.info("round %d: %d/%d delivered, %d stale, %d retries, accuracy %s", rep.round_number,
                         rep.delivered, rep.selected, rep.stale, rep.retries, rep.accuracy)
        elif kind == "round_failed":
            log.error("round %d failed: %s", data["round_number"], data.get("message", ""))
