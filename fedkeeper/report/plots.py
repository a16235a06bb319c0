"""PNG plots of session series, drawn with matplotlib's object API on the
Agg canvas (no pyplot state, no windows)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .data import PARTICIPATION_COLOURS, legend_labels


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
    pts = [(row[x], row[y]) for row in rows
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
    """Retries and failures per round (retries_figure) as a PNG."""
    return _save(retries_figure(s), path)


def retries_figure(s: dict[str, Any]):
    """Per round: re-invocations, failed client attempts (by error class) and
    clients that failed for good."""
    import numpy as np
    fig = _figure()
    ax = fig.subplots()
    rows = s["rounds"]
    x = np.array([row["round"] for row in rows], dtype=float)
    width = 0.27
    ax.bar(x - width, [row["retries"] for row in rows], width, label="retries", color="#1565c0")
    classes = sorted({k for row in rows for k in row["failures_by_class"]})
    bottom = np.zeros(len(rows))
    colours = ["#c62828", "#ef6c00", "#6a1b9a", "#5d4037", "#00838f", "#9e9d24"]
    for i, cls in enumerate(classes):
        counts = np.array([row["failures_by_class"].get(cls, 0) for row in rows])
        ax.bar(x, counts, width, bottom=bottom, label=f"failed attempts: {cls}", color=colours[i % len(colours)])
        bottom += counts
    failed_clients = [row["failed_clients"] or 0 for row in rows]
    ax.bar(x + width, failed_clients, width, label="clients failed for good", color="#212121")
    # Counts start at 0; with nothing to count the axis still reads 0 to 1,
    # not the symmetric range matplotlib picks around an all-zero plot.
    top = max([row["retries"] for row in rows] + failed_clients + [int(v) for v in bottom] + [0])
    ax.set_ylim(0, max(1, top) * 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("count")
    ax.set_xticks(x)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"retries and failures per round: {s['session']}", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_participation(s: dict[str, Any], path: Path) -> Path:
    """Client x round map of what each client's invocation came to."""
    return _save(participation_figure(s), path)


def participation_figure(s: dict[str, Any]):
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
    ax.set_xticks(range(len(p["rounds"])), [str(r) for r in p["rounds"]])
    step = max(1, len(p["clients"]) // 40)
    ax.set_yticks(range(0, len(p["clients"]), step), p["clients"][::step], fontsize="small")
    # Cell borders, so that neighbouring cells of one state stay countable.
    ax.set_xticks([x - 0.5 for x in range(len(p["rounds"]) + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(len(p["clients"]) + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("round")
    # A figure title: constrained layout keeps it above the outside legend
    # (an axes title ran under the legend on narrow plots).
    fig.suptitle(f"client participation: {s['session']}", fontsize="medium")
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
    return fig


