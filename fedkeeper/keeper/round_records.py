"""The attempt documents of the rounds this keeper started, as it wrote
them, so that a round's closing record (the round event, its CSV) needs no
read of them back: reading a 1,000-client round's attempts took 0.15 s of
the embedded store, a 100-client one's 17-20 ms, at every round's end.

Only a round the keeper started itself is kept (begin(): a new session's
round 0, a later round that had no round document), and only until it is
taken. Every write to such a round's attempts goes through the dispatcher,
and what fl_invoker writes on an attempt it invoked (`running`, its
platform id) the dispatcher reads back right after the call and copies, so
the copy is what the store holds. A round resumed from the store is not
kept, and its records are read back as before. Combiners write from their
own threads, hence the lock."""
from __future__ import annotations

import threading
from typing import Any, Iterable


class RoundRecords:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: dict[tuple[str, int], dict[Any, dict[str, Any]]] = {}
        self._round_of: dict[Any, tuple[str, int]] = {}

    def begin(self, session: str, rnd: int) -> None:
        """A round none of whose attempts exists yet: a new session's
        round 0 (its init call is filed under it), a later round without a
        round document."""
        with self._lock:
            self._rounds[(session, rnd)] = {}

    def clear(self) -> None:
        """A session (re)starts: what an interrupted run kept is stale."""
        with self._lock:
            self._rounds.clear()
            self._round_of.clear()

    def inserted(self, docs: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for d in docs:
                kept = self._rounds.get((d["session"], d["round"]))
                if kept is not None:
                    kept[d["_id"]] = dict(d)
                    self._round_of[d["_id"]] = (d["session"], d["round"])

    def changed(self, changes: Iterable[tuple[Any, dict[str, Any]]]) -> None:
        """Fields set on attempt documents (a $set each)."""
        with self._lock:
            for doc_id, fields in changes:
                key = self._round_of.get(doc_id)
                if key is not None:
                    self._rounds[key][doc_id].update(fields)

    def take(self, session: str, rnd: int) -> list[dict[str, Any]] | None:
        """The round's attempt documents in the store's order (client,
        attempt), and the round forgotten; None for a round not kept."""
        with self._lock:
            kept = self._rounds.pop((session, rnd), None)
            if kept is None:
                return None
            for doc_id in kept:
                self._round_of.pop(doc_id, None)
        return sorted(kept.values(), key=lambda d: (d["client"], d["attempt"]))
