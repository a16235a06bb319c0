"""When and how an attempt's `running` mark reaches the store.

An attempt's document is written before its invocation (`submitting`) and
again when it ends (its outcome). The `running` mark in between carries
the platform's id for it: a keeper killed with -9 then adopts the attempt
on --resume instead of invoking its client again. Written on the attempt
documents, the marks were a third write per attempt, and an update costs
the embedded store about three inserts: at 100 no-op clients a round, the
marks' one bulk took 0.3-0.55 s of the store's time, at 1,000 about 6 s,
while the clients were writing their updates to the same store.

So a mark is held for `after_s`. An attempt that ends sooner has the mark's
fields written with its outcome, in the write it needed anyway. The marks
of attempts still running then are written as one document per batch
(store.RUNNING_MARKS: one insert, however many marks), with the keeper's
next write to the attempts (every tracking pass makes one; a helper call,
such as the aggregation semi_async stragglers run beside, makes one when it
ends). Those batches are folded into the attempts they name when a keeper
resumes the session (the marked attempts become `running` and are
adopted), and by an interrupted keeper (Ctrl-C, a cluster given up), which
writes every mark it holds first; they are dropped when the session ends.
A keeper killed within an attempt's hold leaves it `submitting`: --resume
records it as abandoned and invokes its client again, which is what it
always did for a keeper killed between an invocation and its mark. The
unique update key keeps the two from counting twice. Pure: an injected
clock, no store. Combiners write their attempts from threads of their own
(keeper/aggregation.py) through the same dispatcher, hence the lock."""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

Change = tuple[Any, dict[str, Any]]
Mark = tuple[Any, str, dict[str, Any]]   # (attempt id, session, mark fields)


class RunningMarks:
    """The `running` marks of accepted attempts: held, oldest first, until
    due; then written in a batch and kept until the attempt ends, so that
    its outcome still carries the mark's fields (the platform's acceptance
    time)."""

    def __init__(self, clock: Callable[[], float], after_s: float = 1.0):
        self.clock = clock
        self.after_s = after_s
        # doc id -> (when the mark is due, session, its fields); insertion order is due order
        self._held: dict[Any, tuple[float, str, dict[str, Any]]] = {}
        self._written: dict[Any, dict[str, Any]] = {}   # doc id -> fields, for attempts still running
        self.sessions: set[str] = set()                 # every session a mark was written for
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, doc_id: Any, session: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self._held[doc_id] = (self.clock() + self.after_s, session, fields)

    def with_changes(self, changes: Iterable[Change]) -> list[Change]:
        """`changes` to attempt documents, each carrying the fields of the
        mark it supersedes (its own win); those marks are done with."""
        out = []
        with self._lock:
            for doc_id, fields in changes:
                held = self._held.pop(doc_id, None)
                mark = held[2] if held is not None else self._written.pop(doc_id, None)
                if mark is not None:
                    fields = {**{k: v for k, v in mark.items() if k != "state"}, **fields}
                out.append((doc_id, fields))
        return out

    def due(self, everything: bool = False) -> list[Mark]:
        """The marks whose time came (every mark held, with `everything`),
        no longer held: the caller writes them."""
        now = self.clock()
        out: list[Mark] = []
        with self._lock:
            while self._held:
                doc_id = next(iter(self._held))
                at, session, fields = self._held[doc_id]
                if at > now and not everything:
                    break
                del self._held[doc_id]
                self._written[doc_id] = fields
                self.sessions.add(session)
                out.append((doc_id, session, fields))
        return out
