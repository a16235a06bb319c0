"""Placement of activations on warm workers within the fabric's user memory,
as an OpenWhisk invoker's container pool does: per action a pool of workers
taking up to `limits.concurrency` activations each, idle workers of other
actions evicted when memory is short, else activations wait in their queue
(queued, never refused: their wait is the record's waitTime). Unlike
OpenWhisk's pool, eviction makes room only for an action's first worker; a
busy action grows its pool into free memory only.

Stem cells (OpenWhisk's prewarmed containers): per runtime a few worker
processes started ahead of need (once an action of the runtime is deployed),
which have imported the runtime's heavy modules: forked from the runtime's
zygote (zygotes.py), which imports them once for the fabric, unless
`fork_stem_cells` is off. A new worker for an action of that runtime is a stem cell taken
for it (its cold start is only the code load), and another stem cell is
started in its place when memory allows. Stem cells count against the user
memory (`stem_memory_mb` each, the action's memory once taken); they are
started only while no activation waits for memory, and an idle stem cell
is evicted (after idle warm workers) when an action needs its memory.

All state changes happen under the fabric's lock; the I/O they imply (start
a process, kill one, send an activation) is returned as a list of
operations and done by `run_ops` once the lock is released."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .entities import Action, Activation
from .status import (APPLICATION_ERROR, DEVELOPER_ERROR, MSG_ABNORMAL_RUN, MSG_MEMORY, MSG_REMOVED, SUCCESS,
                     WHISK_ERROR, msg_init_failed, msg_too_large)
from .launcher import Launcher
from .stem_cells import StemCells
from .workers import Worker, activation_env

if TYPE_CHECKING:
    from .core import Fabric

log = logging.getLogger("fedkeeper.fabric")

#: The longest code load a worker may report (its own message says it):
#: more than a day is no measurement.
MAX_REPORTED_MS = 86_400_000.0


def _millis(value: object) -> float:
    """A worker's reported milliseconds, as a finite number within bounds
    (0 when it is not one): its messages come from a process that runs the
    action's code."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        ms = float(value)
    except OverflowError:   # an int too large for a float
        return 0.0
    return ms if 0.0 <= ms <= MAX_REPORTED_MS else 0.0


