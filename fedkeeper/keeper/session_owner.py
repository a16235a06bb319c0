"""Which keeper runs a session, so that two never run one at once: both
would invoke its clients and record its attempts.

A keeper that opens a session writes itself (host, boot time, process id,
process start time) on the session document. Another keeper may resume a
session that is not `running`, or whose recorded keeper is gone:
  - on this machine (same host name and boot time), its process is no longer alive (checked by process id and
    start time, so a reused id does not count): a keeper killed with kill -9
    is resumed at once;
  - elsewhere, its heartbeat is older than STALE_AFTER_S, the only sign of
    life another machine's keeper gives;
  - this very process ran it before (a sweep retrying its own session).
The keeper then claims it with one conditional write (Store.claim_session):
should another keeper have claimed it since the check, this one stops.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from typing import Any, Callable

import psutil

from ..store import STALE_AFTER_S, effective_state


def this_keeper() -> dict[str, Any]:
    """What a keeper writes on the session document it opens. `boot` (when
    the machine booted) tells two machines of one host name apart (cloned
    virtual machines, containers on the host's network), whose process ids
    mean nothing to each other. Read once per process: both times derive
    from the wall clock, which may be stepped while the keeper runs, and
    every conditional write must name the keeper as it was recorded."""
    return dict(_identity(os.getpid()))


@functools.lru_cache(maxsize=4)
def _identity(pid: int) -> tuple[tuple[str, Any], ...]:
    return (("host", socket.gethostname()), ("boot", psutil.boot_time()), ("pid", pid),
            ("started", psutil.Process(pid).create_time()))


def same_boot(recorded: Any, mine: Any) -> bool:
    """Whether a keeper's recorded boot time is this machine's: the kernel
    derives it from the clock, which may be stepped by a second or two
    since; a record without one (an earlier version's) is taken as this
    machine's."""
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool) or not isinstance(mine, (int, float)):
        return True
    return abs(float(recorded) - float(mine)) < 10.0


def process_alive(pid: Any, started: Any, boot: Any = None) -> bool:
    """Whether process `pid` runs on this host and is the one that started
    at `started` (seconds since the epoch, as psutil gives). With the
    machine's `boot` time recorded beside it, the start is compared as
    seconds after boot, which a step of the wall clock since (moving both)
    leaves as they were. A killed process its parent has not reaped yet (a
    zombie) runs no more."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(started, (int, float)):
        return False
    try:
        proc = psutil.Process(pid)
        if isinstance(boot, (int, float)) and not isinstance(boot, bool):
            moved = (proc.create_time() - psutil.boot_time()) - (float(started) - float(boot))
        else:
            moved = proc.create_time() - float(started)
        return abs(moved) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError, ValueError):
        return False


def resume_blocked(doc: dict[str, Any], *, me: dict[str, Any] | None = None, now: float | None = None,
                   alive: Callable[[Any, Any, Any], bool] = process_alive) -> str | None:
    """Why the session of `doc` may not be resumed now (another keeper runs
    it), or None when it may."""
    if doc.get("state") != "running":
        return None
    me = me or this_keeper()
    owner = doc.get("keeper") or {}
    session = doc.get("_id")
    if owner.get("host") == me["host"] and same_boot(owner.get("boot"), me.get("boot")):
        if owner.get("pid") == me["pid"] and owner.get("started") == me["started"]:
            return None
        if alive(owner.get("pid"), owner.get("started"), owner.get("boot")):
            return (f"session {session} is running in another keeper on this machine (process "
                    f"{owner.get('pid')}); stop it (Ctrl-C) before resuming the session here")
        return None
    beat = doc.get("heartbeat")
    now = time.time() if now is None else now
    if not isinstance(beat, (int, float)) or effective_state(doc, now) != "running":
        return None   # no heartbeat was ever written, or it stopped: that keeper is gone
    where = f"on {owner['host']}" if owner.get("host") else "elsewhere"
    return (f"session {session} is running in a keeper {where} (its heartbeat is {max(now - beat, 0):.0f}s "
            f"old); stop that keeper, or resume once its heartbeat is {STALE_AFTER_S:.0f}s old")
