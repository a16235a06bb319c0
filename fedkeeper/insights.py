"""`fedkeeper insights`: questions about a session answered by the
fl_insights function (docs/insights.md), deployed like the other functions
on the insights cluster (scenario.insights.cluster, else the server's).

The keeper sends a signed query and gets a small answer back: the figures
themselves, or the id of a GridFS blob holding a larger answer, which it
reads from the store. Queries are not recorded as invocation attempts of
the session: they are no part of its training, and recording them would
change the very records `reliability` reports on.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import click
from bson import ObjectId
from bson.errors import InvalidId
from rich.console import Console
from rich.table import Table

from flcommon import store as fs
from flcommon.auth import signed
from flcommon.blobs import BlobError

from .providers import ErrorClass, ProviderError
from .runtime import Placement, Runtime

FUNCTION = "fl_insights"
WHATS = ("contributions", "clusters", "reliability")


class InsightsError(RuntimeError):
    """A query could not be answered (unknown session, function failure)."""


class InsightsClient:
    """Queries fl_insights on the scenario's insights cluster."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.cluster = rt.insights_cluster()
        section = rt.cfg.providers.clusters()[self.cluster][0]
        self.placement = Placement(self.cluster, section, rt.function_spec(FUNCTION, section))
        self._deployed = False

    @property
    def platform(self) -> str:
        return self.rt.provider(self.cluster).platform

    def deploy(self) -> None:
        """Deploy fl_insights as configured; unchanged deployments are skipped."""
        (_, _, err), = self.rt.deploy([self.placement])
        if err is not None:
            raise InsightsError(f"deploying {FUNCTION} on {self.cluster} failed: {err}")
        self._deployed = True

    def query(self, session: str, what: str, rounds: tuple[int, int] | None = None, k: int | None = None,
              cache: bool | str = True) -> dict[str, Any]:
        """The function's answer, with `data` filled in (read from the store
        when it came as a reference), `result_fetched_bytes` (what that read
        cost), `wall_seconds` (keeper side, end to end), `cluster` and `platform`."""
        if what not in WHATS:
            raise InsightsError(f"unknown query {what!r}; expected one of {', '.join(WHATS)}")
        if not self._deployed:
            self.deploy()
        payload: dict[str, Any] = {"function": FUNCTION, "session": session, "what": what}
        if rounds is not None:
            payload["rounds"] = [int(rounds[0]), int(rounds[1])]
        if k is not None:
            payload["k"] = int(k)
        if cache is not True:
            payload["cache"] = cache
        t0 = time.perf_counter()
        result, cold = self._call(signed(self.rt.secret, payload))
        fetched = 0
        if "result_ref" in result:
            result["data"], fetched = self._fetch(result)
        result.update(result_fetched_bytes=fetched, wall_seconds=time.perf_counter() - t0,
                      cluster=self.cluster, platform=self.platform, cold_start=cold)
        return result

    def _call(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
        provider = self.rt.provider(self.cluster)
        timeout = self.placement.spec.timeout_s + self.rt.scenario.training.attempt_grace_s
        for attempt in (1, 2):
            try:
                # Polled closely at first: a warm answer takes milliseconds.
                out = provider.call(FUNCTION, body, timeout_s=timeout, poll_s=0.01)
            except ProviderError as exc:
                if exc.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                    self.deploy()  # removed behind our back: put it back once
                    continue
                raise InsightsError(f"{FUNCTION} on {self.cluster}: {exc}") from None
            result = out.result or {}
            if out.ok and "error" not in result:
                return dict(result), out.cold_start
            if out.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                self.deploy()
                continue
            raise InsightsError(str(result.get("error") or out.error or f"{FUNCTION} failed"))
        raise InsightsError(f"{FUNCTION} is missing on {self.cluster} even after deploying it")

    def _fetch(self, result: dict[str, Any]) -> tuple[Any, int]:
        """A large answer: a uint8 array blob holding its JSON, checked against its hash."""
        try:
            arrays = fs.get_arrays(self.rt.store.db, ObjectId(result["result_ref"]))
        except (BlobError, InvalidId, TypeError) as exc:
            raise InsightsError(f"the answer's blob {result.get('result_ref')} cannot be read: {exc}") from None
        raw = arrays[0].tobytes() if len(arrays) == 1 else b""
        if hashlib.sha256(raw).hexdigest() != result.get("result_sha256"):
            raise InsightsError(f"the answer's blob {result['result_ref']} does not match its hash")
        return json.loads(raw), len(raw)


# --------------------------------------------------------------------------- command line

def parse_rounds(round_: int | None, rounds: str | None, last_round: int | None) -> tuple[int, int] | None:
    """--round R or --rounds A:B (inclusive; A or B may be left out) as
    (first, last); `last_round` fills in an open end."""
    if round_ is not None and rounds is not None:
        raise ValueError("give --round or --rounds, not both")
    if round_ is not None:
        if round_ < 0:
            raise ValueError("--round must not be negative")
        return round_, round_
    if rounds is None:
        return None
    first, sep, last = rounds.partition(":")
    try:
        lo = int(first) if first.strip() else 0
        hi = int(last) if last.strip() else (last_round if last_round is not None else lo)
        if not sep:
            hi = lo
    except ValueError:
        raise ValueError(f"--rounds {rounds!r}: expected A:B with round numbers") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"--rounds {rounds!r}: expected 0 <= A <= B")
    return lo, hi


