"""`fedkeeper insights`: questions about a session answered by fl_insights
(fedkeeper.insights). Rounds, in options and output, count from 1."""
from __future__ import annotations

import click
from pymongo.errors import PyMongoError

from ..insights import (WHATS, InsightsClient, InsightsError, last_round, parse_rounds, provenance, shown_rounds,
                        tables)
from ..providers import ProviderError
from ..store import StoreUnavailable
from .common import UsageFailure, config_option, console, fail, load, open_runtime, print_json, scenario_option, table


def store_span(store, session: str, round_: int | None, rounds: str | None) -> tuple[int, int] | None:
    """The rounds asked for (from 1) as the store numbers them (from 0);
    a round the session does not have is bad input."""
    top = last_round(store, session)
    shown_last = None if top is None else top + 1
    try:
        span = parse_rounds(round_, rounds, shown_last)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    if span is None:
        return None
    if shown_last is None:
        raise UsageFailure(f"session {session} has no rounds yet")
    if span[1] > shown_last:
        asked = f"round {span[1]}" if span[0] == span[1] else f"rounds {span[0]}-{span[1]}"
        raise UsageFailure(f"session {session} has no {asked}: its rounds are 1 to {shown_last}")
    return span[0] - 1, span[1] - 1


@click.command("insights")
@click.argument("session")
@click.argument("what", type=click.Choice(WHATS))
@config_option
@scenario_option
@click.option("--round", "round_", type=int, default=None, metavar="N",
              help="Only round N (counted from 1, as `status` shows rounds).")
@click.option("--rounds", "rounds", default=None, metavar="A:B",
              help="Rounds A to B, both included (from 1; A or B may be left out).")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="clusters: this many groups (default: the best silhouette score for 2..8).")
@click.option("--no-cache", is_flag=True, help="Read every update from the store; keep nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running, so a warm fl_insights keeps its cache "
                   "for the next query.")
def insights_cmd(session: str, what: str, config_path: str | None, scenario: str | None, round_: int | None,
                 rounds: str | None, k: int | None, no_cache: bool, as_json: bool, keep_services: bool) -> None:
    """Per-update contributions, client clusters, or reliability of a session,
    computed by the fl_insights function."""
    cfg = load(config_path)
    if k is not None and what != "clusters":
        raise UsageFailure("--k applies to clusters only")
    # Local services stop with the command, as for start and sweep, unless kept.
    rt = open_runtime(cfg, scenario, need_store=True, keep_local_services=keep_services)
    try:
        try:
            if rt.store.session(session) is None:   # bad input, as for `status` and `model`
                raise UsageFailure(f"no session {session!r} in the store")
            span = store_span(rt.store, session, round_, rounds)
            result = InsightsClient(rt).query(session, what, span, k, cache=False if no_cache else True)
        # A provider that cannot be made or deploy (credentials, a fabric
        # that will not start) and a store that stops answering: say what, not where.
        except (InsightsError, ValueError, ProviderError, StoreUnavailable, PyMongoError) as exc:
            fail(str(exc))
    finally:
        rt.close(stop_store=not keep_services)
    result = shown_rounds(result)
    if as_json:
        print_json(result)
        return
    for spec in tables(result):
        console.print(table(spec.title, spec.columns, spec.rows, width=console.width, right=spec.right,
                            caption=spec.caption))
    console.print(provenance(result), markup=False, highlight=False, soft_wrap=True)