class Scheduler:
    def __init__(self, fabric: "Fabric"):
        self.f = fabric
        self.pools: dict[tuple[str, str], list[Worker]] = {}
        self.queues: dict[tuple[str, str], deque[Activation]] = {}
        self.workers: set[Worker] = set()
        self.stem_cells = StemCells(fabric)
        self.launcher = Launcher(fabric, serve=self._serve_worker, failed=self._start_failed)
        self.zygotes = self.launcher.zygotes
        self.memory_used = 0
        self._doing = threading.local()   # the ops list run_ops works through on this thread

    def enqueue(self, act: Activation) -> list:
        """Queue an admitted activation (lock held); returns the I/O to do."""
        key = (act.ns.name, act.action.name)
        self.queues.setdefault(key, deque()).append(act)
        return self.pump(key) + self.replenish()

    def drop_queue(self, key: tuple[str, str]) -> None:
        """Fail what waits for a deleted action (lock held)."""
        for act in self.queues.pop(key, deque()):
            self.f.complete(act, WHISK_ERROR, {"error": MSG_REMOVED})

    def pump(self, key: tuple[str, str]) -> list:
        """Hand queued activations of one action to workers (lock held)."""
        ops: list = []
        q = self.queues.get(key)
        if not q:
            return ops
        action = self.f.namespaces[key[0]].actions.get(key[1])
        if action is None:
            while q:
                self.f.complete(q.popleft(), WHISK_ERROR, {"error": MSG_REMOVED})
            return ops
        need, budget = int(action.limits["memory"]), self.f.settings.user_memory_mb
        while q:
            w = self._free_worker(key, action.version)
            if w is None:
                if need > budget and not self._live_workers(key, action.version):
                    # The user memory was lowered below the action's limit
                    # after it was deployed (the fabric's limits are shared)
                    # and none of its workers is left: none could ever be
                    # started, and waiting would hold stem cells back too.
                    while q:
                        self.f.complete(q.popleft(), WHISK_ERROR, {"error": msg_too_large(need, budget)})
                    break
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
                ops.extend(self.pump(key))
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

    def _live_workers(self, key, version) -> bool:
        """Whether the action has a worker of this version that will take
        activations once it is free."""
        return any(w.version == version and not w.retired and w.state != "dead" and not w.kill_reason
                   for w in self.pools.get(key, ()))

    def _new_worker(self, action: Action, ops: list) -> Worker | None:
        need = int(action.limits["memory"])
        # Another action's warm worker is evicted only for an action that has
        # none: one that has grows into free memory, else its activations
        # wait for its warm workers (a queued activation waits a fraction of
        # what a cold start costs, and two actions evicting each other's
        # workers would make every round cold).
        may_evict = not any(not x.retired and x.version == action.version and not x.kill_reason
                            for x in self.pools.get((action.namespace, action.name), ()))
        w = self.stem_cells.find(action)
        if w is not None:
            # the stem cell's own memory becomes the action's
            if not self._make_room(need - w.memory_mb, ops, keep=w, evict=may_evict):
                return None
            self.stem_cells.discard(w)
            self.memory_used -= w.memory_mb
            w.specialize(action)
            if w.state == "stem":
                w.state = "starting"
                ops.append(("init", w))
            # else it is still loading its modules: its code follows when it is done
        else:
            if not self._make_room(need, ops, evict=may_evict):
                return None
            w = Worker(action)
            self.workers.add(w)
            ops.append(("spawn", w))
        self.pools.setdefault(w.key, []).append(w)
        self.memory_used += w.memory_mb
        return w

    def _make_room(self, need: int, ops: list, keep: Worker | None = None, evict: bool = True) -> bool:
        """Free user memory for `need` MB more (lock held): with `evict`,
        idle workers evicted, least recently used first, then idle stem
        cells (not `keep`). False, having evicted nothing, when that cannot
        be enough."""
        budget = self.f.settings.user_memory_mb
        if self.memory_used + need <= budget:
            return True
        if not evict:
            return False
        idle = sorted((w for w in self.workers if w.state == "ready" and not w.assigned
                       and not w.kill_reason and w.action is not None), key=lambda w: w.last_used)
        idle += self.stem_cells.idle(keep)
        if self.memory_used + need - sum(w.memory_mb for w in idle) > budget:
            return False
        for w in idle:
            if self.memory_used + need <= budget:
                break
            self.evict(w, "evicted", ops)
        return True

    def replenish(self) -> list:
        """Start stem cells up to each runtime's count while memory allows and
        no activation waits (lock held); returns the I/O to do."""
        ops: list = []
        if self.f.stopping or any(self.queues.values()):
            return ops
        for w in self.stem_cells.to_start(self.f.settings.user_memory_mb - self.memory_used):
            self.workers.add(w)
            self.memory_used += w.memory_mb
            ops.append(("spawn", w))
        return ops

    def _unlist(self, w: Worker) -> None:
        if w.is_stem:
            self.stem_cells.discard(w)
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

    def retire(self, ns: str, name: str, keep_version: int | None) -> list:
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
        # A worker's death implies I/O of its own (what it held is placed
        # again, a stem cell replaces it): appended here and done in turn,
        # also when it comes from an op this thread is doing (a spawn that
        # failed reports through _start_failed), so a run of failures is a
        # loop, not a recursion.
        active = getattr(self._doing, "ops", None)
        if active is not None:
            active.extend(ops)
            return
        self._doing.ops = ops = list(ops)
        try:
            self._run_each(ops)
        finally:
            self._doing.ops = None

    def _run_each(self, ops: list) -> None:
        for op in ops:
            kind, w = op[0], op[1]
            if kind == "spawn":
                self.launcher.spawn(w)
            elif kind == "kill":
                w.kill()
                if w.proc is None:  # never started: nothing will report its death
                    with self.f.lock:
                        ops.extend(self._worker_died(w))
            elif kind == "init":
                a = w.action
                try:
                    w.send({"t": "init", "code_dir": a.code_dir, "main": str(a.exec.get("main") or "main"),
                            "concurrency": w.capacity, "log": str(self.launcher.log_path(w))})
                except (OSError, TypeError, ValueError) as exc:
                    log.debug("init of stem cell %s failed: %s", w.id, exc)
                    w.kill()
            elif kind == "send":
                act: Activation = op[2]
                try:
                    w.send({"t": "run", "id": act.id, "args": act.args,
                            "env": activation_env(act, self.f.api_host, self.f.auth), "slow_ms": act.slow_ms,
                            "crash": act.fault == "crash", "hang": act.fault == "timeout"})
                except (OSError, TypeError, ValueError) as exc:
                    # A dead worker is reported by its reader; unserialisable
                    # args cannot happen with args parsed from JSON.
                    log.debug("send to worker %s failed: %s", w.id, exc)
                    w.kill()

    def _start_failed(self, w: Worker, error: str) -> None:
        with self.f.lock:
            w.init_error = error
            ops = self._worker_died(w)
        self.run_ops(ops)

    def _serve_worker(self, w: Worker) -> None:
        try:
            w.read_messages(lambda msg: self._on_message(w, msg))
        except Exception:  # noqa: BLE001 - a message this reader could not take: the worker goes
            log.warning("worker %s sent a message the fabric cannot take; stopping it", w.id, exc_info=True)
            w.kill()
        finally:
            with self.f.lock:
                ops = self._worker_died(w)
            self.run_ops(ops)

    def _on_message(self, w: Worker, msg: dict) -> None:
        ops: list = []
        with self.f.lock:
            t = msg.get("t")
            if t == "stem" and w.stem and w.state == "starting":
                w.stem_ms = _millis(msg.get("init_ms"))
                self.stem_cells.loaded(w)
                if w.action is None:
                    w.state = "stem"
                    w.last_used = time.time()
                else:  # taken while it was loading its modules
                    ops.append(("init", w))
            elif t == "ready":
                now = time.time()
                w.state = "ready"
                w.init_ms = _millis(msg.get("init_ms"))
                w.last_used = now
                for act in w.pending:
                    act.cold = True
                    act.prewarmed = w.stem
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
                        self.f.complete(act, DEVELOPER_ERROR, {"error": str(msg["dev_error"])})
                    else:
                        res = msg.get("result")
                        code = APPLICATION_ERROR if isinstance(res, dict) and "error" in res else SUCCESS
                        self.f.complete(act, code, res)
                    if w.retired and not w.assigned:
                        self.evict(w, "retired", ops)
                    else:
                        ops.extend(self.pump(w.key))
                    ops.extend(self.pump_all(exclude=w.key))
                    ops.extend(self.replenish())
        self.run_ops(ops)

    def _worker_died(self, w: Worker) -> list:
        """Fail what the dead worker held (lock held); returns follow-up I/O."""
        ops: list = []
        self.stem_cells.died(w)
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
            self.f.complete(act, DEVELOPER_ERROR, {"error": err})
        w.assigned.clear()
        w.pending.clear()
        if not self.f.stopping:
            if w.key is not None:
                ops.extend(self.pump(w.key))
            ops.extend(self.pump_all(exclude=w.key))
            ops.extend(self.replenish())
        return ops

    # ------------------------------------------------------------------ records

    def stop_all(self) -> None:
        with self.f.lock:
            workers = set(self.workers) | {w for p in self.pools.values() for w in p}
        for w in workers:
            w.kill()
        self.zygotes.stop()
        for w in workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=5)
                except Exception:  # noqa: BLE001 - shutting down regardless
                    pass
