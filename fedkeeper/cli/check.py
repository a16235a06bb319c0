"""`fedkeeper check`: deploy nodeinfo everywhere, invoke it cold and warm."""
from __future__ import annotations

import sys
from typing import Any, Sequence

import click
from rich.markup import escape

from .common import (check_output_path, config_option, errconsole, load, note, open_runtime, print_json,
                     scenario_option, select_clusters, show_table, split_list, write_output)

COLUMNS = ("cluster", "platform", "deploy s", "cold ms", "warm ms", "host", "result")


def check_rows(results: Sequence[Any]) -> list[list[str]]:
    """Table cells of ClusterCheck results, in COLUMNS order."""
    rows = []
    for r in results:
        host = r.host
        hinfo = (f"{host.get('hostname', '?')} {host.get('cpu_count', '?')} cpu "
                 f"{(host.get('memory_total_mb') or 0) / 1024:.1f} GiB py{host.get('python', '?')}") if host else ""
        rows.append([escape(r.cluster), escape(r.platform), f"{r.deploy_s:.2f}" if r.deploy_s is not None else "-",
                     f"{r.cold_ms:.0f}" if r.cold_ms is not None else "-",
                     f"{r.warm_ms:.0f}" if r.warm_ms is not None else "-", escape(hinfo),
                     "[green]ok[/green]" if r.ok else f"[red]{escape(f'{r.stage} failed: {r.error}')}[/red]"])
    return rows


@click.command("check")
@config_option
@scenario_option
@click.option("--cluster", "clusters", multiple=True, metavar="NAME[,NAME]",
              help="Only these clusters (repeat or comma-separate); default: all.")
@click.option("--openwhisk", "ow_clusters", multiple=True, metavar="NAME[,NAME]",
              help="Only these OpenWhisk clusters (repeat or comma-separate).")
@click.option("--google", "gcf_clusters", multiple=True, metavar="NAME[,NAME]",
              help="Only these Google clusters (repeat or comma-separate).")
# The original FedKeeper spelled these -o and -g; -o now means an output
# path everywhere, so they are kept only as hidden aliases (docs/cli.md).
@click.option("-o", "legacy_ow", multiple=True, hidden=True, help="Old spelling of --openwhisk.")
@click.option("-g", "legacy_gcf", multiple=True, hidden=True, help="Old spelling of --google.")
@click.option("--keep", is_flag=True, help="Leave nodeinfo deployed.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--junit-xml", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report for CI systems.")
def check_cmd(config_path: str | None, scenario: str | None, clusters: tuple[str, ...],
              ow_clusters: tuple[str, ...], gcf_clusters: tuple[str, ...], legacy_ow: tuple[str, ...],
              legacy_gcf: tuple[str, ...], keep: bool, as_json: bool, junit_path: str | None) -> None:
    """Deploy nodeinfo to every cluster, invoke it cold and warm, remove it."""
    from ..check import as_dicts, junit_xml, run_checks
    if legacy_ow or legacy_gcf:
        note("check: -o and -g are old spellings; use --openwhisk and --google")
    if junit_path:
        check_output_path(junit_path, "--junit-xml")
    cfg = load(config_path)
    chosen = select_clusters(cfg, split_list(clusters),
                             sections={"openwhisk": split_list(ow_clusters + legacy_ow),
                                       "google": split_list(gcf_clusters + legacy_gcf)})
    rt = open_runtime(cfg, scenario, need_store=False)
    try:
        results = run_checks(rt, chosen, keep)
    finally:
        rt.close()
    if junit_path:
        write_output(junit_path, junit_xml(results))
    if as_json:
        print_json(as_dicts(results))
    else:
        show_table("cluster check (nodeinfo)", COLUMNS, check_rows(results),
                   right=("deploy s", "cold ms", "warm ms"))
    for r in results:
        for w in r.kube.get("warnings") or []:
            errconsole.print(f"cluster {r.cluster}: warning: {w}", markup=False)
        if r.kube.get("error"):
            errconsole.print(f"cluster {r.cluster}: could not read its nodes: {r.kube['error']}", markup=False)
    failed = [r for r in results if not r.ok]
    for r in failed:
        errconsole.print(f"cluster {r.cluster} failed at {r.stage}: {r.error}", markup=False)
    sys.exit(1 if failed else 0)
