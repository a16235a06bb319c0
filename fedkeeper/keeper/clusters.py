"""Clusters that stop answering, as the I/O side of `ClusterHealth`.

A cluster whose platform refuses connections is not asked again at every
poll (that once wrote a log line every 20 ms): it is asked with a capped
backoff, said once in the run log and then at most every ~10 s, its local
service restarted through its provider when the provider owns one
(`Provider.restart_local_service`, never by platform name), and given up
after a bounded wait with `ClusterLost`, which leaves the session resumable.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

from ..providers import Invocation, ProviderError
from .cluster_health import ClusterHealth
from .errors import ClusterLost
from .events import RoundEvents

log = logging.getLogger("fedkeeper.keeper")


class ClusterWatch:
    def __init__(self, platforms: Any, events: RoundEvents, clock: Callable[[], float], patience_s: float):
        self.platforms = platforms
        self.events = events
        self.clock = clock
        self.health = ClusterHealth(clock, patience_s=patience_s)
        # When this keeper restarted a cluster's local service: what was
        # submitted before is unknown to the new one.
        self.restarted_at: dict[str, float] = {}
        # Combiners report from their own threads while the round loop does:
        # one report at a time, so that one outage restarts a service once.
        self._lock = threading.RLock()

    def may_probe(self, cluster: str) -> bool:
        with self._lock:
            return self.health.may_probe(cluster)

    def next_probe(self, cluster: str) -> float:
        with self._lock:
            return self.health.next_probe(cluster)

    def _emit(self, cluster: str, state: str, message: str) -> None:
        self.events.emit("service", service=f"cluster {cluster}", state=state, message=message)

    def failed(self, cluster: str, error: str) -> None:
        """The cluster did not answer (tracking or invoking). Raises
        ClusterLost once it has been gone for longer than the patience."""
        with self._lock:
            self._failed(cluster, error)

    def _failed(self, cluster: str, error: str) -> None:
        # Every provider answers restart_local_service (False: it owns none).
        verdict = self.health.failed(cluster, error, can_restart=True)
        outage = self.health.down[cluster]
        if verdict.give_up:
            self._emit(cluster, "gone", error)
            raise ClusterLost(cluster, f"no answer for {self.clock() - outage.since:.0f}s: {error}")
        if verdict.log:
            if outage.failures == 1:
                log.warning("cluster %s does not answer (%s); asking again with backoff", cluster, error)
                self._emit(cluster, "waiting", error)
            else:
                log.warning("cluster %s still does not answer after %.0fs (%d tries): %s", cluster,
                            self.clock() - outage.since, outage.failures, error)
        if verdict.restart:
            try:
                restarted = self.platforms.provider(cluster).restart_local_service()
            except (ProviderError, OSError) as exc:
                log.warning("cluster %s: restarting its local service failed: %s", cluster, exc)
                restarted = False
            if restarted:
                log.warning("cluster %s: its local service was restarted; attempts running on it are "
                            "invoked again", cluster)
                self._emit(cluster, "restarted", "local service restarted")
                self.restarted_at[cluster] = self.clock()
                self.health.restarted(cluster)

    def answered(self, cluster: str) -> None:
        with self._lock:
            outage = self.health.ok(cluster)
        if outage is not None:
            log.warning("cluster %s answers again after %.0fs", cluster, self.clock() - outage.since)
            self._emit(cluster, "back", "")

    def lost_by_restart(self, cluster: str, pending: Iterable[Invocation]) -> set[str]:
        with self._lock:
            since = self.restarted_at.get(cluster)
        if since is None:
            return set()
        return {inv.platform_id for inv in pending if inv.submitted_at < since}

    def check(self) -> None:
        """Raise ClusterLost for a cluster still unreachable: a round that
        failed while one was gone failed because of it, and stays resumable."""
        with self._lock:
            down = list(self.health.down.items())
        for cluster, outage in down:
            raise ClusterLost(cluster, f"no answer for {self.clock() - outage.since:.0f}s: {outage.error}")
