"""Dispatch and tracking: carries out what the attempt state machine decides.

Invokes clients (directly or through fl_invoker), tracks them in batches,
records every attempt as a store document (written before the invocation,
so a killed keeper leaves a trace of everything it may have started), calls
the helper functions (init, aggregator, invoker; helper_calls.py) with the
same bounded retries, redeploys a missing function, and keeps a cluster that stopped
answering from flooding the log: it is asked again with a capped backoff,
its local service is restarted when its provider owns one, and it is given
up (ClusterLost) after a bounded wait.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from bson import ObjectId

from flcommon.auth import signed

from ..providers import ErrorClass, Invocation, ProviderError
from ..runtime import Placement
from .attempts import RUNNING, AttemptTable, DeliveryRecord, RetryPolicy, Slot
from .clusters import ClusterWatch
from .errors import SessionError
from .events import RoundEvents
from .hedging import Hedger
from .helper_calls import call_helper
from .outcomes import outcome_fields, succeeded
from .round_records import RoundRecords
from .running_marks import RunningMarks

log = logging.getLogger("fedkeeper.keeper")

ENDED_STATES = ("succeeded", "failed", "timed_out", "abandoned", "hedged")


class Platforms:
    """What dispatch needs from the runtime: providers, function specs,
    each cluster's invocation mode, redeploys and signed payloads."""

    def __init__(self, rt: Any):
        self.rt = rt
        self._specs: dict[tuple[str, str], Any] = {}

    def provider(self, cluster: str):
        return self.rt.provider(cluster)

    def spec(self, cluster: str, function: str):
        key = (cluster, function)
        if key not in self._specs:
            section = self.rt.cfg.providers.clusters()[cluster][0]
            self._specs[key] = self.rt.function_spec(function, section)
        return self._specs[key]

    def via_invoker(self, cluster: str) -> bool:
        return getattr(self.rt.cfg.providers.clusters()[cluster][1], "invocation", "direct") == "via_invoker"

    def redeploy(self, cluster: str, function: str) -> None:
        section = self.rt.cfg.providers.clusters()[cluster][0]
        self.rt.deploy([Placement(cluster, section, self.spec(cluster, function))])

    def payload(self, **ids: Any) -> dict[str, Any]:
        return signed(self.rt.secret, ids)


def across_clusters(slots: Sequence[Slot]) -> list[Slot]:
    """The slots one cluster after another in turn, each cluster's in their
    own order, so that every cluster starts on its clients at once. Sent in
    client order, a cluster whose clients came last waited for every other
    cluster's invocations first: 1.3 s of a 1,000-client round for the
    second of two local clusters, whose clients then ended last."""
    queues: dict[str, list[Slot]] = {}
    for s in slots:
        queues.setdefault(s.cluster, []).append(s)
    longest = max((len(q) for q in queues.values()), default=0)
    return [q[i] for i in range(longest) for q in queues.values() if i < len(q)]


#: The fields fl_invoker sets on an attempt document it invoked.
INVOKER_FIELDS = ("platform_id", "state", "via")


