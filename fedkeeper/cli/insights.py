"""`fedkeeper insights`: questions about a session answered by fl_insights
(fedkeeper.insights)."""
from __future__ import annotations

import json

import click
from rich.console import Console

from ..insights import WHATS, InsightsClient, InsightsError, last_round, parse_rounds, provenance, tables
from .common import DEFAULT_CONFIG, UsageFailure, console, fail, load, open_runtime


@click.command("insights")
@click.argument("session")
@click.argument("what", type=click.Choice(WHATS))
@click.option("-c", "--config", "--configfile", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML config whose scenario names the store and clusters "
                   "(default: $FEDKEEPER_CONFIG, else config.yaml).")
@click.option("-s", "--scenario", "scenario", default=None,
              help="Scenario under `scenarios:` (default: federated_learning).")
@click.option("--round", "round_", type=int, default=None, help="Only this round (numbered as in the store).")
@click.option("--rounds", "rounds", default=None, metavar="A:B", help="Rounds A to B, both included.")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="clusters: this many groups (default: the best silhouette score for 2..8).")
@click.option("--no-cache", is_flag=True, help="Read every update from the store; keep nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")
def insights_cmd(session: str, what: str, config_path: str | None, scenario: str | None, round_: int | None,
                 rounds: str | None, k: int | None, no_cache: bool, as_json: bool) -> None:
    """Per-update contributions, client clusters, or reliability of a session,
    computed by the fl_insights function."""
    cfg = load(config_path or DEFAULT_CONFIG)
    if k is not None and what != "clusters":
        raise UsageFailure("--k applies to clusters only")
    # Local services stay up, so a warm fl_insights keeps its cache for the next query.
    rt = open_runtime(cfg, scenario, need_store=True, keep_local_services=True)
    try:
        if rt.store.session(session) is None:
            fail(f"no session {session!r} in the store")
        try:
            span = parse_rounds(round_, rounds, last_round(rt.store, session) if rounds else None)
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
        try:
            result = InsightsClient(rt).query(session, what, span, k, cache=False if no_cache else True)
        except (InsightsError, ValueError) as exc:
            fail(str(exc))
    finally:
        rt.close()
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    # Piped or logged output is not cut to 80 columns: the rows stay whole.
    out = console if console.is_terminal else Console(width=200, highlight=False)
    for t in tables(result):
        out.print(t)
    out.print(provenance(result), markup=False, highlight=False, soft_wrap=True)
