"""A session whose data set is behind HTTP Basic authorisation, the
credentials written in the config's data URL: it trains on the local
fabric, and the credentials reach neither the store, nor the command's
output, nor its run log. Only the functions that download the data set
(fl_server_init, fl_model_validate) are given them, bound at deploy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pymongo

from flcommon import store as fs

from basic_auth_server import BasicAuthFile, digits_npz, serve
from session_config import write_session_config

PASSWORD = "Sup3r/S3cret:token42"   # '/' and ':' escaped in the URL


def test_data_url_credentials_stay_out_of_the_store_and_output(fabric_state, mongo_url, tmp_path):
    class Data(BasicAuthFile):
        body, user, seen = digits_npz(), "alice", []
    Data.password = PASSWORD
    srv = serve(Data)
    try:
        bare = f"http://127.0.0.1:{srv.server_port}/data.npz"
        url = bare.replace("://", f"://alice:{urllib.parse.quote(PASSWORD, safe='')}@")
        db_name = "e2e_data_credentials"
        cfg = write_session_config(
            tmp_path / "cfg.yaml", name="creds", mongo={"url": mongo_url, "db": db_name},
            clients_info={"total_num_clients": 2, "num_clients_per_round": 2, "clusters": {"local_ow": 2}},
            training={"rounds": 1, "seed": 5, "round_deadline_s": 240},
            scenario={"training_test_data": {"dataset": "npz", "path": url}})
        proc = subprocess.run([sys.executable, "-m", "fedkeeper.cli", "start", "-c", str(cfg), "--keep-services"],
                              env=dict(os.environ), capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-3000:]
        assert Data.seen and all(h is not None for h in Data.seen)   # every download was authorised
        assert "Sup3r" not in output and "S3cret" not in output

        db = pymongo.MongoClient(mongo_url)[db_name]
        sess = db[fs.SESSIONS].find_one(sort=[("created", -1)])
        assert sess["state"] == "finished" and sess["spec"]["data"]["path"] == bare
        documents = [json.dumps(d, default=str) for name in db.list_collection_names()
                     if not name.endswith(".chunks") for d in db[name].find()]
        assert len(documents) > 10
        assert not [d for d in documents if "S3cret" in d or "Sup3r" in d]
        logs = list(Path(os.environ["FEDKEEPER_LOG_DIR"]).rglob("*.log"))
        assert logs and not [p for p in logs if "S3cret" in p.read_text(errors="replace")]
    finally:
        srv.shutdown()
        srv.server_close()