class Dispatcher:
    INVOKER_BATCH = 40  # client payloads per fl_invoker call: keeps its payload small
    INVOKE_THREADS = 16  # client invocations sent at once

    def __init__(self, platforms: Platforms, store: Any, policy: RetryPolicy, events: RoundEvents, *,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, cluster_patience_s: float = 60.0):
        self.platforms = platforms
        self.store = store
        self.policy = policy
        self.events = events
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.clusters = ClusterWatch(platforms, events, clock, cluster_patience_s)
        # Called once per attempt that ends: (cluster, platform, state,
        # error_class, duration_s, cold_start, function=...), e.g. metrics.
        self.attempt_ended: Callable[..., None] | None = None
        self._attempt_where: dict[Any, tuple[str, str, str]] = {}
        self.running_marks = RunningMarks(clock)   # accepted client attempts' marks, held a while
        self.round_records = RoundRecords()        # the attempts of rounds this keeper started
        self.hedger = Hedger(self)   # speculative attempts; where they run: Hedger.where
        self.peer_durations: dict[int, list[float]] = {}   # shared by its tables (AttemptTable)
        self.warm_durations: dict[int, list[float]] = {}
        self.deliveries = DeliveryRecord()                 # likewise: a cluster's recent attempts delivered?
        # Kept for the dispatcher's life: starting threads for every submit
        # cost about 0.1 ms of keeper CPU per invocation (async top-ups
        # submit one or two clients at a time).
        self._invoke_pool: ThreadPoolExecutor | None = None

    def invoke_each(self, invoke: Callable[[Any], Any], slots: Sequence[Any]) -> list[Any]:
        """invoke(item) for every item (a slot, or a hedge to start), up to
        INVOKE_THREADS at once; a single one on the calling thread."""
        if len(slots) == 1:
            return [invoke(slots[0])]
        if self._invoke_pool is None:
            self._invoke_pool = ThreadPoolExecutor(max_workers=self.INVOKE_THREADS,
                                                   thread_name_prefix="fk-invoke")
        return list(self._invoke_pool.map(invoke, slots))

    def close(self) -> None:
        """Let the invoke threads go (a sweep runs many keepers in one
        process); the pool starts again if this dispatcher is used again."""
        pool, self._invoke_pool = self._invoke_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def table(self, slots: Iterable[Slot] = (), rng: random.Random | None = None) -> AttemptTable:
        return AttemptTable(self.policy, self.clock, rng or self.rng, slots, self.peer_durations,
                            self.warm_durations, self.deliveries)

    def check_invocation_modes(self, clusters: Iterable[str]) -> None:
        """via_invoker needs a platform that tracks invocations by id alone:
        on HTTP platforms the answer belongs to the connection that called."""
        for cluster in dict.fromkeys(clusters):
            provider = self.platforms.provider(cluster)
            if self.platforms.via_invoker(cluster) and not provider.tracks_foreign_invocations:
                raise SessionError(f"cluster {cluster}: invocation: via_invoker needs a platform whose "
                                   f"invocations can be tracked by id ({provider.platform} cannot); "
                                   "use invocation: direct")

    # ------------------------------------------------------------------ attempt records
    def remember(self, doc_id: Any, cluster: str, platform: str, function: str) -> None:
        self._attempt_where[doc_id] = (cluster, platform, function)

    def insert_attempts(self, docs: list[dict[str, Any]]) -> None:
        for d in docs:
            self.remember(d["_id"], d["cluster"], d["platform"], d["function"])
        self.store.insert_attempts(docs)
        self.round_records.inserted(docs)

    def update_attempts(self, changes: list[tuple[Any, dict[str, Any]]]) -> None:
        """Write `changes` to attempt documents, with the running marks
        they supersede and those now due (running_marks.py)."""
        changes = self.running_marks.with_changes(changes)
        self.store.update_attempts(changes)
        self.round_records.changed(changes)
        self._write_marks(self.running_marks.due())
        # An attempt that ended is forgotten here: the map would otherwise
        # hold every attempt of a long session.
        ended = [(fields, self._attempt_where.pop(doc_id, None)) for doc_id, fields in changes
                 if fields.get("state") in ENDED_STATES]
        if self.attempt_ended is None:
            return
        for fields, where in ended:
            if where:
                d = fields.get("duration_ms")
                self.attempt_ended(where[0], where[1], fields["state"], fields.get("error_class"),
                                   d / 1000 if d is not None else None, fields.get("cold_start"),
                                   function=where[2])

    def _write_marks(self, marks: list[tuple[Any, str, dict[str, Any]]]) -> None:
        by_session: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for doc_id, session, fields in marks:
            by_session.setdefault(session, []).append((doc_id, fields))
        for session, batch in by_session.items():
            self.store.insert_running_marks(session, batch)

    def write_running_marks(self) -> None:
        """The keeper stops: every running mark it holds is written, and
        its sessions' marks are folded into their attempts, which are left
        `running` for --resume to adopt."""
        self._write_marks(self.running_marks.due(everything=True))
        for session in sorted(self.running_marks.sessions):
            self.store.fold_running_marks(session)

    def abandon(self, slots: Iterable[Slot], why: str) -> None:
        """Running attempts given up: recorded as abandoned. An update one of
        them still stores cannot count twice (its key is unique)."""
        now = self.clock()
        changes = []
        for s in slots:
            changes.append((s.doc_id, {"state": "abandoned", "error": why, "finished": now}))
            if s.hedge is not None:
                changes.append((s.hedge.doc_id, {"state": "abandoned", "error": why, "finished": now}))
                s.hedge = None
        self.update_attempts(changes)

    def _record_lost(self, lost: list[tuple[AttemptTable, Slot]], why: str) -> None:
        if not lost:
            return
        now = self.clock()
        changes = []
        for table, s in lost:
            fields = {"state": "failed", "error_class": ErrorClass.PLATFORM_ERROR.value, "error": why,
                      "finished": now}
            doc_id = s.doc_id
            if not table.promote_hedge(s):
                table.lost(s, f"platform_error: {why}")
                fields["lost"] = True   # not counted against max_attempts, by a resumed keeper either
            changes.append((doc_id, fields))
        self.update_attempts(changes)

    def _landed(self, session: str, slots: list[Slot]) -> dict[tuple[int, str], int | None]:
        """(round, client) of these slots whose client has an update stored
        (an earlier attempt landed late, or the running hedge stored it), and
        the attempt that stored it: one query per round for a whole tracking
        pass, not one per failed attempt."""
        by_round: dict[int, list[str]] = {}
        for s in slots:
            by_round.setdefault(s.round, []).append(s.client)
        return {(r, c): attempt for r, clients in by_round.items()
                for c, attempt in self.store.storing_attempts(session, r, clients).items()}

    # ------------------------------------------------------------------ client attempts
    def submit(self, session: str, rnd: int, table: AttemptTable, ready: list[Slot], *,
               function: str = "fl_client", payload_of: Callable[[Slot], dict[str, Any]] | None = None,
               record: dict[str, Any] | None = None) -> None:
        """Invoke slots whose attempt numbers were taken (table.begin): their
        records in one write first, then the invocations, the clusters' in
        turn. Each payload carries `payload_of(slot)` (by default the slot's
        client) and its attempt number; `record`: fields every attempt
        record also gets (a secure-aggregation stage's name). Only fl_client
        is relayed through fl_invoker."""
        if not ready:
            return
        payload_of = payload_of or (lambda s: {"client": s.client})
        relayed = (lambda s: self.platforms.via_invoker(s.cluster)) if function == "fl_client" \
            else (lambda s: False)
        now = self.clock()
        docs = []
        for s in ready:
            s.doc_id = ObjectId()
            docs.append({"_id": s.doc_id, "session": session, "round": rnd, "client": s.client,
                         "attempt": s.attempt, "cluster": s.cluster,
                         "platform": self.platforms.provider(s.cluster).platform,
                         "function": function, "memory_mb": self.platforms.spec(s.cluster, function).memory_mb,
                         "state": "submitting", "submitted": now,
                         "via": "invoker" if relayed(s) else "direct", **(record or {})})
        self.insert_attempts(docs)

        def invoke(s: Slot):
            payload = self.platforms.payload(function=function, session=session, round=rnd, **payload_of(s),
                                             attempt=s.attempt)
            try:
                return s, self.platforms.provider(s.cluster).invoke(function, payload), None
            except ProviderError as exc:
                return s, None, exc

        direct = across_clusters([s for s in ready if not relayed(s)])
        results = []
        if direct:
            results = self.invoke_each(invoke, direct)
        results += self._submit_via_invoker(session, rnd, [s for s in ready if relayed(s)])
        changes = []
        unreachable: dict[str, str] = {}
        for s, inv, err in results:
            if inv is not None:
                table.started(s, inv, self.platforms.spec(s.cluster, function).timeout_s)
                self.running_marks.hold(s.doc_id, session, {"state": "running", "platform_id": inv.platform_id,
                                                            "submitted": inv.submitted_at})
                continue
            changes.append((s.doc_id, {"state": "failed", "error_class": err.error_class.value,
                                       "error": str(err), "finished": self.clock()}))
            reached = err.error_class != ErrorClass.UNREACHABLE
            verdict = table.failed(s, err.error_class, str(err), err.retry_after, reached=reached)
            if not reached:
                unreachable[s.cluster] = str(err)
                s.next_try = max(s.next_try, self.clusters.next_probe(s.cluster))
            if verdict.redeploy:
                self.platforms.redeploy(s.cluster, function)
        self.update_attempts(changes)
        for cluster, error in unreachable.items():
            self.clusters.failed(cluster, error)
            for s in ready:
                if s.cluster == cluster and s.state == "waiting":
                    s.next_try = max(s.next_try, self.clusters.next_probe(cluster))
        # An accepted invocation does not clear an outage: HTTP platforms
        # accept on this side and report the refused connection as its outcome.

    def _submit_via_invoker(self, session: str, rnd: int, slots: list[Slot]):
        """Hand a cluster's clients to fl_invoker, which invokes them inside
        the cluster and writes each platform id on the attempt document."""
        out = []
        by_cluster: dict[str, list[Slot]] = {}
        for s in slots:
            by_cluster.setdefault(s.cluster, []).append(s)
        for cluster, group in by_cluster.items():
            for i in range(0, len(group), self.INVOKER_BATCH):
                batch = group[i:i + self.INVOKER_BATCH]
                calls = [self.platforms.payload(function="fl_client", session=session, round=rnd,
                                                client=s.client, attempt=s.attempt) for s in batch]
                try:
                    res = self.call(cluster, session, rnd, "fl_invoker", target="fl_client", calls=calls)
                except SessionError as exc:
                    res, error = None, exc
                docs = self.store.attempts_by_id([s.doc_id for s in batch])
                # What fl_invoker wrote itself on the attempts it invoked (even
                # when its call then failed), copied to the round's records.
                self.round_records.changed(
                    [(s.doc_id, {k: docs[s.doc_id][k] for k in INVOKER_FIELDS if k in docs[s.doc_id]})
                     for s in batch if docs.get(s.doc_id, {}).get("platform_id")])
                if res is None:
                    out += [(s, None, ProviderError(ErrorClass.PLATFORM_ERROR, str(error))) for s in batch]
                    continue
                failed = {f["client"]: f.get("error", "failed") for f in res.get("failed", [])}
                for s in batch:
                    pid = docs.get(s.doc_id, {}).get("platform_id")
                    if pid and s.client not in failed:
                        out.append((s, Invocation("fl_client", pid, self.clock()), None))
                    else:
                        out.append((s, None, ProviderError(ErrorClass.PLATFORM_ERROR,
                                                           f"fl_invoker: {failed.get(s.client, 'no platform id')}")))
        return out

    def track(self, session: str, tables: Sequence[AttemptTable], start_hedges: bool = True) -> None:
        """Ask each cluster how the running attempts went, record the
        outcomes and move each slot on: delivered, waiting for a retry, or
        failed for good; an attempt past its own deadline is timed out.
        Stragglers are hedged unless `start_hedges` is false (a sync round
        past its deadline, whose running attempts are abandoned next)."""
        running = [(t, s) for t in tables for s in t if s.state == RUNNING]
        by_cluster: dict[str, list[tuple[AttemptTable, Slot]]] = {}
        for t, s in running:
            by_cluster.setdefault(s.cluster, []).append((t, s))
        changes: list[tuple[Any, dict[str, Any]]] = []
        # Judged after the outcomes are recorded: a cluster given up
        # (ClusterLost) must not take what it did answer with it.
        verdicts: list[tuple[str, str | None]] = []
        for cluster, group in by_cluster.items():
            if not self.clusters.may_probe(cluster):
                continue
            provider = self.platforms.provider(cluster)
            try:
                pending = [s.inv for _, s in group]
                lost_ids = set(provider.lost_invocations(pending)) | self.clusters.lost_by_restart(cluster, pending)
                outcomes = provider.track([s.inv for _, s in group if s.inv.platform_id not in lost_ids])
            except ProviderError as exc:
                verdicts.append((cluster, str(exc)))
                continue
            if lost_ids:
                lost = [(t, s) for t, s in group if s.inv.platform_id in lost_ids]
                log.warning("cluster %s does not know %d running attempt(s) (its service restarted); "
                            "invoking them again", cluster, len(lost))
                self._record_lost(lost, "unknown to the platform (its service restarted); invoked again")
            unreachable, answered = None, not outcomes
            by_id = {s.inv.platform_id: (t, s) for t, s in group if s.inv is not None}
            landed = self._landed(session, [by_id[o.platform_id][1] for o in outcomes
                                            if o.platform_id in by_id and not succeeded(o)])
            for out in outcomes:
                hit = by_id.get(out.platform_id)
                if hit is None:
                    continue
                table, s = hit
                fields = outcome_fields(out, self.clock())
                # HTTP platforms report a refused connection per invocation.
                reached = out.error_class != ErrorClass.UNREACHABLE
                answered = answered or reached
                if fields["state"] == "succeeded" and (out.result or {}).get("duplicate"):
                    # Another attempt of the client stored its update first.
                    settled = self.hedger.own_attempt_refused(table, s, fields, out.result)
                    if settled is not None:
                        changes += settled
                        continue
                if out.error_class == ErrorClass.PLATFORM_ERROR and s.running_attempt \
                        and landed.get((s.round, s.client), 0) == s.running_attempt:
                    # It stored its client's update: it did its work, only
                    # its answer did not come (lost with the keeper that
                    # sent it, say). Not a failure of its client or cluster
                    # (status, reliability and reports count it done).
                    fields.update(state="succeeded", stored_update=True, error_class=None,
                                  error=f"its answer did not come ({fields['error'] or 'platform error'}); "
                                        "its update is stored")
                changes.append((s.doc_id, fields))
                if fields["state"] == "succeeded":
                    changes += self.hedger.own_attempt_delivered(s)
                    table.delivered(s, out.result, out.cold_start)
                    continue
                if (s.round, s.client) in landed:
                    # A failed attempt whose client has an update stored needs no retry.
                    changes += self.hedger.update_found_stored(table, s, landed[(s.round, s.client)], out)
                    continue
                if table.promote_hedge(s):
                    continue  # its speculative attempt runs on as the slot's
                verdict = table.failed(s, out.error_class or ErrorClass.APPLICATION_ERROR,
                                       fields["error"] or "failed", out.retry_after, reached=reached)
                if not reached:
                    unreachable = fields["error"] or "unreachable"
                    s.next_try = max(s.next_try, self.clusters.next_probe(cluster))
                if verdict.redeploy:
                    self.platforms.redeploy(s.cluster, s.function)
            verdicts.append((cluster, None if answered else unreachable))
        now = self.clock()
        overdue = [(table, s) for table in tables for s in table.overdue()]
        landed = self._landed(session, [s for _, s in overdue])
        for table, s in overdue:
            # The platform never reported: treat as lost and retry. If
            # the lost attempt still lands, the unique update key keeps
            # it from counting twice.
            changes.append((s.doc_id, {"state": "timed_out", "error_class": "timeout",
                                       "error": "no outcome within the function timeout plus grace",
                                       "finished": now}))
            if (s.round, s.client) in landed:
                # Delivered, but when is not known: nothing for the peers'
                # durations (the wait here is the timeout, not the run).
                changes += self.hedger.update_found_stored(table, s, landed[(s.round, s.client)])
            elif table.promote_hedge(s):
                pass
            else:
                table.failed(s, ErrorClass.TIMEOUT, "no outcome within timeout + grace")
        self.update_attempts(changes)
        for cluster, error in verdicts:
            if error is None:
                self.clusters.answered(cluster)
                continue
            self.clusters.failed(cluster, error)
            probe = self.clusters.next_probe(cluster)
            for _, s in running:
                if s.cluster == cluster and s.state == "waiting":
                    s.next_try = max(s.next_try, probe)
        self.hedger.track(session, tables, outcome_fields)
        if start_hedges:
            self.hedger.start(session, tables)

    # ------------------------------------------------------------------ helper calls
    def call(self, cluster: str, session: str, rnd: int, function: str, *, slot_name: str | None = None,
             rng: random.Random | None = None, stop: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        """Invoke a helper function (init, aggregator, combiner, invoker) and
        wait for it, with the same bounded retries (helper_calls.py)."""
        return call_helper(self, cluster, session, rnd, function, slot_name=slot_name, rng=rng, stop=stop,
                           **args)
