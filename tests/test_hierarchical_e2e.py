"""A hierarchical session on both local clusters (OpenWhisk and Cloud
Functions): fl_combiner is deployed on each client cluster, invoked once
per cluster and round with that cluster's delivered clients, and the
aggregator counts each update once, through its cluster's partial."""
from __future__ import annotations

from pathlib import Path

import pymongo
import pytest

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from flcommon import store as fs
from flcommon.partials import PARTIALS

from session_config import write_session_config

DB = "e2e_hierarchical"
ROUNDS = 2


def write_config(path: Path, mongo_url: str) -> Path:
    return write_session_config(
        path, name=DB, mongo={"url": mongo_url, "db": DB}, google={"local_gcf": {"kind": "local"}},
        clients_info={"total_num_clients": 4, "num_clients_per_round": 4, "ow_clients_count": 2,
                      "gcf_clients_count": 2},
        training={"rounds": ROUNDS, "seed": 3, "strategy": "fedavg", "aggregation": "hierarchical",
                  "round_deadline_s": 240})


@pytest.fixture
def db(mongo_url):
    client = pymongo.MongoClient(mongo_url)
    yield client[DB]
    client.drop_database(DB)
    client.close()


def test_a_hierarchical_session_combines_per_cluster(fabric_state, mongo_url, db, tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", mongo_url))
    assert run_start(cfg, None, keep_services=True) == 0
    sess = db[fs.SESSIONS].find_one({"name": DB}, sort=[("created", -1)])
    assert sess["state"] == "finished"
    sid = sess["_id"]
    for rnd in range(ROUNDS):
        parts = {p["cluster"]: p for p in db[PARTIALS].find({"session": sid, "round": rnd})}
        assert sorted(parts) == ["local_gcf", "local_ow"] and all(p.get("used") for p in parts.values())
        model = db[fs.MODELS].find_one({"session": sid, "round": rnd + 1})
        counted = [c["client"] for c in model["contributions"]]
        assert len(counted) == len(set(counted)) == 4
        by = {c["client"]: c.get("combined_by") for c in model["contributions"]}
        for cluster, part in parts.items():
            assert all(by[c["client"]] == cluster for c in part["clients"])
        names = {a["client"] for a in db[fs.INVOCATIONS].find({"session": sid, "round": rnd,
                                                               "function": "fl_combiner"})}
        assert names == {"_fl_combiner@local_ow", "_fl_combiner@local_gcf"}
