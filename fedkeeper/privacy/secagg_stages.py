"""Secure aggregation's stages, driven by the keeper as rounds of
invocations around a training round (docs/privacy.md):

    u2 = stages.before_training(session, rnd, selected)   # advertise, share
    ... the round's clients in u2 train and upload masked vectors ...
    u3 = stages.before_aggregating(session, rnd, delivered)  # unmask
    ... fl_server_aggregator unmasks the sum of u3's vectors ...

Each stage invokes fl_secagg_client once per client through the keeper's
dispatcher and attempt state machine, with the training's retries and a
deadline of its own (secagg_dispatch.py), and records every attempt as a
document like any other (client "_secagg_<stage>/<client>", so that
per-client views skip them as they skip helper calls). A client out of a
stage (failed for good, or no answer by the deadline) is out of the round's
sets; the threshold decides whether the round goes on. A client whose output
is in the store has done the stage: a resumed keeper invokes only the others
(adopting attempts left running), and reads back the sets u1, u2 and u3 the
first keeper fixed, which never change once written.

The keeper calls this module, never the other way round at import time: the
state machine is imported only when a session's stages run.
"""
from __future__ import annotations

import logging
import os
import secrets as pysecrets
from pathlib import Path
from typing import Any, Callable

from flcommon.secagg import graph, relay
from flcommon.secagg.session import CLIENT_SECRET_KEY, neighbours, threshold

log = logging.getLogger("fedkeeper.keeper")

FUNCTION = "fl_secagg_client"
CLIENT_SECRET_ENV = "FEDKEEPER_CLIENT_SECRET"
#: what client functions get bound besides the shared settings
CLIENT_FUNCTIONS = ("fl_client", FUNCTION)


def client_secret(state_dir: Path) -> str:
    """The secret client functions derive their secure-aggregation keys
    from. Bound to client functions only, never to the aggregator: from the
    environment, or generated once per state directory (mode 0600)."""
    env = os.environ.get(CLIENT_SECRET_ENV)
    if env:
        return env
    path = Path(state_dir) / "client_secret"
    if path.exists():
        return path.read_text().strip()
    value = pysecrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def bound_for(function: str, state_dir: Path) -> dict[str, str]:
    """What a function gets bound for secure aggregation: the client secret
    for client functions, nothing for the others."""
    return {CLIENT_SECRET_KEY: client_secret(state_dir)} if function in CLIENT_FUNCTIONS else {}


class StageError(RuntimeError):
    """A stage reached fewer clients than the threshold: the round cannot be
    aggregated securely (the keeper ends the session with this message)."""


class SecAggStages:
    """The stages of one session. `dispatcher` is the keeper's: its
    platforms (providers, function specs, signed payloads, redeploys), its
    retry policy, clock, sleep and rng, its tracking and its attempt records."""

    def __init__(self, dispatcher: Any, store: Any, client_cluster: dict[str, str], deadline_s: float,
                 threshold_share: float | None = None, emit: Callable[..., None] | None = None,
                 neighbours: int | str | None = None):
        self.dispatch = dispatcher
        self.store = store
        self.client_cluster = client_cluster
        self.deadline_s = deadline_s
        self.settings = {"threshold": threshold_share, "neighbours": neighbours}
        self.emit = emit or (lambda *a, **k: None)
        self.dropped: dict[tuple[int, str], dict[str, str]] = {}   # (round, stage) -> client -> why

    @property
    def db(self):
        return self.store.db

    def threshold(self, n: int) -> int:
        return threshold(self.settings, n)

    # ------------------------------------------------------------------ the two hooks
    def before_training(self, session: str, rnd: int, selected: list[str]) -> list[str]:
        """Advertise and share; returns u2, the clients that may train."""
        sets = relay.sets(self.db, session, rnd)
        u1 = sets.get("u1")
        if u1 is None:
            u1 = self.run(session, rnd, "advertise", selected)
            self._enough(rnd, "advertise", u1, len(selected))
            relay.set_sets(self.db, session, rnd, u1=u1)
            u1 = relay.sets(self.db, session, rnd)["u1"]
        u2 = sets.get("u2")
        if u2 is None:
            u2 = self.run(session, rnd, "share", u1)
            self._enough(rnd, "share", u2, len(u1))
            relay.set_sets(self.db, session, rnd, u2=u2)
            u2 = relay.sets(self.db, session, rnd)["u2"]
        return u2

    def before_aggregating(self, session: str, rnd: int, delivered: list[str]) -> list[str]:
        """Fix u3 (the clients whose masked vectors are summed) and collect
        the reveals; returns u3, the aggregator's client list."""
        sets = relay.sets(self.db, session, rnd)
        u1, u2 = sets["u1"], sets["u2"]
        u3 = sets.get("u3")
        if u3 is None:
            u3 = sorted(c for c in delivered if c in u2)
            self.dropped[(rnd, "mask")] = {c: "no masked update delivered" for c in u2 if c not in u3}
            self._enough(rnd, "mask", u3, len(u1))
            relay.set_sets(self.db, session, rnd, u3=u3)
            u3 = relay.sets(self.db, session, rnd)["u3"]
        self._one_part(session, rnd, u1, u3)
        revealed = self.run(session, rnd, "unmask", u3)
        self._enough(rnd, "unmask", revealed, len(u1))
        return u3

    def _one_part(self, session: str, rnd: int, u1: list[str], u3: list[str]) -> None:
        """Dropouts that split u3 in the neighbour graph would let unmasking
        reveal each part's own sum: the clients would refuse to reveal and
        the aggregator to unmask, so the round ends here, saying why."""
        split = graph.parts(neighbours(self.settings, session, rnd, u1), u3)
        if len(split) > 1:
            raise StageError(f"round {rnd + 1}: the {len(u3)} clients that delivered a masked update fall into "
                             f"{len(split)} unconnected parts of the neighbour graph (sizes "
                             f"{', '.join(str(len(p)) for p in split)}); unmasking would reveal each part's sum, "
                             "so the round cannot be aggregated securely (more neighbours make such a split "
                             "less likely)")

    def _enough(self, rnd: int, stage: str, done: list[str], of: int) -> None:
        need = self.threshold(of)
        if len(done) < need:
            dropped = self.dropped.get((rnd, stage)) or {}
            why = "; ".join(f"{c}: {r}" for c, r in sorted(dropped.items()))
            raise StageError(f"round {rnd + 1}: secure aggregation's {stage} stage reached {len(done)} of "
                             f"{of} client(s), below its threshold of {need}"
                             + (f" ({why})" if why else "") + "; the round cannot be aggregated securely")

    # ------------------------------------------------------------------ one stage
    def run(self, session: str, rnd: int, stage: str, clients: list[str]) -> list[str]:
        """Run `stage` for every client without its output stored, until each
        has done it or is out of it, or the stage deadline passes; returns
        the clients whose output is stored."""
        from .secagg_dispatch import StageRun   # the keeper's state machine; see the module doc
        self.emit("secagg_stage", round=rnd, stage=stage, clients=len(clients))
        dropped = StageRun(self.dispatch, self.store, FUNCTION, session, rnd, stage, self.client_cluster,
                           self.deadline_s).run(clients)
        done = relay.done(self.db, session, rnd, relay.STAGE_OUTPUT[stage], clients)
        dropped = {c: why for c, why in dropped.items() if c not in done}
        self.dropped[(rnd, stage)] = dropped
        if dropped:
            log.warning("secure aggregation %s, round %d: %s", stage, rnd + 1,
                        "; ".join(f"{c}: {why}" for c, why in sorted(dropped.items())))
        return done
