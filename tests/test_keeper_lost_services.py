"""Services lost mid-round, for real: the local fabric and the embedded store
are stopped while a round runs, and the keeper that owns them starts them
again and finishes the session (the real FL functions, TensorFlow included).
The bounded give-up paths are tested on fakes (test_keeper_session.py)."""
from __future__ import annotations

import logging

import pymongo
from fedkeeper.config import load_config
from fedkeeper.keeper import Keeper, new_session_id
from fedkeeper.runtime import Runtime
from flcommon import store as fs

from session_config import fragment, write_session_config


def write_config(path, mongo: str, *, rounds: int = 2, clients: int = 4) -> object:
    return load_config(write_session_config(
        path, name="lost", mongo=fragment(mongo),
        clients_info={"total_num_clients": clients, "num_clients_per_round": clients,
                      "clusters": {"local_ow": clients}},
        training={"rounds": rounds, "seed": 5, "quorum": 0.5, "round_deadline_s": 240, "attempt_grace_s": 5,
                  "retries": {"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 1}},
        functions={"fl_client": {"openwhisk": {"timeout": "60000", "memory": "1024"}}}))


def run_until(cfg, when, act) -> tuple[str, object]:
    """Run a session in this process; `act()` once, at the first progress
    event for which `when(kind, data)` holds."""
    sid = new_session_id(cfg.name)
    done = []

    def progress(kind, data):
        if not done and when(kind, data):
            done.append(True)
            act()

    rt = Runtime.open(cfg, keep_local_services=True)
    try:
        summary = Keeper(rt, progress=progress).start(session_id=sid)
    finally:
        rt.close(stop_store=False)
    assert done, "the service was never stopped"
    return sid, summary


def second_round_running(kind, data):
    return kind == "tick" and data.get("round") == 1 and data.get("running", 0) > 0


def test_the_fabric_stopped_mid_round_is_restarted_and_the_session_finishes(fabric_state, mongo_url, tmp_path,
                                                                               caplog):
    from fedkeeper.local.fabric import fabric_down
    db_name = "lost_fabric"
    cfg = write_config(tmp_path / "cfg.yaml", f'{{url: "{mongo_url}", db: {db_name}}}')
    with caplog.at_level(logging.INFO, logger="fedkeeper"):
        sid, summary = run_until(cfg, second_round_running, lambda: fabric_down(fabric_state / "fabric"))
    assert summary.state == "finished", summary.message
    db = pymongo.MongoClient(mongo_url)[db_name]
    assert [r["state"] for r in db[fs.ROUNDS].find({"session": sid}).sort("round", 1)] == ["done", "done"]
    lost = [a for a in db[fs.INVOCATIONS].find({"session": sid, "round": 1})
            if "restarted" in (a.get("error") or "")]
    assert lost, "no attempt was recorded as lost with the old fabric"
    lines = [r.getMessage() for r in caplog.records if "local_ow" in r.getMessage()]
    assert any("restarted" in m for m in lines)
    assert len(lines) < 20, lines                   # said, not flooded


def test_the_embedded_store_stopped_mid_round_is_restarted_and_the_session_finishes(fabric_state, tmp_path):
    from fedkeeper.local.store import EmbeddedMongo
    mongo_dir = tmp_path / "mongo"
    cfg = write_config(tmp_path / "cfg.yaml", f'{{url: embedded, db: lost_store, state_dir: "{mongo_dir}"}}')
    try:
        sid, summary = run_until(cfg, second_round_running, lambda: EmbeddedMongo(mongo_dir).shutdown())
        assert summary.state == "finished", summary.message
        url, _ = EmbeddedMongo(mongo_dir).start()
        db = pymongo.MongoClient(url)["lost_store"]
        assert db[fs.SESSIONS].find_one({"_id": sid})["state"] == "finished"
        assert db[fs.ROUNDS].count_documents({"session": sid, "state": "done"}) == 2
    finally:
        EmbeddedMongo(mongo_dir).shutdown()

