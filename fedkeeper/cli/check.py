"""`fedkeeper check`: deploy nodeinfo everywhere, invoke it cold and warm."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from .common import config_option, console, errconsole, load, open_runtime, scenario_option, select_clusters, split_list


@click.command("check")
@config_option
@scenario_option
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable or comma-separated).")
@click.option("-o", "ow_clusters", multiple=True, help="Only these OpenWhisk clusters (FedKeeper's -o).")
@click.option("-g", "gcf_clusters", multiple=True, help="Only these Google clusters (FedKeeper's -g).")
@click.option("--keep", is_flag=True, help="Leave nodeinfo deployed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--junit-xml", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report for CI systems.")
def check_cmd(config_path: str, scenario: str | None, clusters: tuple[str, ...], ow_clusters: tuple[str, ...],
              gcf_clusters: tuple[str, ...], keep: bool, as_json: bool, junit_path: str | None) -> None:
    """Deploy nodeinfo to every cluster, invoke it cold and warm, remove it."""
    from ..check import as_dicts, junit_xml, run_checks
    cfg = load(config_path)
    chosen = select_clusters(cfg, split_list(clusters),
                             sections={"openwhisk": split_list(ow_clusters), "google": split_list(gcf_clusters)})
    rt = open_runtime(cfg, scenario, need_store=False)
    try:
        results = run_checks(rt, chosen, keep)
    finally:
        rt.close()
    if junit_path:
        Path(junit_path).write_bytes(junit_xml(results))
    if as_json:
        click.echo(json.dumps(as_dicts(results), indent=2, default=str))
    else:
        t = Table(title="cluster check (nodeinfo)")
        for col in ("cluster", "platform", "deploy s", "cold ms", "warm ms", "host", "result"):
            t.add_column(col)
        for r in results:
            host = r.host
            hinfo = (f"{host.get('hostname', '?')} {host.get('cpu_count', '?')} cpu "
                     f"{(host.get('memory_total_mb') or 0) / 1024:.1f} GiB py{host.get('python', '?')}") if host else ""
            t.add_row(r.cluster, r.platform, f"{r.deploy_s:.2f}" if r.deploy_s is not None else "-",
                      f"{r.cold_ms:.0f}" if r.cold_ms is not None else "-",
                      f"{r.warm_ms:.0f}" if r.warm_ms is not None else "-", hinfo,
                      "[green]ok[/green]" if r.ok else f"[red]{r.stage} failed: {r.error}[/red]")
        console.print(t)
    for r in results:
        for w in r.kube.get("warnings") or []:
            errconsole.print(f"cluster {r.cluster}: warning: {w}", markup=False)
        if r.kube.get("error"):
            errconsole.print(f"cluster {r.cluster}: could not read its nodes: {r.kube['error']}", markup=False)
    failed = [r for r in results if not r.ok]
    for r in failed:
        errconsole.print(f"cluster {r.cluster} failed at {r.stage}: {r.error}", markup=False)
    sys.exit(1 if failed else 0)
