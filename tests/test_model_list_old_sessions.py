"""`fedkeeper model` on sessions written before model trails: what they
have is listed and exported, what they lack is named."""
from __future__ import annotations

import json
import textwrap

import numpy as np
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from flcommon import store as fs


def _config(tmp_path, mongo_url, db):
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(f"""\
        providers:
          openwhisk:
            local_ow: {{kind: local}}
        scenarios:
          federated_learning:
            mongo_config: {{url: "{mongo_url}", db: {db}}}
        """))
    return p


def _plant_old_session(store, session, *, spec):
    store.create_session({"_id": session, "name": "old", "state": "finished",
                          **({"spec": spec} if spec is not None else {})})
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    for rnd in (0, 1):
        blob = fs.put_arrays(store.db, [w + rnd for w in weights], f"{session}/model/{rnd:03d}.npz",
                             {"kind": "model", "session": session, "round": rnd})
        doc = {"session": session, "round": rnd, "blob_id": blob, "created": float(rnd)}
        if rnd:  # what the aggregator wrote before trails and strategies were recorded
            doc.update(metrics={"accuracy": 0.5, "loss": 1.2}, accepted=2, accepted_clients=["client_0", "client_1"])
        store.db[fs.MODELS].insert_one(doc)
    return weights


def test_old_session_lists_and_exports_raw_weights_and_names_what_it_lacks(store, mongo_url, tmp_path):
    cfg = _config(tmp_path, mongo_url, store.db.name)
    weights = _plant_old_session(store, "old-1", spec=None)
    res = CliRunner().invoke(cli, ["model", "list", "old-1", "-c", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["models"]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["accuracy"] == 0.5 and rows[1]["clients"] == 2 and rows[1]["trail"] is None
    assert rows[1]["examples"] is None and rows[1]["strategy"] is None and rows[1]["validations"] == []
    table = CliRunner().invoke(cli, ["model", "list", "old-1", "-c", str(cfg)])
    assert table.exit_code == 0 and "before model trails" in table.output

    out = tmp_path / "w.npz"
    res = CliRunner().invoke(cli, ["model", "export", "old-1", "-c", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    with np.load(out, allow_pickle=False) as z:
        assert np.array_equal(z["arr_0000"], weights[0] + 1)

    res = CliRunner().invoke(cli, ["model", "export", "old-1", "-c", str(cfg), "-o", str(tmp_path / "m.keras")])
    assert res.exit_code == 2 and "records no model spec" in res.output and ".npz" in res.output
    assert not (tmp_path / "m.keras").exists()


def test_missing_blob_is_named_not_a_traceback(store, mongo_url, tmp_path):
    cfg = _config(tmp_path, mongo_url, store.db.name)
    _plant_old_session(store, "old-2", spec={"model": "small", "clients": ["client_0"]})
    doc = store.db[fs.MODELS].find_one({"session": "old-2", "round": 1})
    fs.delete_blob(store.db, doc["blob_id"])
    rows = json.loads(CliRunner().invoke(cli, ["model", "list", "old-2", "-c", str(cfg), "--json"]).output)["models"]
    assert rows[1]["stored"] is False and rows[1]["bytes"] is None
    res = CliRunner().invoke(cli, ["model", "export", "old-2", "-c", str(cfg), "-o", str(tmp_path / "m.npz")])
    assert res.exit_code == 2 and "cannot be read" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["model", "export", "old-2", "-c", str(cfg), "--round", "0",
                                   "-o", str(tmp_path / "m.keras")])
    assert res.exit_code == 2 and "no stored test split" in res.output
