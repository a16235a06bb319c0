"""One secure-aggregation stage of one round as a round of invocations,
driven by the keeper's dispatcher and attempt state machine
(keeper/attempts.py, keeper/dispatch.py) the way a training round is:

- every client of the stage is a `Slot` (client `_secagg_<stage>/<client>`,
  function fl_secagg_client) in an `AttemptTable` under a `RoundDispatch`
  whose deadline is the stage's;
- attempts are invoked without blocking, their record written before the
  invocation, and tracked in batches by `Dispatcher.track`: per-attempt
  deadlines (function timeout + grace), capped backoff with jitter,
  Retry-After, non-retryable classes, a missing function redeployed, lost
  invocations invoked again, clusters that stop answering asked with
  backoff and given up (ClusterLost) as for training;
- at the stage deadline the running attempts are abandoned and the client
  is out of the stage: the protocol's threshold decides whether the round
  can go on (secagg_stages.py), and the Shamir shares of the others rebuild
  what the dropped client's masks need;
- a client whose output is in the store has done the stage, whatever its
  attempts said (a retried stage writes nothing new);
- a resumed keeper adopts an attempt an earlier keeper left running (it is
  tracked to its end, not invoked again) and continues the numbering. As
  for training, an attempt's running mark is held a moment
  (keeper/running_marks.py): one a keeper killed with -9 left within it is
  invoked again, which writes nothing new.

Stage attempts are never hedged: a stage is short and any answer above the
threshold will do.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flcommon.secagg import relay

from ..keeper.attempts import DELIVERED, FAILED, RUNNING, WAITING, AttemptTable, HedgePolicy, Slot
from ..keeper.round_closing import DEADLINE, RoundDispatch
from ..providers import Invocation


def slot_name(stage: str, client: str) -> str:
    """The `client` of a stage's attempt records: per-client views skip
    names starting with `_`, as they skip helper calls."""
    return f"_secagg_{stage}/{client}"


def client_of(slot: Slot) -> str:
    return slot.client.split("/", 1)[1]


class StageRun:
    """Run `stage` of round `rnd` for the clients without its output."""

    def __init__(self, dispatcher: Any, store: Any, function: str, session: str, rnd: int, stage: str,
                 client_cluster: dict[str, str], deadline_s: float):
        self.dispatch = dispatcher
        self.store = store
        self.function = function
        self.session = session
        self.rnd = rnd
        self.stage = stage
        self.output = relay.STAGE_OUTPUT[stage]
        self.client_cluster = client_cluster
        self.deadline_s = deadline_s
        self._checked: dict[str, int] = {}   # slot -> the attempt whose failure was checked against the store

    @property
    def db(self):
        return self.store.db

    def run(self, clients: list[str]) -> dict[str, str]:
        """Invoke, track and retry until every client did the stage or is
        out of it; returns the clients out of it, each with why."""
        have = set(relay.done(self.db, self.session, self.rnd, self.output, clients))
        todo = [c for c in clients if c not in have]
        if not todo:
            return {}
        table = self._adopt(todo)
        rd = RoundDispatch(table, self.deadline_s)
        why = rd.verdict()
        while why is None:
            self._submit(table, rd.to_invoke())
            self.dispatch.track(self.session, [table])
            self._settle(table)
            why = rd.verdict()
            if why is None:
                self.dispatch.sleep(table.sleep_hint())
        dropped = self._reasons(table, why)
        closing = rd.close(why)
        self.dispatch.abandon(closing.abandoned, f"secure aggregation's {self.stage} stage deadline passed")
        return dropped

    # ------------------------------------------------------------------ slots
    def _adopt(self, todo: list[str]) -> AttemptTable:
        """The stage's slots, continuing what an earlier keeper recorded."""
        policy = dataclasses.replace(self.dispatch.policy, hedging=HedgePolicy())
        slots = {slot_name(self.stage, c): Slot(slot_name(self.stage, c), self.client_cluster[c], self.rnd,
                                                function=self.function) for c in todo}
        table = AttemptTable(policy, self.dispatch.clock, self.dispatch.rng, slots.values(),
                             deliveries=self.dispatch.deliveries)
        last: dict[str, dict[str, Any]] = {}
        for a in self.store.attempts(self.session, self.rnd):
            s = slots.get(a["client"])
            if s is not None and a["attempt"] > s.attempt:
                s.attempt = s.uncounted = a["attempt"]   # an earlier keeper's: not counted here
                last[s.client] = a
        now = self.dispatch.clock()
        for name, a in last.items():
            if a.get("state") == "running" and a.get("platform_id"):
                s = slots[name]
                s.doc_id = a["_id"]
                self.dispatch.remember(a["_id"], a["cluster"], a.get("platform", ""), self.function)
                table.adopted(s, Invocation(self.function, a["platform_id"], a.get("submitted", now)),
                              self._timeout(s.cluster))
        return table

    def _timeout(self, cluster: str) -> float:
        return self.dispatch.platforms.spec(cluster, self.function).timeout_s

    # ------------------------------------------------------------------ attempts
    def _submit(self, table: AttemptTable, ready: list[Slot]) -> None:
        """Invoke slots whose attempt numbers were taken, as training's are
        (Dispatcher.submit); each payload and record names the stage."""
        self.dispatch.submit(self.session, self.rnd, table, ready, function=self.function,
                             payload_of=lambda s: {"client": client_of(s), "stage": self.stage},
                             record={"stage": self.stage})

    def _settle(self, table: AttemptTable) -> None:
        """A client whose attempt failed but whose output is stored (an
        earlier attempt landed late) has done the stage: no retry."""
        failed = [s for s in table.in_state(WAITING, FAILED)
                  if s.inv is None and self._checked.get(s.client) != s.attempt and s.last_error]
        if not failed:
            return
        for s in failed:
            self._checked[s.client] = s.attempt
        done = set(relay.done(self.db, self.session, self.rnd, self.output, [client_of(s) for s in failed]))
        for s in failed:
            if client_of(s) in done:
                table.delivered(s)

    def _reasons(self, table: AttemptTable, why: str) -> dict[str, str]:
        """Why each client that did not deliver is out of the stage."""
        out = {}
        for s in table:
            if s.state == DELIVERED:
                continue
            if s.state == RUNNING and why == DEADLINE:
                reason = f"no answer within the stage deadline ({self.deadline_s:g}s)"
            elif s.state == WAITING:
                reason = f"{s.last_error}; no retry before the stage deadline ({self.deadline_s:g}s)"
            elif s.state == FAILED:
                reason = f"{s.last_error or 'failed'} (after {s.counted} attempt(s))"
            else:
                reason = s.last_error or "did not deliver"
            out[client_of(s)] = reason
        return out
