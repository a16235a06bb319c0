"""Every aggregation strategy end to end on the local fabric: a local
OpenWhisk cluster, the real FL functions (the strategies run from the
function zips), a real MongoDB-wire-protocol server. One fabric and one
store for the module, one short session per strategy."""
from __future__ import annotations

import math
from pathlib import Path

import pymongo
import pytest
import yaml

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from flcommon.strategies import STRATEGIES
from flcommon import store as fs

from session_config import FUNCTIONS, write_session_config

DB = "e2e_strategies"
ROUNDS = 2
# Three updates a round, so that Krum has a delta to choose (it needs three)
# and the trimmed mean (trim_ratio 0.34) cuts one value at each end.
SETTINGS = {"trimmed_mean": "{name: trimmed_mean, trim_ratio: 0.34}",
            "krum": "{name: krum, byzantine: 1}",
            "fedprox": "{name: fedprox, mu: 0.1}"}


def write_config(path: Path, mongo_url: str, strategy: str) -> Path:
    functions = dict(FUNCTIONS, fl_client={"openwhisk": FUNCTIONS["fl_client"]["openwhisk"]})
    return write_session_config(
        path, name=f"strategy_{strategy}", mongo={"url": mongo_url, "db": DB}, functions=functions,
        clients_info={"total_num_clients": 4, "num_clients_per_round": 3, "ow_clients_count": 4},
        training={"rounds": ROUNDS, "seed": 11, "strategy": yaml.safe_load(SETTINGS.get(strategy, strategy)),
                  "round_deadline_s": 120})



@pytest.fixture(scope="module")
def db(mongo_url):
    client = pymongo.MongoClient(mongo_url)
    yield client[DB]
    client.drop_database(DB)
    client.close()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_session_trains_with_each_strategy(strategy, fabric_state, mongo_url, db, tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", mongo_url, strategy))
    assert run_start(cfg, None, keep_services=True) == 0
    sess = db[fs.SESSIONS].find_one({"name": f"strategy_{strategy}"}, sort=[("created", -1)])
    assert sess["state"] == "finished"
    assert sess["spec"]["strategy"]["name"] == strategy
    models = list(db[fs.MODELS].find({"session": sess["_id"], "round": {"$gte": 1}}).sort("round", 1))
    assert [m["round"] for m in models] == list(range(1, ROUNDS + 1))
    cls = STRATEGIES[strategy]
    for m in models:
        assert m["strategy"] == strategy
        assert math.isfinite(m["metrics"]["accuracy"]) and 0 <= m["metrics"]["accuracy"] <= 1
        assert math.isfinite(m["metrics"]["loss"])
        shares = [c["weight"] for c in m["contributions"]]
        assert len(shares) == m["accepted"] == 3 and math.isclose(sum(shares), 1.0)
        if strategy == "krum":
            assert sorted(shares) == [0.0, 0.0, 1.0]
        if cls.stateful:
            state = db["blobs.files"].find_one({"_id": m["state_blob_id"]})
            assert state["metadata"]["kind"] == "state" and state["metadata"]["strategy"] == strategy
        else:
            assert "state_blob_id" not in m
    # A sync session: the models' contributions are the record of what
    # counted, each update in its own round's aggregation, none marked.
    counted = [(c["client"], c["round"], m["round"] - 1, c["staleness"])
               for m in models if m["round"] > 0 for c in m["contributions"]]
    assert len(counted) == len(set(counted)) == 3 * ROUNDS
    assert all(r == agg and staleness == 0 for _, r, agg, staleness in counted)
    assert db[fs.UPDATES].count_documents({"session": sess["_id"], "status": "accepted"}) == 0
