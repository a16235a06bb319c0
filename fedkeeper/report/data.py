"""A session's series, read from the store into plain dicts and lists
(what report.json holds)."""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Sequence

from flcommon import store as fs
from flcommon.update_stats import client_order
from flcommon.update_stats import finite_or_none as _num  # JSON-safe: NaN and inf become None
from flcommon.reliability import cluster_stats

from ..model_trail.catalog import validation_rows

log = logging.getLogger("fedkeeper.report")

ENDED = ("succeeded", "failed", "timed_out", "abandoned")
# What a report reads of each attempt (the reliability figures' fields
# included): a long session's documents, results and errors with them, are
# far larger.
REPORT_FIELDS = ("client", "round", "attempt", "hedge", "state", "error_class", "cluster", "platform",
                 "duration_ms", "cold_start", "unsent", "stray")
FAILED = ("failed", "timed_out", "abandoned")
# Session settings that tell sweep runs apart; the legend shows those that differ.
COMPARED_PARAMS = ("strategy", "optim", "lr", "local_epochs", "mode")
# Participation states, in legend order, with their colours.
PARTICIPATION_COLOURS = {
    "accepted": "#2e7d32",   # its update for this round was aggregated
    "rejected": "#f9a825",   # delivered, refused by the aggregator (or a late update refused in this round)
    "stale": "#66bb6a",      # an earlier round's update aggregated in this round (models.contributions)
    "included": "#90caf9",   # listed for aggregation, no model recorded yet
    "late": "#8d6e63",       # selected, its update arrived after the round closed
    "failed": "#c62828",     # selected, no update
    "pending": "#bdbdbd",    # selected, round still running
    "idle": "#f5f5f5",       # not selected
}


class ReportError(Exception):
    """A report cannot be made (a session is not in the store)."""



def _offset(ts: Any, t0: float | None) -> float | None:
    ts = _num(ts)
    return None if ts is None or t0 is None else ts - t0


def session_params(doc: dict[str, Any]) -> dict[str, Any]:
    """The settings a session ran with, from its spec (older sessions have no
    strategy or mode in it: they ran FedAvg, synchronously)."""
    spec = doc.get("spec") or {}
    strategy = spec.get("strategy")
    if isinstance(strategy, dict):
        strategy = strategy.get("name")
    return {
        "strategy": strategy or "fedavg",
        "optim": spec.get("optim"),
        "lr": spec.get("lr"),
        "local_epochs": spec.get("local_epochs"),
        "mode": spec.get("mode") or "sync",
        "model": (spec.get("user_module") or {}).get("name") or spec.get("model"),
        "dataset": (spec.get("data") or {}).get("dataset"),
        "partition": (spec.get("partition") or {}).get("method"),
        "clients": len(spec.get("clients") or []),
        "batch_size": spec.get("batch_size"),
        "seed": spec.get("seed"),
    }


def _stale_aggregated(rd: dict[str, Any], model: dict[str, Any] | None,
                      rejected: set[tuple[Any, Any]]) -> set[str]:
    """Clients with a late update (from an earlier round) aggregated in round
    rd: the model's `contributions` with staleness > 0. A model stored before
    contributions were recorded falls back to what the keeper offered
    (`rounds.stale_included`) less what the aggregator refused."""
    if model is None:
        return set()
    if "contributions" in model:
        return {c.get("client") for c in model.get("contributions") or []
                if isinstance(c, dict) and (c.get("staleness") or 0) > 0}
    return {s.get("client") for s in rd.get("stale_included") or []
            if isinstance(s, dict) and (s.get("client"), s.get("round")) not in rejected}


