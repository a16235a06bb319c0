"""A sweep's result rows from the store: retries counted as the keeper
counts them, rows in run order however many runs, and JSON-safe figures."""
from __future__ import annotations

import json
import math

import pytest
from bson import ObjectId

from fedkeeper.sweep import render_csv, result_rows, session_result

SESSION = "sweep-results-000"


def attempt(rnd: int, client: str, attempt_no: int, **extra) -> dict:
    return {"_id": ObjectId(), "session": SESSION, "round": rnd, "client": client, "attempt": attempt_no,
            "cluster": "ow", "platform": "openwhisk", "function": "fl_client", "state": "succeeded",
            "platform_id": f"act-{client}-{attempt_no}", "duration_ms": 100, **extra}


@pytest.fixture
def finished_session(store):
    store.create_session({"_id": SESSION, "name": "sweeptest", "scenario": "federated_learning",
                          "state": "finished"})
    store.upsert_round(SESSION, 0, state="done", accuracy=0.5, duration_s=2.0)
    return store


def test_retries_leave_hedges_out_as_the_keeper_does(finished_session):
    finished_session.insert_attempts([
        attempt(0, "client_0", 1, state="failed", error_class="application_error"),
        attempt(0, "client_0", 2),                                 # a retry
        attempt(0, "client_1", 1, state="hedged"),
        attempt(0, "client_1", 2, hedge=True),                     # a hedge: the slot's next number, no retry
        attempt(0, "client_2", 1, state="failed", error_class="timeout"),
        attempt(0, "client_2", 2, state="failed", error_class="timeout"),  # a retry
        attempt(0, "client_2", 3, hedge=True),                     # a hedge of the retry
    ])
    row = session_result(finished_session, SESSION, None, None)
    assert row["retries"] == 2
    assert row["invocations"] == 7


def test_a_nan_final_accuracy_is_none_and_the_json_is_valid(finished_session):
    finished_session.upsert_round(SESSION, 1, state="done", accuracy=math.nan, duration_s=math.inf)
    row = session_result(finished_session, SESSION, None, 0.4)
    assert row["final_accuracy"] is None
    assert row["time_to_target_s"] == pytest.approx(2.0)
    # A result stored by an older version, with the NaN in it.
    doc = {"runs": {"run000": {"index": 0, "labels": {"lr": "0.1"}, "repeat": 0, "seed": 1, "session": SESSION,
                               "state": "finished", "result": {**row, "final_accuracy": math.nan}}}}
    rows = result_rows(doc)
    assert rows[0]["final_accuracy"] is None
    json.dumps(rows, allow_nan=False)  # the sweep's --format json prints these
    assert render_csv(rows, ["lr"]).splitlines()[1].split(",")[8] == ""


def test_rows_follow_the_run_index_past_a_thousand_runs():
    indexes = [0, 99, 100, 101, 999, 1000, 1001, 1010]
    runs = {f"run{i:03d}": {"index": i, "labels": {"seed_of": str(i)}, "repeat": 0, "seed": i,
                            "session": f"s-{i:03d}", "state": "finished"} for i in indexes}
    # Mongo keeps a document's keys in insertion order; insert them shuffled.
    doc = {"runs": dict(sorted(runs.items(), key=lambda kv: str(kv[0])[::-1]))}
    assert [r["seed"] for r in result_rows(doc)] == indexes
    # Run documents written without an index are ordered by their key's number.
    for run in doc["runs"].values():
        del run["index"]
    assert [r["seed"] for r in result_rows(doc)] == indexes
