"""`fedkeeper metrics`: what each cluster's Prometheus saw."""
from __future__ import annotations

import sys
from typing import Any

import click
from rich.markup import escape

from ..config import ConfigError
from .common import (UsageFailure, config_option, load, print_json, scenario_option, select_clusters,
                     show_table, split_list)


def metrics_cells(data: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) of metrics rows (MetricsRow.row() dicts)."""
    cols = list(data[0].keys()) if data else ["cluster"]
    # cells are markup: a cluster name or an error text may hold brackets
    cells = [[("-" if v is None else f"{v:.3f}" if isinstance(v, float) else escape(str(v))) for v in row.values()]
             for row in data]
    return cols, cells


@click.command("metrics")
@config_option
@scenario_option
@click.option("--window", default="1h", show_default=True, help="Prometheus range such as 15m or 1h; 'all' for totals.")
@click.option("--cluster", "clusters", multiple=True, metavar="NAME[,NAME]",
              help="Only these clusters (repeat or comma-separate); default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def metrics_cmd(config_path: str | None, scenario: str | None, window: str, clusters: tuple[str, ...],
                as_json: bool) -> None:
    """Per-cluster cold starts, duration percentiles and error rates from each
    cluster's Prometheus (prometheus_config)."""
    from ..metrics import fedkeeper_functions, metrics_exit_status, metrics_for_config
    cfg = load(config_path)
    try:
        cfg.scenario(scenario)   # a scenario the config lacks is a usage error
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    chosen = select_clusters(cfg, split_list(clusters)) if clusters else None
    try:
        rows = metrics_for_config(cfg, None if window == "all" else window,
                                  actions=fedkeeper_functions(), clusters=chosen)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    data = [r.row() for r in rows]
    if as_json:
        print_json(data)
    else:
        cols, cells = metrics_cells(data)
        show_table(f"cluster metrics ({'all time' if window == 'all' else 'last ' + window})", cols, cells,
                   right=cols[1:])
    # 1 when a cluster's figures could not be read; a platform without a
    # Prometheus source is a note, not an error (docs/metrics.md)
    sys.exit(metrics_exit_status(rows))
