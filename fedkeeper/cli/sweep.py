"""`fedkeeper sweep`: train every combination of a grid (fedkeeper.sweep)."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from ..logs import setup_run_log
from ..store.embedded import EmbeddedMongoError
from ..sweep import Sweep, SweepError, parse_grid, plan_sweep, render_csv, render_markdown, render_table, result_rows
from .common import UsageFailure, fail, load


@click.command("sweep")
@click.option("-c", "--config", "--configfile", "config_path",
              default=os.environ.get("FEDKEEPER_CONFIG", "config.yaml"), show_default=True,
              type=click.Path(dir_okay=False), help="YAML config (FedKeeper's config-sample.yaml schema).")
@click.option("-s", "--scenario", "scenario", default=None,
              help="Scenario under `scenarios:` (default: federated_learning).")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="A setting and its values (repeatable): optim, lr, momentum, local_epochs, batch_size, "
                   "strategy, mode, clients_per_round, rounds, or a dotted path in the scenario.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs per combination (seed = base + repeat).")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Sessions running at once.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]), default="table",
              show_default=True)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Also write the results to this file, in --format.")
@click.option("--sweep-id", "sweep_id", default=None, help="Name the sweep instead of hashing its content.")
@click.option("--target", "target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy for 'rounds/time to target' (default: training.target_accuracy).")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running afterwards.")
def sweep_cmd(config_path: str, scenario: str | None, grid: tuple[str, ...], repeats: int, parallel: int,
              fmt: str, output: str | None, sweep_id: str | None, target: float | None,
              keep_services: bool) -> None:
    """Train every combination of a grid of settings, each repeat with its
    own seed; re-running the same command resumes an interrupted sweep."""
    cfg = load(config_path)
    try:
        plan = plan_sweep(cfg, scenario, parse_grid(grid), repeats, sweep_id)
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: no 80-column truncation
        console = Console(highlight=False, width=200)
    log_path = setup_run_log(plan.sweep_id, cfg.secret_values())
    console.print(f"sweep {plan.sweep_id}: {len(plan.runs)} runs "
                  f"({len(plan.runs) // plan.repeats} combinations x {plan.repeats} repeats), "
                  f"{parallel} at a time; log {log_path}", markup=False)
    sweep = Sweep(plan, parallel=parallel, keep_services=keep_services, target=target,
                  report=lambda text: console.print(text, markup=False, soft_wrap=True))
    try:
        doc = sweep.run()
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        # At once: runs still in flight belong to daemon threads, and an
        # orderly exit would wait for their HTTP pools.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
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
    else:
        table = render_table(rows, title)
        console.print(table)
        buf = Console(file=io.StringIO(), width=200, color_system=None)
        buf.print(table)
        text = buf.file.getvalue()
    if output:
        Path(output).write_text(text)
    unfinished = [r for r in rows if r["state"] != "finished"]
    if unfinished:
        Console(stderr=True, highlight=False).print(
            f"{len(unfinished)} of {len(rows)} runs did not finish; run the same command again to "
            "resume them", markup=False)
        sys.exit(1)
