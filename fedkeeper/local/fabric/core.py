"""The fabric's core: namespaces, actions, admission of invocations (rate
limits, injected faults) and activation records. Placement on workers is
the scheduler's, limits over time the watchdog's."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .. import supervisor
from .actions import ActionFiles, define
from .entities import DEFAULT_NAMESPACE, Action, Activation, Namespace, Settings, annotation, valid_name
from .metrics import UserEvents
from .records import build, user_status_code
from .scheduler import Scheduler
from .status import (DEVELOPER_ERROR, MSG_ABNORMAL_RUN, MSG_EXISTS, MSG_NOT_FOUND, MSG_PARAMS_NOT_ALLOWED,
                     ApiError, msg_init_timeout, msg_timeout, msg_too_many_concurrent, msg_too_many_per_minute)
from .watchdog import Watchdog

log = logging.getLogger("fedkeeper.fabric")


class Fabric:
    def __init__(self, state_dir: Path, settings: Settings, auth: str, api_host: str = ""):
        self.state_dir = Path(state_dir)
        self.settings = settings
        # What it was started with: a limit set back to null returns to it.
        self.started_settings = copy.deepcopy(settings)
        self.auth = auth
        self.api_host = api_host
        self.lock = threading.RLock()
        # PUT and DELETE of an action, by a hash of its name (bounded: names are the callers')
        self._write_locks = [threading.Lock() for _ in range(16)]
        self._state_file_lock = threading.Lock()
        self.namespaces: dict[str, Namespace] = {}
        self.stopping = False
        self.events = UserEvents()
        self.files = ActionFiles(self.state_dir / "actions")
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for a in self.files.load_all():
            if valid_name(a.namespace) and valid_name(a.name):
                self.ns(a.namespace).actions[a.name] = a
        self.scheduler = Scheduler(self)
        self.watchdog = Watchdog(self)
        self.watchdog.start()

    def start_stem_cells(self) -> None:
        """Start the stem cells the settings ask for (at start, and after a
        change of the settings)."""
        with self.lock:
            ops = self.scheduler.replenish()
        self.scheduler.run_ops(ops)

    def publish_capacity(self) -> None:
        """Write the user memory and stem cells in force into the fabric's
        state file, which `fabric status` shows next to the pool's own: a
        copy left at the values the fabric started with would contradict
        them once a cluster's config changed them."""
        from .service import STATE_FILE   # the service module imports this one
        path = self.state_dir / STATE_FILE
        with self._state_file_lock:
            with self.lock:
                if self.stopping:
                    return   # its stopper removes the file: not to be written back
                capacity = {"user_memory_mb": self.settings.user_memory_mb,
                            "stem_cells": dict(self.settings.stem_cells)}
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(path.read_text())
                # only the file of this process: a fabric started since owns its own
                if isinstance(info, dict) and info.get("pid") == os.getpid():
                    supervisor.write_private(path, json.dumps({**info, **capacity}))

    def prewarm(self, runtimes: list[str]) -> None:
        """Start the zygotes of these runtimes now, ahead of their actions'
        deploy (those given no stem cells, or when stem cells are not
        forked, get none)."""
        if self.stopping or not self.settings.fork_stem_cells:
            return
        for runtime in dict.fromkeys(runtimes):
            if self.settings.stem_cells.get(runtime, 0) > 0:
                self.scheduler.launcher.start_zygote(runtime)

    def ns(self, name: str) -> Namespace:
        if name == "_":
            name = DEFAULT_NAMESPACE
        if not valid_name(name):
            raise ApiError(400, "The namespace contains illegal characters.")
        n = self.namespaces.get(name)
        if n is None:
            with self.lock:
                n = self.namespaces.setdefault(name, Namespace(name, self.settings))
        return n

    # ------------------------------------------------------------------ actions
    def put_action(self, ns_name: str, name: str, body: Any, overwrite: bool) -> dict:
        ns = self.ns(ns_name)
        # One write of an action at a time (concurrent PUTs would both become
        # version N+1, a DELETE could remove the files of a PUT racing in);
        # invocations and other actions' writes go on meanwhile.
        with self._write_lock(ns.name, name):
            with self.lock:
                old = ns.actions.get(name)
                if old is not None and not overwrite:
                    raise ApiError(409, MSG_EXISTS)
            action, code_bytes, source = define(ns.name, name, body, old, self.settings)
            if code_bytes is not None or source is not None:
                action.code_dir = self.files.unpack(action, code_bytes, source)
            self.files.persist(action)
            with self.lock:
                ns.actions[name] = action
                ops = self.scheduler.retire(ns.name, name, keep_version=action.version)
                # a stem cell of its runtime, ahead of the action's first invocation
                ops += self.scheduler.replenish()
                # Asked once the new version is in place: no worker can start
                # on an older one after this.
                in_use = {w.action.code_dir for w in self.scheduler.workers if w.action is not None}
            self.files.prune(action, in_use)
        self.scheduler.run_ops(ops)
        return action.to_json(code=True)

    def _write_lock(self, ns: str, name: str) -> threading.Lock:
        return self._write_locks[hash((ns, name)) % len(self._write_locks)]

    def get_action(self, ns_name: str, name: str) -> Action:
        a = self.ns(ns_name).actions.get(name)
        if a is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return a

    def delete_action(self, ns_name: str, name: str) -> dict:
        ns = self.ns(ns_name)
        with self._write_lock(ns.name, name):
            with self.lock:
                a = ns.actions.pop(name, None)
                if a is None:
                    raise ApiError(404, MSG_NOT_FOUND)
                ops = self.scheduler.retire(ns.name, name, keep_version=None)
                self.scheduler.drop_queue((ns.name, name))
            self.scheduler.run_ops(ops)
            self.files.remove(ns.name, name)
        return a.to_json(code=False)

    def list_actions(self, ns_name: str, limit: int, skip: int) -> list[dict]:
        ns = self.ns(ns_name)
        acts = sorted(ns.actions.values(), key=lambda a: -a.updated)
        return [a.to_json(code=False) for a in acts[skip:skip + limit if limit else None]]

    # ------------------------------------------------------------------ invoke
    def invoke(self, ns_name: str, name: str, payload: dict) -> Activation:
        ns = self.ns(ns_name)
        action = ns.actions.get(name)
        if action is None:
            raise ApiError(404, MSG_NOT_FOUND)
        if annotation(action.annotations, "final") is True and action.parameters:
            if {p["key"] for p in action.parameters} & payload.keys():
                raise ApiError(400, MSG_PARAMS_NOT_ALLOWED)
        args = {p["key"]: p["value"] for p in action.parameters}
        args.update(payload)
        ops: list = []
        with self.lock:
            fault, slow_ms = self._admit(ns, name)
            act = Activation(uuid.uuid4().hex, ns, action, args, fault, slow_ms)
            if action.run_error is not None:
                act.start = act.received
                self.complete(act, DEVELOPER_ERROR, {"error": action.run_error})
            elif fault == "timeout_instant":
                act.start = act.received
                self.complete(act, DEVELOPER_ERROR, {"error": msg_timeout(action.timeout_ms)}, timed_out=True)
            else:
                ops = self.scheduler.enqueue(act)
        self.scheduler.run_ops(ops)
        return act

    def _admit(self, ns: Namespace, name: str) -> tuple[str | None, int]:
        """Rate limits and the injected fault of one invocation (lock held):
        (fault, slow_ms), or ApiError 429."""
        now = time.time()
        fault, slow_ms = None, 0
        if ns.faults is not None:
            n = ns.fault_counters.get(name, 0)
            ns.fault_counters[name] = n + 1
            fault = ns.faults.draw(ns.name, name, n)
            if ns.faults.applies_to(name):
                slow_ms = ns.faults.slow_ms
        if fault == "throttle":
            ns.counts["throttled"] += 1
            # An injected throttle stands in for the per-minute limit.
            self.events.limit(ns.name, concurrent=False)
            raise ApiError(429, "Too many requests: throttled by the fabric's injected faults.")
        window = ns.minute
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= ns.invocations_per_minute:
            ns.counts["throttled"] += 1
            self.events.limit(ns.name, concurrent=False)
            raise ApiError(429, msg_too_many_per_minute(len(window) + 1, ns.invocations_per_minute))
        if ns.inflight >= ns.concurrent_invocations:
            ns.counts["throttled"] += 1
            self.events.limit(ns.name, concurrent=True)
            raise ApiError(429, msg_too_many_concurrent(ns.inflight + 1, ns.concurrent_invocations))
        window.append(now)
        ns.inflight += 1
        ns.counts["invocations"] += 1
        return fault, slow_ms

    # ------------------------------------------------------------------ placement
    def complete(self, act: Activation, code: int, result: Any, timed_out: bool = False) -> None:
        """Turn a finished activation into its record (lock held)."""
        if act.record is not None:
            return
        now = time.time()
        act.end = now
        start = act.start if act.start is not None else now
        start_ms = int(start * 1000)
        end_ms = max(int(now * 1000), start_ms)
        a = act.action
        wait_ms = max(0, int((start - act.received) * 1000))
        init_ms = int(round(act.init_ms)) if act.cold and act.init_ms is not None else None
        if not isinstance(result, dict):
            code, result = DEVELOPER_ERROR, {"error": MSG_ABNORMAL_RUN}
        try:
            result_json = json_text(result)
        except (TypeError, ValueError, RecursionError):
            code, result_json = DEVELOPER_ERROR, json_text({"error": MSG_ABNORMAL_RUN})
        doc, summary = build(act, code, result_json, start_ms, end_ms, wait_ms, init_ms, timed_out)
        act.record = doc
        act.status = code
        ns = act.ns
        # The activation event OpenWhisk's invoker sends for its record: the
        # action's namespace, the invoking subject's namespace (the same one
        # here: the fabric has no packages shared across namespaces), the
        # record's own millisecond timings.
        self.events.activation(ns.name, ns.name, a.name, str(a.exec.get("kind")), int(a.limits["memory"]),
                               code, end_ms - start_ms, wait_ms, init_ms, len(result_json),
                               user_status_code(result))
        ns.records.add(act.id, start_ms, next(ns.seq), a.name, doc, summary)
        ns.inflight -= 1
        act.done.set()

    def time_out(self, act: Activation, during_init: bool = False) -> None:
        """Record an activation as overrunning its time limit (lock held)."""
        ms = act.action.timeout_ms
        msg = msg_init_timeout(ms) if during_init else msg_timeout(ms)
        self.complete(act, DEVELOPER_ERROR, {"error": msg}, timed_out=True)

    def get_activation(self, ns_name: str, aid: str) -> tuple[int, str, bytes, bytes]:
        ns = self.ns(ns_name)
        with self.lock:
            rec = ns.records.get(aid)
        if rec is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return rec

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
        self.scheduler.stop_all()


def json_text(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
