"""`fedkeeper start`: deploy if needed and train, with progress on the
terminal and a summary at the end.

Ctrl-C stops the session resumably: the command prints the session id,
the rounds the store keeps and the exact `--resume` command, and exits 130.
"""
from __future__ import annotations

import contextlib
import gc
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import click
from rich.console import Console
from rich.markup import escape

from ..config import Config
from ..config.values import session_id as check_session_id
from .common import (INTERRUPTED_EXIT, UsageFailure, config_option, console, errconsole, fail, load,
                     open_runtime, print_json, remember_config, scenario_option, show_table)


class ConsoleProgress:
    """Round progress on the terminal: a live line on a TTY, one line per
    event otherwise (CI logs). Round numbers are shown from 1."""

    def __init__(self, rounds: int, out: Console | None = None):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.out = out or console
        self.rounds = rounds
        self.live = self.out.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=self.out, transient=False) if self.live else None
        self.task = None
        self.acc: float | None = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=self.rounds, info="")
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "deployed":
            state = "error: " + str(data["error"]) if data["error"] else (
                "unchanged" if data["skipped"] else "deployed")
            self._line(f"deploy {data['function']} on {data['cluster']}: {state}")
        elif kind == "session":
            self._line(f"session {data['session']}" + (" (resumed)" if data["resumed"] else ""))
        elif kind == "warning":
            self._line(f"warning: {data['message']}")
        elif kind == "service":
            self._line(f"{data.get('service')}: {data.get('state')}"
                       + (f" ({data['message']})" if data.get("message") else ""))
        elif kind == "init":
            self._line("initialising: partitioning data, storing the round-0 model")
        elif kind == "tick" and self.bar:
            acc = f"{self.acc:.3f}" if self.acc is not None else "-"
            self.bar.update(self.task, description=f"round {data['round'] + 1}/{self.rounds}",
                            info=f"done {data['delivered']} failed {data['failed']} "
                                 f"in flight {data['running']} retrying {data['retrying']}  acc {acc}")
        elif kind == "aggregating":
            text = f"round {data['round'] + 1}/{self.rounds}: aggregating {data.get('included', '?')} update(s)"
            if self.bar:  # the bar says it; no extra line on a terminal
                self.bar.update(self.task, description=f"round {data['round'] + 1}/{self.rounds}",
                                info=f"aggregating {data.get('included', '?')} update(s)")
            else:
                self._line(text)
        elif kind == "round_failed":
            self._line(f"round {data['round'] + 1}/{self.rounds} failed: {data.get('message')}")
        elif kind == "round":
            rep = data["report"]
            self.acc = rep.accuracy
            if self.bar:
                self.bar.update(self.task, completed=rep.round + 1)
            acc = f"{rep.accuracy:.4f}" if rep.accuracy is not None else "-"
            stale = f" + {rep.stale} late" if rep.stale else ""
            eps = f", epsilon {rep.epsilon:.3g}" if rep.epsilon is not None else ""
            self._line(f"round {rep.round + 1}/{self.rounds}: {rep.delivered}/{rep.selected} clients{stale}, "
                       f"{rep.failed} failed, {rep.retries} retries, {rep.seconds:.1f}s, accuracy {acc}{eps}")

    def line(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text, markup=False, soft_wrap=True)
        else:
            self.out.print(text, markup=False, highlight=False, soft_wrap=True)

    _line = line


def resume_command(cfg: Config, scenario: str | None, session: str) -> str:
    """The exact command that resumes `session`."""
    parts = ["fedkeeper", "start", "-c", str(cfg.source)]
    if scenario:
        parts += ["-s", scenario]
    return shlex.join(parts + ["--resume", session])


def rounds_kept(store, session: str) -> int:
    """Rounds of `session` the store holds as done (what a resume keeps)."""
    try:
        return sum(1 for r in store.rounds(session) if r.get("state") == "done")
    except Exception:  # the store may be what went away
        return 0


def session_wall_time(doc: dict[str, Any] | None) -> float | None:
    """Wall time of a session as `start` and `report` both show it: from its
    creation to its end (to now while it runs), in seconds."""
    if not doc or doc.get("created") is None:
        return None
    end = doc.get("ended") or time.time()
    return float(end) - float(doc["created"])


