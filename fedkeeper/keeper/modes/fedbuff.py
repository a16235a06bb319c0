"""async (FedBuff): k invocations stay in flight, each training from the model
current when it was made; the server steps every `buffer_size` updates
("round" R = the step from model R). Jobs (one per client at most: a client
trains one thing at a time) carry over from step to step; a resumed session
adopts the attempts still running."""
from __future__ import annotations

import math

from ..attempts import DELIVERED, FAILED, RUNNING, WAITING, AttemptTable, Slot
from ..errors import SessionError
from ..events import RoundReport, shown
from .base import RoundMode, log, paused_s


class AsyncRounds(RoundMode):
    name = "async"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.jobs: AttemptTable = self.dispatch.table()

    def running(self) -> list[Slot]:
        return list(self.jobs)

    def _job(self, client: str) -> Slot | None:
        return next((s for s in self.jobs if s.client == client), None)

    def run(self, session: str, first_round: int, reports: list[RoundReport]) -> None:
        self.jobs = self.dispatch.table()
        for s in self.adopt_running(session, first_round):
            if self._job(s.client) is None:
                self.jobs.add(s)
        version = first_round
        with self.tracking_until_the_end():
            while version < self.training.rounds:
                rep = self.step(session, version)
                reports.append(rep)
                if self.ctx.reached_target(rep.accuracy):
                    break
                version += 1
            self.unselect_never_invoked(session)

    def unselect_never_invoked(self, session: str) -> None:
        """A step whose buffer was full when it topped up its jobs leaves
        them to the next step to invoke; after the last step none will be."""
        self.unselect(session, [s for s in self.jobs if s.state == WAITING and s.attempt == 0])

    def carry_never_invoked(self, session: str, v: int, selected: list[str]) -> None:
        """Jobs an earlier step picked when its buffer was already full were
        never invoked: they are invoked now, so they train from model `v`
        and belong to round v's `selected`, not the round they were picked in."""
        carried = [s for s in list(self.jobs) if s.state == WAITING and s.attempt == 0 and s.round < v]
        if not carried:
            return
        self.unselect(session, carried)
        for s in carried:
            self.jobs.remove(s)
            s.round = v
            self.jobs.add(s)
            if s.client not in selected:
                selected.append(s.client)

    def unselect(self, session: str, slots: list[Slot]) -> None:
        """Jobs never invoked leave their rounds' `selected`, which lists the
        clients invoked from each round's model."""
        never: dict[int, set[str]] = {}
        for s in slots:
            never.setdefault(s.round, set()).add(s.client)
        for rnd, clients in sorted(never.items()):
            doc = self.store.round(session, rnd)
            if doc is not None:
                self.store.upsert_round(session, rnd, selected=[c for c in doc.get("selected", [])
                                                                if c not in clients])

    def buffer_size(self) -> int:
        return self.training.buffer_size or math.ceil(self.ctx.per_round / 2)

    def step(self, session: str, v: int) -> RoundReport:
        """Model `v` is current: keep k invocations in flight (new ones train
        from model v), and once `buffer_size` updates have arrived aggregate
        round v: the updates trained from model v as `clients`, older ones
        within the staleness tolerance as `stale`."""
        t0 = self.ctx.clock()
        # Jobs trained from models older than the tolerance cannot join this or a later aggregation.
        self.dispatch.hedger.oldest_useful_round = v - self.training.staleness_tolerance
        existing = self.store.round(session, v)
        selected: list[str] = list(existing["selected"]) if existing else []
        started = existing.get("started", t0) if existing else t0
        if existing and existing.get("state") == "aggregating":
            fresh, stale = existing["included"], existing.get("stale_included") or []
            for s in self.adopt(session, v, selected):
                if s.state == RUNNING and self._job(s.client) is None:
                    self.jobs.add(s)
        else:
            self.carry_never_invoked(session, v, selected)
            self.store.upsert_round(session, v, selected=selected, state="running", mode="async",
                                    started=started)
            for s in self.adopt(session, v, selected):
                if s.state in (RUNNING, WAITING) and self._job(s.client) is None:
                    self.jobs.add(s)
            self.fill_buffer(session, v, selected)
            fresh, stale = self.fresh_updates(session, v), self.stale_updates(session, v)
            self.mark_stale(session, v)
            self.store.upsert_round(session, v, state="aggregating", included=fresh, stale_included=stale)
        delivered = self.store.delivered_clients(session, v)
        busy = {s.client for s in self.jobs}
        failed = sum(1 for c in selected if c not in delivered and c not in busy)
        return self.aggregate(session, v, selected=selected, included=fresh, stale=stale, failed=failed,
                              started=started + paused_s(existing), t0=t0, args={"clients": fresh, "stale": stale},
                              extra=lambda res: {"stale_accepted": res.get("stale_accepted")})

    def buffered(self, session: str, v: int) -> int:
        """Updates that arrived and can still join the aggregation of round v."""
        return self.store.count_received_updates(session, v - self.training.staleness_tolerance, v + 1)

    def fill_buffer(self, session: str, v: int, selected: list[str]) -> None:
        """Invoke, track and retry (FedBuff's client side) until `buffer_size`
        updates can be aggregated. `selected` (clients invoked at version v)
        grows in place and is written to round v's document as it does."""
        tr = self.training
        k = self.ctx.per_round
        buffer_size = self.buffer_size()
        clock = self.ctx.clock
        deadline = clock() + tr.round_deadline_s
        # A client is invoked at most once per model version: its update key
        # (session, round, client) is unique.
        tried = set(selected) | self.store.delivered_clients(session, v)
        buffered = self.buffered(session, v)
        failed = 0  # jobs that failed for good during this step
        while True:
            # Jobs too stale to be aggregated keep their client busy but not a slot.
            free = k - sum(1 for s in self.jobs if s.round >= v - tr.staleness_tolerance)
            busy = {s.client for s in self.jobs}
            candidates = [c for c in self.ctx.clients() if c not in busy and c not in tried]
            if free > 0 and candidates:
                pick = self.ctx.selector.select(session, v, candidates, k=free, draw=len(selected))
                for c in pick:
                    self.jobs.add(Slot(c, self.ctx.client_cluster[c], v))
                selected.extend(pick)
                tried.update(pick)
                self.store.upsert_round(session, v, selected=selected)
            if buffered >= buffer_size:
                # Checked after the top-up: clients that finished while the
                # last aggregation ran are replaced at once, even when their
                # updates already fill this buffer.
                break
            if not len(self.jobs):
                # Every client has been tried at this version and nothing is
                # in flight: no further update can arrive.
                if buffered:
                    log.warning("round %d: every client tried; aggregating %d of %d buffered updates",
                                shown(v), buffered, buffer_size)
                    return
                self.dispatch.clusters.check()
                raise SessionError(f"round {shown(v)}: every client was tried and none delivered an update")
            self.submit_due(session, v)
            self.dispatch.track(session, [self.jobs])
            ended = self.jobs.keep_only(RUNNING, WAITING, "submitting")
            if any(s.state == DELIVERED for s in ended):
                buffered = self.buffered(session, v)
            failed += sum(1 for s in ended if s.state == FAILED)
            c = self.jobs.counts()
            self.ctx.events.emit("tick", round=v, delivered=buffered, buffered=buffered, buffer_size=buffer_size,
                                 running=c["running"], waiting=c["waiting"], failed=failed,
                                 retrying=sum(1 for s in self.jobs if s.attempt > 1))
            if buffered >= buffer_size:
                break
            if clock() >= deadline:
                if buffered:
                    log.warning("round %d deadline passed with %d of %d buffered updates; aggregating them",
                                shown(v), buffered, buffer_size)
                    return
                self.dispatch.clusters.check()
                raise SessionError(f"round {shown(v)}: no update arrived within the round deadline "
                                   f"({tr.round_deadline_s:g}s)")
            self.dispatch.sleep(self.jobs.sleep_hint())

    def submit_due(self, session: str, v: int) -> None:
        """Due jobs are submitted for the round they train from; a job whose
        update could no longer be aggregated is not worth a retry."""
        by_round: dict[int, list[Slot]] = {}
        for s in self.jobs.due():
            by_round.setdefault(s.round, []).append(s)
        for rnd, ready in sorted(by_round.items()):
            if rnd < v - self.training.staleness_tolerance:
                for s in ready:
                    s.state, s.last_error = FAILED, s.last_error or "too stale to retry"
                self.unselect(session, [s for s in ready if s.attempt == 0])
            else:
                self.dispatch.submit(session, rnd, self.jobs, self.jobs.begin(ready))
