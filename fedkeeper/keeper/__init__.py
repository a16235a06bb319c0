"""The round loop as small parts: selection, dispatch, tracking, bounded
retries, quorum, aggregation, stopping and resuming.

State lives in the store, not in this process: every attempt is a document
written as it happens, updates are keyed by (session, round, client), and a
round is `running` -> `aggregating` -> `done`. A keeper killed at any point,
interrupted, or stopped by a lost store or cluster is resumed from those
documents (`fedkeeper start -c CONFIG --resume SESSION`).

  attempts.py   the pure attempt state machine (slots, backoff, deadlines,
                hedging decisions)
  round_closing.py  when a round stops waiting (quorum, round deadline)
  dispatch.py   carries its decisions out: invoke, track, record, redeploy
  modes/        sync, semi_async, async (FedBuff), one interface
  selection.py  selection policies (random, reliability, a registry for more)
  session.py    Keeper: deploy, start, resume, heartbeat, Ctrl-C, lost services
  session_owner.py  which keeper runs a session (resume waits until it is gone)
  events.py     round events and reports; output.py: run log and CSVs observe them

Round numbers: the store counts rounds from 0 (every session ever written
does); everything a user sees counts them from 1. Store round 0 is
`round 1` in the run log, `round_001.csv`, and `round_number` 1 in progress
events (whose `round` stays the store's number).

An update is aggregated at most once in every mode: the aggregator marks it
accepted with the round that used it and refuses it a second time.
"""
from __future__ import annotations

from .attempts import RetryPolicy, Slot
from .errors import ClusterLost, ServiceLost, SessionError, SessionInterrupted
from .events import (Progress, RoundEvents, RoundReport, SessionSummary, client_index, new_session_id,
                     shown)
from .output import round_csv_name
from .selection import POLICIES, SelectionPolicy, register, select_clients
from .session import CLUSTER_PATIENCE_S, STORE_PATIENCE_S, Keeper
from ..store import StoreUnavailable

__all__ = ["CLUSTER_PATIENCE_S", "ClusterLost", "Keeper", "POLICIES", "Progress", "RetryPolicy", "RoundEvents",
           "RoundReport", "STORE_PATIENCE_S", "SelectionPolicy", "ServiceLost", "SessionError",
           "SessionInterrupted", "SessionSummary", "Slot", "StoreUnavailable", "client_index",
           "new_session_id", "register", "round_csv_name", "select_clients", "shown"]
