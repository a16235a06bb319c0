"""Session reports: PNG plots and one self-contained HTML page per report
(docs/reports.md).

Three layers:

* `session_series` reads one session's series from the store into plain
  dicts and lists (what `report.json` holds);
* `plot_*` draw PNGs from those series with matplotlib's object API on the
  Agg canvas (no pyplot state, no windows);
* `write_html` embeds every PNG as a base64 data URI next to summary tables,
  so the page opens anywhere without its directory.

`write_report` runs the three for one or more sessions; `report_cmd` is the
`fedkeeper report` command.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from flcommon import store as fs
from flcommon.update_stats import finite_or_none as _num  # JSON-safe: NaN and inf become None
from flcommon.reliability import cluster_stats

log = logging.getLogger("fedkeeper.report")

ENDED = ("succeeded", "failed", "timed_out", "abandoned")
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


# --------------------------------------------------------------------------- data

def _offset(ts: Any, t0: float | None) -> float | None:
    ts = _num(ts)
    return None if ts is None or t0 is None else ts - t0


def _client_order(client: str) -> tuple[int, str]:
    tail = client.rsplit("_", 1)[-1]
    return (int(tail), client) if tail.isdigit() else (1 << 30, client)


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
        "model": spec.get("model"),
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
                stale_cells.append([c, r])
    return {"clients": clients, "rounds": [rd["round"] for rd in rounds],
            "states": [states[c] for c in clients], "stale": stale_cells}


def session_series(store, session_id: str, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a report plots for one session, as plain data.

    Rounds keep the store's numbering (0-based); wall times are seconds since
    the session was created. Per-cluster lists cover client attempts that
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
    attempts = store.attempts(session_id)
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
            "round": r,
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
            "retries": sum(1 for a in mine if a.get("attempt", 1) > 1),
            "client_retries": sum(1 for a in clients_r if a.get("attempt", 1) > 1),
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
    clients = sorted(set(spec_clients) | seen, key=_client_order)
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
        from .cost import session_cost as estimate
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


# --------------------------------------------------------------------------- plots

def _figure(width: float = 11.0, height: float = 4.2):
    # The object API with an explicit Agg canvas: nothing global changes and
    # no window can open, whatever backend the environment asks for.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _xy(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [((row["round"] + 1) if x == "round" else row[x], row[y]) for row in rows
           if row[y] is not None and (x == "round" or row[x] is not None)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metric(series: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """`metric` (accuracy or loss) against round and against wall time, one
    line per session."""
    fig = _figure()
    by_round, by_time = fig.subplots(1, 2)
    for s, label in zip(series, legend_labels(series)):
        xs, ys = _xy(s["rounds"], "round", metric)
        line, = by_round.plot(xs, ys, marker="o", label=label)
        xs, ys = _xy(s["rounds"], "ended_s", metric)
        by_time.plot(xs, ys, marker="o", color=line.get_color(), label=label)
    by_round.set_xlabel("round")
    by_time.set_xlabel("wall time since session start (s)")
    for ax in (by_round, by_time):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    by_round.xaxis.get_major_locator().set_params(integer=True)
    by_round.set_title(f"{metric} by round")
    by_time.set_title(f"{metric} by wall time")
    fig.legend(*by_round.get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    return _save(fig, path)


def plot_durations(s: dict[str, Any], path: Path) -> Path:
    """Client invocation durations per cluster (cold and warm starts marked)
    and the cold/warm split of attempts per cluster."""
    import numpy as np
    fig = _figure()
    dur_ax, cold_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    names = sorted(s["clusters"])
    data = [[d / 1000 for d in s["clusters"][n]["durations_ms"] if d is not None] for n in names]
    positions = list(range(1, len(names) + 1))
    if not names:
        for ax in (dur_ax, cold_ax):
            ax.text(0.5, 0.5, "no client invocation has ended", transform=ax.transAxes, ha="center")
    if any(data):
        dur_ax.boxplot([d or [math.nan] for d in data], positions=positions, widths=0.5, showfliers=False)
    kinds = ((True, "#e65100", "cold start"), (False, "#1565c0", "warm"), (None, "#757575", "cold start unknown"))
    rng = np.random.default_rng(0)  # jitter only; the same picture every time
    for cold, colour, label in kinds:
        for pos, name in zip(positions, names):
            c = s["clusters"][name]
            ys = [d / 1000 for d, flag in zip(c["durations_ms"], c["cold_start"]) if d is not None and flag is cold]
            if ys:
                dur_ax.scatter(pos + rng.uniform(-0.15, 0.15, len(ys)), ys, s=14, color=colour, alpha=0.7,
                               label=label)
    dur_ax.set_xticks(positions, names)
    dur_ax.set_ylabel("duration (s)")
    dur_ax.set_title("client invocation durations per cluster")
    positive = [d for ds in data for d in ds if d > 0]
    if positive and max(positive) / min(positive) > 20:
        # Cold and warm starts are orders of magnitude apart on most platforms.
        dur_ax.set_yscale("log")
    handles, labels = dur_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per kind, not per cluster
    if unique:
        dur_ax.legend(unique.values(), unique.keys(), fontsize="small")
    dur_ax.grid(alpha=0.3, axis="y")
    bottom = np.zeros(len(names))
    for flag, colour, label in kinds:
        counts = np.array([sum(1 for f in s["clusters"][n]["cold_start"] if f is flag) for n in names])
        if counts.any():
            cold_ax.bar(names, counts, bottom=bottom, color=colour, label=label)
            bottom += counts
    cold_ax.set_ylabel("ended client attempts")
    cold_ax.set_title("cold starts per cluster")
    if bottom.any():
        cold_ax.legend(fontsize="small")
    fig.suptitle(s["session"], fontsize="medium")
    return _save(fig, path)


def plot_retries(s: dict[str, Any], path: Path) -> Path:
    """Per round: re-invocations, failed client attempts (by error class) and
    clients that failed for good."""
    import numpy as np
    fig = _figure()
    ax = fig.subplots()
    rows = s["rounds"]
    x = np.array([row["round"] + 1 for row in rows], dtype=float)
    width = 0.27
    ax.bar(x - width, [row["retries"] for row in rows], width, label="retries", color="#1565c0")
    classes = sorted({k for row in rows for k in row["failures_by_class"]})
    bottom = np.zeros(len(rows))
    colours = ["#c62828", "#ef6c00", "#6a1b9a", "#5d4037", "#00838f", "#9e9d24"]
    for i, cls in enumerate(classes):
        counts = np.array([row["failures_by_class"].get(cls, 0) for row in rows])
        ax.bar(x, counts, width, bottom=bottom, label=f"failed attempts: {cls}", color=colours[i % len(colours)])
        bottom += counts
    ax.bar(x + width, [row["failed_clients"] or 0 for row in rows], width, label="clients failed for good",
           color="#212121")
    ax.set_xlabel("round")
    ax.set_ylabel("count")
    ax.set_xticks(x)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"retries and failures per round: {s['session']}", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_participation(s: dict[str, Any], path: Path) -> Path:
    """Client x round map of what each client's invocation came to."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    p = s["participation"]
    states = list(PARTICIPATION_COLOURS)
    grid = np.array([[states.index(v) for v in row] for row in p["states"]], dtype=float).reshape(
        len(p["clients"]), len(p["rounds"]))
    height = min(12.0, 2.5 + 0.22 * len(p["clients"]))
    fig = _figure(width=max(6.0, min(14.0, 4 + 0.35 * len(p["rounds"]))), height=height)
    ax = fig.subplots()
    if grid.size:
        ax.imshow(grid, cmap=ListedColormap(list(PARTICIPATION_COLOURS.values())), vmin=-0.5,
                  vmax=len(states) - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(p["rounds"])), [str(r + 1) for r in p["rounds"]])
    step = max(1, len(p["clients"]) // 40)
    ax.set_yticks(range(0, len(p["clients"]), step), p["clients"][::step], fontsize="small")
    # Cell borders, so that neighbouring cells of one state stay countable.
    ax.set_xticks([x - 0.5 for x in range(len(p["rounds"]) + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(len(p["clients"]) + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("round")
    ax.set_title(f"client participation: {s['session']}", fontsize="medium")
    # A late update aggregated in a round where the client's cell shows its
    # own (selected) outcome: a dot of the stale colour on that cell.
    row_of = {c: i for i, c in enumerate(p["clients"])}
    col_of = {r: j for j, r in enumerate(p["rounds"])}
    marked = [(col_of[r], row_of[c]) for c, r in p.get("stale") or []
              if c in row_of and r in col_of and p["states"][row_of[c]][col_of[r]] != "stale"]
    if marked:
        ax.scatter([x for x, _ in marked], [y for _, y in marked], s=40, c=PARTICIPATION_COLOURS["stale"],
                   edgecolors="black", linewidths=0.8, zorder=3)
    used = {v for row in p["states"] for v in row}
    handles = [Patch(facecolor=PARTICIPATION_COLOURS[k], edgecolor="#9e9e9e", label=k)
               for k in states if k in used]
    if marked:
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=6,
                              markerfacecolor=PARTICIPATION_COLOURS["stale"], markeredgecolor="black",
                              label="+ stale update aggregated"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------- HTML

def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 10:
            return f"{value:.1f}"
        if value and abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _money(amount: Any, currency: str | None) -> str:
    """Money as fedkeeper.cost prints it (enough digits for the small sums
    of a session)."""
    if amount is None:
        return "-"
    try:
        from .cost import format_money
    except ImportError:
        return f"{_fmt(amount)} {currency or ''}".strip()
    return format_money(amount, currency or "USD")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#212121;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-weight:bold;margin-bottom:0.3em}
figure{margin:1em 0}
img{max-width:100%}
.note{color:#616161;font-style:italic}
"""


def write_html(report: dict[str, Any], pngs: dict[str, Path], path: Path) -> Path:
    """One HTML file: summary tables and every PNG inline."""
    series = report["sessions"]
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["generated"]))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FedKeeper report: "
             f"{html.escape(', '.join(s['session'] for s in series))}</title><style>{CSS}</style></head><body>",
             "<h1>FedKeeper session report</h1>",
             f"<p class='note'>generated {generated}; "
             "rounds count from 1 as in <code>fedkeeper status</code>; wall time is seconds since the session was "
             "created.</p>"]
    parts.append(_table(
        ["session", "state", *COMPARED_PARAMS, "model", "clients", "rounds", "final accuracy", "wall time s", "cost"],
        [[s["session"], s["state"], *(s["params"].get(k) for k in COMPARED_PARAMS), s["params"]["model"],
          s["params"]["clients"], len(s["rounds"]), s["final_accuracy"], s["wall_time_s"],
          _money(s["cost"]["total"], s["cost"]["currency"]) if s["cost"] else None] for s in series],
        "sessions"))
    parts.append("<h2>Accuracy and loss</h2>")
    parts += [_img(pngs[k], k) for k in ("accuracy", "loss")]
    for s in series:
        sid = s["session"]
        parts.append(f"<h2>Session {html.escape(sid)}</h2>")
        if s.get("error"):
            parts.append(f"<p class='note'>error: {html.escape(str(s['error']))}</p>")
        parts.append(_table(["setting", "value"], [[k, v] for k, v in s["params"].items()], "settings"))
        with_cost = s["cost"] is not None
        parts.append(_table(
            ["round", "state", "selected", "included", "accepted", "rejected", "stale", "retries",
             "failed attempts", "failed clients", "duration s", "aggregation s", "accuracy", "loss"]
            + (["cost"] if with_cost else []),
            [[row["round"] + 1, row["state"], row["selected"], row["included"], row["accepted"], row["rejected"],
              row["stale_included"], row["retries"], row["failed_attempts"], row["failed_clients"],
              row["duration_s"], row["aggregation_s"], row["accuracy"], row["loss"]]
             + ([_money(row["cost"], s["cost"]["currency"])] if with_cost else []) for row in s["rounds"]],
            "rounds"))
        classes = sorted({k for row in s["rounds"] for k in row["failures_by_class"]})
        if classes:
            parts.append(_table(["round", *classes],
                                [[row["round"] + 1, *(row["failures_by_class"].get(c, 0) for c in classes)]
                                 for row in s["rounds"]], "failed client attempts by error class"))
        parts.append(_table(
            ["cluster", "platform", "attempts", "succeeded", "success rate", "timeouts", "cold starts",
             "cold start rate", "p50 ms", "p95 ms"],
            [[name, c["platform"], *((c["stats"] or {}).get(k) for k in (
                "attempts", "succeeded", "success_rate", "timeouts", "cold_starts", "cold_start_rate",
                "p50_ms", "p95_ms"))] for name, c in sorted(s["clusters"].items())],
            "client invocations per cluster"))
        if with_cost:
            cost = s["cost"]
            rows = [[name, _money(c.get("cost"), c.get("currency") or cost["currency"]), c.get("gb_seconds"),
                     c.get("ghz_seconds"), c.get("invocations")] for name, c in sorted(cost["per_cluster"].items())]
            rows.append(["total", _money(cost["total"], cost["currency"]), cost["gb_seconds"],
                         cost["ghz_seconds"], cost["invocations"]])
            parts.append(_table(["cluster", "cost", "GB-seconds", "GHz-seconds", "invocations"], rows,
                                f"estimated cost ({cost['currency']})"))
        else:
            parts.append(f"<p class='note'>{html.escape(report['cost_notes'].get(sid) or 'no cost estimate')}</p>")
        parts += [_img(pngs[f"{sid}/{kind}"], f"{kind} of {sid}") for kind in ("durations", "retries", "participation")]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- report

def safe_name(session_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", session_id)


def default_out_dir(session_ids: Sequence[str]) -> Path:
    return Path("reports") / safe_name(session_ids[0])


def write_report(store, session_ids: Sequence[str], out_dir: Path | None = None, cfg=None) -> dict[str, Any]:
    """Write report.html, report.json and the PNGs for `session_ids` into
    `out_dir` (default: reports/<first session id>/). Returns report.json's
    content, whose "files" lists what was written."""
    if not session_ids:
        raise ReportError("no session given")
    missing = [sid for sid in session_ids if store.session(sid) is None]
    if missing:
        raise ReportError("not in the store: " + ", ".join(f"session {sid!r}" for sid in missing))
    session_ids = list(dict.fromkeys(session_ids))
    out = Path(out_dir) if out_dir is not None else default_out_dir(session_ids)
    out.mkdir(parents=True, exist_ok=True)
    series, notes = [], {}
    for sid in session_ids:
        cost, note = estimated_cost(store, sid, cfg)
        if note:
            notes[sid] = note
        series.append(session_series(store, sid, cost))
    pngs: dict[str, Path] = {}
    for metric in ("accuracy", "loss"):
        pngs[metric] = plot_metric(series, metric, out / f"{metric}.png")
    for s in series:
        stem = safe_name(s["session"])
        pngs[f"{s['session']}/durations"] = plot_durations(s, out / f"{stem}-durations.png")
        pngs[f"{s['session']}/retries"] = plot_retries(s, out / f"{stem}-retries.png")
        pngs[f"{s['session']}/participation"] = plot_participation(s, out / f"{stem}-participation.png")
    report = {"generated": time.time(), "sessions": series, "labels": legend_labels(series),
              "cost_notes": notes}
    html_path = write_html(report, pngs, out / "report.html")
    json_path = out / "report.json"
    report["files"] = {"html": str(html_path), "json": str(json_path),
                       "png": {key: str(p) for key, p in pngs.items()}}
    json_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return report


@click.command("report")
@click.argument("sessions", nargs=-1, required=True)
@click.option("-c", "--config", "--configfile", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML config whose scenario names the store (default: $FEDKEEPER_CONFIG, else config.yaml).")
@click.option("-s", "--scenario", "scenario", default=None,
              help="Scenario under `scenarios:` (default: federated_learning).")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: reports/<first session id>/).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the paths.")
def report_cmd(sessions: tuple[str, ...], config_path: str | None, scenario: str | None, out_dir: str | None,
               as_json: bool) -> None:
    """Plots (accuracy, loss, durations, cold starts, retries, participation)
    and a self-contained HTML page for one or more sessions; several sessions
    are overlaid in the accuracy and loss plots."""
    # Imported here: cli imports this module to register the command.
    from .cli import DEFAULT_CONFIG, _fail, _load, _open_runtime
    cfg = _load(config_path or DEFAULT_CONFIG)
    rt = _open_runtime(cfg, scenario, need_store=True)
    try:
        try:
            report = write_report(rt.store, list(sessions), Path(out_dir) if out_dir else None, cfg)
        except ReportError as exc:
            _fail(str(exc))
    finally:
        rt.close()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    files = report["files"]
    click.echo(f"wrote {files['html']}")
    click.echo(f"wrote {files['json']}")
    for p in files["png"].values():
        click.echo(f"wrote {p}")
