"""How a session stops early, as exceptions the CLI prints with `str(exc)`."""
from __future__ import annotations

from typing import Any


class SessionError(RuntimeError):
    """A session cannot go on (quorum not met, init or aggregation failed)."""


class SessionInterrupted(Exception):
    """The user interrupted a running session (Ctrl-C). The session is marked
    `interrupted` in the store and can be resumed with `--resume SESSION`."""

    def __init__(self, session: str, rounds_done: int = 0, resume_hint: str = ""):
        text = f"session {session} interrupted after {rounds_done} round(s)"
        super().__init__(text + (f"; resume it with: {resume_hint}" if resume_hint else ""))
        self.session = session
        self.rounds_done = rounds_done
        self.resume_hint = resume_hint


class ServiceLost(Exception):
    """A service the session needs (the store, or a cluster's platform) is
    gone and did not come back in time. Nothing is lost: the session stays
    resumable, and the message says how (one line, no traceback)."""

    def __init__(self, session: str, service: str, reason: str, resume_hint: str = ""):
        text = f"{service} is gone ({reason}); session {session} stopped"
        super().__init__(text + (f" and can be resumed with: {resume_hint}" if resume_hint else ""))
        self.session = session
        self.service = service
        self.reason = reason
        self.resume_hint = resume_hint


class SessionTakenOver(Exception):
    """Another keeper resumed the session while this one could not reach
    the store (its heartbeat went stale): this one stops at once and writes
    nothing more to the session, whose attempts the other keeper adopted."""

    def __init__(self, session: str, keeper: Any):
        where = f"{keeper.get('host')} (pid {keeper.get('pid')})" if isinstance(keeper, dict) else "another keeper"
        super().__init__(f"session {session} was resumed by {where} while this keeper could not reach "
                         "the store; this keeper stopped and leaves the session to it")
        self.session = session


class ClusterLost(Exception):
    """Raised inside the round loop when a cluster stayed unreachable past
    the keeper's patience; the session turns it into ServiceLost."""

    def __init__(self, cluster: str, reason: str):
        super().__init__(f"cluster {cluster}: {reason}")
        self.cluster = cluster
        self.reason = reason
