"""Waiting out a store that stopped answering.

A keeper that loses its store mid-round should neither die with a pymongo
traceback nor give up at the first refused connection: the embedded server
may be restarting, a remote one may be failing over. Every `Store` call
goes through `Patience.run`, which retries on connection failures with a
capped exponential backoff for at most `patience_s` in all, logs one line
when the wait starts and one when the store is back, and then raises
`StoreUnavailable`, an error that names the store (never its credentials).
When the caller owns the store (the embedded server), `restart` is tried
once per outage before waiting on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError

log = logging.getLogger("fedkeeper.store")

T = TypeVar("T")

#: pymongo's own wait for a server before a call fails: the unit in which
#: an outage is noticed.
SERVER_SELECTION_MS = 5_000


class StoreUnavailable(RuntimeError):
    """The store did not answer within the time the caller would wait."""

    def __init__(self, where: str, waited_s: float, cause: BaseException):
        reason = str(cause).split(",")[0].split("\n")[0][:160]
        super().__init__(f"the store at {where} is unreachable ({waited_s:.0f}s without an answer: {reason})")
        self.where = where
        self.waited_s = waited_s


def display_address(url: str) -> str:
    """host:port of a MongoDB URL, without user or password."""
    try:
        u = urlsplit(url)
        return u.netloc.rpartition("@")[2] or url.split("://")[0]
    except ValueError:
        return "the configured URL"


def _only_duplicates(exc: BulkWriteError) -> bool:
    errors = (exc.details or {}).get("writeErrors") or []
    return bool(errors) and all(e.get("code") == 11000 for e in errors)


class Patience:
    def __init__(self, where: str, patience_s: float = 0.0, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.where = where
        self.patience_s = patience_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._clock = clock
        #: starts the store again when the caller owns it; True when it answers
        self.restart: Callable[[], bool] | None = None

    def run(self, fn: Callable[..., T], *args: Any, insert: bool = False, **kwargs: Any) -> T:
        """fn(*args, **kwargs), retried while the store is unreachable.

        `insert`: a duplicate key on a retry means the earlier try landed
        before its answer was lost, so it counts as done."""
        started: float | None = None
        delay = self.backoff_s
        restart = self.restart
        while True:
            try:
                result = fn(*args, **kwargs)
            except DuplicateKeyError:
                if insert and started is not None:
                    return None  # type: ignore[return-value]
                raise
            except BulkWriteError as exc:
                if insert and started is not None and _only_duplicates(exc):
                    return None  # type: ignore[return-value]
                raise
            except ConnectionFailure as exc:
                now = self._clock()
                if started is None:
                    started = now
                    if self.patience_s > 0:
                        log.warning("the store at %s is unreachable; waiting up to %.0fs for it",
                                    self.where, self.patience_s)
                waited = now - started
                if restart is not None and self.patience_s > 0:
                    restart, restarted = None, self._restart()
                    if restarted:
                        continue
                if waited >= self.patience_s:
                    raise StoreUnavailable(self.where, waited + SERVER_SELECTION_MS / 1000, exc) from None
                self._sleep(min(delay, self.patience_s - waited))
                delay = min(delay * 2, self.backoff_max_s)
                continue
            if started is not None:
                log.warning("the store at %s answers again after %.0fs", self.where, self._clock() - started)
            return result

    def _restart(self) -> bool:
        try:
            ok = bool(self.restart and self.restart())
        except Exception as exc:  # a failed restart leaves the bounded wait to decide
            log.warning("restarting the store at %s failed: %s", self.where, str(exc).splitlines()[0][:200])
            return False
        if ok:
            log.warning("the store at %s was restarted", self.where)
        return ok
