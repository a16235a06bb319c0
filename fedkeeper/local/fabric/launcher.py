"""How the scheduler's workers start: a stem cell is forked from its
runtime's zygote (zygotes.py) on a thread of its own, since the first fork
waits for the zygote's import and an invoke or a deploy may be the caller;
anything else, or a stem cell whose zygote cannot fork, is started as a
process of its own (worker.py), importing what it needs itself."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..prewarm import preload_for
from .workers import Worker
from .zygotes import Zygote, Zygotes

if TYPE_CHECKING:
    from .core import Fabric

log = logging.getLogger("fedkeeper.fabric")


class Launcher:
    """`serve(w)` runs on a thread of its own once `w`'s process runs (it
    reads the worker's messages until it dies); `failed(w, error)` is called
    when the process could not start."""

    def __init__(self, fabric: "Fabric", serve: Callable[[Worker], None], failed: Callable[[Worker, str], None]):
        self.f = fabric
        self.zygotes = Zygotes()
        self._serve = serve
        self._failed = failed

    def log_path(self, w: Worker) -> Path:
        a = w.action
        name = f"{a.namespace}.{a.name}.log" if a is not None else f"stem-cell.{w.runtime or 'stock'}.log"
        return self.f.logs_dir / name[:250]

    def start_zygote(self, runtime: str | None) -> Zygote | None:
        """The runtime's zygote, started now if none runs (None if it cannot)."""
        return self.zygotes.get(runtime, preload_for(runtime),
                                self.f.logs_dir / f"stem-cell.{runtime or 'stock'}.log"[:250], str(self.f.logs_dir))

    def spawn(self, w: Worker) -> None:
        if w.stem and w.action is None and self.f.settings.fork_stem_cells:
            threading.Thread(target=self._spawn_forked, args=(w,), name=f"fork-{w.id}", daemon=True).start()
            return
        self._spawn_process(w)

    def _serve_in_thread(self, w: Worker) -> None:
        threading.Thread(target=self._serve, args=(w,), name=f"worker-{w.id}", daemon=True).start()

    def _spawn_forked(self, w: Worker) -> None:
        if w.kill_reason is not None or self.f.stopping:
            return
        z = self.start_zygote(w.runtime)
        if z is not None:
            try:
                w.start_forked(z)
            except OSError as exc:
                # A stop signal reaches the whole process group: the zygote
                # may die of it before this process's handler marks the
                # fabric stopping. That is no failure of the zygote's.
                stopped = z.ended_by(signal.SIGTERM)
                if self.f.stopping:
                    return
                if not stopped:
                    log.warning("the %s zygote failed (%s): stem cells start as their own processes",
                                w.runtime, exc)
            else:
                with self.f.lock:
                    gone = w.kill_reason is not None or w.state == "dead" or self.f.stopping
                if gone:  # evicted (or the fabric stopped) while it was being forked (its reader ends at once)
                    w.kill()
                self._serve_in_thread(w)
                return
        self._spawn_process(w)

    def _spawn_process(self, w: Worker) -> None:
        a = w.action
        if w.kill_reason is not None or w.state == "dead":
            return
        try:
            w.start_process(self.log_path(w), a.code_dir if a is not None else str(self.f.logs_dir),
                            preload_for(w.runtime))
        except OSError as exc:
            self._failed(w, f"could not start a worker process: {exc}")
            return
        with self.f.lock:
            gone = w.kill_reason is not None or w.state == "dead" or self.f.stopping
        if gone:  # evicted (or the fabric stopped) while its process started: nothing else would end it
            w.kill()
        self._serve_in_thread(w)
