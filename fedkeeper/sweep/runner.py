"""Running a planned sweep: one deployment, then up to `parallel` sessions at
a time, every run recorded on the sweep document."""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flcommon.urls import masked

from ..cost import format_money
from ..formatting import fixed_decimals
from .plan import Run, SweepError, SweepPlan
from .results import session_result

log = logging.getLogger("fedkeeper.sweep")


Report = Callable[[str], None]


class Sweep:
    """Runs a plan: deploys once, then up to `parallel` sessions at a time,
    each with its own Runtime (own providers and store client) over the
    shared services, recording every run on the sweep document."""

    def __init__(self, plan: SweepPlan, *, parallel: int = 1, keep_services: bool = False,
                 target: float | None = None, report: Report = print, phase: Report | None = None):
        """`phase`: told what long work begins before the runs (the store's
        start, the deployment), as Runtime.phase is."""
        self.plan = plan
        self.parallel = max(1, parallel)
        self.keep_services = keep_services
        self.target = target
        self.report = report
        self.phase = phase
        self.rt = None
        self.store = None
        self.total = len(plan.runs)
        self.running: dict[str, Run] = {}   # run key -> run, while its session trains
        self._lock = threading.Lock()
        # Set when the sweep stops taking results (done, or failed): a worker
        # then neither waits for its run's end to be printed nor starts another.
        self._ended = threading.Event()

    # -- the sweep document
    def _doc_runs(self) -> dict[str, Any]:
        # Stored (and so printed and written to CSV) with any URL's user info masked.
        return {run.key: {"index": run.index, "params": _masked(run.params), "labels": _masked(run.labels),
                          "repeat": run.repeat, "seed": run.seed, "session": run.session,
                          "state": "pending"} for run in self.plan.runs}

    def _open_doc(self) -> dict[str, Any]:
        p = self.plan
        doc = {"_id": p.sweep_id, "content_hash": p.content_hash, "name": p.runs[0].cfg.name,
               "scenario": p.scenario, "repeats": p.repeats, "base_seed": p.base_seed,
               "grid": [{"key": a.key, "path": ".".join(a.path), "values": _masked(a.labels)} for a in p.axes],
               "parallel": self.parallel, "state": "running", "runs": self._doc_runs()}
        if not self.store.create_sweep(doc):
            existing = self.store.sweep(p.sweep_id)
            if existing.get("content_hash") != p.content_hash:
                raise SweepError(f"sweep {p.sweep_id} exists with a different config, grid or repeats; "
                                 "choose another --sweep-id")
            self.store.update_sweep(p.sweep_id, state="running", parallel=self.parallel)
        return self.store.sweep(p.sweep_id)

    def _target_for(self, run: Run) -> float | None:
        if self.target is not None:
            return self.target
        return run.cfg.scenarios[self.plan.scenario].training.target_accuracy

    def _record(self, run: Run, **fields: Any) -> None:
        self.store.update_sweep(self.plan.sweep_id, **{f"runs.{run.key}.{k}": v for k, v in fields.items()})

    def _new_attempt(self, run: Run, entry: dict[str, Any], failed: dict[str, Any]) -> None:
        """A run whose session failed is tried again as a new session (its
        failed round would only fail again on resume); the failed sessions
        stay listed on the run."""
        earlier = list(entry.get("failed_sessions") or []) + [run.session]
        base = f"{self.plan.sweep_id}-{run.index:03d}"
        new = f"{base}-try{len(earlier) + 1}"
        reason = failed.get("error") or "no reason recorded"
        self.report(f"run {run.index + 1}/{self.total} {run.label} repeat {run.repeat}: session {run.session} "
                    f"failed earlier ({reason}); trying again as session {new}")
        run.session = new
        self._record(run, session=new, failed_sessions=earlier, state="pending", result=None)

    # -- one run, in a worker thread
    def _execute(self, run: Run) -> dict[str, Any]:
        from ..keeper import Keeper
        from ..runtime import Runtime
        t0 = time.time()
        existing = self.store.session(run.session)
        self._record(run, state="running", started=t0)
        with self._lock:
            self.running[run.key] = run
        self.report(f"run {run.index + 1}/{self.total} {run.label} repeat {run.repeat} "
                    f"{'resumed' if existing else 'started'}: session {run.session}")
        # The sweep's own runtime holds the local services for the whole sweep,
        # so a run's lease never stops them; keeping them (which would outlive
        # the sweep) is the sweep's choice, --keep-services, not each run's.
        rt = Runtime.open(run.cfg, self.plan.scenario, keep_local_services=self.keep_services)
        try:
            keeper = Keeper(rt)
            summary = keeper.start(resume=run.session if existing else None, deploy=False,
                                   session_id=run.session)
            rt.store.update_session(run.session, sweep=self.plan.sweep_id, sweep_run=run.key,
                                    config_path=str(Path(run.cfg.source).resolve()) if run.cfg.source else None)
            return {"state": summary.state, "message": summary.message, "seconds": time.time() - t0,
                    "resumed": existing is not None}
        finally:
            with self._lock:
                self.running.pop(run.key, None)
            rt.close(stop_store=False)

    def _worker(self, jobs: "queue.Queue[Run | None]",
                done: "queue.Queue[tuple[Run, dict, threading.Event]]") -> None:
        while not self._ended.is_set():
            run = jobs.get()
            if run is None:
                return
            t0 = time.time()
            try:
                outcome = self._execute(run)
            except Exception as exc:  # one broken run must not end the sweep
                log.exception("sweep run %s (%s) failed", run.key, run.session)
                outcome = {"state": "failed", "message": f"{type(exc).__name__}: {exc}",
                           "seconds": time.time() - t0, "resumed": False}
            reported = threading.Event()
            done.put((run, outcome, reported))
            # The next run starts once this one's end is recorded and printed:
            # its start line must not come before that (one at a time, the
            # lines would read as two runs in flight).
            while not reported.wait(0.5) and not self._ended.is_set():
                pass

    def _finish_run(self, run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
        result = session_result(self.store, run.session, run.cfg, self._target_for(run))
        state = "finished" if result["state"] == "finished" else "failed"
        # a finished session's message says why it stopped, which is no error
        if state != "finished" and outcome.get("message") and not result.get("error"):
            result["error"] = outcome["message"]
        result["seconds"] = outcome.get("seconds")
        self._record(run, state=state, ended=time.time(), result=result)
        return {**result, "state": state}

    def _line(self, n: int, total: int, run: Run, result: dict[str, Any], note: str) -> None:
        acc = fixed_decimals(result.get("final_accuracy"))
        cost = format_money(result.get("cost"), result.get("currency") or "USD")
        text = (f"[{n}/{total}] run {run.index + 1} {run.label} repeat {run.repeat} ({run.session}): {note} - "
                f"{result.get('rounds', 0)} rounds, accuracy {acc}, {result.get('invocations', 0)} invocations, "
                f"{result.get('retries', 0)} retries, cost {cost}")
        if result.get("state") != "finished":
            text += f"; error: {result.get('error') or 'no reason recorded'}"
        self.report(text)

    def run(self) -> dict[str, Any]:
        from ..runtime import Runtime
        plan = self.plan
        self.rt = Runtime.open(plan.runs[0].cfg, plan.scenario, keep_local_services=self.keep_services,
                               phase=self.phase)
        self.store = self.rt.store
        interrupted = opened = False
        try:
            sweep_doc = self._open_doc()
            opened = True
            todo: list[Run] = []
            total, n = len(plan.runs), 0
            for run in plan.runs:
                entry = (sweep_doc.get("runs") or {}).get(run.key) or {}
                run.session = entry.get("session") or run.session  # the run's latest attempt
                doc = self.store.session(run.session)
                if doc is not None and doc.get("state") == "finished":
                    n += 1
                    result = self._finish_run(run, {})
                    self._line(n, total, run, result, "finished earlier, skipped")
                    continue
                if doc is not None and doc.get("state") == "failed":
                    self._new_attempt(run, entry, doc)
                todo.append(run)
            if todo:
                self._deploy()
                jobs: queue.Queue = queue.Queue()
                done: queue.Queue = queue.Queue()
                for run in todo:
                    jobs.put(run)
                workers = min(self.parallel, len(todo))
                for _ in range(workers):
                    jobs.put(None)
                # Daemon threads: an interrupted sweep exits at once, leaving its
                # sessions as a killed keeper leaves them, to be resumed.
                for i in range(workers):
                    threading.Thread(target=self._worker, args=(jobs, done), daemon=True,
                                     name=f"sweep-{i}").start()
                for _ in todo:
                    while True:
                        try:
                            run, outcome, reported = done.get(timeout=0.5)
                            break
                        except queue.Empty:
                            continue
                    n += 1
                    result = self._finish_run(run, outcome)
                    note = ("resumed and " if outcome.get("resumed") else "") + \
                        f"{result['state']} in {fixed_decimals(outcome.get('seconds'), 1)}s"
                    self._line(n, total, run, result, note)
                    reported.set()
        except KeyboardInterrupt:
            # Services stay up and nothing is closed: stopping the fabric under
            # the runs still in flight would fail their rounds, while left
            # alone they are resumed like the sessions of a killed keeper.
            interrupted = True
            self.store.update_sweep(plan.sweep_id, state="interrupted")
            with self._lock:
                in_flight = list(self.running.values())
            for run in in_flight:
                kept = sum(1 for r in self.store.rounds(run.session) if r.get("state") == "done")
                self.report(f"run {run.index + 1}/{self.total} {run.label} repeat {run.repeat}: session "
                            f"{run.session} interrupted; the store keeps its {kept} finished round(s)")
            self.report(f"sweep {plan.sweep_id} interrupted; finished runs are kept and the same command "
                        "resumes the others (local services are left running; `fedkeeper fabric down` stops them)")
            raise
        finally:
            self._ended.set()
            doc = None
            if not interrupted:
                if opened:
                    doc = self.store.sweep(plan.sweep_id)
                    states = [r.get("state") for r in doc["runs"].values()]
                    self.store.update_sweep(plan.sweep_id, state="finished" if all(
                        s == "finished" for s in states) else "failed")
                    doc = self.store.sweep(plan.sweep_id)
                self.rt.close(stop_store=not self.keep_services)
        return doc

    def _deploy(self) -> None:
        """Once for every run (they share one deployment), with the keeper's
        own rules: a failed optional function only warns."""
        from ..keeper import Keeper
        self.rt.phase("deploying the functions every run uses (unchanged ones are skipped)")
        Keeper(self.rt, progress=self._warn).deploy()

    def _warn(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "warning":
            self.report(f"warning: {data['message']}")


def _masked(o: Any) -> Any:
    """`o` with every string's URL user info as ***."""
    if isinstance(o, str):
        return masked(o)
    if isinstance(o, dict):
        return {k: _masked(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_masked(v) for v in o]
    return o
