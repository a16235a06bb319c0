"""The round loop: selection, dispatch, tracking, bounded retries, quorum,
aggregation, stopping and resuming.

State lives in the store, not in this process: every attempt is a document
written as it happens, updates are keyed by (session, round, client), and a
round is `running` -> `aggregating` -> `done`. A keeper killed at any point is
resumed from those documents (`fedkeeper start --resume SESSION`).
"""
from __future__ import annotations

import csv
import logging
import math
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from bson import ObjectId

from flcommon import store as fs
from flcommon.auth import signed

from .providers import ErrorClass, Invocation, Outcome, Provider, ProviderError
from .runtime import Placement, Runtime
from .logs import log_dir

log = logging.getLogger("fedkeeper.keeper")


class SessionError(RuntimeError):
    """A session cannot go on (quorum not met, init or aggregation failed)."""


@dataclass
class Slot:
    """One selected client in one round."""

    client: str
    cluster: str
    attempt: int = 0
    state: str = "waiting"          # waiting | running | delivered | failed
    next_try: float = 0.0
    inv: Invocation | None = None
    doc_id: ObjectId | None = None
    deadline: float = 0.0           # per-attempt: function timeout + grace
    last_error: str | None = None
    result: dict[str, Any] | None = None


@dataclass
class RoundReport:
    round: int
    selected: int
    delivered: int
    failed: int
    retries: int
    seconds: float
    accuracy: float | None = None
    loss: float | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SessionSummary:
    session: str
    state: str
    rounds: list[RoundReport]
    message: str = ""

    @property
    def final_accuracy(self) -> float | None:
        for r in reversed(self.rounds):
            if r.accuracy is not None:
                return r.accuracy
        return None


Progress = Callable[[str, dict[str, Any]], None]


