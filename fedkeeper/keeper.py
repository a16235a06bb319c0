"""The round loop: selection, dispatch, tracking, bounded retries, quorum,
aggregation, stopping and resuming.

State lives in the store, not in this process: every attempt is a document
written as it happens, updates are keyed by (session, round, client), and a
round is `running` -> `aggregating` -> `done`. A keeper killed at any point is
resumed from those documents (`fedkeeper start --resume SESSION`).

Three round modes (`training.mode`, docs/round-modes.md):
  sync        a round waits for its clients: quorum plus deadline.
  semi_async  a round closes at quorum; attempts still running go on and
              their updates join a later round as stale updates, down-weighted
              by the aggregator, while at most `staleness_tolerance` rounds old.
  async       FedBuff: k invocations stay in flight, each training from the
              model current when it was made; the server steps every
              `buffer_size` updates ("round" R = the step from model R).
An update is aggregated at most once in every mode: the aggregator marks it
accepted with the round that used it and refuses it a second time.
"""
from __future__ import annotations

import contextlib
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
from flcommon.reliability import ENDED, client_stats, cluster_stats, reliability_score

from .providers import ErrorClass, Invocation, Outcome, Provider, ProviderError
from .runtime import OPTIONAL_FUNCTIONS, Placement, Runtime
from .logs import log_dir

log = logging.getLogger("fedkeeper.keeper")


class SessionError(RuntimeError):
    """A session cannot go on (quorum not met, init or aggregation failed)."""


class SessionInterrupted(Exception):
    """The user interrupted a running session (Ctrl-C). The session is marked
    `interrupted` in the store and can be resumed with `--resume SESSION`."""

    def __init__(self, session: str, rounds_done: int = 0):
        super().__init__(f"session {session} interrupted")
        self.session = session
        self.rounds_done = rounds_done


@dataclass
class Slot:
    """One selected client in one round."""

    client: str
    cluster: str
    round: int = 0                  # the model round the client trains from
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
    stale: int = 0                  # updates of earlier rounds aggregated in this one


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


def client_index(client: str) -> int:
    return int(client.split("_")[1])


