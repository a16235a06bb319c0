"""Hedged re-invocation end to end, on the local fabric with a real held
timeout: every fl_client activation on cluster ow_a is held until the
action's time limit (the fabric's `timeout` fault). client_0 lives there;
its three peers on ow_b deliver, client_0 runs past them and is hedged, on
ow_b (the other cluster it may run on), long before its limit. The hedge
wins, client_0's update counts once, the held attempt is recorded as
hedged, and attempt records, cost and the report all show it. One round of
no-op clients (`local_epochs: 0`, the `small` model), in each round mode,
all on one fabric."""
from __future__ import annotations

from pathlib import Path

import pytest

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.cost import session_cost
from fedkeeper.report.data import session_series
from fedkeeper.store import connect
from flcommon import store as fs

from session_config import write_session_config

DB = "e2e_hedging"
LIMIT_MS = 60000   # far past what the hedge needs: the held attempt never ends inside a test


def write_config(path: Path, mongo_url: str, mode: str) -> Path:
    return write_session_config(
        path, name=f"{DB}_{mode}", mongo={"url": mongo_url, "db": DB}, server="ow_b",
        openwhisk={"ow_a": {"kind": "local", "faults": {"timeout": 1.0, "functions": ["fl_client"]}},
                   "ow_b": {"kind": "local"}},
        clients_info={"total_num_clients": 4, "num_clients_per_round": 4,
                      "clusters": {"ow_a": [0], "ow_b": [1, 2, 3]}},
        model_params={"local_epochs": 0},
        training={"rounds": 1, "seed": 5, "mode": mode, "quorum": 1.0, "buffer_size": 4, "round_deadline_s": 300,
                  "hedging": {"enabled": True},
                  # two attempts: the held one and its hedge, however slow the machine
                  # (a third would be made only for a hedge that straggles too)
                  "retries": {"max_attempts": 2}},
        functions={"fl_client": {"openwhisk": {"memory": "128", "timeout": str(LIMIT_MS)}}})


@pytest.fixture(scope="module")
def store(mongo_url):
    s = connect(mongo_url, DB)
    yield s
    s.client.drop_database(DB)
    s.close()


@pytest.mark.parametrize("mode", ["sync", "semi_async", "async"])
def test_the_hedge_of_a_held_client_wins_on_the_other_cluster(mode, fabric_state, mongo_url, store, tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", mongo_url, mode))
    assert run_start(cfg, None, keep_services=True) == 0
    sess = store.db[fs.SESSIONS].find_one({"name": f"{DB}_{mode}"}, sort=[("created", -1)])
    assert sess["state"] == "finished"
    sid = sess["_id"]

    held = [a for a in store.attempts(sid) if a["client"] == "client_0"]
    assert [(a["round"], a["attempt"], a["cluster"], a["state"], bool(a.get("hedge"))) for a in held] == [
        (0, 1, "ow_a", "hedged", False), (0, 2, "ow_b", "succeeded", True)]
    assert held[0]["error"] == "another attempt of this client delivered first"
    # The peers ran once each, where they are placed, and nobody else was hedged.
    peers = [a for a in store.attempts(sid) if a["client"] in ("client_1", "client_2", "client_3")]
    assert sorted((a["client"], a["attempt"], a["cluster"], a["state"]) for a in peers) == [
        (f"client_{i}", 1, "ow_b", "succeeded") for i in (1, 2, 3)]

    # Counted once: one update, from the hedge, in the model once.
    updates = list(store.db[fs.UPDATES].find({"session": sid, "round": 0, "client": "client_0"}))
    assert [u["attempt"] for u in updates] == [2]
    model = store.db[fs.MODELS].find_one({"session": sid, "round": 1})
    counted = [c["client"] for c in model["contributions"]]
    assert sorted(counted) == ["client_0", "client_1", "client_2", "client_3"]

    # Cost: the held attempt is billed on ow_a (its invocation: how long it
    # runs is unknown), the hedge on ow_b with its duration.
    cost = session_cost(store, sid, cfg)
    assert cost["per_cluster"]["ow_a"]["invocations"] == 1
    assert cost["per_cluster"]["ow_a"]["gb_seconds"] == 0
    assert held[1]["duration_ms"] is not None

    # The report counts one hedge and no retry.
    row = session_series(store, sid, cost)["rounds"][0]
    assert (row["hedges"], row["client_retries"], row["failed_attempts"], row["included"]) == (1, 0, 0, 4)