def _participation(clients: list[str], rounds: list[dict[str, Any]], models: dict[int, dict[str, Any]],
                   updates: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """client x round matrix of PARTICIPATION_COLOURS states, plus `stale`:
    the [client, round] cells where a late update of the client was
    aggregated (a selected client's cell keeps its own round's state; the
    plot marks the stale update on it)."""
    delivered = {(u["round"], u["client"]) for u in updates}
    states: dict[str, list[str]] = {c: [] for c in clients}
    stale_cells: list[list[Any]] = []
    for rd in rounds:
        r = rd["round"]
        selected = set(rd.get("selected") or [])
        included = set(rd.get("included") or [])
        model = models.get(r + 1)
        # Rejections carry the round of the refused update: r for this
        # round's, an earlier one for a stale update refused in this round.
        rejected = {(x.get("client"), x.get("round", r)) for x in (model or {}).get("rejected") or []
                    if isinstance(x, dict)}
        stale_refused = {c for c, ur in rejected if ur != r}
        stale = _stale_aggregated(rd, model, rejected)
        closed = rd.get("state") in ("aggregating", "done", "failed")
        for c in clients:
            if c in selected:
                if c in included:
                    state = ("rejected" if (c, r) in rejected
                             else ("accepted" if model is not None else "included"))
                elif (r, c) in delivered and closed:
                    state = "late"
                elif closed:
                    state = "failed"
                else:
                    state = "pending"
            elif c in stale:
                state = "stale"
            elif c in stale_refused:
                state = "rejected"
            else:
                state = "idle"
            states[c].append(state)
            if c in stale:
                stale_cells.append([c, r + 1])
    return {"clients": clients, "rounds": [rd["round"] + 1 for rd in rounds],
            "states": [states[c] for c in clients], "stale": stale_cells}


def session_series(store, session_id: str, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a report plots for one session, as plain data.

    Rounds are counted from 1, as everywhere a user sees them (the store
    counts from 0); wall times are seconds since the session was created,
    and the session's `wall_time_s` is from its creation to its end, as
    `fedkeeper start` reports it. Per-cluster lists cover client attempts that
    ended, in (round, client, attempt) order. `cost` is what
    fedkeeper.cost.session_cost returned, if anything.
    """
    doc = store.session(session_id)
    if doc is None:
        raise ReportError(f"no session {session_id!r} in the store")
    t0 = _num(doc.get("created"))
    rounds = store.rounds(session_id)
    models = {m["round"]: m for m in store.db[fs.MODELS].find(
        {"session": session_id}, {"round": 1, "metrics": 1, "accepted": 1, "accepted_clients": 1,
                                  "rejected": 1, "contributions": 1, "seconds": 1})}
    attempts = store.attempts(session_id, fields=REPORT_FIELDS)
    client_attempts = [a for a in attempts if not str(a.get("client", "")).startswith("_")]
    per_round_cost = {int(k): v for k, v in ((cost or {}).get("per_round") or {}).items()}
    attempts_by_round: dict[Any, list[dict[str, Any]]] = {}
    for a in attempts:
        attempts_by_round.setdefault(a.get("round"), []).append(a)

    round_rows = []
    for rd in rounds:
        r = rd["round"]
        model = models.get(r + 1) or {}
        metrics = model.get("metrics") or {}
        mine = attempts_by_round.get(r, [])
        clients_r = [a for a in mine if not str(a.get("client", "")).startswith("_")]
        by_class: dict[str, int] = {}
        for a in clients_r:
            if a.get("state") in FAILED:
                key = a.get("error_class") or a.get("state")
                by_class[key] = by_class.get(key, 0) + 1
        rejected = model.get("rejected") if model else rd.get("rejected")
        round_rows.append({
            "round": r + 1,
            "state": rd.get("state"),
            "accuracy": _num(metrics.get("accuracy", rd.get("accuracy"))),
            "loss": _num(metrics.get("loss", rd.get("loss"))),
            "started_s": _offset(rd.get("started"), t0),
            "ended_s": _offset(rd.get("ended"), t0),
            "duration_s": _num(rd.get("duration_s")),
            "aggregation_s": _num(model.get("seconds")),
            "selected": len(rd.get("selected") or []),
            "included": len(rd.get("included") or []),
            "delivered": rd.get("delivered"),
            "accepted": model.get("accepted", rd.get("accepted")),
            "rejected": len(rejected or []),
            "stale_included": len(rd.get("stale_included") or []),
            "attempts": len(clients_r),
            # Every re-invocation in the round, helpers included (as rounds.retries counts them).
            # (a hedge takes the next attempt number but is no retry)
            "retries": sum(1 for a in mine if a.get("attempt", 1) > 1 and not a.get("hedge")),
            "client_retries": sum(1 for a in clients_r if a.get("attempt", 1) > 1 and not a.get("hedge")),
            "hedges": sum(1 for a in clients_r if a.get("hedge")),
            "epsilon": _num(rd.get("epsilon")),  # under differential privacy
            "failed_attempts": sum(by_class.values()),
            "failures_by_class": dict(sorted(by_class.items())),
            "failed_clients": rd.get("failed"),
            "cost": _num((per_round_cost.get(r) or {}).get("cost")),
        })

    clusters: dict[str, dict[str, Any]] = {}
    stats = cluster_stats(client_attempts)
    for a in client_attempts:
        if a.get("state") not in ENDED:
            continue
        c = clusters.setdefault(a.get("cluster") or "?", {
            "platform": a.get("platform"), "durations_ms": [], "cold_start": [], "states": []})
        c["durations_ms"].append(_num(a.get("duration_ms")))
        c["cold_start"].append(a.get("cold_start"))
        c["states"].append(a.get("state"))
    for name, c in clusters.items():
        c["stats"] = stats.get(name)

    spec_clients = list((doc.get("spec") or {}).get("clients") or [])
    seen = {c for rd in rounds for c in rd.get("selected") or []}
    clients = sorted(set(spec_clients) | seen, key=client_order)
    accuracies = [row["accuracy"] for row in round_rows if row["accuracy"] is not None]
    ended = [row["ended_s"] for row in round_rows if row["ended_s"] is not None]
    return {
        "session": session_id,
        "state": doc.get("state"),
        "created": t0,
        "ended": _num(doc.get("ended")),
        "wall_time_s": _offset(doc.get("ended"), t0) if doc.get("ended") else (max(ended) if ended else None),
        "error": doc.get("error"),
        "params": session_params(doc),
        "final_accuracy": accuracies[-1] if accuracies else None,
        "rounds": round_rows,
        "clusters": clusters,
        "participation": _participation(clients, rounds, models, store.updates(session_id)),
        "cost": _cost_summary(cost),
        "validations": validation_rows(store, session_id),  # fedkeeper model validate
    }


def _cost_summary(cost: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cost:
        return None
    return {"currency": cost.get("currency"), "total": _num(cost.get("total")),
            "gb_seconds": _num(cost.get("gb_seconds")), "ghz_seconds": _num(cost.get("ghz_seconds")),
            "invocations": cost.get("invocations"),
            "per_cluster": cost.get("per_cluster") or {}}


def estimated_cost(store, session_id: str, cfg=None) -> tuple[dict[str, Any] | None, str | None]:
    """(cost, note): the session's estimated cost when fedkeeper.cost is
    installed; otherwise, or when the estimate fails, None and why."""
    try:
        from ..cost import session_cost as estimate
    except ImportError:
        return None, "no cost estimate: fedkeeper.cost is not available in this installation"
    try:
        return estimate(store, session_id, cfg), None
    except Exception as exc:  # the cost section is optional: the plots still get written
        log.warning("cost of session %s: %s", session_id, exc)
        return None, f"no cost estimate: {exc}"


def legend_labels(series: Sequence[dict[str, Any]]) -> list[str]:
    """Session id plus the COMPARED_PARAMS whose values differ between the
    sessions (all of them when there is only one session)."""
    if len(series) == 1:
        keys = list(COMPARED_PARAMS)
    else:
        keys = [k for k in COMPARED_PARAMS if len({json.dumps(s["params"].get(k)) for s in series}) > 1]
    out = []
    for s in series:
        shown = ", ".join(f"{k}={s['params'].get(k)}" for k in keys)
        out.append(f"{s['session']} ({shown})" if shown else s["session"])
    return out