def select_clients(candidates: list[str], k: int, rng: np.random.Generator,
                   scores: dict[str, float], exploration: float) -> tuple[list[str], list[str]]:
    """Reliability-based selection: (picked, explored).

    Most picks go to the best-scored candidates (ties broken at random); an
    `exploration` share is drawn at random from the others, so a client that
    failed early still gets the chances that would show it recovered, and
    never-tried clients get tried. The share is honoured in expectation when
    `exploration * k` is not whole (the fraction decides one extra pick).
    Deterministic for a given rng state, candidates and scores."""
    k = min(k, len(candidates))
    exact = exploration * k
    n_explore = int(math.floor(exact))
    if rng.random() < exact - n_explore:
        n_explore += 1
    n_explore = min(n_explore, k)
    order = rng.permutation(len(candidates))
    ranked = sorted((int(i) for i in order), key=lambda i: -scores.get(candidates[i], 0.0))
    best = [candidates[i] for i in ranked[:k - n_explore]]
    rest = [c for c in candidates if c not in set(best)]
    explored = rng.choice(rest, size=n_explore, replace=False).tolist() if n_explore else []
    return best + explored, explored


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
        # semi_async: attempts of closed rounds still running, tracked to
        # their end; their clients are not selected again meanwhile.
        self._stragglers: list[Slot] = []
        self._scores_for: tuple[Any, ...] = (None, None, {})  # (session, round, reliability scores)

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
        for pl, err in failed:
            if pl.spec.name in OPTIONAL_FUNCTIONS:
                # Training does not need it; `fedkeeper insights` deploys it again when asked.
                warning = f"{pl.spec.name} could not be deployed on {pl.cluster}: {err}"
                log.warning(warning)
                self.progress("warning", {"message": warning})
        failed = [(pl, err) for pl, err in failed if pl.spec.name not in OPTIONAL_FUNCTIONS]
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
            self._check_same_round_mode(doc)
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
            if self.training.mode == "async":
                self._run_async(session, rnd, reports)
            else:
                if self.training.mode == "semi_async":
                    self._stragglers = self._adopt_stragglers(session, rnd)
                with self._tracking_until_the_end(session, lambda: self._stragglers):
                    while rnd < self.training.rounds:
                        rep = self._run_round(session, rnd)
                        reports.append(rep)
                        if self._reached_target(rep.accuracy):
                            break
                        rnd += 1
                self._stragglers = []
            if self.training.mode != "sync":
                done = [r["round"] for r in self.store.rounds(session) if r.get("state") == "done"]
                self._mark_stale(session, max(done, default=-1) + 1)
        except SessionError as exc:
            self.store.update_session(session, state="failed", error=str(exc), ended=time.time())
            self.store.event(session, "failed", str(exc))
            log.error("session %s failed: %s", session, exc)
            return SessionSummary(session, "failed", reports, str(exc))
        acc = reports[-1].accuracy if reports else None
        self.store.update_session(session, state="finished", ended=time.time(), final_accuracy=acc)
        self.store.event(session, "finished", f"finished after {len(reports)} rounds this run")
        return SessionSummary(session, "finished", reports)

    def _check_same_round_mode(self, doc: dict[str, Any]) -> None:
        """A session keeps the round mode it started with: stragglers, stale
        updates and round documents only make sense under one mode."""
        stored = doc.get("spec") or {}
        tr = self.training
        for key, now in (("mode", tr.mode), ("staleness_tolerance", tr.staleness_tolerance)):
            if key in stored and stored[key] != now:
                raise SessionError(f"session {doc['_id']} was started with training.{key}: {stored[key]}, "
                                   f"the config now says {now}; resume it with the config it started with")

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
                   "function": function, "memory_mb": spec.memory_mb, "state": "submitting",
                   "submitted": time.time()}
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
    def _clients(self) -> list[str]:
        return sorted(self.client_cluster, key=client_index)

    def _select(self, session: str, rnd: int, candidates: list[str] | None = None,
                k: int | None = None, draw: int = 0) -> list[str]:
        """k clients of `candidates` (default: all) for round `rnd`; `draw`
        numbers the selections made for one round (async makes several).

        random: uniform, seeded by (seed, round[, draw]). reliability: by
        each client's reliability score over this session's ended attempts,
        with the `exploration` share at random (select_clients)."""
        clients = self._clients() if candidates is None else sorted(candidates, key=client_index)
        k = min(self.rt.scenario.clients_info.num_clients_per_round if k is None else k, len(clients))
        if k <= 0:
            return []
        seed = [self.training.seed, rnd] + ([draw] if draw else [])
        if self.training.selection == "reliability":
            rng = np.random.default_rng(seed + [1])
            picked, _ = select_clients(clients, k, rng, self._reliability_scores(session, rnd),
                                       self.training.exploration)
        else:
            picked = np.random.default_rng(seed).choice(clients, size=k, replace=False).tolist()
        return sorted(picked, key=client_index)

    def _reliability_scores(self, session: str, rnd: int) -> dict[str, float]:
        """client -> smoothed chance that its invocation finishes, from this
        session's own ended client attempts. A client's success rate is
        smoothed towards its cluster's score rather than a flat prior:
        crashes, timeouts and throttling are mostly the platform's doing, so
        a client seldom or never tried inherits what its cluster has shown.

        Read once per round: async tops up clients after every completion,
        and re-reading every attempt of the session each time would grow
        with the session's length."""
        if self._scores_for[:2] == (session, rnd):
            return self._scores_for[2]
        docs = list(self.store.db[fs.INVOCATIONS].find(
            {"session": session, "function": "fl_client", "state": {"$in": list(ENDED)}},
            {"client": 1, "cluster": 1, "state": 1, "error_class": 1, "cold_start": 1, "duration_ms": 1}))
        per_cluster = {c: reliability_score(st) for c, st in cluster_stats(docs).items()}
        per_client = client_stats(docs)
        scores = {c: reliability_score(per_client.get(c), prior=per_cluster.get(cluster, 0.5))
                  for c, cluster in self.client_cluster.items()}
        self._scores_for = (session, rnd, scores)
        return scores

    def _adopt(self, session: str, rnd: int, selected: list[str]) -> dict[str, Slot]:
        """Rebuild the round's slots from the store (fresh round or resume)."""
        slots = {c: Slot(c, self.client_cluster[c], rnd) for c in selected}
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
                         "function": "fl_client", "memory_mb": self._spec(s.cluster, "fl_client").memory_mb,
                         "state": "submitting", "submitted": now,
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
        """One sync or semi_async round."""
        t0 = time.time()
        semi = self.training.mode == "semi_async"
        existing = self.store.round(session, rnd)
        if existing:
            selected = existing["selected"]
        elif semi:
            selected = self._select(session, rnd, self._free_clients(session))
        else:
            selected = self._select(session, rnd)
        stale: list[dict[str, Any]] = []
        if existing and existing.get("state") == "aggregating":
            included = existing["included"]
            stale = existing.get("stale_included") or []
            slots = self._adopt(session, rnd, selected)
            if semi:  # the round closed before the keeper stopped: its running attempts straggle
                self._stragglers += [s for s in slots.values() if s.state == "running"]
        else:
            self.store.upsert_round(session, rnd, selected=selected, state="running", mode=self.training.mode,
                                    started=existing.get("started", t0) if existing else t0)
            slots = self._adopt(session, rnd, selected)
            quorum = math.ceil(self.training.quorum * len(selected))
            if semi:
                included = self._dispatch(session, rnd, slots, close_at=quorum)
                stale = self._stale_updates(session, rnd)
            else:
                included = self._dispatch(session, rnd, slots)
            # semi_async: stale updates count towards the quorum, as they
            # count in the aggregate.
            if len(included) + len(stale) < quorum or not (included or stale):
                failures = "; ".join(f"{s.client}: {s.last_error}" for s in slots.values()
                                     if s.state != "delivered")
                self.store.upsert_round(session, rnd, state="failed", ended=time.time(),
                                        included=included)
                _round_csv(session, rnd, self.store.attempts(session, rnd))
                extra = f" and {len(stale)} stale update(s) arrived" if semi else ""
                raise SessionError(f"round {rnd}: only {len(included)} of {len(selected)} clients "
                                   f"delivered{extra}, quorum needs {quorum} ({failures})")
            if semi:
                self._mark_stale(session, rnd)
                self.store.upsert_round(session, rnd, state="aggregating", included=included,
                                        stale_included=stale)
            else:
                self.store.upsert_round(session, rnd, state="aggregating", included=included)
        self.progress("aggregating", {"round": rnd, "included": len(included) + len(stale)})
        args: dict[str, Any] = {"clients": included}
        if semi:
            args["stale"] = stale
        res = self._server_call(session, rnd, "fl_server_aggregator", **args)
        attempts = self.store.attempts(session, rnd)
        retries = sum(1 for a in attempts if a["attempt"] > 1)
        failed = sum(1 for s in slots.values() if s.state == "failed")
        ended = time.time()
        extra_fields = {"stale_accepted": res.get("stale_accepted")} if semi else {}
        self.store.upsert_round(session, rnd, state="done", ended=ended,
                                accuracy=res.get("accuracy"), loss=res.get("loss"),
                                accepted=res.get("accepted"), rejected=res.get("rejected", []),
                                retries=retries, failed=failed, delivered=len(included),
                                duration_s=ended - (existing or {}).get("started", t0), **extra_fields)
        _round_csv(session, rnd, attempts)
        rep = RoundReport(rnd, len(selected), len(included), failed, retries, ended - t0,
                          res.get("accuracy"), res.get("loss"), res.get("rejected", []), stale=len(stale))
        self.progress("round", {"report": rep, "rounds": self.training.rounds})
        log.info("round %d: %d/%d delivered, %d stale, %d retries, accuracy %s", rnd, len(included),
                 len(selected), len(stale), retries, rep.accuracy)
        return rep

    def _dispatch(self, session: str, rnd: int, slots: dict[str, Slot],
                  close_at: int | None = None) -> list[str]:
        """Invoke, track and retry until every selected client has delivered
        or failed for good, or the round deadline passes.

        semi_async (`close_at` set): the round also closes once `close_at`
        clients have delivered, and attempts still running when it closes
        are not abandoned: they join the stragglers, tracked in later rounds."""
        deadline = time.monotonic() + self.training.round_deadline_s
        poll = 0.02
        while True:
            now = time.monotonic()
            ready = [s for s in slots.values() if s.state == "waiting" and s.next_try <= now]
            if ready and now < deadline:
                self._submit(session, rnd, ready)
            self._track(session, list(slots.values()) + self._stragglers)
            if self._stragglers:
                # An ended straggler is not retried: its round has closed.
                self._stragglers = [s for s in self._stragglers if s.state == "running"]
            counts = {k: sum(1 for s in slots.values() if s.state == k)
                      for k in ("delivered", "failed", "running", "waiting")}
            self.progress("tick", {"round": rnd, **counts,
                                   "retrying": sum(1 for s in slots.values() if s.attempt > 1
                                                   and s.state in ("running", "waiting"))})
            if counts["running"] == 0 and counts["waiting"] == 0:
                break
            if close_at is not None and counts["delivered"] >= close_at:
                break
            if time.monotonic() >= deadline:
                log.warning("round %d deadline passed with %d running, %d waiting", rnd,
                            counts["running"], counts["waiting"])
                if close_at is None:
                    abandon = [(s.doc_id, {"state": "abandoned", "finished": time.time()})
                               for s in slots.values() if s.state == "running"]
                    self._update_attempts(abandon)
                for s in slots.values():
                    if s.state == "waiting" or (s.state == "running" and close_at is None):
                        s.state, s.last_error = "failed", s.last_error or "round deadline passed"
                break
            time.sleep(poll if counts["running"] else min(0.2, max(0.005, min(
                s.next_try for s in slots.values() if s.state == "waiting") - time.monotonic())))
        if close_at is not None:
            for s in slots.values():
                if s.state == "running":
                    self._stragglers.append(s)
                elif s.state == "waiting":
                    s.state, s.last_error = "failed", s.last_error or "round closed before a retry"
        return sorted((s.client for s in slots.values() if s.state == "delivered"), key=client_index)

    def _track(self, session: str, slots: list[Slot]) -> None:
        """Ask each cluster how the running attempts went, record the
        outcomes and move each slot on: delivered, waiting for a retry, or
        failed for good; an attempt past its own deadline is timed out."""
        running = [s for s in slots if s.state == "running"]
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
                if fields["state"] == "succeeded" or self._has_update(session, s.round, s.client):
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
                if self._has_update(session, s.round, s.client):
                    s.state, s.inv = "delivered", None
                else:
                    self._failed_attempt(s, ErrorClass.TIMEOUT, "no outcome within timeout + grace")
        self._update_attempts(changes)

    # ------------------------------------------------------------------ stale updates, stragglers
    def _stale_updates(self, session: str, rnd: int) -> list[dict[str, Any]]:
        """Received, never aggregated updates of the `staleness_tolerance`
        rounds before `rnd`, as the aggregator's `stale` list."""
        lo = rnd - self.training.staleness_tolerance
        cur = self.store.db[fs.UPDATES].find(
            {"session": session, "status": "received", "round": {"$gte": lo, "$lt": rnd}},
            {"client": 1, "round": 1})
        return sorted(({"client": d["client"], "round": d["round"]} for d in cur),
                      key=lambda u: (u["round"], client_index(u["client"])))

    def _fresh_updates(self, session: str, rnd: int) -> list[str]:
        cur = self.store.db[fs.UPDATES].find({"session": session, "round": rnd, "status": "received"},
                                             {"client": 1})
        return sorted((d["client"] for d in cur), key=client_index)

    def _mark_stale(self, session: str, rnd: int) -> None:
        """Updates too old to join the aggregation of round `rnd` (or any
        later one) are marked stale: they are never aggregated."""
        lo = rnd - self.training.staleness_tolerance
        self.store.db[fs.UPDATES].update_many(
            {"session": session, "status": "received", "round": {"$lt": lo}},
            {"$set": {"status": "stale"}})

    def _adopt_stragglers(self, session: str, rnd: int) -> list[Slot]:
        """Client attempts of rounds before `rnd` still running (a resumed
        semi_async or async session): tracked on to their end."""
        out = []
        now = time.time()
        for a in self.store.db[fs.INVOCATIONS].find({"session": session, "state": "running",
                                                     "function": "fl_client", "round": {"$lt": rnd}}):
            if not a.get("platform_id"):
                continue
            spec = self._spec(a["cluster"], "fl_client")
            submitted = a.get("submitted", now)
            out.append(Slot(a["client"], a["cluster"], a["round"], attempt=a["attempt"], state="running",
                            inv=Invocation("fl_client", a["platform_id"], submitted), doc_id=a["_id"],
                            deadline=submitted + spec.timeout_s + self.training.attempt_grace_s))
            self._attempt_where[a["_id"]] = (a["cluster"], a.get("platform", ""), "fl_client")
        return out

    @contextlib.contextmanager
    def _tracking_until_the_end(self, session: str, running: Callable[[], list[Slot]]):
        """Abandon the attempts still running when the session ends, finished
        or failed. An interrupted keeper (Ctrl-C, a crash) leaves them as
        kill -9 would, `running`, so that --resume adopts them instead of
        invoking their clients again while they still run."""
        try:
            yield
        except SessionError:
            self._stop_tracking(session, running(), "the session ended")
            raise
        else:
            self._stop_tracking(session, running(), "the session ended")

    def _stop_tracking(self, session: str, slots: list[Slot], why: str) -> None:
        """Attempts still running when the session ends (finished or failed)
        are recorded as abandoned. An update one of them still stores is
        aggregated only if the session is resumed while it is recent enough."""
        now = time.time()
        changes = [(s.doc_id, {"state": "abandoned", "error": why, "finished": now})
                   for s in slots if s.state == "running"]
        self._update_attempts(changes)
        for s in slots:
            if s.state == "running":
                s.state, s.inv = "failed", None

    def _free_clients(self, session: str) -> list[str]:
        """semi_async: the clients not busy with a straggling attempt. When
        every client is busy, waits (at most the round deadline) for one."""
        deadline = time.monotonic() + self.training.round_deadline_s
        while True:
            busy = {s.client for s in self._stragglers}
            free = [c for c in self._clients() if c not in busy]
            if free or time.monotonic() >= deadline:
                return free
            self._track(session, self._stragglers)
            self._stragglers = [s for s in self._stragglers if s.state == "running"]
            time.sleep(0.05)

    # ------------------------------------------------------------------ async (FedBuff)
    def _run_async(self, session: str, version: int, reports: list[RoundReport]) -> None:
        """Server steps `version`, `version`+1, ... up to `training.rounds`.
        Jobs (one per client at most: a client trains one thing at a time)
        carry over from step to step; a resumed session adopts the attempts
        still running."""
        jobs = {s.client: s for s in self._adopt_stragglers(session, version)}
        with self._tracking_until_the_end(session, lambda: list(jobs.values())):
            while version < self.training.rounds:
                rep = self._async_step(session, version, jobs)
                reports.append(rep)
                if self._reached_target(rep.accuracy):
                    break
                version += 1

    def _async_step(self, session: str, v: int, jobs: dict[str, Slot]) -> RoundReport:
        """Model `v` is current: keep k invocations in flight (new ones train
        from model v), and once `buffer_size` updates have arrived aggregate
        round v: the updates trained from model v as `clients`, older ones
        within the staleness tolerance as `stale`."""
        t0 = time.time()
        tr = self.training
        k = self.rt.scenario.clients_info.num_clients_per_round
        buffer_size = tr.buffer_size or math.ceil(k / 2)
        existing = self.store.round(session, v)
        selected: list[str] = list(existing["selected"]) if existing else []
        started = existing.get("started", t0) if existing else t0
        if existing and existing.get("state") == "aggregating":
            fresh, stale = existing["included"], existing.get("stale_included") or []
            for c, s in self._adopt(session, v, selected).items():
                if s.state == "running" and c not in jobs:
                    jobs[c] = s
        else:
            self.store.upsert_round(session, v, selected=selected, state="running", mode="async",
                                    started=started)
            for c, s in self._adopt(session, v, selected).items():
                if s.state in ("running", "waiting") and c not in jobs:
                    jobs[c] = s
            self._fill_buffer(session, v, jobs, selected, buffer_size)
            fresh, stale = self._fresh_updates(session, v), self._stale_updates(session, v)
            self._mark_stale(session, v)
            self.store.upsert_round(session, v, state="aggregating", included=fresh, stale_included=stale)
        self.progress("aggregating", {"round": v, "included": len(fresh) + len(stale)})
        res = self._server_call(session, v, "fl_server_aggregator", clients=fresh, stale=stale)
        attempts = self.store.attempts(session, v)
        retries = sum(1 for a in attempts if a["attempt"] > 1)
        delivered = self.store.delivered_clients(session, v)
        failed = sum(1 for c in selected if c not in delivered and c not in jobs)
        ended = time.time()
        self.store.upsert_round(session, v, state="done", ended=ended,
                                accuracy=res.get("accuracy"), loss=res.get("loss"),
                                accepted=res.get("accepted"), rejected=res.get("rejected", []),
                                stale_accepted=res.get("stale_accepted"),
                                retries=retries, failed=failed, delivered=len(fresh),
                                duration_s=ended - started)
        _round_csv(session, v, attempts)
        rep = RoundReport(v, len(selected), len(fresh), failed, retries, ended - t0,
                          res.get("accuracy"), res.get("loss"), res.get("rejected", []), stale=len(stale))
        self.progress("round", {"report": rep, "rounds": tr.rounds})
        log.info("server step %d: %d fresh + %d stale updates, %d invoked, %d retries, accuracy %s",
                 v, len(fresh), len(stale), len(selected), retries, rep.accuracy)
        return rep

    def _buffered(self, session: str, v: int) -> int:
        """Updates that arrived and can still join the aggregation of round v."""
        return self.store.db[fs.UPDATES].count_documents(
            {"session": session, "status": "received",
             # $lt v+1, not $lte v: the embedded store reads $lte as $lt on a
             # field that a compound index continues past (README, "Design decisions").
             "round": {"$gte": v - self.training.staleness_tolerance, "$lt": v + 1}})

    def _fill_buffer(self, session: str, v: int, jobs: dict[str, Slot], selected: list[str],
                     buffer_size: int) -> None:
        """Invoke, track and retry (FedBuff's client side) until `buffer_size`
        updates can be aggregated. `selected` (clients invoked at version v)
        grows in place and is written to round v's document as it does."""
        tr = self.training
        k = self.rt.scenario.clients_info.num_clients_per_round
        deadline = time.monotonic() + tr.round_deadline_s
        # A client is invoked at most once per model version: its update key
        # (session, round, client) is unique.
        tried = set(selected) | self.store.delivered_clients(session, v)
        buffered = self._buffered(session, v)
        failed = 0  # jobs that failed for good during this step
        while True:
            now = time.monotonic()
            # Jobs too stale to be aggregated keep their client busy but not a slot.
            free = k - sum(1 for s in jobs.values() if s.round >= v - tr.staleness_tolerance)
            candidates = [c for c in self._clients() if c not in jobs and c not in tried]
            if free > 0 and candidates:
                pick = self._select(session, v, candidates, k=free, draw=len(selected))
                for c in pick:
                    jobs[c] = Slot(c, self.client_cluster[c], v)
                selected.extend(pick)
                tried.update(pick)
                self.store.upsert_round(session, v, selected=selected)
            if buffered >= buffer_size:
                # Checked after the top-up: clients that finished while the
                # last aggregation ran are replaced at once, even when their
                # updates already fill this buffer.
                break
            if not jobs:
                # Every client has been tried at this version and nothing is
                # in flight: no further update can arrive.
                if buffered:
                    log.warning("round %d: every client tried; aggregating %d of %d buffered updates",
                                v, buffered, buffer_size)
                    return
                raise SessionError(f"round {v}: every client was tried and none delivered an update")
            by_round: dict[int, list[Slot]] = {}
            for s in jobs.values():
                if s.state == "waiting" and s.next_try <= now:
                    by_round.setdefault(s.round, []).append(s)
            for rnd, ready in sorted(by_round.items()):
                if rnd < v - tr.staleness_tolerance:
                    # Its update could no longer be aggregated: not worth a retry.
                    for s in ready:
                        s.state, s.last_error = "failed", s.last_error or "too stale to retry"
                else:
                    self._submit(session, rnd, ready)
            self._track(session, list(jobs.values()))
            ended = [c for c, s in jobs.items() if s.state in ("delivered", "failed")]
            if any(jobs[c].state == "delivered" for c in ended):
                buffered = self._buffered(session, v)
            for c in ended:
                failed += jobs[c].state == "failed"
                del jobs[c]
            running = sum(1 for s in jobs.values() if s.state == "running")
            waiting = [s for s in jobs.values() if s.state == "waiting"]
            self.progress("tick", {"round": v, "delivered": buffered, "buffered": buffered,
                                   "buffer_size": buffer_size, "running": running, "waiting": len(waiting),
                                   "failed": failed, "retrying": sum(1 for s in jobs.values() if s.attempt > 1)})
            if buffered >= buffer_size:
                break
            if time.monotonic() >= deadline:
                if buffered:
                    log.warning("round %d deadline passed with %d of %d buffered updates; aggregating them",
                                v, buffered, buffer_size)
                    return
                raise SessionError(f"round {v}: no update arrived within the round deadline "
                                   f"({tr.round_deadline_s:g}s)")
            time.sleep(0.02 if running else min(0.2, max(0.005, min(
                (s.next_try for s in waiting), default=now + 0.05) - time.monotonic())))
