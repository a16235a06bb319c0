"""The fabric's stem cells (OpenWhisk's prewarmed containers): per runtime,
worker processes started ahead of need that have imported the runtime's
heavy modules (fedkeeper/local/prewarm.py) and wait for an action's code.
The scheduler takes one for a cold start and accounts their memory; this
keeps which are untaken, and which to start."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...runtimes.isolation import action_runtime
from .entities import Action
from .workers import Worker

if TYPE_CHECKING:
    from .core import Fabric

# a runtime whose stem cells die this many times in a row before they are
# ready gets no more (its modules cannot be loaded)
MAX_FAILURES = 3


@functools.lru_cache(maxsize=256)
def _runtime_of_exec(kind: str | None, image: str | None) -> str | None:
    return action_runtime({"kind": kind, "image": image})


def runtime_of(action: Action) -> str | None:
    """The runtime an action's workers run (cached: telling it from an
    image's tag costs a content hash)."""
    return _runtime_of_exec(action.exec.get("kind"), action.exec.get("image"))


class StemCells:
    """Untaken stem cells per runtime; every method runs under the fabric's lock."""

    def __init__(self, fabric: "Fabric"):
        self.f = fabric
        self.cells: dict[str | None, list[Worker]] = {}
        self.failures: dict[str | None, int] = {}

    def idle(self, keep: Worker | None = None) -> list[Worker]:
        return [w for cells in self.cells.values() for w in cells if w is not keep and not w.kill_reason]

    def find(self, action: Action) -> Worker | None:
        """A stem cell of the action's runtime: a ready one, else the one
        that started first (still loading its modules). Like OpenWhisk's
        prewarm containers, a cell serves only actions given at least its
        memory: one that already holds the runtime's modules would break a
        smaller action's memory limit (a 128 MB no-op action on a
        TensorFlow cell is killed)."""
        if action.code_dir is None:
            return None
        if int(action.limits.get("memory", 0)) < self.f.settings.stem_memory_mb:
            return None
        cells = [w for w in self.cells.get(runtime_of(action), ())
                 if not w.kill_reason and w.state in ("stem", "starting")]
        if not cells:
            return None
        return min(cells, key=lambda w: (w.state != "stem", w.spawned))

    def discard(self, w: Worker) -> None:
        """No longer an untaken stem cell (taken, or gone)."""
        cells = self.cells.get(w.runtime)
        if cells and w in cells:
            cells.remove(w)

    def loaded(self, w: Worker) -> None:
        self.failures.pop(w.runtime, None)

    def died(self, w: Worker) -> None:
        if w.stem and w.stem_ms is None and not w.kill_reason:   # before its modules were loaded
            self.failures[w.runtime] = self.failures.get(w.runtime, 0) + 1

    def to_start(self, free_mb: int) -> list[Worker]:
        """New stem cells, up to each runtime's count within `free_mb`, for
        the runtimes some deployed action runs on (a fabric serving other
        runtimes does not hold a TensorFlow process for nothing)."""
        mb = self.f.settings.stem_memory_mb
        wanted = {r: n for r, n in self.f.settings.stem_cells.items()
                  if len(self.cells.get(r, ())) < n and self.failures.get(r, 0) < MAX_FAILURES}
        if not wanted or free_mb < mb:
            return []
        in_use = {runtime_of(a) for ns in self.f.namespaces.values() for a in ns.actions.values()
                  if a.code_dir is not None}
        new: list[Worker] = []
        for runtime, count in wanted.items():
            if runtime not in in_use:
                continue
            cells = self.cells.setdefault(runtime, [])
            while len(cells) < count and free_mb >= mb:
                w = Worker(None, runtime=runtime, memory_mb=mb)
                cells.append(w)
                new.append(w)
                free_mb -= mb
        return new

    def trim(self) -> list[Worker]:
        """The untaken stem cells beyond each runtime's count (after a change
        of the settings), to evict."""
        out = []
        for runtime, cells in self.cells.items():
            out += cells[self.f.settings.stem_cells.get(runtime or "", 0):]
        return out
