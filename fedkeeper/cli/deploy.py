"""`fedkeeper deploy` and `fedkeeper remove`."""
from __future__ import annotations

import sys
from typing import Iterable

import click
from rich.markup import escape

from ..config import Config
from .common import (UsageFailure, config_option, errconsole, load, open_runtime, print_json, scenario_option,
                     select_clusters, show_table, split_list)


def _needs_store(functions: Iterable[str]) -> bool:
    return any(f != "nodeinfo" for f in functions)


def _text(err: object) -> str | None:
    return None if err is None else str(err)


def run_deploy(cfg: Config, scenario: str | None, functions: list[str] | None,
               clusters: list[str] | None, remove: bool = False, as_json: bool = False) -> int:
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
        rows: list[dict] = []
        if remove:
            for pl, existed, err in rt.remove(placements):
                rows.append({"cluster": pl.cluster, "function": pl.spec.name,
                             "result": "removed" if existed else "not deployed", "error": _text(err)})
        else:
            try:
                results = rt.deploy(placements)
            except ArtifactError as exc:
                raise UsageFailure(str(exc)) from None
            for pl, res, err in results:
                rows.append({"cluster": pl.cluster, "function": pl.spec.name,
                             "result": None if err else ("unchanged" if res.skipped else "deployed"),
                             "seconds": None if err else res.seconds, "error": _text(err)})
        failures = sum(1 for r in rows if r["error"])
        if as_json:
            print_json(rows)
        else:
            show_table(f"{verb} ({rt.scenario_name})", ("cluster", "function", "result", "seconds"),
                       [[r["cluster"], r["function"], f"[red]{escape(r['error'])}[/red]" if r["error"] else r["result"],
                         f"{r['seconds']:.2f}" if r.get("seconds") is not None else ""] for r in rows],
                       right=("seconds",))
        if failures:
            errconsole.print(f"[red]{failures} of {len(placements)} {verb} operation(s) failed[/red]")
        return 1 if failures else 0
    finally:
        rt.close()


function_option = click.option(
    "-f", "--function", "functions", multiple=True, metavar="NAME[,NAME]",
    help="Only these functions (repeat or comma-separate); default: what the scenario's training needs.")
cluster_option = click.option("--cluster", "clusters", multiple=True, metavar="NAME[,NAME]",
                              help="Only these clusters (repeat or comma-separate); default: all.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")


@click.command("deploy")
@config_option
@scenario_option
@function_option
@cluster_option
@json_option
@click.option("--dry-run", is_flag=True,
              help="Print what would be uploaded where, with sizes and limits; upload nothing.")
def deploy_cmd(config_path: str | None, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...], as_json: bool, dry_run: bool) -> None:
    """Deploy functions (content-hashed: unchanged ones are skipped)."""
    cfg = load(config_path)
    fns = split_list(functions) or None
    if dry_run:
        from .runtime import dry_run_deploy
        sys.exit(dry_run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None,
                                as_json=as_json))
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None,
                        as_json=as_json))


@click.command("remove")
@config_option
@scenario_option
@function_option
@cluster_option
@json_option
def remove_cmd(config_path: str | None, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...], as_json: bool) -> None:
    """Remove deployed functions."""
    cfg = load(config_path)
    fns = split_list(functions) or None
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, split_list(clusters)) if clusters else None,
                        remove=True, as_json=as_json))
