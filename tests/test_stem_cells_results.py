"""Stem cells change when a worker's modules are loaded, never what it
computes: two sessions with the same seed, one whose functions run on stem
cells (TensorFlow imported before the function's code) and one on workers
started for them, select the same clients and reach the same accuracy in
every round."""
from __future__ import annotations

import json
from pathlib import Path

import pymongo
import pytest
import requests

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.local import fabric
from flcommon import store as fs

from session_config import write_session_config

pytestmark = pytest.mark.timeout(600)


def write_config(path: Path, mongo_url: str, db: str) -> Path:
    half_gb = {"openwhisk": {"timeout": "120000", "memory": "512"}}
    return write_session_config(
        path, name="stems", mongo={"url": mongo_url, "db": db},
        clients_info={"total_num_clients": 2, "num_clients_per_round": 2, "ow_clients_count": 2,
                      "gcf_clients_count": 0},
        training={"rounds": 2, "seed": 11, "quorum": 1.0, "round_deadline_s": 300},
        functions={"fl_client": half_gb, "fl_server_init": half_gb, "fl_server_aggregator": half_gb})


def cold_starts(fabric_dir: Path) -> list[str]:
    """fk-start of every cold start the fabric recorded (local_ow namespace)."""
    info = fabric.fabric_status(fabric_dir)
    r = requests.get(f"{info['url']}/api/v1/namespaces/local_ow/activations",
                     params={"limit": 200, "docs": "true"}, auth=tuple(info["auth"].split(":", 1)), timeout=10)
    r.raise_for_status()
    out = []
    for rec in r.json():
        ann = {a["key"]: a["value"] for a in rec["annotations"]}
        if "initTime" in ann:
            out.append(ann["fk-start"])
    return out


def tensorflow_zygote(fabric_dir: Path) -> dict:
    info = fabric.fabric_status(fabric_dir)
    r = requests.get(f"{info['url']}/_fabric/status", params={"namespace": "_"},
                     auth=tuple(info["auth"].split(":", 1)), timeout=10)
    r.raise_for_status()
    return next(z for z in r.json()["zygotes"] if z["runtime"] == "tensorflow")


def session_rounds(db, session: str) -> list[tuple]:
    rounds = list(db[fs.ROUNDS].find({"session": session}).sort("round", 1))
    return [(r["round"], sorted(r["selected"]), sorted(r["included"]), r.get("accuracy")) for r in rounds]


def test_same_seed_same_results_with_and_without_stem_cells(fabric_state, mongo_url, tmp_path):
    db_name = "stems_results"
    cfg = load_config(write_config(tmp_path / "cfg.yaml", mongo_url, db_name))
    fabric_dir = fabric_state / "fabric"
    db = pymongo.MongoClient(mongo_url)[db_name]

    # with stem cells (the fabric's default: one of the tensorflow runtime)
    assert run_start(cfg, None, keep_services=True) == 0
    with_stems = db[fs.SESSIONS].find_one(sort=[("created", -1)])["_id"]
    starts = cold_starts(fabric_dir)
    assert "prewarmed" in starts, starts
    # its zygote loaded TensorFlow and Keras without scikit-learn (prewarm.PRELOAD)
    zygote_maps = Path(f"/proc/{tensorflow_zygote(fabric_dir)['pid']}/maps").read_text()
    assert "/tensorflow/" in zygote_maps and "/sklearn/" not in zygote_maps

    # a fabric without stem cells: every worker is started for its action
    fabric.fabric_down(fabric_dir)
    info = fabric.fabric_up(fabric_dir, extra_args=["--stem-cells", ""])
    assert info["started"] and info["stem_cells"] == {}
    assert run_start(cfg, None, keep_services=True) == 0
    without = db[fs.SESSIONS].find_one(sort=[("created", -1)])["_id"]
    assert without != with_stems
    starts = cold_starts(fabric_dir)
    assert starts and set(starts) == {"cold"}, starts

    a, b = session_rounds(db, with_stems), session_rounds(db, without)
    assert len(a) == 2 and all(acc is not None for *_, acc in a)
    # same selections, same clients counted, same accuracy, round by round
    assert a == b, json.dumps({"with_stem_cells": a, "without": b})
