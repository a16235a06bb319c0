"""A sweep's results: one row per run read from the store, rendered as a
table, CSV or Markdown."""
from __future__ import annotations

import csv
import io
from typing import Any

from flcommon.update_stats import finite_or_none

from ..config import Config
from ..cost import format_money, session_cost
from ..formatting import fixed_decimals

RESULT_COLUMNS = ("repeat", "seed", "session", "state", "rounds", "rounds_to_target", "time_to_target_s",
                  "final_accuracy", "invocations", "retries", "cost", "currency")


def session_result(store, session: str, cfg: Config | None, target: float | None) -> dict[str, Any]:
    """One run's row, from the store alone. Time to target is the training
    time of the rounds up to and including the first at or above target."""
    doc = store.session(session)
    if doc is None:
        return {"state": "pending", "rounds": 0, "rounds_to_target": None, "time_to_target_s": None,
                "final_accuracy": None, "invocations": 0, "retries": 0, "cost": 0.0, "currency": None}
    done = [r for r in store.rounds(session) if r.get("state") == "done"]
    rounds_to_target = time_to_target = None
    elapsed = 0.0
    for r in done:
        elapsed += finite_or_none(r.get("duration_s")) or 0.0
        acc = r.get("accuracy")
        if target is not None and acc is not None and acc >= target:
            rounds_to_target, time_to_target = r["round"] + 1, elapsed
            break
    cost = session_cost(store, session, cfg)
    attempts = store.attempts(session, fields=("attempt", "hedge"))
    return {
        "state": doc.get("state"),
        "rounds": len(done),
        "rounds_to_target": rounds_to_target,
        "time_to_target_s": time_to_target,
        # JSON has no NaN: a diverged model's accuracy is unknown, not a number.
        "final_accuracy": finite_or_none(done[-1].get("accuracy")) if done else None,
        "invocations": cost["invocations"],
        # As the keeper counts them: a hedge takes the slot's next attempt number but is not a retry.
        "retries": sum(1 for a in attempts if (a.get("attempt") or 1) > 1 and not a.get("hedge")),
        "cost": cost["total"],
        "currency": cost["currency"],
        "error": doc.get("error"),
    }


def _run_order(item: tuple[str, dict[str, Any]]) -> tuple[int, str]:
    """A run's place in the grid: its index (the key's digits for a run
    without one). Keys sort wrongly as text past run999 (run1000 < run101)."""
    key, run = item
    index = run.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        digits = "".join(ch for ch in key if ch.isdigit())
        index = int(digits) if digits else -1
    return index, key


def result_rows(sweep_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a sweep document, in run order: params, then RESULT_COLUMNS."""
    rows = []
    for _, run in sorted((sweep_doc.get("runs") or {}).items(), key=_run_order):
        res = run.get("result") or {}
        rows.append({"params": run["labels"], "repeat": run["repeat"], "seed": run["seed"],
                     "session": run["session"], "state": run.get("state"),
                     **{c: res.get(c) for c in RESULT_COLUMNS if c not in ("repeat", "seed", "session", "state")},
                     # a result stored by a version that kept a NaN accuracy
                     "final_accuracy": finite_or_none(res.get("final_accuracy")),
                     "error": res.get("error"), "failed_sessions": run.get("failed_sessions") or []})
    return rows


DISPLAY_COLUMNS = ("params", "repeat", "session", "state", "rounds", "rounds to target", "time to target (s)",
                   "final accuracy", "invocations", "retries", "cost")


def display_cells(row: dict[str, Any]) -> list[str]:
    """A result row as the table and Markdown show it, in DISPLAY_COLUMNS order."""
    return [" ".join(f"{k}={v}" for k, v in row["params"].items()), str(row["repeat"]), row["session"],
            str(row["state"]), fixed_decimals(row["rounds"]), fixed_decimals(row["rounds_to_target"]),
            fixed_decimals(row["time_to_target_s"], 1), fixed_decimals(row["final_accuracy"]),
            fixed_decimals(row["invocations"]), fixed_decimals(row["retries"]),
            format_money(row["cost"], row.get("currency") or "USD")]


def csv_columns(keys: list[str]) -> list[str]:
    """The CSV header: one column per grid key, then RESULT_COLUMNS. A grid
    key named like a result column (`rounds`: the rounds planned, beside the
    rounds completed) is prefixed `grid.`, so that no two columns share a
    name and a reader by name gets both."""
    taken = set(RESULT_COLUMNS)
    names = []
    for key in keys:
        name = key
        while name in taken:
            name = f"grid.{name}"
        taken.add(name)
        names.append(name)
    return [*names, *RESULT_COLUMNS]


def render_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """One column per grid key, then the result columns; numbers unformatted."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(csv_columns(keys))
    for r in rows:
        w.writerow([*[r["params"].get(k) for k in keys],
                    *["" if r.get(c) is None else r.get(c) for c in RESULT_COLUMNS]])
    return out.getvalue()


def render_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(DISPLAY_COLUMNS) + " |", "|" + "---|" * len(DISPLAY_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in display_cells(r)) + " |")
    return "\n".join(lines) + "\n"
