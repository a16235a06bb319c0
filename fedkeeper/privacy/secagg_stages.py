"""Secure aggregation's stages, driven by the keeper as rounds of
invocations around a training round (docs/privacy.md):

    u2 = stages.before_training(session, rnd, selected)   # advertise, share
    ... the round's clients in u2 train and upload masked vectors ...
    u3 = stages.before_aggregating(session, rnd, delivered)  # unmask
    ... fl_server_aggregator unmasks the sum of u3's vectors ...

Each stage invokes fl_secagg_client once per client with the training's
retry policy (backoff, max attempts, non-retryable errors, redeploy of a
missing function) within the round deadline, and records every attempt as
a document like any other (client "_secagg_<stage>/<client>", so that
per-client views skip them as they skip helper calls). It takes the
keeper's dispatcher as it is and imports nothing of the keeper: the keeper
calls it, never the other way round. A client
whose output is in the store has done the stage: a resumed keeper invokes
only the others, and reads back the sets u1, u2 and u3 the first keeper
fixed, which never change once written.
"""
from __future__ import annotations

import logging
import os
import secrets as pysecrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bson import ObjectId

from flcommon.secagg import relay
from flcommon.secagg.session import CLIENT_SECRET_KEY, threshold

from ..providers import ErrorClass, Outcome, ProviderError

log = logging.getLogger("fedkeeper.keeper")

FUNCTION = "fl_secagg_client"
OUTPUT = {"advertise": "keys", "share": "shares", "unmask": "reveal"}
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


@dataclass
class _Pending:
    """One client's stage across its attempts."""

    client: str
    cluster: str
    attempt: int          # the last attempt number taken (a resumed keeper continues it)
    uncounted: int        # attempts that never reached the platform, or made by an earlier keeper
    next_try: float = 0.0
    done: bool = False
    failed: bool = False
    last_error: str = ""

    @property
    def key(self) -> str:
        return f"_secagg_{self.client}"


class SecAggStages:
    """The stages of one session. `dispatcher` is the keeper's: its
    platforms (providers, function specs, signed payloads, redeploys), its
    retry policy, clock, sleep and rng, and its attempt records."""

    def __init__(self, dispatcher: Any, store: Any, client_cluster: dict[str, str], deadline_s: float,
                 threshold_share: float | None = None, emit: Callable[..., None] | None = None):
        self.dispatch = dispatcher
        self.store = store
        self.client_cluster = client_cluster
        self.deadline_s = deadline_s
        self.settings = {"threshold": threshold_share}
        self.emit = emit or (lambda *a, **k: None)

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
            self._enough(rnd, "mask", u3, len(u1))
            relay.set_sets(self.db, session, rnd, u3=u3)
            u3 = relay.sets(self.db, session, rnd)["u3"]
        revealed = self.run(session, rnd, "unmask", u3)
        self._enough(rnd, "unmask", revealed, len(u1))
        return u3

    def _enough(self, rnd: int, stage: str, done: list[str], of: int) -> None:
        need = self.threshold(of)
        if len(done) < need:
            raise StageError(f"round {rnd + 1}: secure aggregation's {stage} stage reached {len(done)} "
                             f"client(s), its threshold is {need}; the round cannot be aggregated securely")

    # ------------------------------------------------------------------ one stage
    def run(self, session: str, rnd: int, stage: str, clients: list[str]) -> list[str]:
        """Invoke `stage` for every client without its output stored, with
        the training's retry policy, until each is done or failed for good
        or the deadline passes; returns the clients whose output is stored."""
        output = OUTPUT[stage]
        have = set(relay.done(self.db, session, rnd, output, clients))
        pending = []
        for c in clients:
            if c not in have:
                before = self.store.last_attempt(session, rnd, f"_secagg_{stage}/{c}")
                pending.append(_Pending(f"{stage}/{c}", self.client_cluster[c], before, before))
        self.emit("secagg_stage", round=rnd, stage=stage, clients=len(clients), pending=len(pending))
        deadline = self.dispatch.clock() + self.deadline_s
        while True:
            now = self.dispatch.clock()
            live = [p for p in pending if not p.done and not p.failed]
            if not live or now >= deadline:
                break
            due = [p for p in live if p.next_try <= now]
            if due:
                self._invoke(session, rnd, stage, output, due)
            else:
                self.dispatch.sleep(min(0.2, max(0.005, min(p.next_try for p in live) - now)))
        missing = [f"{p.client.split('/', 1)[1]}: {p.last_error or 'round deadline passed'}"
                   for p in pending if not p.done]
        if missing:
            log.warning("secure aggregation %s, round %d: %s", stage, rnd + 1, "; ".join(missing))
        return relay.done(self.db, session, rnd, output, clients)

    def _invoke(self, session: str, rnd: int, stage: str, output: str, due: list[_Pending]) -> None:
        platforms, policy = self.dispatch.platforms, self.dispatch.policy
        docs = []
        for p in due:
            p.attempt += 1
            docs.append({"_id": ObjectId(), "session": session, "round": rnd, "client": p.key,
                         "attempt": p.attempt, "cluster": p.cluster,
                         "platform": platforms.provider(p.cluster).platform, "function": FUNCTION,
                         "memory_mb": platforms.spec(p.cluster, FUNCTION).memory_mb, "state": "submitting",
                         "submitted": self.dispatch.clock(), "stage": stage})
        self.dispatch.insert_attempts(docs)

        def call(p: _Pending) -> Outcome:
            payload = platforms.payload(function=FUNCTION, session=session, round=rnd,
                                        client=p.client.split("/", 1)[1], stage=stage, attempt=p.attempt)
            timeout = platforms.spec(p.cluster, FUNCTION).timeout_s + policy.grace_s
            try:
                return platforms.provider(p.cluster).call(FUNCTION, payload, timeout_s=timeout)
            except ProviderError as exc:
                return Outcome(platform_id="", ok=False, error_class=exc.error_class, error=str(exc),
                               retry_after=exc.retry_after)

        with ThreadPoolExecutor(max_workers=min(16, len(due))) as pool:
            outcomes = list(pool.map(call, due))
        changes = []
        for p, doc, out in zip(due, docs, outcomes):
            error = out.error or (out.result or {}).get("error")
            ok = out.ok and not error
            changes.append((doc["_id"], _fields(out, ok, error, self.dispatch.clock())))
            if ok or relay.get(self.db, session, rnd, p.client.split("/", 1)[1], output) is not None:
                p.done = True
                continue
            ec = out.error_class or ErrorClass.APPLICATION_ERROR
            p.last_error = f"{ec.value}: {error or 'failed'}"
            if ec == ErrorClass.UNREACHABLE:
                p.uncounted += 1
            if not ec.retryable or p.attempt - p.uncounted >= policy.max_attempts:
                p.failed = True
                continue
            p.next_try = self.dispatch.clock() + policy.backoff(max(1, p.attempt - p.uncounted),
                                                                self.dispatch.rng, out.retry_after)
            if ec == ErrorClass.FUNCTION_MISSING:
                platforms.redeploy(p.cluster, FUNCTION)
        self.dispatch.update_attempts(changes)


def _fields(out: Outcome, ok: bool, error: str | None, now: float) -> dict[str, Any]:
    """An outcome as the fields of its attempt document (as the keeper records them)."""
    return {"platform_id": out.platform_id or None, "state": "succeeded" if ok else "failed",
            "error_class": out.error_class.value if out.error_class else None, "error": error,
            "start": out.start, "end": out.end, "duration_ms": out.duration_ms, "wait_ms": out.wait_ms,
            "init_ms": out.init_ms, "cold_start": out.cold_start, "finished": now}
