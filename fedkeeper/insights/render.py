"""Insights answers as tables (plain data, laid out by the command line),
and the round options, counted from 1 as a user sees rounds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from flcommon import store as fs

from .client import FUNCTION


def parse_rounds(round_: int | None, rounds: str | None, last_round: int | None) -> tuple[int, int] | None:
    """--round R or --rounds A:B (inclusive; A or B may be left out) as
    (first, last), rounds counted from 1 as everywhere a user sees them;
    `last_round` (also from 1) fills in an open end."""
    if round_ is not None and rounds is not None:
        raise ValueError("give --round or --rounds, not both")
    if round_ is not None:
        if round_ < 1:
            raise ValueError("--round: rounds are counted from 1")
        return round_, round_
    if rounds is None:
        return None
    first, sep, last = rounds.partition(":")
    try:
        lo = int(first) if first.strip() else 1
        hi = int(last) if last.strip() else (last_round if last_round is not None else lo)
        if not sep:
            hi = lo
    except ValueError:
        raise ValueError(f"--rounds {rounds!r}: expected A:B with round numbers") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"--rounds {rounds!r}: expected 1 <= A <= B (rounds are counted from 1)")
    return lo, hi


def shown_rounds(result: dict[str, Any]) -> dict[str, Any]:
    """The answer with every round number counted from 1 (fl_insights
    answers with the store's numbering, from 0)."""
    out = dict(result)
    data = dict(out.get("data") or {})
    if data.get("rounds"):
        data["rounds"] = [r + 1 for r in data["rounds"]]
    if isinstance(data.get("rows"), list):
        data["rows"] = [dict(r, round=r["round"] + 1, trained_from=r["trained_from"] + 1)
                        if isinstance(r.get("round"), int) and isinstance(r.get("trained_from"), int)
                        else r for r in data["rows"]]
    out["data"] = data
    return out


def last_round(store, session: str) -> int | None:
    """The highest round number (the store's, from 0) the session has any record of."""
    rounds = [r["round"] for r in store.rounds(session)]
    top = store.db[fs.UPDATES].find_one({"session": session}, {"round": 1}, sort=[("round", -1)])
    if top:
        rounds.append(top["round"])
    return max(rounds) if rounds else None


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _mb(n: Any) -> str:
    return f"{(n or 0) / 1e6:.2f} MB"


@dataclass
class TableSpec:
    """A table as data; the command line decides how to lay it out."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    right: tuple[str, ...] = ()
    caption: str | None = None


def tables(result: dict[str, Any]) -> list[TableSpec]:
    """The answer (rounds as shown_rounds gives them) as tables; cells may
    hold console markup, values from the store are escaped."""
    what, data = result["what"], result.get("data") or {}
    rounds = data.get("rounds")
    span = "" if not rounds else (f" round {rounds[0]}" if rounds[0] == rounds[1]
                                  else f" rounds {rounds[0]}-{rounds[1]}")
    title = f"{what} of {result['session']}{span}"
    if what == "contributions":
        rows = data.get("rows", [])
        # "from" (the round an update trained from) only when some update is stale.
        stale = any(r["trained_from"] != r["round"] for r in rows)
        cols = ["round", "client"] + (["from"] if stale else []) + [
            "status", "examples", "share", "loss", "norm", "z", "cosine", "flags", "reason"]
        t = TableSpec(title, cols, right=tuple(c for c in cols if c not in ("client", "status", "flags", "reason")))
        for r in rows:
            flags = ", ".join(r.get("flags") or [])
            t.rows.append([str(r["round"]), escape(r["client"]), *([str(r["trained_from"])] if stale else []),
                           escape(str(r["status"])), _num(r.get("num_examples")), _pct(r.get("share")),
                           _num(r.get("loss")), _num(r.get("norm")), _num(r.get("z"), 2), _num(r.get("cosine"), 3),
                           f"[red]{escape(flags)}[/red]" if flags else "",
                           escape(str(r.get("reason") or r.get("error") or ""))])
        return [t]
    if what == "clusters":
        by_k = data.get("silhouette_by_k") or {}
        how = {"given": "given", "silhouette": "with the best silhouette"}.get(data.get("k_chosen_by"),
                                                                          data.get("k_chosen_by"))
        caption = f"silhouette {_num(data.get('silhouette'), 3)}, k {how}"
        if len(by_k) > 1:
            caption += "; tried " + ", ".join(f"k={k}: {_num(v, 3)}" for k, v in by_k.items())
        t = TableSpec(f"{title}: {data.get('k')} group(s)", ["group", "size", "mean cosine", "clients"],
                      right=("group", "size", "mean cosine"), caption=caption)
        for g in data.get("groups", []):
            t.rows.append([str(g["group"]), str(g["size"]), _num(g.get("mean_cosine"), 3),
                           escape(", ".join(g["clients"]))])
        return [t]
    out = []
    for key, label in (("clients", "client"), ("clusters", "cluster")):
        extra = "cluster" if key == "clients" else "platform"
        cols = [label, extra, "attempts", "success", "timeouts", "cold starts", "p50 ms", "p95 ms"]
        t = TableSpec(f"{title}: per {label}", cols, right=tuple(cols[2:]))
        for name, s in (data.get(key) or {}).items():
            t.rows.append([escape(name), escape(str(s.get(extra) or "-")), str(s["attempts"]),
                           _pct(s.get("success_rate")), str(s["timeouts"]), _pct(s.get("cold_start_rate")),
                           _num(s.get("p50_ms"), 1), _num(s.get("p95_ms"), 1)])
        out.append(t)
    return out


def provenance(result: dict[str, Any]) -> str:
    """Where the answer came from and what it cost to read."""
    source = "from the query cache" if result.get("from_cache") else (
        "computed" + (" without the cache" if result.get("cache_mode") == "off" else ""))
    line = (f"{result['what']}: {source} by {FUNCTION} on {result['cluster']} ({result['platform']}); "
            f"update cache {result.get('update_cache_hits', 0)} hit(s), {result.get('update_cache_misses', 0)} "
            f"miss(es); {_mb(result.get('bytes_read'))} read from the store in {result.get('blobs_read', 0)} "
            f"blob(s); cache holds {_mb(result.get('cache_bytes'))} of {_mb(result.get('cache_limit_bytes'))}; "
            f"{result.get('seconds', 0):.3f}s in the function, {result.get('wall_seconds', 0):.3f}s in all")
    if result.get("result_ref"):
        line += f"; answer read from blob {result['result_ref']} ({_mb(result.get('result_fetched_bytes'))})"
    return line

