"""`fedkeeper deploy` and `fedkeeper remove`."""
from __future__ import annotations

import sys
from typing import Iterable

import click
from rich.table import Table

from ..config import Config
from .common import (UsageFailure, config_option, console, errconsole, load, open_runtime, scenario_option,
                     select_clusters, split_list)


def _needs_store(functions: Iterable[str]) -> bool:
    return any(f != "nodeinfo" for f in functions)


def run_deploy(cfg: Config, scenario: str | None, functions: list[str] | None,
               clusters: list[str] | None, remove: bool = False) -> int:
    """Deploy (or remove) functions. With no function list: everything the
    scenario's training needs, where it needs it."""
    # Deployed functions stay deployed: local services outlive a deploy.
    rt = open_runtime(cfg, scenario, need_store=(functions is None or _needs_store(functions)) and not remove,
                       keep_local_services=not remove)
    try:
        try:
            if functions:
                placements = rt.placements_for(functions, clusters or list(cfg.providers.clusters()))
            else:
                placements = rt.training_placements()
                if clusters:
                    placements = [p for p in placements if p.cluster in clusters]
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
        from ..artifacts import ArtifactError
        verb = "remove" if remove else "deploy"
        table = Table(title=f"{verb} ({rt.scenario_name})")
        for col in ("cluster", "function", "result", "seconds"):
            table.add_column(col)
        failures = 0
        if remove:
            results = rt.remove(placements)
            for pl, existed, err in results:
                failures += err is not None
                table.add_row(pl.cluster, pl.spec.name,
                              f"[red]{err}[/red]" if err else ("removed" if existed else "not deployed"), "")
        else:
            try:
                results = rt.deploy(placements)
            except ArtifactError as exc:
                raise UsageFailure(str(exc)) from None
            for pl, res, err in results:
                failures += err is not None
                if err:
                    table.add_row(pl.cluster, pl.spec.name, f"[red]{err}[/red]", "")
                else:
                    table.add_row(pl.cluster, pl.spec.name, "unchanged" if res.skipped else "deployed",
                                  f"{res.seconds:.2f}")
        console.print(table)
        if failures:
            errconsole.print(f"[red]{failures} of {len(placements)} {verb} operation(s) failed[/red]")
        return 1 if failures else 0
    finally:
        rt.close()


@click.command("deploy")
@config_option
@scenario_option
@click.option("-f", "--function", "functions", multiple=True,
              help="Function to deploy (repeat or comma-separate); default: what training needs.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable).")
@click.option("--dry-run", is_flag=True,
              help="Print what would be uploaded where, with sizes and limits; upload nothing.")
def deploy_cmd(config_path: str, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...], dry_run: bool) -> None:
    """Deploy functions (content-hashed: unchanged ones are skipped)."""
    cfg = load(config_path)
    fns = split_list(functions) or None
    if dry_run:
        from .runtime import dry_run_deploy
        sys.exit(dry_run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None))
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None))


@click.command("remove")
@config_option
@scenario_option
@click.option("-f", "--function", "functions", multiple=True)
@click.option("--cluster", "clusters", multiple=True)
def remove_cmd(config_path: str, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...]) -> None:
    """Remove deployed functions."""
    cfg = load(config_path)
    fns = split_list(functions) or None
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None,
                        remove=True))