def new_session_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _round_csv(session: str, rnd: int, attempts: list[dict[str, Any]]) -> None:
    d = log_dir() / session
    d.mkdir(parents=True, exist_ok=True)
    cols = ["client_id", "cluster", "platform", "platform_id", "attempt", "start", "end",
            "duration_ms", "status", "error_class", "cold_start"]
    with open(d / f"round_{rnd:03d}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for a in attempts:
            w.writerow([a.get("client"), a.get("cluster"), a.get("platform"), a.get("platform_id"),
                        a.get("attempt"), a.get("start"), a.get("end"), a.get("duration_ms"),
                        a.get("state"), a.get("error_class"), a.get("cold_start")])


class Keeper:
    def __init__(self, rt: Runtime, progress: Progress | None = None):
        self.rt = rt
        self.store = rt.open_store()
        self.training = rt.scenario.training
        self.progress = progress or (lambda kind, data: None)
        self.client_cluster = rt.client_clusters()
        self.server = rt.server_cluster()
        self._rng = random.Random()
        self._specs: dict[tuple[str, str], Any] = {}
        # Called once per attempt that ends: (cluster, platform, state,
        # error_class, duration_s, cold_start, function=...), e.g. metrics.
        self.attempt_ended: Callable[..., None] | None = None
        self._attempt_where: dict[Any, tuple[str, str, str]] = {}

    # ------------------------------------------------------------------ attempt records
    def _insert_attempts(self, docs: list[dict[str, Any]]) -> None:
        for d in docs:
            self._attempt_where[d["_id"]] = (d["cluster"], d["platform"], d["function"])
        self.store.insert_attempts(docs)

    def _update_attempts(self, changes: list[tuple[Any, dict[str, Any]]]) -> None:
        self.store.update_attempts(changes)
        if self.attempt_ended is None:
            return
        for doc_id, fields in changes:
            where = self._attempt_where.get(doc_id)
            if where and fields.get("state") in ("succeeded", "failed", "timed_out", "abandoned"):
                d = fields.get("duration_ms")
                self.attempt_ended(where[0], where[1], fields["state"], fields.get("error_class"),
                                   d / 1000 if d is not None else None, fields.get("cold_start"),
                                   function=where[2])

    # ------------------------------------------------------------------ helpers
    def _spec(self, cluster: str, function: str):
        key = (cluster, function)
        if key not in self._specs:
            section = self.rt.cfg.providers.clusters()[cluster][0]
            self._specs[key] = self.rt.function_spec(function, section)
        return self._specs[key]

    def _payload(self, **ids: Any) -> dict[str, Any]:
        return signed(self.rt.secret, ids)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        r = self.training.retries
        base = min(r.backoff_max_s, r.backoff_s * (2 ** max(0, attempt - 1)))
        delay = base * (1 + r.jitter * (2 * self._rng.random() - 1))
        return max(delay, retry_after or 0.0)

    def _session_spec(self) -> dict[str, Any]:
        s = self.rt.scenario
        ds, data, mp = s.data_sampling, s.training_test_data, s.model_params
        return {
            "model": ds.model,
            "data": data.model_dump(exclude_none=True),
            "partition": {"method": ds.partition, "alpha": ds.dirichlet_alpha,
                          "shards_per_client": ds.shards_per_client},
            "clients": sorted(self.client_cluster, key=lambda c: int(c.split("_")[1])),
            "seed": self.training.seed,
            "optim": mp.optim, "lr": mp.lr, "momentum": mp.momentum,
            "local_epochs": mp.local_epochs, "batch_size": ds.batch_size,
            "strategy": self.training.strategy.model_dump(),
            "mode": self.training.mode,
            "staleness_tolerance": self.training.staleness_tolerance,
            "staleness_exponent": self.training.staleness_exponent,
        }

    # ------------------------------------------------------------------ deploy
    def deploy(self) -> list[Placement]:
        placements = self.rt.training_placements()
        results = self.rt.deploy(placements, on_done=lambda pl, res, err: self.progress(
            "deployed", {"cluster": pl.cluster, "function": pl.spec.name,
                         "skipped": getattr(res, "skipped", None), "error": err}))
        failed = [(pl, err) for pl, _, err in results if err is not None]
        if failed:
            raise SessionError("deployment failed: " + "; ".join(
                f"{pl.spec.name} on {pl.cluster}: {err}" for pl, err in failed))
        return placements

    # ------------------------------------------------------------------ session
    def start(self, resume: str | None = None, deploy: bool = True,
              session_id: str | None = None) -> SessionSummary:
        self._check_invocation_modes()
        if deploy:
            self.deploy()
        if resume:
            doc = self.store.session(resume)
            if doc is None:
                raise SessionError(f"no session {resume!r} in the store")
            if doc.get("state") == "finished":
                raise SessionError(f"session {resume} already finished")
            session = resume
            self.store.event(session, "resumed", "keeper resumed the session")
        else:
            session = session_id or new_session_id(self.rt.cfg.name)
            self.store.create_session({
                "_id": session, "name": self.rt.cfg.name, "scenario": self.rt.scenario_name,
                "spec": self._session_spec(), "training": self.training.model_dump(),
                "clusters": self.client_cluster, "server_cluster": self.server,
            })
        self.store.update_session(session, state="running")
        self._warn_capacity(session)
        self.progress("session", {"session": session, "resumed": bool(resume)})
        log.info("session %s %s", session, "resumed" if resume else "started")
        reports: list[RoundReport] = []
        try:
            self._init(session)
            rnd = 0
            done = [r for r in self.store.rounds(session) if r.get("state") == "done"]
            if done:
                rnd = max(r["round"] for r in done) + 1
                last = max(done, key=lambda r: r["round"])
                if self._reached_target(last.get("accuracy")):
                    rnd = self.training.rounds
            while rnd < self.training.rounds:
                rep = self._run_round(session, rnd)
                reports.append(rep)
                if self._reached_target(rep.accuracy):
                    break
                rnd += 1
        except SessionError as exc:
            self.store.update_session(session, state="failed", error=str(exc), ended=time.time())
            self.store.event(session, "failed", str(exc))
            log.error("session %s failed: %s", session, exc)
            return SessionSummary(session, "failed", reports, str(exc))
        acc = reports[-1].accuracy if reports else None
        self.store.update_session(session, state="finished", ended=time.time(), final_accuracy=acc)
        self.store.event(session, "finished", f"finished after {len(reports)} rounds this run")
        return SessionSummary(session, "finished", reports)

    def _check_invocation_modes(self) -> None:
        for cluster in dict.fromkeys(self.client_cluster.values()):
            if self._via_invoker(cluster) and not self.rt.provider(cluster).tracks_foreign_invocations:
                raise SessionError(f"cluster {cluster}: invocation: via_invoker needs a platform whose "
                                   f"invocations can be tracked by id ({self.rt.provider(cluster).platform} "
                                   "cannot); use invocation: direct")

    def _warn_capacity(self, session: str) -> None:
        """Warn once per session when a round could exceed a cluster's limits."""
        k = self.rt.scenario.clients_info.num_clients_per_round
        per_cluster: dict[str, int] = {}
        for c in self.client_cluster.values():
            per_cluster[c] = per_cluster.get(c, 0) + 1
        for cluster, n in per_cluster.items():
            warning = self.rt.provider(cluster).capacity_warning(min(n, k))
            if warning:
                log.warning(warning)
                self.store.event(session, "capacity", warning, cluster=cluster)
                self.progress("warning", {"message": warning})

    def _reached_target(self, acc: float | None) -> bool:
        t = self.training.target_accuracy
        return t is not None and acc is not None and acc >= t

    # ------------------------------------------------------------------ server calls
    def _server_call(self, session: str, rnd: int, function: str, **args: Any) -> dict[str, Any]:
        return self._call(self.server, session, rnd, function, **args)

    def _call(self, cluster: str, session: str, rnd: int, function: str, **args: Any) -> dict[str, Any]:
        """Invoke a helper function (init, aggregator, invoker) and wait, with
        the same bounded retries; every attempt is recorded."""
        provider = self.rt.provider(cluster)
        spec = self._spec(cluster, function)
        r = self.training.retries
        last = ""
        # A resumed keeper continues the attempt numbering of the one it replaces.
        done_before = [a["attempt"] for a in self.store.db[fs.INVOCATIONS].find(
            {"session": session, "round": rnd, "client": f"_{function}"}, {"attempt": 1})]
        first = max(done_before, default=0) + 1
        attempt = first
        for attempt in range(first, first + r.max_attempts):
            payload = self._payload(function=function, session=session, round=rnd, client=None,
                                    attempt=attempt, **args)
            doc = {"_id": ObjectId(), "session": session, "round": rnd, "client": f"_{function}",
                   "attempt": attempt, "cluster": cluster, "platform": provider.platform,
                   "function": function, "state": "submitting", "submitted": time.time()}
            self._insert_attempts([doc])
            try:
                out = provider.call(function, payload, timeout_s=spec.timeout_s + self.training.attempt_grace_s)
            except ProviderError as exc:
                out = Outcome(platform_id="", ok=False, error_class=exc.error_class, error=str(exc))
                if exc.error_class == ErrorClass.FUNCTION_MISSING:
                    self._redeploy(cluster, function)
            self._update_attempts([(doc["_id"], self._outcome_fields(out))])
            if out.ok and out.result and "error" not in out.result:
                return out.result
            last = out.error or (out.result or {}).get("error") or "failed"
            log.warning("%s round %d attempt %d failed: %s", function, rnd, attempt, last)
            if out.error_class is not None and not out.error_class.retryable:
                break
            time.sleep(self._backoff(attempt - first + 1, None))
        raise SessionError(f"{function} failed for round {rnd} after {attempt - first + 1} attempt(s): {last}")

    def _init(self, session: str) -> None:
        if self.store.model(session, 0) is not None:
            return
        self.progress("init", {"session": session})
        res = self._server_call(session, 0, "fl_server_init")
        self.store.event(session, "initialised", "data partitioned and round-0 model stored",
                         result=res)

    def _redeploy(self, cluster: str, function: str) -> None:
        section = self.rt.cfg.providers.clusters()[cluster][0]
        pl = Placement(cluster, section, self._spec(cluster, function))
        self.rt.deploy([pl])

    @staticmethod
    def _outcome_fields(out: Outcome) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "platform_id": out.platform_id or None,
            "state": "succeeded" if out.ok and not (out.result or {}).get("error") else "failed",
            "error_class": out.error_class.value if out.error_class else None,
            "error": out.error or (out.result or {}).get("error"),
            "start": out.start, "end": out.end, "duration_ms": out.duration_ms,
            "wait_ms": out.wait_ms, "init_ms": out.init_ms, "cold_start": out.cold_start,
            "finished": time.time(),
        }
        res = out.result or {}
        summary = {k: res[k] for k in ("num_examples", "metrics", "timings", "duplicate") if k in res}
        if summary:
            fields["result"] = summary
        return fields

    # ------------------------------------------------------------------ one round
    def _select(self, rnd: int) -> list[str]:
        clients = sorted(self.client_cluster, key=lambda c: int(c.split("_")[1]))
        k = self.rt.scenario.clients_info.num_clients_per_round
        rng = np.random.default_rng([self.training.seed, rnd])
        return sorted(rng.choice(clients, size=k, replace=False).tolist(),
                      key=lambda c: int(c.split("_")[1]))

    def _adopt(self, session: str, rnd: int, selected: list[str]) -> dict[str, Slot]:
        """Rebuild the round's slots from the store (fresh round or resume)."""
        slots = {c: Slot(c, self.client_cluster[c]) for c in selected}
        delivered = self.store.delivered_clients(session, rnd)
        now = time.time()
        for a in self.store.attempts(session, rnd):
            s = slots.get(a["client"])
            if s is None:
                continue
            s.attempt = max(s.attempt, a["attempt"])
            if a["attempt"] == s.attempt:
                s.doc_id = a["_id"]
                self._attempt_where[a["_id"]] = (a["cluster"], a.get("platform", ""), a.get("function", ""))
                if a.get("state") == "running" and a.get("platform_id"):
                    spec = self._spec(s.cluster, "fl_client")
                    s.inv = Invocation("fl_client", a["platform_id"], a.get("submitted", now))
                    s.state = "running"
                    s.deadline = a.get("submitted", now) + spec.timeout_s + self.training.attempt_grace_s
                elif a.get("state") == "succeeded":
                    s.state = "delivered"
        for c in delivered:
            # A running attempt is still tracked to its end (its record is
            # wanted); anything else with a stored update has delivered.
            if c in slots and slots[c].state != "running":
                slots[c].state = "delivered"
        for s in slots.values():
            if s.state == "waiting" and s.attempt >= self.training.retries.max_attempts:
                s.state = "failed"
        return slots

    def _submit(self, session: str, rnd: int, ready: list[Slot]) -> None:
        """Write attempt documents first, then invoke, so a killed keeper
        leaves a trace of everything it may have started."""
        now = time.time()
        docs = []
        for s in ready:
            s.attempt += 1
            s.doc_id = ObjectId()
            prov = self.rt.provider(s.cluster)
            docs.append({"_id": s.doc_id, "session": session, "round": rnd, "client": s.client,
                         "attempt": s.attempt, "cluster": s.cluster, "platform": prov.platform,
                         "function": "fl_client", "state": "submitting", "submitted": now,
                         "via": "invoker" if self._via_invoker(s.cluster) else "direct"})
        self._insert_attempts(docs)

        def invoke(s: Slot):
            payload = self._payload(function="fl_client", session=session, round=rnd,
                                    client=s.client, attempt=s.attempt)
            try:
                return s, self.rt.provider(s.cluster).invoke("fl_client", payload), None
            except ProviderError as exc:
                return s, None, exc

        changes = []
        direct = [s for s in ready if not self._via_invoker(s.cluster)]
        results = []
        if direct:
            with ThreadPoolExecutor(max_workers=min(16, len(direct))) as ex:
                results = list(ex.map(invoke, direct))
        results += self._submit_via_invoker(session, rnd, [s for s in ready if self._via_invoker(s.cluster)])
        for s, inv, err in results:
            if inv is not None:
                spec = self._spec(s.cluster, "fl_client")
                s.inv, s.state = inv, "running"
                s.deadline = time.time() + spec.timeout_s + self.training.attempt_grace_s
                changes.append((s.doc_id, {"state": "running", "platform_id": inv.platform_id,
                                           "submitted": inv.submitted_at}))
            else:
                changes.append((s.doc_id, {"state": "failed", "error_class": err.error_class.value,
                                           "error": str(err), "finished": time.time()}))
                self._failed_attempt(s, err.error_class, str(err), err.retry_after)
        self._update_attempts(changes)

    def _has_update(self, session: str, rnd: int, client: str) -> bool:
        return self.store.db[fs.UPDATES].find_one(
            {"session": session, "round": rnd, "client": client}, {"_id": 1}) is not None

    def _via_invoker(self, cluster: str) -> bool:
        return getattr(self.rt.cfg.providers.clusters()[cluster][1], "invocation", "direct") == "via_invoker"

    INVOKER_BATCH = 40  # client payloads per fl_invoker call: keeps its payload small

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
                calls = [self._payload(function="fl_client", session=session, round=rnd, client=s.client,
                                       attempt=s.attempt) for s in batch]
                try:
                    res = self._call(cluster, session, rnd, "fl_invoker", target="fl_client", calls=calls)
                except SessionError as exc:
                    out += [(s, None, ProviderError(ErrorClass.PLATFORM_ERROR, str(exc))) for s in batch]
                    continue
                failed = {f["client"]: f.get("error", "failed") for f in res.get("failed", [])}
                docs = {d["_id"]: d for d in self.store.db[fs.INVOCATIONS].find(
                    {"_id": {"$in": [s.doc_id for s in batch]}})}
                for s in batch:
                    pid = docs.get(s.doc_id, {}).get("platform_id")
                    if pid and s.client not in failed:
                        out.append((s, Invocation("fl_client", pid, time.time()), None))
                    else:
                        out.append((s, None, ProviderError(ErrorClass.PLATFORM_ERROR,
                                                           f"fl_invoker: {failed.get(s.client, 'no platform id')}")))
        return out

    def _failed_attempt(self, s: Slot, ec: ErrorClass | None, error: str,
                        retry_after: float | None = None) -> None:
        s.inv = None
        s.last_error = f"{ec.value if ec else 'error'}: {error}"
        if ec == ErrorClass.FUNCTION_MISSING:
            self._redeploy(s.cluster, "fl_client")
        if (ec is not None and not ec.retryable) or s.attempt >= self.training.retries.max_attempts:
            s.state = "failed"
        else:
            s.state = "waiting"
            s.next_try = time.monotonic() + self._backoff(s.attempt, retry_after)

    def _run_round(self, session: str, rnd: int) -> RoundReport:
        t0 = time.time()
        existing = self.store.round(session, rnd)
        selected = existing["selected"] if existing else self._select(rnd)
        if existing and existing.get("state") == "aggregating":
            included = existing["included"]
            slots = self._adopt(session, rnd, selected)
        else:
            self.store.upsert_round(session, rnd, selected=selected, state="running",
                                    started=existing.get("started", t0) if existing else t0)
            slots = self._adopt(session, rnd, selected)
            included = self._dispatch(session, rnd, slots)
            quorum = math.ceil(self.training.quorum * len(selected))
            if len(included) < quorum:
                failures = "; ".join(f"{s.client}: {s.last_error}" for s in slots.values()
                                     if s.state != "delivered")
                self.store.upsert_round(session, rnd, state="failed", ended=time.time(),
                                        included=included)
                _round_csv(session, rnd, self.store.attempts(session, rnd))
                raise SessionError(f"round {rnd}: only {len(included)} of {len(selected)} clients "
                                   f"delivered, quorum needs {quorum} ({failures})")
            self.store.upsert_round(session, rnd, state="aggregating", included=included)
        self.progress("aggregating", {"round": rnd, "included": len(included)})
        res = self._server_call(session, rnd, "fl_server_aggregator", clients=included)
        attempts = self.store.attempts(session, rnd)
        retries = sum(1 for a in attempts if a["attempt"] > 1)
        failed = sum(1 for s in slots.values() if s.state == "failed")
        ended = time.time()
        self.store.upsert_round(session, rnd, state="done", ended=ended,
                                accuracy=res.get("accuracy"), loss=res.get("loss"),
                                accepted=res.get("accepted"), rejected=res.get("rejected", []),
                                retries=retries, failed=failed, delivered=len(included),
                                duration_s=ended - (existing or {}).get("started", t0))
        _round_csv(session, rnd, attempts)
        rep = RoundReport(rnd, len(selected), len(included), failed, retries, ended - t0,
                          res.get("accuracy"), res.get("loss"), res.get("rejected", []))
        self.progress("round", {"report": rep, "rounds": self.training.rounds})
        log.info("round %d: %d/%d delivered, %d retries, accuracy %s", rnd, len(included),
                 len(selected), retries, rep.accuracy)
        return rep

    def _dispatch(self, session: str, rnd: int, slots: dict[str, Slot]) -> list[str]:
        """Invoke, track and retry until every selected client has delivered
        or failed for good, or the round deadline passes."""
        deadline = time.monotonic() + self.training.round_deadline_s
        poll = 0.02
        while True:
            now = time.monotonic()
            ready = [s for s in slots.values() if s.state == "waiting" and s.next_try <= now]
            if ready and now < deadline:
                self._submit(session, rnd, ready)
            running = [s for s in slots.values() if s.state == "running"]
            by_cluster: dict[str, list[Slot]] = {}
            for s in running:
                by_cluster.setdefault(s.cluster, []).append(s)
            changes = []
            for cluster, group in by_cluster.items():
                provider: Provider = self.rt.provider(cluster)
                try:
                    outcomes = provider.track([s.inv for s in group])
                except ProviderError as exc:
                    log.warning("tracking on %s failed: %s", cluster, exc)
                    outcomes = []
                by_id = {s.inv.platform_id: s for s in group}
                for out in outcomes:
                    s = by_id.get(out.platform_id)
                    if s is None:
                        continue
                    fields = self._outcome_fields(out)
                    changes.append((s.doc_id, fields))
                    if fields["state"] == "succeeded" or self._has_update(session, rnd, s.client):
                        # A failed attempt whose client has an update stored
                        # (an earlier attempt landed late) needs no retry.
                        s.state, s.result, s.inv = "delivered", out.result, None
                    else:
                        self._failed_attempt(s, out.error_class or ErrorClass.APPLICATION_ERROR,
                                             fields["error"] or "failed", out.retry_after)
            wall = time.time()
            for s in running:
                if s.state == "running" and wall > s.deadline:
                    # The platform never reported: treat as lost and retry. If
                    # the lost attempt still lands, the unique update key keeps
                    # it from counting twice.
                    changes.append((s.doc_id, {"state": "timed_out", "error_class": "timeout",
                                               "error": "no outcome within the function timeout plus grace",
                                               "finished": wall}))
                    if self._has_update(session, rnd, s.client):
                        s.state, s.inv = "delivered", None
                    else:
                        self._failed_attempt(s, ErrorClass.TIMEOUT, "no outcome within timeout + grace")
            self._update_attempts(changes)
            counts = {k: sum(1 for s in slots.values() if s.state == k)
                      for k in ("delivered", "failed", "running", "waiting")}
            self.progress("tick", {"round": rnd, **counts,
                                   "retrying": sum(1 for s in slots.values() if s.attempt > 1
                                                   and s.state in ("running", "waiting"))})
            if counts["running"] == 0 and counts["waiting"] == 0:
                break
            if time.monotonic() >= deadline:
                log.warning("round %d deadline passed with %d running, %d waiting", rnd,
                            counts["running"], counts["waiting"])
                abandon = [(s.doc_id, {"state": "abandoned", "finished": time.time()})
                           for s in slots.values() if s.state == "running"]
                self._update_attempts(abandon)
                for s in slots.values():
                    if s.state in ("running", "waiting"):
                        s.state, s.last_error = "failed", s.last_error or "round deadline passed"
                break
            time.sleep(poll if counts["running"] else min(0.2, max(0.005, min(
                s.next_try for s in slots.values() if s.state == "waiting") - time.monotonic())))
        return sorted((s.client for s in slots.values() if s.state == "delivered"),
                      key=lambda c: int(c.split("_")[1]))