def last_round(store, session: str) -> int | None:
    """The highest round number the session has any record of."""
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


def tables(result: dict[str, Any]) -> list[Table]:
    what, data = result["what"], result.get("data") or {}
    rounds = data.get("rounds")
    span = "" if not rounds else (f" round {rounds[0]}" if rounds[0] == rounds[1]
                                  else f" rounds {rounds[0]}-{rounds[1]}")
    title = f"{what} of {result['session']}{span}"
    if what == "contributions":
        rows = data.get("rows", [])
        # "from" (the round an update trained from) only when some update is stale.
        stale = any(r["trained_from"] != r["round"] for r in rows)
        t = Table(title=title)
        cols = ["round", "client"] + (["from"] if stale else []) + [
            "status", "examples", "share", "loss", "norm", "z", "cosine", "flags", "reason"]
        for col in cols:
            t.add_column(col, justify="left" if col in ("client", "status", "flags", "reason") else "right")
        for r in rows:
            flags = ", ".join(r.get("flags") or [])
            t.add_row(str(r["round"]), r["client"], *([str(r["trained_from"])] if stale else []), str(r["status"]),
                      _num(r.get("num_examples")), _pct(r.get("share")), _num(r.get("loss")), _num(r.get("norm")),
                      _num(r.get("z"), 2), _num(r.get("cosine"), 3), f"[red]{flags}[/red]" if flags else "",
                      str(r.get("reason") or r.get("error") or ""))
        return [t]
    if what == "clusters":
        by_k = data.get("silhouette_by_k") or {}
        how = {"given": "given", "silhouette": "with the best silhouette"}.get(data.get("k_chosen_by"),
                                                                          data.get("k_chosen_by"))
        caption = f"silhouette {_num(data.get('silhouette'), 3)}, k {how}"
        if len(by_k) > 1:
            caption += "; tried " + ", ".join(f"k={k}: {_num(v, 3)}" for k, v in by_k.items())
        t = Table(title=f"{title}: {data.get('k')} group(s)", caption=caption)
        for col in ("group", "size", "mean cosine", "clients"):
            t.add_column(col)
        for g in data.get("groups", []):
            t.add_row(str(g["group"]), str(g["size"]), _num(g.get("mean_cosine"), 3), ", ".join(g["clients"]))
        return [t]
    out = []
    for key, label in (("clients", "client"), ("clusters", "cluster")):
        t = Table(title=f"{title}: per {label}")
        extra = "cluster" if key == "clients" else "platform"
        for col in (label, extra, "attempts", "success", "timeouts", "cold starts", "p50 ms", "p95 ms"):
            t.add_column(col, justify="left" if col in (label, extra) else "right")
        for name, s in (data.get(key) or {}).items():
            t.add_row(name, str(s.get(extra) or "-"), str(s["attempts"]), _pct(s.get("success_rate")),
                      str(s["timeouts"]), _pct(s.get("cold_start_rate")), _num(s.get("p50_ms"), 1),
                      _num(s.get("p95_ms"), 1))
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


@click.command("insights")
@click.argument("session")
@click.argument("what", type=click.Choice(WHATS))
@click.option("-c", "--config", "--configfile", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML config whose scenario names the store and clusters "
                   "(default: $FEDKEEPER_CONFIG, else config.yaml).")
@click.option("-s", "--scenario", "scenario", default=None,
              help="Scenario under `scenarios:` (default: federated_learning).")
@click.option("--round", "round_", type=int, default=None, help="Only this round (numbered as in the store).")
@click.option("--rounds", "rounds", default=None, metavar="A:B", help="Rounds A to B, both included.")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="clusters: this many groups (default: the best silhouette score for 2..8).")
@click.option("--no-cache", is_flag=True, help="Read every update from the store; keep nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")
def insights_cmd(session: str, what: str, config_path: str | None, scenario: str | None, round_: int | None,
                 rounds: str | None, k: int | None, no_cache: bool, as_json: bool) -> None:
    """Per-update contributions, client clusters, or reliability of a session,
    computed by the fl_insights function."""
    # Imported here: cli imports this module to register the command.
    from .cli import DEFAULT_CONFIG, UsageFailure, _fail, _load, _open_runtime, console
    cfg = _load(config_path or DEFAULT_CONFIG)
    if k is not None and what != "clusters":
        raise UsageFailure("--k applies to clusters only")
    # Local services stay up, so a warm fl_insights keeps its cache for the next query.
    rt = _open_runtime(cfg, scenario, need_store=True, keep_local_services=True)
    try:
        if rt.store.session(session) is None:
            _fail(f"no session {session!r} in the store")
        try:
            span = parse_rounds(round_, rounds, last_round(rt.store, session) if rounds else None)
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
        try:
            result = InsightsClient(rt).query(session, what, span, k, cache=False if no_cache else True)
        except (InsightsError, ValueError) as exc:
            _fail(str(exc))
    finally:
        rt.close()
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    # Piped or logged output is not cut to 80 columns: the rows stay whole.
    out = console if console.is_terminal else Console(width=200, highlight=False)
    for t in tables(result):
        out.print(t)
    out.print(provenance(result), markup=False, highlight=False, soft_wrap=True)
