"""Session reports: PNG plots and one self-contained HTML page per report
(docs/reports.md).

Three layers, one module each:

* `data.session_series` reads one session's series from the store into
  plain dicts and lists (what `report.json` holds);
* `plots.plot_*` draw PNGs from those series;
* `page.write_html` embeds every PNG next to summary tables.

`write_report` runs the three for one or more sessions; the `fedkeeper
report` command lives in fedkeeper.cli.report.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

from .data import (COMPARED_PARAMS, ENDED, FAILED, PARTICIPATION_COLOURS, ReportError, estimated_cost,
                   legend_labels, session_params, session_series)
from .page import write_html
from .plots import plot_durations, plot_metric, plot_participation, plot_retries

__all__ = ["COMPARED_PARAMS", "ENDED", "FAILED", "PARTICIPATION_COLOURS", "ReportError", "default_out_dir",
           "estimated_cost", "legend_labels", "plot_durations", "plot_metric", "plot_participation",
           "plot_retries", "safe_name", "session_params", "session_series", "write_html", "write_report"]


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

