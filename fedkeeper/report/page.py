"""The self-contained HTML page: every PNG embedded as a base64 data URI
next to summary tables, so the page opens anywhere without its directory."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .data import COMPARED_PARAMS


def _cell_text(value: Any, digits: int = 4) -> str:
    """A summary table's cell: numbers of any magnitude in few characters
    (a page's tables mix seconds, fractions and epsilons in one column, so
    unlike the terminal's fixed decimals, fedkeeper.formatting), flags as
    yes/no, "-" for a missing value."""
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
        from ..cost import format_money
    except ImportError:
        return f"{_cell_text(amount)} {currency or ''}".strip()
    return format_money(amount, currency or "USD")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell_text(v))}</td>" for v in row) + "</tr>" for row in rows)
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
        with_eps = any(row.get("epsilon") is not None for row in s["rounds"])
        parts.append(_table(
            ["round", "state", "selected", "included", "accepted", "rejected", "stale", "retries", "hedges",
             "failed attempts", "failed clients", "duration s", "aggregation s", "accuracy", "loss"]
            + (["epsilon"] if with_eps else []) + (["cost"] if with_cost else []),
            [[row["round"], row["state"], row["selected"], row["included"], row["accepted"], row["rejected"],
              row["stale_included"], row["retries"], row.get("hedges", 0), row["failed_attempts"],
              row["failed_clients"], row["duration_s"], row["aggregation_s"], row["accuracy"], row["loss"]]
             + ([row.get("epsilon")] if with_eps else [])
             + ([_money(row["cost"], s["cost"]["currency"])] if with_cost else []) for row in s["rounds"]],
            "rounds"))
        if s.get("validations"):
            parts.append(_table(["model", "data", "accuracy", "loss", "examples"],
                                [[v["model"], v["data"], v["accuracy"], v["loss"], v["examples"]]
                                 for v in s["validations"]], "validations (fedkeeper model validate)"))
        classes = sorted({k for row in s["rounds"] for k in row["failures_by_class"]})
        if classes:
            parts.append(_table(["round", *classes],
                                [[row["round"], *(row["failures_by_class"].get(c, 0) for c in classes)]
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


