"""Hedged re-invocation, as the I/O side of the attempt table's hedging.

A client attempt running past `factor` x the `percentile` of its round
peers' durations (training.hedging; the decision is `AttemptTable.hedge_due`;
the peers are the warm ones once min_peers of them delivered, see
`HedgePolicy`) gets a speculative attempt (one at a time). The first
update stored wins: the winner is the slot's delivered attempt, the other
one is recorded as `hedged` (neither counted nor a failure). An update the
loser still stores is refused by the unique (session, round, client) key of
updates, so it never counts twice.

Every speculative attempt is an attempt record with `hedge: true` (its own
attempt number, after the slot's), so cost and reports see it. A hedge
that fails on its own (crashes, is refused, has no outcome in time) counts
against max_attempts like any failed attempt, and while attempts remain the
straggler is hedged again when a retry would be made (without jitter). A
hedge that straggles too (held, or on a cold worker) takes the place of the
slot's older attempt, which is given up, and is hedged in turn (while that
leaves an attempt; each further give-up of the same client and round waits
twice as long as the one before): at most two of a client's attempts are
tracked at once.

Where it runs: on another cluster the client may run on, else on its own.
A client may run on every cluster that hosts the session's client
functions: fl_client reads the client's partition from the session's store
(every cluster's functions are bound to the same one), not from the
cluster. The placement only says where the client's regular attempts go.
Of the other client clusters, the hedge goes to one that answers, is
invoked directly and runs the fewest of this keeper's attempts (ties in
config order), so it avoids the cluster the straggler is slow on. A
cluster invoked through fl_invoker is neither hedged nor a hedge's target
(its clients are not invoked from here).

Hedging draws nothing from any rng: selections and backoffs for a seed are
the same with it on or off.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from bson import ObjectId

from ..providers import ErrorClass, Outcome, ProviderError
from .attempts import RUNNING, AttemptTable, Hedge, Slot

log = logging.getLogger("fedkeeper.keeper")

HEDGED = "hedged"
LOST_THE_RACE = "another attempt of this client delivered first"
GIVEN_UP = "its hedge ran past the round's peers too; given up for a younger attempt"
STORED_BY_ANOTHER = "no longer tracked: an attempt given up earlier stored the client's update"
STORED_FIRST = "given up for a younger attempt, but its update was stored first and is the one counted"


def hedged_fields(now: float, why: str = LOST_THE_RACE) -> dict[str, Any]:
    return {"state": HEDGED, "error": why, "finished": now}


class Hedger:
    """Starts, tracks and settles speculative attempts for a Dispatcher."""

    def __init__(self, dispatcher: Any):
        self.d = dispatcher
        self._client_clusters: list[str] | None = None
        # (client, round) -> when a straggler whose hedge failed may be hedged again
        self._again_at: dict[tuple[str, int], float] = {}
        # (client, round) -> how many of its older attempts were given up
        self._gave_up: dict[tuple[str, int], int] = {}
        # (client, round, attempt) -> the record of an attempt given up, should its update be the one stored
        self._given_up_docs: dict[tuple[str, int, int], Any] = {}
        # platform id -> an attempt (a hedge, or the own attempt its hedge found had stored the update)
        # whose update is its client's (delivered) but that has not reported:
        # tracked on for its own record only
        self._reporting: dict[str, Hedge] = {}
        # Client rounds older than this can no longer be aggregated (set by
        # the semi_async and async modes as their rounds move on): a
        # straggler of such a round is worth no hedge, whose update would
        # only be marked stale.
        self.oldest_useful_round = 0

    def given_up(self, client: str, rnd: int, attempt: int, doc_id: Any) -> None:
        """An attempt no longer tracked (given up for a younger one, or left
        running beside it by a stopped keeper): should its update be the
        one stored, the record of `doc_id` is told so."""
        self._given_up_docs[(client, rnd, attempt)] = doc_id

    # ------------------------------------------------------------------ settling
    def own_attempt_delivered(self, s: Slot) -> list[tuple[Any, dict[str, Any]]]:
        """The slot's own attempt delivered first: its hedge lost the race."""
        h = s.hedge
        if h is None:
            return []
        s.hedge = None
        return [(h.doc_id, hedged_fields(self.d.clock()))] if h.doc_id is not None else []

    def update_found_stored(self, table: AttemptTable, s: Slot, stored_by: int | None,
                            outcome: Outcome | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """The slot's own attempt ended without reporting an update (it
        failed, or never reported), but the client's update is stored, by
        the attempt `stored_by` (as the update document says): the client
        is delivered. When that is its running hedge, the hedge won
        (_delivered_by_hedge); otherwise a running hedge lost the race, and
        when `stored_by` is an attempt given up for a younger one, its
        record says its update is the one counted. `outcome`: the own
        attempt's, when it reported one (its run then counts among the
        peers' durations if it stored the update itself)."""
        h = s.hedge
        if h is not None and h.inv is not None and stored_by == h.attempt:
            return self._delivered_by_hedge(table, s)
        changes = self.own_attempt_delivered(s)
        given_up = self._given_up_docs.pop((s.client, s.round, stored_by), None)
        if given_up is not None:
            changes.append((given_up, {"error": STORED_FIRST, "stored_update": True}))
        if outcome is not None and stored_by == s.running_attempt:
            table.delivered(s, outcome.result, outcome.cold_start)
        else:
            table.delivered_untracked(s, outcome.result if outcome is not None else None)
        return changes

    def own_attempt_refused(self, table: AttemptTable, s: Slot, fields: dict[str, Any],
                            result: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]] | None:
        """The slot's own attempt succeeded but its update was refused: the
        client's was stored first by the attempt `result["stored_by"]`
        names. When that is its running hedge, the hedge becomes the slot's
        attempt (it reports next); when it is an attempt given up for a
        younger one, the client is delivered and that attempt's record says
        its update is the one counted. Either way the own attempt lost the
        race and its record says so; the changes to write, or None when the
        answer names neither (the caller delivers the slot as before)."""
        stored_by = result.get("stored_by")
        if isinstance(stored_by, bool) or not isinstance(stored_by, int):
            return None
        lost = {**fields, "state": HEDGED, "error": LOST_THE_RACE}
        h = s.hedge
        if h is not None and h.inv is not None and stored_by == h.attempt:
            return [(s.doc_id, lost)] + self._delivered_by_hedge(table, s)
        stored = self._given_up_docs.pop((s.client, s.round, stored_by), None)
        if stored is None:
            return None
        changes = [(s.doc_id, lost)] + self.own_attempt_delivered(s)
        changes.append((stored, {"error": STORED_FIRST, "stored_update": True}))
        table.delivered_untracked(s, result)
        return changes

    def _delivered_by_hedge(self, table: AttemptTable, s: Slot) -> list[tuple[Any, dict[str, Any]]]:
        """The slot's running hedge stored the client's update and has not
        reported yet: the client is delivered now (its round does not wait
        for that report, which a hedge held after storing would delay to
        its limit), and the hedge is tracked on for its own record, which
        says that its update is the one counted."""
        h, s.hedge = s.hedge, None
        table.delivered_untracked(s)
        self._reporting[h.inv.platform_id] = h
        return [(h.doc_id, {"stored_update": True})]

    def _delivered_by_own_attempt(self, table: AttemptTable, s: Slot) -> list[tuple[Any, dict[str, Any]]]:
        """The slot's own running attempt stored the client's update (its
        hedge found it there) and has not reported: as _delivered_by_hedge,
        the client is delivered now and the attempt tracked for its record."""
        own = Hedge(s.cluster, s.running_attempt, s.doc_id, s.inv, s.started_at, s.deadline)
        table.delivered_untracked(s)
        self._reporting[own.inv.platform_id] = own
        return [(own.doc_id, {"stored_update": True})]

    def _reported(self, outcome_fields) -> list[tuple[Any, dict[str, Any]]]:
        """The outcomes of the hedges tracked for their record only, and a
        time-out for those past their deadline."""
        if not self._reporting:
            return []
        changes: list[tuple[Any, dict[str, Any]]] = []
        for out in self._outcomes_of(list(self._reporting.values())):
            h = self._reporting.pop(out.platform_id, None)
            if h is not None:
                changes.append((h.doc_id, {**outcome_fields(out, self.d.clock()), "stored_update": True}))
        now = self.d.clock()
        for pid, h in list(self._reporting.items()):
            if now > h.deadline:
                del self._reporting[pid]
                changes.append((h.doc_id, {"state": "timed_out", "error_class": "timeout", "finished": now,
                                           "error": "no outcome within the function timeout plus grace"}))
        return changes

    def _outcomes_of(self, hedges: Sequence[Hedge]) -> list[Outcome]:
        """The outcomes the hedges' clusters report for them, each cluster
        asked once; one that does not answer (or may not be asked now) is
        left to its own tracking, which judges its health."""
        by_cluster: dict[str, list[Hedge]] = {}
        for h in hedges:
            by_cluster.setdefault(h.cluster, []).append(h)
        outcomes: list[Outcome] = []
        for cluster, group in by_cluster.items():
            if not self.d.clusters.may_probe(cluster):
                continue
            try:
                outcomes += self.d.platforms.provider(cluster).track([h.inv for h in group])
            except ProviderError:
                continue
        return outcomes

    def stop_reporting(self, why: str) -> None:
        """The session ends: the hedges still tracked for their record only
        are recorded as abandoned (their records keep `stored_update`)."""
        now = self.d.clock()
        changes = [(h.doc_id, {"state": "abandoned", "error": why, "finished": now})
                   for h in self._reporting.values()]
        self._reporting.clear()
        if changes:
            self.d.update_attempts(changes)

    # ------------------------------------------------------------------ starting
    def client_clusters(self) -> list[str]:
        """The clusters any client may run on: those the placement puts
        clients on, in config order."""
        if self._client_clusters is None:
            rt = self.d.platforms.rt
            placed = set(rt.client_clusters().values())
            self._client_clusters = [c for c in rt.cfg.providers.clusters() if c in placed]
        return self._client_clusters

    def where(self, s: Slot, running: dict[str, int] | None = None) -> str:
        """Another client cluster for `s`'s speculative attempt (answering,
        invoked directly, the fewest running attempts first), else its own."""
        others = [c for c in self.client_clusters()
                  if c != s.cluster and self.d.clusters.may_probe(c) and not self.d.platforms.via_invoker(c)]
        if not others:
            return s.cluster
        load = running or {}
        return min(others, key=lambda c: load.get(c, 0))   # min keeps the first of equals

    def start(self, session: str, tables: Sequence[AttemptTable]) -> None:
        now = self.d.clock()
        self._give_up_for_younger(tables, now)
        due = [(t, s) for t in tables for s in t.hedge_due()
               if not self.d.platforms.via_invoker(s.cluster) and s.round >= self.oldest_useful_round
               and self._again_at.get((s.client, s.round), 0.0) <= now]
        if not due:
            return
        running: dict[str, int] = {}
        for t in tables:
            for s in t:
                if s.state == RUNNING:
                    running[s.cluster] = running.get(s.cluster, 0) + 1
                if s.hedge is not None:
                    running[s.hedge.cluster] = running.get(s.hedge.cluster, 0) + 1
        chosen: list[tuple[AttemptTable, Slot, str]] = []
        for table, s in due:
            self._again_at.pop((s.client, s.round), None)
            cluster = self.where(s, running)
            if not self.d.clusters.may_probe(cluster):
                continue        # every cluster it could run on is down for now
            running[cluster] = running.get(cluster, 0) + 1
            chosen.append((table, s, cluster))
        if chosen:
            self._start(session, chosen)

    def _give_up_for_younger(self, tables: Sequence[AttemptTable], now: float) -> None:
        """A hedge that runs past its round's threshold as well (held, or on
        a cold worker): the slot's own, older attempt is given up (recorded
        hedged, no longer tracked) and the hedge becomes the slot's attempt,
        which may be hedged in turn, only while that leaves an attempt for
        the next hedge. The n-th give-up of a client and round waits until
        the hedge ran 2^(n-1) times the threshold: a held hedge is replaced
        soon, as a held own attempt is, while a chain of hedges on a loaded
        machine (where every new worker is a cold one) is slowed down, not
        fed. An update the given-up attempt still stores first is the
        slot's: the first younger attempt to report it as a duplicate
        settles the slot (see track)."""
        changes = []
        for table in tables:
            limits: dict[int, float | None] = {}
            for s in table:
                h = s.hedge
                if h is None or h.inv is None or s.state != RUNNING \
                        or s.counted + 1 >= table.policy.max_attempts or s.round < self.oldest_useful_round:
                    continue
                if s.round not in limits:
                    limits[s.round] = table.hedge_threshold(s.round)
                limit = limits[s.round]
                given_up = self._gave_up.get((s.client, s.round), 0)
                if limit is not None and now - h.started_at > limit * 2 ** given_up:
                    changes.append((s.doc_id, hedged_fields(now, GIVEN_UP)))
                    if len(self._gave_up) > 4096:   # keep the maps small: drop settled rounds
                        oldest = min((x.round for t in tables for x in t), default=s.round)
                        self._gave_up = {k: n for k, n in self._gave_up.items() if k[1] >= oldest}
                        self._given_up_docs = {k: d for k, d in self._given_up_docs.items() if k[1] >= oldest}
                    self._gave_up[(s.client, s.round)] = given_up + 1
                    self.given_up(s.client, s.round, s.running_attempt, s.doc_id)
                    table.promote_hedge(s)
        if changes:
            self.d.update_attempts(changes)

    def _failed(self, table: AttemptTable, s: Slot, ec: ErrorClass | None) -> Any:
        """A speculative attempt failed on its own: it counts as an attempt;
        the next one (if any) waits as a retry would, without jitter."""
        h = table.hedge_failed(s)
        # Every counted attempt but the slot's own running one has failed.
        delivering = h is not None and table.deliveries.delivering(h.cluster)
        delay = table.policy.retry_delay(s.counted - 1, ec, rng=None, delivering=delivering)
        self._again_at[(s.client, s.round)] = self.d.clock() + delay
        if len(self._again_at) > 4096:   # slots long settled; keep the map small
            now = self.d.clock()
            self._again_at = {k: v for k, v in self._again_at.items() if v > now}
        return h

    def _start(self, session: str, chosen: list[tuple[AttemptTable, Slot, str]]) -> None:
        """Start a speculative attempt for each (table, slot, cluster): the
        records in one write, the invocations in parallel (as a round's
        first attempts are), their outcomes in one more write."""
        now = self.d.clock()
        docs = []
        for table, s, cluster in chosen:
            h = table.begin_hedge(s, cluster)
            h.doc_id = ObjectId()
            docs.append({
                "_id": h.doc_id, "session": session, "round": s.round, "client": s.client,
                "attempt": h.attempt, "cluster": cluster, "platform": self.d.platforms.provider(cluster).platform,
                "function": "fl_client", "memory_mb": self.d.platforms.spec(cluster, "fl_client").memory_mb,
                "state": "submitting", "submitted": now, "via": "direct", "hedge": True})
            log.info("round %d: %s runs past its peers; hedging it (attempt %d on %s)",
                     s.round + 1, s.client, h.attempt, cluster)
        self.d.insert_attempts(docs)

        def invoke(item: tuple[AttemptTable, Slot, str]):
            _, s, cluster = item
            payload = self.d.platforms.payload(function="fl_client", session=session, round=s.round,
                                               client=s.client, attempt=s.hedge.attempt)
            try:
                return item, self.d.platforms.provider(cluster).invoke("fl_client", payload), None
            except ProviderError as exc:
                return item, None, exc

        changes: list[tuple[Any, dict[str, Any]]] = []
        unreachable: dict[str, str] = {}
        for (table, s, cluster), inv, exc in self.d.invoke_each(invoke, chosen):
            h = s.hedge
            if inv is not None:
                table.hedge_started(s, inv, self.d.platforms.spec(cluster, "fl_client").timeout_s)
                changes.append((h.doc_id, {"state": "running", "platform_id": inv.platform_id,
                                           "submitted": inv.submitted_at}))
                continue
            if exc.error_class == ErrorClass.UNREACHABLE:
                # Nothing ran: the cluster's health pays for it (the next
                # hedge goes elsewhere while it is down), not the
                # straggler's attempts.
                table.hedge_not_started(s)
                unreachable[cluster] = str(exc)
            else:
                self._failed(table, s, exc.error_class)
            changes.append((h.doc_id, {**hedged_fields(self.d.clock(), f"not started: {exc}"),
                                       "error_class": exc.error_class.value}))
        self.d.update_attempts(changes)
        # Once per cluster, as Dispatcher.submit does, and after the records
        # are written: a cluster given up (ClusterLost) leaves none of them
        # `submitting`.
        for cluster, error in unreachable.items():
            self.d.clusters.failed(cluster, error)

    # ------------------------------------------------------------------ tracking
    def track(self, session: str, tables: Sequence[AttemptTable], outcome_fields) -> None:
        """Ask how the running speculative attempts went and settle them."""
        changes = self._reported(outcome_fields)
        hedged = [(t, s) for t in tables for s in t if s.hedge is not None and s.hedge.inv is not None]
        if not hedged:   # nor any overdue hedge
            if changes:
                self.d.update_attempts(changes)
            return
        by_id = {s.hedge.inv.platform_id: (t, s) for t, s in hedged}
        for out in self._outcomes_of([s.hedge for _, s in hedged]):
            hit = by_id.get(out.platform_id)
            if hit is None:
                continue
            table, s = hit
            fields = outcome_fields(out, self.d.clock())
            # A duplicate: the update the slot's own attempt stored was
            # there first, so that one wins (tracked to its end as usual).
            duplicate = bool((out.result or {}).get("duplicate"))
            if fields["state"] == "succeeded" and s.state == RUNNING and not duplicate:
                hedge_doc = s.hedge.doc_id
                loser = table.hedge_won(s, out.result, out.cold_start)
                changes.append((hedge_doc, fields))
                if loser is not None:
                    changes.append((loser, hedged_fields(self.d.clock())))
                continue
            if fields["state"] == "succeeded" and duplicate and s.state == RUNNING \
                    and table.stored_by_untracked(s, (out.result or {}).get("stored_by")):
                # An attempt given up for a younger one stored the update:
                # the client delivered. Waiting for the running attempt
                # (held, perhaps to the function's limit) would hold the
                # round for nothing.
                h = table.hedge_dropped(s)
                changes.append((h.doc_id, {**fields, "state": HEDGED, "error": LOST_THE_RACE}))
                changes.append((s.doc_id, hedged_fields(self.d.clock(), STORED_BY_ANOTHER)))
                stored_by = self._given_up_docs.pop((s.client, s.round, out.result["stored_by"]), None)
                if stored_by is not None:   # its record says it was not counted: it was
                    changes.append((stored_by, {"error": STORED_FIRST, "stored_update": True}))
                table.delivered_untracked(s, out.result)
                continue
            if fields["state"] == "succeeded":   # the slot's own attempt stored its update first
                h = table.hedge_dropped(s)
                changes.append((h.doc_id, {**fields, "state": HEDGED, "error": LOST_THE_RACE}))
                if duplicate and s.state == RUNNING and s.inv is not None \
                        and (out.result or {}).get("stored_by") == s.running_attempt:
                    # Known to have stored it: the client is delivered now,
                    # not when its attempt reports (held after storing, it
                    # would hold the round to its deadline, then be left out).
                    changes += self._delivered_by_own_attempt(table, s)
                continue
            # A speculative attempt that failed is no failure of its
            # client: the slot's own attempt carries on.
            h = self._failed(table, s, out.error_class)
            changes.append((h.doc_id, {**fields, "state": HEDGED, "error": fields["error"] or LOST_THE_RACE}))
        now = self.d.clock()
        for table in tables:
            for s in table.overdue_hedges():
                h = self._failed(table, s, ErrorClass.TIMEOUT)
                changes.append((h.doc_id, {**hedged_fields(now, "no outcome within the function timeout "
                                                               "plus grace"), "error_class": "timeout"}))
        self.d.update_attempts(changes)
