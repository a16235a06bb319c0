"""A training session: deploy, start or resume, run the round mode, and end
finished, failed, interrupted (Ctrl-C) or stopped by a lost service, always
with the store saying which and the session resumable unless finished."""
from __future__ import annotations

import logging
import math
import shlex
import threading
import time
from typing import Any, Callable, NoReturn

from ..privacy.rounds import RoundPrivacy, resume_refusal
from ..runtime import OPTIONAL_FUNCTIONS, Placement, Runtime
from ..store import HEARTBEAT_S, StoreUnavailable
from ..user_module import spec_entry as user_module_spec
from .attempts import RetryPolicy
from .dispatch import Dispatcher, Platforms
from .errors import ClusterLost, ServiceLost, SessionError, SessionInterrupted, SessionTakenOver
from .events import Progress, RoundEvents, RoundReport, SessionSummary, new_session_id, report_from_doc
from .modes import RoundContext, make_mode
from .output import RoundCsv, RunLog
from .selection import Selector, make_policy
from .session_owner import resume_blocked, this_keeper

log = logging.getLogger("fedkeeper.keeper")

#: How long the keeper waits for a store that stopped answering before it
#: stops (the session stays resumable).
STORE_PATIENCE_S = 60.0
#: How long a cluster may stay unreachable (its local service restarted
#: once when its provider owns one) before the keeper stops.
CLUSTER_PATIENCE_S = 60.0


class Heartbeat:
    """Writes `heartbeat` on the session document every HEARTBEAT_S while
    the keeper runs, so `status` can tell a live session from one whose
    keeper is gone (store.effective_state), and only while the session
    still names this keeper: a keeper cut off from the store for longer
    than STALE_AFTER_S may find it resumed by another when the store
    answers again, and `check` then stops this one (SessionTakenOver)."""

    def __init__(self, store: Any, session: str, keeper: dict[str, Any], every_s: float = HEARTBEAT_S):
        self.store, self.session, self.keeper, self.every_s = store, session, keeper, every_s
        self._stop = threading.Event()
        self._taken_by: Any = None   # the session's keeper once it is another one
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{session}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.store.heartbeat(self.session, timeout_s=self.every_s, keeper=self.keeper) is None:
                try:
                    doc = self.store.session(self.session) or {}
                except Exception:   # noqa: BLE001 - only for the message
                    doc = {}
                self._taken_by = doc.get("keeper") or {}
                return

    def check(self) -> None:
        """Raise SessionTakenOver once another keeper holds the session."""
        if self._taken_by is not None:
            raise SessionTakenOver(self.session, self._taken_by)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


