"""Hierarchical aggregation's first level, as the keeper runs it
(training.aggregation: hierarchical): one fl_combiner per client cluster,
invoked in parallel through the dispatcher like any helper function, for
each cluster with a client that delivered. A combiner's payload names only
the session, the round and its cluster, whatever the number of clients: it
finds its clients in the store (the round's `included`, written before
aggregation, and the session's client clusters). The aggregator then adds
the partial aggregates they stored (flcommon.partials) and reads the other
listed updates itself: a combiner that fails for good costs time, not
updates."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import SessionError
from .events import client_index
from .dispatch import Dispatcher

log = logging.getLogger("fedkeeper.keeper")

COMBINER = "fl_combiner"


def by_cluster(clients: list[str], client_cluster: dict[str, str]) -> dict[str, list[str]]:
    """The round's delivered clients grouped by their cluster, each list in client order."""
    out: dict[str, list[str]] = {}
    for c in sorted(clients, key=client_index):
        out.setdefault(client_cluster[c], []).append(c)
    return out


def combine_clusters(dispatch: Dispatcher, session: str, rnd: int, clients: list[str],
                     client_cluster: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run every cluster's combiner for round `rnd` at once; cluster -> its
    result, or {"error": why} for a combiner that failed after its retries."""
    groups = by_cluster(clients, client_cluster)
    if not groups:
        return {}

    def combine(item: tuple[str, list[str]]) -> tuple[str, dict[str, Any]]:
        cluster, members = item
        try:
            return cluster, dispatch.call(cluster, session, rnd, COMBINER, slot_name=f"_{COMBINER}@{cluster}",
                                          cluster_name=cluster)
        except SessionError as exc:
            log.warning("combiner of cluster %s failed; the aggregator reads its %d update(s) itself: %s",
                        cluster, len(members), exc)
            return cluster, {"error": str(exc)}

    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        return dict(pool.map(combine, groups.items()))
