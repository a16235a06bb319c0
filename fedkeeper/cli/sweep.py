"""`fedkeeper sweep`: train every combination of a grid (fedkeeper.sweep).

Each run prints a line when it starts and when it ends (with its rounds,
accuracy, invocations, retries and cost). Ctrl-C stops the sweep, says
which sessions were in flight and what the store keeps of them, and exits
130; the same command resumes it.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import sys

import click
from rich.console import Console
from rich.markup import escape

from ..logs import setup_run_log
from ..local.store import EmbeddedMongoError
from ..sweep import (DISPLAY_COLUMNS, RESULT_COLUMNS, Sweep, SweepError, SweepPlan, display_cells, parse_grid,
                     plan_sweep, render_csv, render_markdown, result_rows)
from .common import (INTERRUPTED_EXIT, UsageFailure, check_output_path, config_option, console, errconsole, fail,
                     load, phase, remember_config, scenario_option, table, write_output)


def rerun_command(cfg_source: str, plan: SweepPlan, parallel: int) -> str:
    """The command that resumes this sweep (its id pins it)."""
    parts = ["fedkeeper", "sweep", "-c", str(cfg_source), "-s", plan.scenario]
    for axis in plan.axes:
        parts += ["--grid", f"{axis.key}={','.join(axis.labels)}"]
    parts += ["--repeats", str(plan.repeats), "--parallel", str(parallel), "--sweep-id", plan.sweep_id]
    return shlex.join(parts)


@click.command("sweep")
@config_option
@scenario_option
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="A setting and its values (repeatable): optim, lr, momentum, local_epochs, batch_size, "
                   "strategy, mode, clients_per_round, rounds, or a dotted path in the scenario.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs per combination (seed = base + repeat).")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Sessions running at once.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table",
              show_default=True, help="How to print the results.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (the same as --format json).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Also write the results to this file, in --format.")
@click.option("--sweep-id", "sweep_id", default=None, help="Name the sweep instead of hashing its content.")
@click.option("--target", "target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy for 'rounds/time to target' (default: training.target_accuracy).")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB, the local fabric and Cloud Functions hosts running afterwards.")
def sweep_cmd(config_path: str | None, scenario: str | None, grid: tuple[str, ...], repeats: int, parallel: int,
              fmt: str, as_json: bool, output: str | None, sweep_id: str | None, target: float | None,
              keep_services: bool) -> None:
    """Train every combination of a grid of settings, each repeat with its
    own seed; re-running the same command resumes an interrupted sweep and
    tries failed runs again."""
    if as_json:
        fmt = "json"
    if output:
        check_output_path(output, "-o/--output")
    cfg = load(config_path)
    try:
        plan = plan_sweep(cfg, scenario, parse_grid(grid), repeats, sweep_id)
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    # Progress goes to stderr when stdout carries machine-readable results.
    out = console if fmt == "table" else Console(stderr=True, highlight=False)
    log_path = setup_run_log(plan.sweep_id, cfg.secret_values())
    remember_config(cfg, f"sweep {plan.sweep_id}")
    out.print(f"sweep {plan.sweep_id}: {len(plan.runs)} runs "
              f"({len(plan.runs) // plan.repeats} combinations x {plan.repeats} repeats), "
              f"{parallel} at a time; log {log_path}", markup=False, soft_wrap=True)
    sweep = Sweep(plan, parallel=parallel, keep_services=keep_services, target=target,
                  report=lambda text: out.print(text, markup=False, highlight=False, soft_wrap=True), phase=phase)
    try:
        doc = sweep.run()
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        errconsole.print(f"resume the sweep with: {rerun_command(cfg.source, plan, parallel)}",
                         markup=False, soft_wrap=True)
        # At once: runs still in flight belong to daemon threads, and an
        # orderly exit would wait for their HTTP pools.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT)
    except EmbeddedMongoError as exc:
        fail(f"embedded MongoDB: {exc}")
    except Exception as exc:  # deployment or store failures: say what, not where
        fail(str(exc))
    rows = result_rows(doc)
    keys = [a.key for a in plan.axes]
    title = f"sweep {plan.sweep_id} ({plan.scenario}): {doc.get('state')}"
    if fmt == "csv":
        text = render_csv(rows, keys)
        click.echo(text, nl=False)
    elif fmt == "markdown":
        text = render_markdown(rows)
        click.echo(text, nl=False)
    elif fmt == "json":
        text = json.dumps({"sweep": plan.sweep_id, "state": doc.get("state"),
                           "runs": [{"params": r["params"], **{c: r.get(c) for c in RESULT_COLUMNS},
                                     "error": r.get("error")} for r in rows]}, indent=2, default=str) + "\n"
        click.echo(text, nl=False)
    else:
        # Table cells are markup; grid values, sweep ids and states are text.
        cells = [[escape(c) for c in display_cells(r)] for r in rows]
        console.print(table(title, DISPLAY_COLUMNS, cells, width=console.width,
                            right=DISPLAY_COLUMNS[4:] + ("repeat",)))
        buf = Console(file=io.StringIO(), width=200, color_system=None)
        buf.print(table(title, DISPLAY_COLUMNS, cells, width=200, right=DISPLAY_COLUMNS[4:] + ("repeat",)))
        text = buf.file.getvalue()
    if output:
        write_output(output, text)
    unfinished = [r for r in rows if r["state"] != "finished"]
    if unfinished:
        errconsole.print(f"{len(unfinished)} of {len(rows)} runs did not finish; run the same command again to "
                         "resume them (failed runs are tried again)", markup=False)
        sys.exit(1)