class Keeper:
    def __init__(self, rt: Runtime, progress: Progress | None = None, *,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.rt = rt
        self.store = rt.open_store()
        self.store.patience_s = STORE_PATIENCE_S
        # An embedded store this runtime uses is started again, once per outage.
        self.store.patience.restart = rt.restart_store
        self.training = rt.scenario.training
        self.heartbeat_s = HEARTBEAT_S   # how often the session's heartbeat is written (and its keeper checked)
        self.progress: Progress = progress or (lambda kind, data: None)
        self.client_cluster = rt.client_clusters()
        self.server = rt.server_cluster()
        self.events = RoundEvents()
        # Rounds done in this run, counted before anyone else hears of one
        # (a Ctrl-C from the progress callback must not lose it).
        self._done_this_run = 0
        self.events.subscribe(self._count_round)
        # Read at every event: the CLI sets `keeper.progress` after construction.
        self.events.subscribe(lambda kind, data: self.progress(kind, data))
        self.events.subscribe(RunLog())
        self.platforms = Platforms(rt)
        self.dispatcher = Dispatcher(self.platforms, self.store, RetryPolicy.from_training(self.training),
                                     self.events, clock=clock, sleep=sleep,
                                     cluster_patience_s=CLUSTER_PATIENCE_S)
        ci = rt.scenario.clients_info
        per_round = ci.num_clients_per_round if ci is not None else 0
        self.selection = Selector(make_policy(self.training.selection, self.training, self.client_cluster,
                                              self.store), per_round)
        self.per_round = per_round
        # Differential privacy and secure aggregation; None when the session uses neither.
        self.privacy = RoundPrivacy.for_session(self.training, ci, self.dispatcher, self.store,
                                                self.client_cluster, self.events, failure=SessionError)

    def _count_round(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "round":
            self._done_this_run += 1

    @property
    def attempt_ended(self) -> Callable[..., None] | None:
        """Called once per attempt that ends (metrics); see Dispatcher."""
        return self.dispatcher.attempt_ended

    @attempt_ended.setter
    def attempt_ended(self, fn: Callable[..., None] | None) -> None:
        self.dispatcher.attempt_ended = fn

    # ------------------------------------------------------------------ deploy
    def deploy(self) -> list[Placement]:
        placements = self.rt.training_placements()
        results = self.rt.deploy(placements, on_done=lambda pl, res, err: self.events.emit(
            "deployed", cluster=pl.cluster, function=pl.spec.name,
            skipped=getattr(res, "skipped", None), error=err))
        failed = [(pl, err) for pl, _, err in results if err is not None]
        for pl, err in failed:
            if pl.spec.name in OPTIONAL_FUNCTIONS:
                # Training does not need it; `fedkeeper insights` deploys it again when asked.
                warning = f"{pl.spec.name} could not be deployed on {pl.cluster}: {err}"
                log.warning(warning)
                self.events.emit("warning", message=warning)
        failed = [(pl, err) for pl, err in failed if pl.spec.name not in OPTIONAL_FUNCTIONS]
        if failed:
            raise SessionError("deployment failed: " + "; ".join(
                f"{pl.spec.name} on {pl.cluster}: {err}" for pl, err in failed))
        return placements

    # ------------------------------------------------------------------ session
    def resume_hint(self, session: str) -> str:
        """The exact command that resumes `session`."""
        cfg = self.rt.cfg
        parts = ["fedkeeper", "start", "-c", str(cfg.source or "CONFIG")]
        if len(cfg.scenarios) > 1:
            parts += ["-s", self.rt.scenario_name]
        return shlex.join(parts + ["--resume", session])

    def start(self, resume: str | None = None, deploy: bool = True,
              session_id: str | None = None) -> SessionSummary:
        """Run a session to its end. Returns its summary when it finished or
        failed; raises SessionInterrupted (Ctrl-C) or ServiceLost (store or
        cluster gone), both leaving it resumable."""
        self.dispatcher.check_invocation_modes(self.client_cluster.values())
        opened = None
        if not resume:
            session_id = session_id or new_session_id(self.rt.cfg.name)
        try:
            if resume:
                self._resumable(resume)   # before deploying: a refusal should not wait for a deploy
            if deploy:
                self.deploy()
            self.dispatcher.round_records.clear()
            session = opened = self._open(resume, session_id)
            if not resume:   # nothing of it exists: its init call and first round are kept as written
                self.dispatcher.round_records.begin(session, 0)
            earlier = [report_from_doc(r) for r in self.store.rounds(session) if r.get("state") == "done"]
        except StoreUnavailable as exc:
            self._store_lost_before_the_rounds(exc, resume or opened, session_id)
        reports: list[RoundReport] = []
        self._done_this_run = 0
        csv = RoundCsv(session)
        self.events.subscribe(csv)
        beat = Heartbeat(self.store, session, this_keeper(), self.heartbeat_s)
        sleep = self.dispatcher.sleep

        def sleep_while_the_keeper(seconds: float) -> None:   # every loop of the session sleeps here
            beat.check()
            sleep(seconds)
        self.dispatcher.sleep = sleep_while_the_keeper
        try:
            with beat:
                return self._run(session, earlier, reports)
        except SessionTakenOver as exc:
            # Nothing more is written: the session and its attempts are the other keeper's.
            log.error("%s", exc)
            raise SessionError(str(exc)) from None
        except KeyboardInterrupt:
            self.store.mark_interrupted(session, keeper=this_keeper())
            log.warning("session %s interrupted by the user", session)
            raise SessionInterrupted(session, len(earlier) + self._done_this_run,
                                     self.resume_hint(session)) from None
        except StoreUnavailable as exc:
            self.store.mark_interrupted(session, timeout_s=1.0, keeper=this_keeper(), error=str(exc))
            log.error("session %s stopped: %s", session, exc)
            raise ServiceLost(session, f"the store at {exc.where}", f"no answer for {exc.waited_s:.0f}s",
                              self.resume_hint(session)) from None
        except ClusterLost as exc:
            self.store.mark_interrupted(session, timeout_s=1.0, keeper=this_keeper(), error=str(exc))
            log.error("session %s stopped: %s", session, exc)
            raise ServiceLost(session, f"cluster {exc.cluster}", exc.reason, self.resume_hint(session)) from None
        finally:
            self.dispatcher.sleep = sleep
            self.events.observers.remove(csv)
            self.dispatcher.close()

    def _resumable(self, resume: str) -> dict[str, Any]:
        """The session document of `resume`, or SessionError saying why it
        cannot be resumed here."""
        doc = self.store.session(resume)
        if doc is None:
            raise SessionError(f"no session {resume!r} in the store")
        if doc.get("state") == "finished":
            raise SessionError(f"session {resume} already finished")
        self._check_same_round_mode(doc)
        if (refused := resume_refusal(doc, self.privacy)) is not None:
            raise SessionError(refused)
        if (busy := resume_blocked(doc)) is not None:
            raise SessionError(busy)
        return doc

    def _store_lost_before_the_rounds(self, exc: StoreUnavailable, session: str | None,
                                      new_session: str | None) -> NoReturn:
        """The store went away while the session was being opened: one
        line, and the way back when there is a session to resume (a new
        one's creation may have been recorded before the store went)."""
        if session is None:
            raise SessionError(f"{exc}; session {new_session} did not start (should `fedkeeper status` list it "
                               f"once the store is back, resume it with: {self.resume_hint(new_session)})") from None
        self.store.mark_interrupted(session, timeout_s=1.0, keeper=this_keeper(), error=str(exc))
        raise ServiceLost(session, f"the store at {exc.where}", f"no answer for {exc.waited_s:.0f}s",
                          self.resume_hint(session)) from None

    def _open(self, resume: str | None, session_id: str | None) -> str:
        if resume:
            doc = self._resumable(resume)   # again: the deploy took time
            session = resume
            last_beat = doc.get("heartbeat")   # the stopped keeper's, before this one's claim replaces it
            # The check and this write are one step for the store: a keeper
            # that claimed the session in between wins, this one stops.
            if not self.store.claim_session(session, doc.get("keeper"), this_keeper(),
                                            state="running", heartbeat=time.time()):
                raise SessionError(f"session {session} was just resumed by another keeper")
            self.store.event(session, "resumed", f"keeper resumed the session (it was {doc.get('state')})")
            self._pause_open_rounds(session, last_beat)
            # The keeper that stopped may have invoked these or not: their
            # clients are invoked again, and the unique update key keeps an
            # update from counting twice should both land.
            closed = self.store.close_unaccepted_attempts(
                session, "the keeper stopped before the platform's answer was recorded", time.time())
            if closed:
                log.info("session %s: %d attempt(s) the stopped keeper was submitting recorded as abandoned",
                         session, closed)
        else:
            session = session_id or new_session_id(self.rt.cfg.name)
            self.store.create_session({
                "_id": session, "name": self.rt.cfg.name, "scenario": self.rt.scenario_name,
                "spec": self._session_spec(), "training": self.training.model_dump(),
                "clusters": self.client_cluster, "server_cluster": self.server,
            })
            self.store.update_session(session, state="running", heartbeat=time.time(), keeper=this_keeper())
        self._warn_capacity(session)
        self.events.emit("session", session=session, resumed=bool(resume))
        log.info("session %s %s", session, "resumed" if resume else "started")
        return session

    def _pause_open_rounds(self, session: str, beat: Any) -> None:
        """The round a stopped keeper left open stood still from its last
        heartbeat until now (overnight, say): recorded as paused, so that
        its duration, and the time to a target it reaches, leave that out.
        It counts up to one heartbeat period of work as paused. The rounds'
        times are the keeper's clock (the wall clock, as the heartbeat's)."""
        if isinstance(beat, (int, float)) and not isinstance(beat, bool) and math.isfinite(beat):
            self.store.pause_open_rounds(session, since=beat, now=self.dispatcher.clock())

    def _run(self, session: str, earlier: list[RoundReport], reports: list[RoundReport]) -> SessionSummary:
        try:
            self._init(session)
            first = 0
            if earlier:
                last = max(earlier, key=lambda r: r.round)
                first = last.round + 1
                if self._reached_target(last.accuracy):
                    first = self.training.rounds
            mode = make_mode(self.training.mode, self._round_context())
            mode.run(session, first, reports)
            mode.finish(session)
        except SessionError as exc:
            self.store.fold_running_marks(session)   # every attempt ended: only drops the batches
            self._end(session, state="failed", error=str(exc), ended=time.time())
            self.store.event(session, "failed", str(exc))
            log.error("session %s failed: %s", session, exc)
            return SessionSummary(session, "failed", earlier + reports, str(exc), rounds_this_run=len(reports))
        every = earlier + reports
        acc = every[-1].accuracy if every else None
        why = self._why_it_stopped(session, every)
        self.store.fold_running_marks(session)   # every attempt ended: only drops the batches
        self._end(session, state="finished", ended=time.time(), final_accuracy=acc, stopped=why)
        self.store.event(session, "finished", f"finished after {len(every)} rounds "
                                              f"({len(reports)} in this run): {why}")
        log.info("session %s finished: %s", session, why)
        return SessionSummary(session, "finished", every, why, rounds_this_run=len(reports))

    def _why_it_stopped(self, session: str, rounds: list[RoundReport]) -> str:
        """Why a finished session trained no further: its rounds, its target
        accuracy, or its privacy budget (shown by start, status and the run log)."""
        last = max(rounds, key=lambda r: r.round) if rounds else None
        if last is not None and self._reached_target(last.accuracy):
            return (f"target accuracy {self.training.target_accuracy:g} reached: {last.accuracy:.4g} "
                    f"after round {last.round + 1}")
        budget = [e for e in self.store.events(session) if e.get("kind") == "privacy_budget"]
        if budget:
            return str(budget[-1].get("message") or "the privacy budget is spent")
        if last is not None and last.round + 1 < self.training.rounds:
            return f"stopped after round {last.round + 1} of {self.training.rounds}"
        return f"all {self.training.rounds} rounds trained"

    def _end(self, session: str, **fields: Any) -> None:
        """The session's end, written only while it is this keeper's: one
        that another keeper resumed meanwhile is left to that one."""
        if not self.store.end_session(session, this_keeper(), **fields):
            raise SessionTakenOver(session, (self.store.session(session) or {}).get("keeper"))

    def _round_context(self) -> RoundContext:
        return RoundContext(store=self.store, dispatcher=self.dispatcher, selector=self.selection,
                            events=self.events, training=self.training, client_cluster=self.client_cluster,
                            server=self.server, per_round=self.per_round, privacy=self.privacy)

    def _init(self, session: str) -> None:
        if self.store.model(session, 0) is not None:
            return
        self.events.emit("init", session=session)
        res = self.dispatcher.call(self.server, session, 0, "fl_server_init")
        self.store.event(session, "initialised", "data partitioned and the first model stored", result=res)

    def _reached_target(self, acc: float | None) -> bool:
        t = self.training.target_accuracy
        return t is not None and acc is not None and acc >= t

    def _check_same_round_mode(self, doc: dict[str, Any]) -> None:
        """A session keeps the round mode it started with: stragglers, stale
        updates and round documents only make sense under one mode."""
        stored = doc.get("spec") or {}
        tr = self.training
        for key, now in (("mode", tr.mode), ("staleness_tolerance", tr.staleness_tolerance),
                         ("aggregation", tr.aggregation)):
            if key in stored and stored[key] != now:
                raise SessionError(f"session {doc['_id']} was started with training.{key}: {stored[key]}, "
                                   f"the config now says {now}; resume it with the config it started with")

    def _warn_capacity(self, session: str) -> None:
        """Warn once per session when a round could exceed a cluster's limits."""
        per_cluster: dict[str, int] = {}
        for c in self.client_cluster.values():
            per_cluster[c] = per_cluster.get(c, 0) + 1
        for cluster, n in per_cluster.items():
            warning = self.rt.provider(cluster).capacity_warning(min(n, self.per_round))
            if warning:
                log.warning(warning)
                self.store.event(session, "capacity", warning, cluster=cluster)
                self.events.emit("warning", message=warning)

    def _session_spec(self) -> dict[str, Any]:
        s = self.rt.scenario
        ds, data, mp = s.data_sampling, s.training_test_data, s.model_params
        return {
            "model": ds.model,
            "data": data.stored(),   # no credentials in the store
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
            "aggregation": self.training.aggregation,
            **({"user_module": um} if (um := user_module_spec(self.rt.cfg, s)) else {}),
            **(self.privacy.session_spec() if self.privacy else {}),
        }
