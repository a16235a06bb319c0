"""When an attempt's `running` mark reaches the store.

An attempt's document is written before its invocation (`submitting`) and
again when it ends (its outcome). The `running` mark in between carries
the platform's id for it: a keeper killed with -9 then adopts the attempt
on --resume instead of invoking its client again. Written at once for every
attempt, the mark was a third write per attempt, and an update costs the
embedded store about three inserts; at 100 no-op clients a round, that one
bulk took 0.3-0.55 s of the store's time while the clients were writing
their updates to it.

So a mark is held for `after_s`. An attempt that ends sooner has the mark's
fields written with its outcome, in the write it needed anyway. An attempt
still running then has its mark written with the keeper's next write to
the attempts (every tracking pass makes one; a helper call, such as the
aggregation semi_async stragglers run beside, makes one when it ends), and
an interrupted keeper (Ctrl-C, a cluster given up) writes every mark it
holds before it stops. A keeper killed within those seconds leaves the
attempt `submitting`: --resume records it as abandoned and invokes its
client again, which is what it always did for a keeper killed between an
invocation and its mark. The unique update key keeps the two from counting
twice. Pure: an injected clock, no store."""
from __future__ import annotations

from typing import Any, Callable, Iterable

Change = tuple[Any, dict[str, Any]]


class RunningMarks:
    """The `running` marks of accepted attempts not written yet, oldest first."""

    def __init__(self, clock: Callable[[], float], after_s: float = 1.0):
        self.clock = clock
        self.after_s = after_s
        # doc id -> (when the mark is due, its fields); insertion order is due order
        self._held: dict[Any, tuple[float, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, doc_id: Any, fields: dict[str, Any]) -> None:
        self._held[doc_id] = (self.clock() + self.after_s, fields)

    def with_changes(self, changes: Iterable[Change]) -> list[Change]:
        """`changes` to attempt documents, each carrying the fields of the
        mark it supersedes (its own win), followed by the marks now due."""
        out = []
        for doc_id, fields in changes:
            held = self._held.pop(doc_id, None)
            if held is not None:
                mark = {k: v for k, v in held[1].items() if k != "state"}
                fields = {**mark, **fields}
            out.append((doc_id, fields))
        return out + self.due()

    def due(self, everything: bool = False) -> list[Change]:
        """The marks whose time came (every mark held, with `everything`),
        no longer held."""
        now = self.clock()
        out: list[Change] = []
        while self._held:
            doc_id = next(iter(self._held))
            at, fields = self._held[doc_id]
            if at > now and not everything:
                break
            del self._held[doc_id]
            out.append((doc_id, fields))
        return out
