"""Round modes (training.mode, docs/round-modes.md), one object each behind
`RoundMode`, sharing dispatch and tracking (dispatch.py):

  sync        a round waits for its clients: quorum plus deadline (sync.py).
  semi_async  a round closes at quorum; stragglers join later rounds as stale
              updates within `staleness_tolerance` (semi_async.py).
  async       FedBuff: k invocations in flight, a server step every
              `buffer_size` updates (fedbuff.py; `async` is a Python keyword).
"""
from __future__ import annotations

from .base import RoundContext, RoundMode
from .fedbuff import AsyncRounds
from .semi_async import SemiAsyncRounds
from .sync import ClosingRounds, SyncRounds

MODES: dict[str, type[RoundMode]] = {m.name: m for m in (SyncRounds, SemiAsyncRounds, AsyncRounds)}


def make_mode(name: str, ctx: RoundContext) -> RoundMode:
    try:
        return MODES[name](ctx)
    except KeyError:
        raise ValueError(f"training.mode: no round mode {name!r}; known: {', '.join(MODES)}") from None


__all__ = ["MODES", "AsyncRounds", "ClosingRounds", "RoundContext", "RoundMode", "SemiAsyncRounds",
           "SyncRounds", "make_mode"]