def _interrupted(cfg: Config, scenario: str | None, store, session: str) -> int:
    """Ctrl-C: mark the session (if the keeper did not), say what was kept
    and how to resume; exit status 130."""
    try:
        doc = store.session(session)
        if doc is not None and doc.get("state") == "running":
            # Only while it is this keeper's: another may have claimed it meanwhile.
            from ..keeper.session_owner import this_keeper
            store.mark_interrupted(session, keeper=this_keeper())
    except Exception:  # best effort: status shows a keeper-less session as interrupted anyway
        doc = None
    if doc is None and store is not None:
        try:
            doc = store.session(session)
        except Exception:
            doc = None
    kept = rounds_kept(store, session) if doc is not None else 0
    errconsole.print(f"\nsession {session} interrupted; the store keeps its {kept} finished round(s)"
                     + ("" if doc is not None else " (the session was not created yet)"),
                     markup=False, soft_wrap=True)
    if doc is not None:
        errconsole.print(f"resume it with: {resume_command(cfg, scenario, session)}", markup=False, soft_wrap=True)
    return INTERRUPTED_EXIT


SUMMARY_COLUMNS = ("rounds", "final accuracy", "wall time", "est. cost", "run log")


def summary_cells(result: dict[str, Any]) -> list[str]:
    """The end-of-session summary (run_start's JSON) as table cells."""
    from ..cost import format_money
    acc, wall = result["final_accuracy"], result["wall_time_s"]
    return [f"{result['rounds']}/{result['rounds_planned']}", f"{acc:.4f}" if acc is not None else "-",
            f"{wall:.1f}s" if wall is not None else "-", format_money(result["cost"], result["currency"]),
            escape(str(result["run_log"]))]   # cells are markup: a path may hold brackets


