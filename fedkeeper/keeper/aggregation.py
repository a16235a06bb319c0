"""Hierarchical aggregation's first level, as the keeper runs it
(training.aggregation: hierarchical): one fl_combiner per client cluster,
invoked in parallel through the dispatcher like any helper function, for
each cluster with a client that delivered. A combiner's payload names only
the session, the round and its cluster, whatever the number of clients: it
finds its clients in the store (the round's `included`, written before
aggregation, and the session's client clusters). The aggregator then adds
the partial aggregates they stored (flcommon.partials) and reads the other
listed updates itself: a combiner that fails for good costs time, not
updates.

A round mode may start the combiners with the round (follow_round), as
FEDn's combiners run beside their clients: each folds its cluster's
updates as they arrive and finishes once the round lists its clients, so
that what the round pays after its last update is the few updates not
folded yet, the partials and the top level, not a read of every update.
A follower that ends without a partial (the round outlasted half its time
limit, or it failed) is replaced by a combiner run once the round closed.
Once the round closes (or fails, or the session ends) a follower makes no
further attempt, and the keeper waits for one at most the attempt it is in.

Combiners run off the round loop's thread, so each draws its backoffs from
its own generator, seeded by session, round and cluster: the dispatcher's
seeded one keeps the round loop's backoffs repeatable."""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from .errors import SessionError
from .events import client_index
from .dispatch import Dispatcher

log = logging.getLogger("fedkeeper.keeper")

COMBINER = "fl_combiner"
# The share of a combiner's time limit it spends following its round; the
# rest is left for the updates not folded yet and its partial.
FOLLOW_SHARE = 0.5


def by_cluster(clients: list[str], client_cluster: dict[str, str]) -> dict[str, list[str]]:
    """The round's delivered clients grouped by their cluster, each list in client order."""
    out: dict[str, list[str]] = {}
    for c in sorted(clients, key=client_index):
        out.setdefault(client_cluster[c], []).append(c)
    return out


def _slot(cluster: str) -> str:
    return f"_{COMBINER}@{cluster}"


def _backoffs(session: str, rnd: int, slot: str) -> random.Random:
    """A combiner's own backoff generator, the same in every run."""
    return random.Random(f"{session}/{rnd}/{slot}")


class Following:
    """The combiners following one round, one per cluster, each in a daemon
    thread (an interrupted keeper does not wait for them; a follower the
    keeper no longer waits for stores nothing once its time is up)."""

    def __init__(self, dispatch: Dispatcher, session: str, rnd: int, clusters: Iterable[str]):
        self.results: dict[str, dict[str, Any]] = {}
        self.stopped = threading.Event()   # set: no follower makes another attempt
        clusters = sorted(set(clusters))
        # The longest one attempt of a follower can take (as the dispatcher waits for it).
        self.attempt_s = max((dispatch.platforms.spec(c, COMBINER).timeout_s for c in clusters), default=0.0) \
            + dispatch.policy.grace_s
        self._threads = [threading.Thread(target=self._follow, args=(dispatch, session, rnd, cluster), daemon=True,
                                          name=f"{COMBINER}-follow-{cluster}") for cluster in clusters]
        for t in self._threads:
            t.start()

    def _follow(self, dispatch: Dispatcher, session: str, rnd: int, cluster: str) -> None:
        try:
            follow_s = dispatch.platforms.spec(cluster, COMBINER).timeout_s * FOLLOW_SHARE
            self.results[cluster] = dispatch.call(cluster, session, rnd, COMBINER, slot_name=_slot(cluster),
                                                  rng=_backoffs(session, rnd, _slot(cluster)), stop=self.stopped,
                                                  cluster_name=cluster, follow_s=round(follow_s, 3))
        except Exception as exc:  # noqa: BLE001 - a follower only saves time: whatever ends it, the
            # combiner runs once the round closes (a lost cluster is the round's own loop to report)
            log.warning("combiner following cluster %s failed; it runs again once the round closes: %s",
                        cluster, exc)
            self.results[cluster] = {"error": str(exc)}

    def join(self) -> dict[str, dict[str, Any]]:
        """Each cluster's result, once every follower has ended (the round
        lists its clients before this is called, so they end soon). None
        starts another attempt: a combiner run on the closed round replaces
        it. One still running after an attempt's time (the combiner's
        timeout + grace) is left behind, as a failed one."""
        self.stopped.set()
        until = time.monotonic() + self.attempt_s
        for t in self._threads:
            t.join(max(0.0, until - time.monotonic()))
        return dict(self.results)

    def abandon(self) -> None:
        """The round failed or the session ends: no follower makes another attempt."""
        self.stopped.set()


def follow_round(dispatch: Dispatcher, session: str, rnd: int, selected: list[str],
                 client_cluster: dict[str, str]) -> Following:
    """Start a combiner on every cluster of the round's selected clients."""
    return Following(dispatch, session, rnd, (client_cluster[c] for c in selected))


def combine_clusters(dispatch: Dispatcher, session: str, rnd: int, clients: list[str],
                     client_cluster: dict[str, str], following: Following | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Every cluster's combiner for round `rnd`, once the round lists its
    clients: the followers' partials are waited for, the other clusters'
    combiners run at once. Cluster -> its result, or {"error": why} for a
    combiner that failed after its retries."""
    groups = by_cluster(clients, client_cluster)
    followed = following.join() if following is not None else {}
    if not groups:
        return {}

    def combine(item: tuple[str, list[str]]) -> tuple[str, dict[str, Any]]:
        cluster, members = item
        done = followed.get(cluster)
        if done is not None and "combined" in done:
            return cluster, done
        # After a follower, a slot of its own: this call is no retry of it.
        slot = _slot(cluster) if done is None else f"{_slot(cluster)}/closed"
        try:
            return cluster, dispatch.call(cluster, session, rnd, COMBINER, slot_name=slot,
                                          rng=_backoffs(session, rnd, slot), cluster_name=cluster)
        except SessionError as exc:
            log.warning("combiner of cluster %s failed; the aggregator reads its %d update(s) itself: %s",
                        cluster, len(members), exc)
            return cluster, {"error": str(exc)}

    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        return dict(pool.map(combine, groups.items()))
