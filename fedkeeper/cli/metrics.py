"""`fedkeeper metrics`: what each cluster's Prometheus saw."""
from __future__ import annotations

import json

import click
from rich.table import Table

from ..config import ConfigError
from .common import UsageFailure, config_option, console, load, scenario_option, select_clusters, split_list


@click.command("metrics")
@config_option
@scenario_option
@click.option("--window", default="1h", show_default=True, help="Prometheus range such as 15m or 1h; 'all' for totals.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def metrics_cmd(config_path: str, scenario: str | None, window: str, clusters: tuple[str, ...], as_json: bool) -> None:
    """Per-cluster cold starts, duration percentiles and error rates from each
    cluster's Prometheus (prometheus_config)."""
    from ..metrics import metrics_for_config
    cfg = load(config_path)
    try:
        name, scen = cfg.scenario(scenario)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    chosen = select_clusters(cfg, split_list(clusters)) if clusters else None
    try:
        rows = metrics_for_config(cfg, None if window == "all" else window,
                                  actions=list(scen.functions) or None, clusters=chosen)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    data = [r.row() for r in rows]
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    t = Table(title=f"cluster metrics ({'all time' if window == 'all' else 'last ' + window})")
    cols = list(data[0].keys()) if data else ["cluster"]
    for c in cols:
        t.add_column(c)
    for row in data:
        t.add_row(*[("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row.values()])
    console.print(t)
