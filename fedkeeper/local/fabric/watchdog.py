"""What the fabric watches over time, as an invoker does: activations past
their time limit, code loads that never finish, idle workers, and workers
over their memory limit (by the anonymous memory they hold: workers.held_bytes)."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Fabric
    from .workers import Worker

log = logging.getLogger("fedkeeper.fabric")

TICK_S = 0.02
# A code load gets the action's time limit plus this, as OpenWhisk's init timeout.
INIT_GRACE_S = 5.0


class Watchdog:
    def __init__(self, fabric: "Fabric"):
        self.fabric = fabric
        self._thread = threading.Thread(target=self._run, name="fabric-watchdog", daemon=True)
        self._next_mem = 0.0
        self._next_idle = 0.0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        f = self.fabric
        while not f.stopping:
            time.sleep(TICK_S)
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - time limits must outlive one bad tick
                log.exception("fabric watchdog: a tick failed; going on")

    def _tick(self) -> None:
        f = self.fabric
        now = time.time()
        ops: list = []
        with f.lock:
            self._time_limits(now, ops)
            self._init_limits(now, ops)
            self._idle(now, ops)
            watch = self._memory_candidates(now)
        f.scheduler.run_ops(ops)
        for w in watch:
            self._check_memory(w)

    def _time_limits(self, now: float, ops: list) -> None:
        f = self.fabric
        for w in list(f.scheduler.workers):
            if w.state != "ready" or not w.assigned:
                continue
            late = [a for a in w.assigned.values() if a.deadline is not None and now > a.deadline]
            if late:
                for a in late:
                    w.assigned.pop(a.id, None)
                    f.time_out(a)
                # The worker is killed as OpenWhisk removes the container;
                # anything else it held fails with it.
                f.scheduler.evict(w, "timeout", ops)

    def _init_limits(self, now: float, ops: list) -> None:
        f = self.fabric
        for w in list(f.scheduler.workers):
            if w.action is None:  # a stem cell: no action's limits yet
                continue
            limit_s = w.action.timeout_ms / 1000.0
            if w.state == "starting" and w.pending and now - w.spawned > limit_s + INIT_GRACE_S:
                for a in w.pending:
                    w.assigned.pop(a.id, None)
                    a.start = a.start or w.spawned
                    a.cold = True
                    f.time_out(a, during_init=True)
                w.pending.clear()
                f.scheduler.evict(w, "timeout", ops)

    def _idle(self, now: float, ops: list) -> None:
        f = self.fabric
        if now < self._next_idle:
            return
        self._next_idle = now + min(1.0, f.settings.idle_s / 4)
        for w in list(f.scheduler.workers):
            if w.state == "ready" and not w.assigned and now - w.last_used > f.settings.idle_s:
                f.scheduler.evict(w, "idle", ops)
        # memory freed by reaping goes to stem cells again
        ops.extend(f.scheduler.replenish())

    def _memory_candidates(self, now: float) -> list["Worker"]:
        f = self.fabric
        if now < self._next_mem:
            return []
        self._next_mem = now + f.settings.memory_check_s
        return [w for w in f.scheduler.workers if w.state == "ready" and w.proc and w.action is not None]

    def _check_memory(self, w: "Worker") -> None:
        f = self.fabric
        held = w.held_bytes()
        if held is None or held <= w.memory_mb * 1024 * 1024:
            return
        ops: list = []
        with f.lock:
            if w.kill_reason is None:
                log.info("worker %s of %s/%s exceeded %d MB (%d MB held)", w.id, *w.key,
                         w.memory_mb, held // (1024 * 1024))
                f.scheduler.evict(w, "memory", ops)
        f.scheduler.run_ops(ops)
