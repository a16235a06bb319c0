"""fl_secagg_client: a client's key stages of secure aggregation.

Payload: {session, round, client, stage: advertise | share | unmask}.
  advertise  publish the client's two public keys for the round
  share      encrypt Shamir shares of its mask secrets to every client of u1
  unmask     reveal, for the round's u3, the shares the server needs
The masked upload itself happens in fl_client, which trains. Outputs go to
the store (collection `secagg`) once; the result holds only counts."""
from __future__ import annotations

import time
from typing import Any

from flcommon.context import database, ids, session_spec
from flcommon.entry import require
from flcommon.secagg.client import run_stage


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    client = require(payload, "client", str)
    stage = require(payload, "stage", str)
    t0 = time.perf_counter()
    db = database(bound)
    out = run_stage(db, bound, session_spec(db, session), session, rnd, client, stage)
    out["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out
