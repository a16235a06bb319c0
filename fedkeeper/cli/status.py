"""`fedkeeper status`: the rounds of a session, from the store.

Rounds are shown, in the table and in --json, counted from 1 (the store
keeps them from 0). A `running` session whose keeper is gone shows as
`interrupted` (fedkeeper.store.effective_state)."""
from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Group
from rich.text import Text

from ..store import effective_state
from .common import (UsageFailure, config_option, console, load, open_runtime, print_json, scenario_option,
                     table)

# `status --watch` runs while the session is in one of these; it stops on
# finished, failed or interrupted (nothing will change any more).
ACTIVE_STATES = ("created", "running")
# what the table reads of each attempt (`--watch` reads them every refresh)
STATUS_FIELDS = ("round", "client", "attempt", "state", "hedge")
COLUMNS = ("round", "state", "done", "failed", "in flight", "retrying", "retries", "seconds", "accuracy")


def status_data(store, session_id: str | None) -> dict[str, Any]:
    """The session's state and its rounds (numbered from 1) as plain data."""
    doc = store.session(session_id) if session_id else store.latest_session()
    if doc is None:
        raise UsageFailure(f"no session {session_id!r} in the store" if session_id else "no sessions in the store")
    sid = doc["_id"]
    by_round: dict[Any, list[dict]] = {}
    for a in store.attempts(sid, fields=STATUS_FIELDS):
        if not a["client"].startswith("_"):
            by_round.setdefault(a["round"], []).append(a)
    rounds = []
    for r in store.rounds(sid):
        mine = by_round.get(r["round"], [])
        latest: dict[str, dict] = {}
        for a in mine:
            if a["attempt"] >= latest.get(a["client"], {}).get("attempt", 0):
                latest[a["client"]] = a
        rounds.append({
            "round": r["round"] + 1, "state": r.get("state"), "selected": len(r.get("selected", [])),
            "done": sum(1 for a in latest.values() if a.get("state") == "succeeded"),
            "failed": sum(1 for a in latest.values() if a.get("state") in ("failed", "timed_out", "abandoned")),
            "in_flight": sum(1 for a in latest.values() if a.get("state") in ("running", "submitting")),
            "retrying": sum(1 for a in latest.values()
                            if a["attempt"] > 1 and a.get("state") in ("running", "submitting")),
            "retries": sum(1 for a in mine if a["attempt"] > 1 and not a.get("hedge")),
            "duration_s": r.get("duration_s"), "accuracy": r.get("accuracy"), "loss": r.get("loss"),
            "epsilon": r.get("epsilon"),
        })
    state = effective_state(doc)
    owner = doc.get("keeper") or {}
    keeper = {"host": owner.get("host"), "pid": owner.get("pid")} if state == "running" and owner else None
    return {"session": sid, "state": state, "created": doc.get("created"),
            "error": doc.get("error"), "stopped": doc.get("stopped"), "keeper": keeper, "rounds": rounds}


def _cells(r: dict[str, Any]) -> list[str]:
    return [str(r["round"]), str(r["state"]), f"{r['done']}/{r['selected']}", str(r["failed"]),
            str(r["in_flight"]), str(r["retrying"]), str(r["retries"]),
            f"{r['duration_s']:.1f}" if r["duration_s"] else "-",
            f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"]


def status_table(data: dict[str, Any], width: int):
    spent = [r["epsilon"] for r in data["rounds"] if r.get("epsilon") is not None]
    eps = f", epsilon {spent[-1]:.3g} spent" if spent else ""
    k = data.get("keeper")
    by = f" (keeper {k['pid']} on {k['host']})" if k else ""
    rounds = table(f"session {data['session']}: {data['state']}{by}{eps}", COLUMNS,
                   [_cells(r) for r in data["rounds"]], width=width, right=COLUMNS)
    if data.get("error"):
        # Why it failed is what a failed session's table cannot show (it may
        # have no rounds at all); plain text, as the store holds it.
        return Group(rounds, Text(f"error: {data['error']}"))
    if data.get("stopped") and data.get("state") == "finished":
        return Group(rounds, Text(f"stopped: {data['stopped']}"))   # why no further round was trained
    return rounds


def _changes(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What changed since the last refresh, as lines (for --watch into a pipe)."""
    lines = []
    if before is None or before["state"] != now["state"]:
        lines.append(f"session {now['session']}: {now['state']}")
    if now.get("error") and (before is None or before.get("error") != now["error"]):
        lines.append(f"error: {now['error']}")
    old = {r["round"]: r for r in (before or {}).get("rounds", [])}
    for r in now["rounds"]:
        if old.get(r["round"]) != r:
            cells = _cells(r)
            lines.append(f"round {cells[0]}: " + ", ".join(f"{c} {v}" for c, v in zip(COLUMNS[1:], cells[1:])))
    return lines


@click.command("status")
@click.argument("session", required=False)
@config_option
@scenario_option
@click.option("--json", "as_json", is_flag=True, help="Print the session and its rounds as JSON.")
@click.option("--watch", is_flag=True, help="Refresh until the session finishes, fails or is interrupted.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between refreshes with --watch.")
def status_cmd(session: str | None, config_path: str | None, scenario: str | None, as_json: bool, watch: bool,
               interval: float) -> None:
    """Rounds of a session (default: the latest), from the store."""
    cfg = load(config_path)
    rt = open_runtime(cfg, scenario, need_store=True)
    try:
        if as_json:
            from ..cost import session_cost
            data = status_data(rt.store, session)
            cost = session_cost(rt.store, data["session"], cfg)
            # rounds counted from 1 here too (the initialisation is round 1's)
            cost["per_round"] = {r + 1: v for r, v in cost["per_round"].items()}
            data["cost"] = cost
            print_json(data)
            return
        if not watch:
            console.print(status_table(status_data(rt.store, session), console.width))
            return
        if not console.is_terminal:
            # A pipe or a log: each change as lines, nothing redrawn.
            before = None
            while True:
                data = status_data(rt.store, session)
                for line in _changes(before, data):
                    click.echo(line)
                before = data
                if data["state"] not in ACTIVE_STATES:
                    return
                time.sleep(interval)
        from rich.live import Live
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                data = status_data(rt.store, session)
                live.update(status_table(data, console.width))
                if data["state"] not in ACTIVE_STATES:
                    break
                time.sleep(interval)
    finally:
        rt.close()
