"""`fedkeeper start`: deploy if needed and train, with progress on the
terminal and a summary at the end."""
from __future__ import annotations

import time
import sys
from typing import Any

import click
from rich.table import Table

from ..config import Config
from .common import (UsageFailure, config_option, console, errconsole, fail, load, open_runtime,
                     scenario_option)


class ConsoleProgress:
    """Round progress on the terminal: a live line on a TTY, one line per
    event otherwise (CI logs)."""

    def __init__(self, rounds: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.rounds = rounds
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console, transient=False) if self.live else None
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
        elif kind == "init":
            self._line("initialising: partitioning data, storing the round-0 model")
        elif kind == "tick" and self.bar:
            acc = f"{self.acc:.3f}" if self.acc is not None else "-"
            self.bar.update(self.task, description=f"round {data['round'] + 1}/{self.rounds}",
                            info=f"done {data['delivered']} failed {data['failed']} "
                                 f"in flight {data['running']} retrying {data['retrying']}  acc {acc}")
        elif kind == "round":
            rep = data["report"]
            self.acc = rep.accuracy
            if self.bar:
                self.bar.update(self.task, completed=rep.round + 1)
            acc = f"{rep.accuracy:.4f}" if rep.accuracy is not None else "-"
            stale = f" + {rep.stale} late" if rep.stale else ""
            self._line(f"round {rep.round + 1}/{self.rounds}: {rep.delivered}/{rep.selected} clients{stale}, "
                       f"{rep.failed} failed, {rep.retries} retries, {rep.seconds:.1f}s, accuracy {acc}")

    def _line(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)
        else:
            click.echo(text)


def run_start(cfg: Config, scenario: str | None, resume: str | None = None, deploy: bool = True,
              keep_services: bool = False, metrics_port: int | None = None) -> int:
    from ..keeper import Keeper, SessionError, new_session_id
    from ..logs import setup_run_log
    session_id = resume or new_session_id(cfg.name)
    log_path = setup_run_log(session_id, cfg.secret_values())
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
    t0 = time.time()
    metrics = None
    try:
        with ConsoleProgress(rt.scenario.training.rounds) as progress:
            keeper.progress = progress
            if metrics_port is not None:
                from ..metrics import KeeperMetrics, fan_out
                metrics = KeeperMetrics()
                port = metrics.start(metrics_port)
                progress._line(f"keeper metrics at http://127.0.0.1:{port}/metrics")
                keeper.progress = fan_out(progress, metrics)
                keeper.attempt_ended = metrics.record_attempt
            summary = keeper.start(resume=resume, deploy=deploy, session_id=session_id)
            from ..cost import format_money, session_cost
            cost = session_cost(rt.store, summary.session, cfg)
    except SessionError as exc:
        fail(str(exc))
    finally:
        if metrics is not None:
            metrics.stop()
        rt.close(stop_store=not keep_services)
    acc = summary.final_accuracy
    table = Table(title=f"session {summary.session}: {summary.state}")
    for col in ("rounds", "final accuracy", "wall time", "est. cost", "run log"):
        table.add_column(col)
    table.add_row(str(len(summary.rounds)), f"{acc:.4f}" if acc is not None else "-",
                  f"{time.time() - t0:.1f}s", format_money(cost["total"], cost["currency"]), str(log_path))
    console.print(table)
    session_metrics(cfg, rt.scenario, time.time() - t0)
    if summary.state != "finished":
        errconsole.print(f"[red]session {summary.session} {summary.state}:[/red] {summary.message}")
        return 1
    return 0


def session_metrics(cfg: Config, scenario, elapsed_s: float) -> None:
    """After a session: what each cluster's own Prometheus saw during it
    (cold starts, duration percentiles, error rate), where one is configured."""
    from ..metrics import metrics_for_config, prometheus_url
    with_prom = [n for n, (_, c) in cfg.providers.clusters().items()
                 if prometheus_url(getattr(c, "prometheus_config", None))]
    if not with_prom:
        return
    rows = metrics_for_config(cfg, f"{int(elapsed_s) + 30}s", actions=list(scenario.functions) or None,
                              clusters=with_prom)
    t = Table(title="clusters' Prometheus during the session")
    for col in ("cluster", "activations", "cold starts", "error rate", "p50 s", "p95 s", "note"):
        t.add_column(col)
    for r in rows:
        d = r.row()
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        t.add_row(str(d.get("cluster")), fmt(d.get("activations")), fmt(d.get("cold_starts")),
                  fmt(d.get("error_rate")), fmt(d.get("duration_p50_s")), fmt(d.get("duration_p95_s")), str(d.get("error") or ""))
    console.print(t)


@click.command("start")
@config_option
@scenario_option
@click.option("--resume", metavar="SESSION", default=None, help="Continue a session after the keeper stopped.")
@click.option("--no-deploy", is_flag=True, help="Assume the functions are deployed already.")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running after the session ends.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the keeper's Prometheus metrics on this loopback port (0: any free port).")
def start_cmd(config_path: str, scenario: str | None, resume: str | None, no_deploy: bool,
              keep_services: bool, metrics_port: int | None) -> None:
    """Deploy (if needed) and run federated training."""
    cfg = load(config_path)
    sys.exit(run_start(cfg, scenario, resume, deploy=not no_deploy, keep_services=keep_services,
                       metrics_port=metrics_port))
