"""The fabric's core: namespaces, admission (rate limits, injected faults),
queues, and the placement of activations on warm workers within the user
memory, as an OpenWhisk invoker does.

All state changes happen under one lock; the I/O they imply (start a
process, kill one, send an activation) is returned as a list of operations
and done once the lock is released."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .actions import ActionFiles, define
from .entities import DEFAULT_NAMESPACE, Action, Activation, Namespace, Settings, annotation, valid_name
from .metrics import UserEvents
from .records import build, user_status_code
from .status import (APPLICATION_ERROR, DEVELOPER_ERROR, MSG_ABNORMAL_RUN, MSG_EXISTS, MSG_MEMORY,
                     MSG_NOT_FOUND, MSG_PARAMS_NOT_ALLOWED, MSG_REMOVED, SUCCESS, WHISK_ERROR, ApiError,
                     msg_init_failed, msg_init_timeout, msg_timeout, msg_too_many_concurrent, msg_too_many_per_minute)
from .watchdog import Watchdog
from .workers import Worker, activation_env

log = logging.getLogger("fedkeeper.fabric")


class Fabric:
    def __init__(self, state_dir: Path, settings: Settings, auth: str, api_host: str = ""):
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.auth = auth
        self.api_host = api_host
        self.lock = threading.RLock()
        self.namespaces: dict[str, Namespace] = {}
        self.pools: dict[tuple[str, str], list[Worker]] = {}
        self.queues: dict[tuple[str, str], deque[Activation]] = {}
        self.workers: set[Worker] = set()
        self.memory_used = 0
        self.stopping = False
        self.events = UserEvents()
        self.files = ActionFiles(self.state_dir / "actions")
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for a in self.files.load_all():
            if valid_name(a.namespace) and valid_name(a.name):
                self.ns(a.namespace).actions[a.name] = a
        self.watchdog = Watchdog(self)
        self.watchdog.start()

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
        with self.lock:
            old = ns.actions.get(name)
            if old is not None and not overwrite:
                raise ApiError(409, MSG_EXISTS)
        action, code_bytes, source = define(ns.name, name, body, old, self.settings)
        if code_bytes is not None or source is not None:
            action.code_dir = self.files.unpack(action, code_bytes, source)
        with self.lock:
            in_use = {w.action.code_dir for w in self.workers}
        self.files.persist(action, in_use)
        with self.lock:
            ns.actions[name] = action
            ops = self._retire(ns.name, name, keep_version=action.version)
        self.run_ops(ops)
        return action.to_json(code=True)

    def get_action(self, ns_name: str, name: str) -> Action:
        a = self.ns(ns_name).actions.get(name)
        if a is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return a

    def delete_action(self, ns_name: str, name: str) -> dict:
        ns = self.ns(ns_name)
        with self.lock:
            a = ns.actions.pop(name, None)
            if a is None:
                raise ApiError(404, MSG_NOT_FOUND)
            ops = self._retire(ns.name, name, keep_version=None)
            for act in self.queues.pop((ns.name, name), deque()):
                self.complete(act, WHISK_ERROR, {"error": MSG_REMOVED})
        self.run_ops(ops)
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
                key = (ns.name, name)
                self.queues.setdefault(key, deque()).append(act)
                ops = self._pump(key)
        self.run_ops(ops)
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
    def _pump(self, key: tuple[str, str]) -> list:
        """Hand queued activations of one action to workers (lock held)."""
        ops: list = []
        q = self.queues.get(key)
        if not q:
            return ops
        action = self.namespaces[key[0]].actions.get(key[1])
        if action is None:
            while q:
                self.complete(q.popleft(), WHISK_ERROR, {"error": MSG_REMOVED})
            return ops
        while q:
            w = self._free_worker(key, action.version)
            if w is None:
                w = self._new_worker(action, ops)
                if w is None:
                    break
            act = q.popleft()
            act.action = action
            w.assigned[act.id] = act
            act.worker = w
            if w.state == "ready":
                self._start(w, act, time.time(), ops)
            else:
                w.pending.append(act)
        if not q:
            self.queues.pop(key, None)
        return ops

    def pump_all(self, exclude=None) -> list:
        ops: list = []
        for key in list(self.queues):
            if key != exclude:
                ops.extend(self._pump(key))
        return ops

    def _free_worker(self, key, version) -> Worker | None:
        best = None
        for w in self.pools.get(key, ()):
            if w.version != version or w.retired or w.state == "dead" or w.kill_reason or w.free <= 0:
                continue
            # Prefer ready workers, then the fullest (packing keeps the
            # others idle, so they can be reaped), then the most recently used.
            rank = (w.state == "ready", -w.free, w.last_used)
            if best is None or rank > best[0]:
                best = (rank, w)
        return best[1] if best else None

    def _new_worker(self, action: Action, ops: list) -> Worker | None:
        need = int(action.limits["memory"])
        if self.memory_used + need > self.settings.user_memory_mb:
            idle = sorted((w for w in self.workers if w.state == "ready" and not w.assigned
                           and not w.kill_reason), key=lambda w: w.last_used)
            for w in idle:
                if self.memory_used + need <= self.settings.user_memory_mb:
                    break
                self.evict(w, "evicted", ops)
            if self.memory_used + need > self.settings.user_memory_mb:
                return None
        w = Worker(action)
        self.workers.add(w)
        self.pools.setdefault(w.key, []).append(w)
        self.memory_used += w.memory_mb
        ops.append(("spawn", w))
        return w

    def _unlist(self, w: Worker) -> None:
        pool = self.pools.get(w.key)
        if pool and w in pool:
            pool.remove(w)
            if not pool:
                self.pools.pop(w.key, None)
        if w in self.workers:
            self.workers.discard(w)
            self.memory_used -= w.memory_mb

    def evict(self, w: Worker, reason: str, ops: list) -> None:
        """Take a worker out of service (lock held); its memory is free at once."""
        if w.kill_reason is None:
            w.kill_reason = reason
        self._unlist(w)
        ops.append(("kill", w))

    def _retire(self, ns: str, name: str, keep_version: int | None) -> list:
        ops: list = []
        for w in list(self.pools.get((ns, name), ())):
            if keep_version is not None and w.version == keep_version:
                continue
            w.retired = True
            if not w.assigned and not w.pending:
                self.evict(w, "retired", ops)
        return ops

    def _start(self, w: Worker, act: Activation, now: float, ops: list) -> None:
        act.start = act.start or now
        act.deadline = act.start + act.action.timeout_ms / 1000.0
        w.runs += 1
        ops.append(("send", w, act))

    # ------------------------------------------------------------------ worker I/O
    def run_ops(self, ops: list) -> None:
        for op in ops:
            kind, w = op[0], op[1]
            if kind == "spawn":
                self._spawn(w)
            elif kind == "kill":
                w.kill()
                if w.proc is None:  # never started: nothing will report its death
                    with self.lock:
                        self._worker_died(w)
            elif kind == "send":
                act: Activation = op[2]
                try:
                    w.send({"t": "run", "id": act.id, "args": act.args,
                            "env": activation_env(act, self.api_host, self.auth), "slow_ms": act.slow_ms,
                            "crash": act.fault == "crash", "hang": act.fault == "timeout"})
                except (OSError, TypeError, ValueError) as exc:
                    # A dead worker is reported by its reader; unserialisable
                    # args cannot happen with args parsed from JSON.
                    log.debug("send to worker %s failed: %s", w.id, exc)
                    w.kill()

    def _spawn(self, w: Worker) -> None:
        a = w.action
        if w.kill_reason is not None or w.state == "dead":
            return
        try:
            w.start_process(self.logs_dir / f"{a.namespace}.{a.name}.log"[:250])
        except OSError as exc:
            with self.lock:
                w.init_error = f"could not start a worker process: {exc}"
                self._worker_died(w)
            return
        threading.Thread(target=self._serve_worker, args=(w,), name=f"worker-{w.id}", daemon=True).start()

    def _serve_worker(self, w: Worker) -> None:
        w.read_messages(lambda msg: self._on_message(w, msg))
        with self.lock:
            ops = self._worker_died(w)
        self.run_ops(ops)

    def _on_message(self, w: Worker, msg: dict) -> None:
        ops: list = []
        with self.lock:
            t = msg.get("t")
            if t == "ready":
                now = time.time()
                w.state = "ready"
                init_ms = msg.get("init_ms")
                w.init_ms = float(init_ms) if isinstance(init_ms, (int, float)) else 0.0
                w.last_used = now
                for act in w.pending:
                    act.cold = True
                    act.init_ms = w.init_ms
                    act.ns.counts["cold_starts"] += 1
                    # A cold activation starts with its code load, as
                    # OpenWhisk's duration includes initTime.
                    act.start = max(act.received, now - w.init_ms / 1000.0)
                    self._start(w, act, now, ops)
                w.pending.clear()
                if w.kill_reason:
                    ops.append(("kill", w))
            elif t == "init_error":
                w.init_error = str(msg.get("error"))[:2000]
            elif t == "done":
                act = w.assigned.pop(msg.get("id"), None) if isinstance(msg.get("id"), str) else None
                if act is not None:
                    w.last_used = time.time()
                    if "dev_error" in msg:
                        self.complete(act, DEVELOPER_ERROR, {"error": str(msg["dev_error"])})
                    else:
                        res = msg.get("result")
                        code = APPLICATION_ERROR if isinstance(res, dict) and "error" in res else SUCCESS
                        self.complete(act, code, res)
                    if w.retired and not w.assigned:
                        self.evict(w, "retired", ops)
                    else:
                        ops.extend(self._pump(w.key))
                    ops.extend(self.pump_all(exclude=w.key))
        self.run_ops(ops)

    def _worker_died(self, w: Worker) -> list:
        """Fail what the dead worker held (lock held); returns follow-up I/O."""
        ops: list = []
        w.state = "dead"
        self._unlist(w)
        if w.init_error:
            err = msg_init_failed(w.init_error)
        elif w.kill_reason == "memory":
            err = MSG_MEMORY
        else:
            err = MSG_ABNORMAL_RUN
        for act in list(w.assigned.values()):
            if act.start is None:
                act.start = time.time()
            self.complete(act, DEVELOPER_ERROR, {"error": err})
        w.assigned.clear()
        w.pending.clear()
        if not self.stopping:
            ops.extend(self._pump(w.key))
            ops.extend(self.pump_all(exclude=w.key))
        return ops

    # ------------------------------------------------------------------ records
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
            workers = list(self.workers) + [w for p in self.pools.values() for w in p]
        for w in set(workers):
            w.kill()
        for w in set(workers):
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=5)
                except Exception:  # noqa: BLE001 - shutting down regardless
                    pass


def json_text(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
