"""Cluster health, pure like the attempt table: which clusters stopped
answering, when to ask them again, when to say so, when to restart a local
service and when to give up. clusters.py carries its verdicts out."""
from __future__ import annotations

from dataclasses import dataclass

from .attempts import Clock


@dataclass
class ClusterOutage:
    since: float
    failures: int = 0
    next_probe: float = 0.0
    last_logged: float = 0.0
    restarted: bool = False
    error: str = ""


@dataclass(frozen=True)
class HealthVerdict:
    log: bool                       # say so in the run log (once, then every log_every_s)
    restart: bool = False           # ask the provider to restart a local service it owns
    give_up: bool = False           # the cluster is gone: stop, the session stays resumable


class ClusterHealth:
    """Which clusters stopped answering, when to ask them again (capped
    exponential backoff), when to log it (once, then at most every
    `log_every_s`), when to try a restart and when to give up."""

    def __init__(self, clock: Clock, patience_s: float = 60.0, backoff_s: float = 0.25,
                 backoff_max_s: float = 8.0, log_every_s: float = 10.0, restart_after: int = 2):
        self.clock = clock
        self.patience_s = patience_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.log_every_s = log_every_s
        self.restart_after = restart_after
        self.down: dict[str, ClusterOutage] = {}

    def may_probe(self, cluster: str) -> bool:
        o = self.down.get(cluster)
        return o is None or self.clock() >= o.next_probe

    def next_probe(self, cluster: str) -> float:
        o = self.down.get(cluster)
        return self.clock() if o is None else o.next_probe

    def failed(self, cluster: str, error: str, *, can_restart: bool) -> HealthVerdict:
        now = self.clock()
        o = self.down.get(cluster)
        first = o is None
        if o is None:
            o = self.down[cluster] = ClusterOutage(since=now)
        o.failures += 1
        o.error = error
        o.next_probe = now + min(self.backoff_max_s, self.backoff_s * 2 ** (o.failures - 1))
        log_it = first or now - o.last_logged >= self.log_every_s
        if log_it:
            o.last_logged = now
        if can_restart and not o.restarted and o.failures >= self.restart_after:
            o.restarted = True
            return HealthVerdict(log=log_it, restart=True)
        if now - o.since >= self.patience_s:
            return HealthVerdict(log=True, give_up=True)
        return HealthVerdict(log=log_it)

    def restarted(self, cluster: str) -> None:
        """A restart answered: probe at once; the outage clock runs on, so
        a service that dies again is still given up in bounded time."""
        o = self.down.get(cluster)
        if o is not None:
            o.next_probe = self.clock()

    def ok(self, cluster: str) -> ClusterOutage | None:
        """The cluster answered; returns the outage that ended, if any."""
        return self.down.pop(cluster, None)