@contextlib.contextmanager
def frozen_for_the_session() -> Iterator[None]:
    """What is alive when a session starts (modules, config, providers)
    lives as long as it: frozen (`gc.freeze`), the session's garbage
    collections stop walking it again and again. In a 1,000-client bench
    run (3 rounds) the keeper's collections took 0.56 s, then 0.26 s. It is
    unfrozen afterwards, so that what a session left behind can be collected
    in a process that runs several; a process that had frozen objects of its
    own is left as it was."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_start(cfg: Config, scenario: str | None, resume: str | None = None, deploy: bool = True,
              keep_services: bool = False, metrics_port: int | None = None, as_json: bool = False) -> int:
    """Train one session; returns the exit status (0, 1, or 130 on Ctrl-C)."""
    from .. import keeper as keeper_module
    from ..keeper import Keeper, SessionError, SessionInterrupted, new_session_id
    from ..logs import setup_run_log
    # The keeper's "a service is gone for good" error, where the keeper has one.
    service_lost = tuple(c for c in [getattr(keeper_module, "ServiceLost", None)] if c is not None)
    if resume is not None:
        # It names the run log: checked first, so that it cannot be a path.
        try:
            check_session_id(resume)
        except ValueError as exc:
            raise UsageFailure(f"--resume {exc}") from None
    session_id = resume or new_session_id(cfg.name)
    log_path = setup_run_log(session_id, cfg.secret_values())
    if deploy:  # local services load their runtimes' modules while the store starts
        from ..local.prewarm import start_ahead
        start_ahead(cfg, scenario, keep_services)
    rt = open_runtime(cfg, scenario, need_store=True, keep_local_services=keep_services)
    if rt.scenario.clients_info is None:
        rt.close()
        raise UsageFailure(f"{cfg.source}: scenario {rt.scenario_name!r} has no clients_info; "
                           "it cannot be trained")
    try:
        keeper = Keeper(rt)
    except ValueError as exc:
        rt.close()
        raise UsageFailure(str(exc)) from None
    out = Console(stderr=True, highlight=False) if as_json else console
    metrics = None
    try:
        with ConsoleProgress(rt.scenario.training.rounds, out) as progress:
            def on_event(kind: str, data: dict[str, Any]) -> None:
                if kind == "session":  # where `resume` and the config defaults find it again
                    remember_config(cfg, f"session {data['session']}")
                    try:
                        rt.store.update_session(data["session"], config_path=str(Path(cfg.source).resolve()))
                    except Exception as exc:  # a convenience only
                        progress.line(f"warning: cannot record the config on the session: {exc}")
                progress(kind, data)
            keeper.progress = on_event
            if metrics_port is not None:
                from ..metrics import KeeperMetrics, fan_out
                metrics = KeeperMetrics()
                port = metrics.start(metrics_port)
                progress.line(f"keeper metrics at http://127.0.0.1:{port}/metrics")
                keeper.progress = fan_out(on_event, metrics)
                keeper.attempt_ended = metrics.record_attempt
            with frozen_for_the_session():
                summary = keeper.start(resume=resume, deploy=deploy, session_id=session_id)
        from ..cost import session_cost
        cost = session_cost(rt.store, summary.session, cfg)
        doc = rt.store.session(summary.session)
        kept = rounds_kept(rt.store, summary.session)
    except (SessionInterrupted, KeyboardInterrupt) as exc:
        sid = getattr(exc, "session", None) or session_id
        return _interrupted(cfg, scenario, rt.store, sid)  # `finally` closes the runtime
    except service_lost as exc:
        fail(str(exc) if getattr(exc, "resume_hint", None)
             else f"{exc}; resume with: {resume_command(cfg, scenario, session_id)}")
    except SessionError as exc:
        fail(str(exc))
    finally:
        if metrics is not None:
            metrics.stop()
        rt.close(stop_store=not keep_services)
    acc = summary.final_accuracy
    wall = session_wall_time(doc)
    result = {"session": summary.session, "state": summary.state, "rounds": kept,
              "rounds_planned": rt.scenario.training.rounds, "final_accuracy": acc, "wall_time_s": wall,
              "cost": cost["total"], "currency": cost["currency"], "run_log": str(log_path),
              "message": summary.message or None}
    if as_json:
        print_json(result)
    else:
        show_table(f"session {summary.session}: {summary.state}", SUMMARY_COLUMNS, [summary_cells(result)])
        if summary.state == "finished" and summary.message:
            console.print(f"stopped: {escape(summary.message)}")   # why no further round was trained
        session_metrics(cfg, rt.scenario, wall or 0.0)
    if summary.state != "finished":
        errconsole.print(f"[red]session {summary.session} {summary.state}:[/red] {escape(summary.message or '')}")
        return 1
    return 0


def session_metrics(cfg: Config, scenario, elapsed_s: float) -> None:
    """After a session: what each cluster's own Prometheus saw during it
    (cold starts, duration percentiles, error rate), where one is configured."""
    from ..metrics import fedkeeper_functions, metrics_for_config, prometheus_url
    with_prom = [n for n, (_, c) in cfg.providers.clusters().items()
                 if prometheus_url(getattr(c, "prometheus_config", None))]
    if not with_prom:
        return
    rows = metrics_for_config(cfg, f"{int(elapsed_s) + 30}s", actions=fedkeeper_functions(),
                              clusters=with_prom)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = []
    for r in rows:
        d = r.row()
        cells.append([escape(str(d.get("cluster"))), fmt(d.get("activations")), fmt(d.get("cold_starts")),
                      fmt(d.get("error_rate")), fmt(d.get("duration_p50_s")), fmt(d.get("duration_p95_s")),
                      escape(str(d.get("error") or ""))])
    show_table("clusters' Prometheus during the session",
               ("cluster", "activations", "cold starts", "error rate", "p50 s", "p95 s", "note"), cells)


@click.command("start")
@config_option
@scenario_option
@click.option("--resume", metavar="SESSION", default=None, help="Continue a session after the keeper stopped.")
@click.option("--no-deploy", is_flag=True, help="Assume the functions are deployed already.")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running after the session ends.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the keeper's Prometheus metrics on this loopback port (0: any free port).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the final summary as JSON on stdout (progress goes to stderr).")
def start_cmd(config_path: str | None, scenario: str | None, resume: str | None, no_deploy: bool,
              keep_services: bool, metrics_port: int | None, as_json: bool) -> None:
    """Deploy (if needed) and run federated training."""
    cfg = load(config_path)
    try:
        code = run_start(cfg, scenario, resume, deploy=not no_deploy, keep_services=keep_services,
                         metrics_port=metrics_port, as_json=as_json)
    except KeyboardInterrupt:  # before the session existed: nothing to resume
        errconsole.print("\ninterrupted before the session started; nothing was kept", markup=False)
        code = INTERRUPTED_EXIT
    sys.exit(code)
