"""`fedkeeper status`: the rounds of a session, from the store."""
from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.table import Table

from .common import UsageFailure, config_option, console, load, open_runtime, scenario_option


def _status_data(store, session_id: str | None) -> dict[str, Any]:
    doc = store.session(session_id) if session_id else store.latest_session()
    if doc is None:
        raise UsageFailure(f"no session {session_id!r} in the store" if session_id else "no sessions in the store")
    sid = doc["_id"]
    attempts = store.attempts(sid)
    rounds = []
    for r in store.rounds(sid):
        mine = [a for a in attempts if a["round"] == r["round"] and not a["client"].startswith("_")]
        latest: dict[str, dict] = {}
        for a in mine:
            if a["attempt"] >= latest.get(a["client"], {}).get("attempt", 0):
                latest[a["client"]] = a
        rounds.append({
            "round": r["round"], "state": r.get("state"), "selected": len(r.get("selected", [])),
            "done": sum(1 for a in latest.values() if a.get("state") == "succeeded"),
            "failed": sum(1 for a in latest.values() if a.get("state") in ("failed", "timed_out", "abandoned")),
            "in_flight": sum(1 for a in latest.values() if a.get("state") in ("running", "submitting")),
            "retrying": sum(1 for a in latest.values()
                            if a["attempt"] > 1 and a.get("state") in ("running", "submitting")),
            "retries": sum(1 for a in mine if a["attempt"] > 1),
            "duration_s": r.get("duration_s"), "accuracy": r.get("accuracy"), "loss": r.get("loss"),
        })
    return {"session": sid, "state": doc.get("state"), "created": doc.get("created"),
            "error": doc.get("error"), "rounds": rounds}


def _status_table(data: dict[str, Any]) -> Table:
    t = Table(title=f"session {data['session']}: {data['state']}")
    for col in ("round", "state", "done", "failed", "in flight", "retrying", "retries", "seconds", "accuracy"):
        t.add_column(col, justify="right")
    for r in data["rounds"]:
        t.add_row(str(r["round"] + 1), str(r["state"]), f"{r['done']}/{r['selected']}", str(r["failed"]),
                  str(r["in_flight"]), str(r["retrying"]), str(r["retries"]),
                  f"{r['duration_s']:.1f}" if r["duration_s"] else "-",
                  f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-")
    return t


@click.command("status")
@click.argument("session", required=False)
@config_option
@scenario_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh until the session ends.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status_cmd(session: str | None, config_path: str, scenario: str | None, as_json: bool, watch: bool,
               interval: float) -> None:
    """Rounds of a session (default: the latest), from the store."""
    cfg = load(config_path)
    rt = open_runtime(cfg, scenario, need_store=True)
    try:
        if as_json:
            from ..cost import session_cost
            data = _status_data(rt.store, session)
            data["cost"] = session_cost(rt.store, data["session"], cfg)
            click.echo(json.dumps(data, default=str, indent=2))
            return
        if not watch:
            console.print(_status_table(_status_data(rt.store, session)))
            return
        from rich.live import Live
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                data = _status_data(rt.store, session)
                live.update(_status_table(data))
                if data["state"] not in ("running", "created"):
                    break
                time.sleep(interval)
    finally:
        rt.close()
