"""A user module (examples/digits_cnn.py: its own CNN, loader and
partition) trains through `fedkeeper start` on both local clusters, with
sync and async rounds; its model is the one exported; changing it
redeploys the functions that run it; an error in it reaches the user as
the user's traceback, classified as an application error and not retried."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.store import connect
from flcommon import store as fs
from flcommon.trail import spec_hash
from flcommon.user_code import content_hash, module_files

from test_model_export import write_config

ROOT = Path(__file__).resolve().parent.parent
USER_MODULE = "user_module: {path: digits_cnn.py, model_params: {filters: 8, dense: 24}}"


def _start(cfg: Path):
    return CliRunner().invoke(cli, ["start", "-c", str(cfg), "--keep-services", "--json"])


def _session(mongo_url: str, db: str):
    store = connect(mongo_url, db)
    return store, store.latest_session()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermod")
    shutil.copy(ROOT / "examples" / "digits_cnn.py", d / "digits_cnn.py")
    return d


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_user_module_trains_on_both_local_clusters(fabric_state, mongo_url, module_dir, mode, tmp_path):
    db = f"user_module_{mode}"
    extra = "buffer_size: 2" if mode == "async" else ""
    cfg = write_config(module_dir / f"{mode}.yaml", mongo_url, db, rounds=3, extra=USER_MODULE, mode=mode,
                       training_extra=extra)
    res = _start(cfg)
    assert res.exit_code == 0, res.output
    store, session = _session(mongo_url, db)
    try:
        assert session["state"] == "finished"
        um = session["spec"]["user_module"]
        assert um["name"] == "digits_cnn.py" and um["model_params"] == {"filters": 8, "dense": 24}
        assert um["sha256"] == content_hash(module_files(module_dir / "digits_cnn.py"))
        platforms = {a["platform"] for a in store.attempts(session["_id"]) if not a["client"].startswith("_")}
        assert platforms == {"openwhisk", "gcf"}
        # The example's own partition: two label shards per client, so each client sees few labels.
        parts = list(store.db[fs.PARTITIONS].find({"session": session["_id"], "client": {"$ne": "_test"}}))
        for p in parts:
            _, y = store.get_arrays(p["blob_id"])
            assert len(set(y.tolist())) <= 4
        models = list(store.db[fs.MODELS].find({"session": session["_id"]}).sort("round", 1))
        assert len(models) == 4
        for prev, m in zip(models, models[1:]):
            trail = m["trail"]
            assert trail["parent"] == prev["round"] and trail["parent_blob"] == prev["blob_id"]
            assert trail["user_module"] == {"name": "digits_cnn.py", "sha256": um["sha256"]}
            assert trail["config_hash"] == spec_hash(session["spec"]) and trail["mode"] == mode
            assert trail["updates"] == m["accepted"] and trail["function"] == "fl_server_aggregator"
            assert m["metrics"]["accuracy"] > 0.1
        assert models[0]["trail"]["function"] == "fl_server_init" and models[0]["trail"]["parent"] is None
        # The model trained is the module's CNN: its .keras export is that architecture.
        out = tmp_path / "m.keras"
        res = CliRunner().invoke(cli, ["model", "export", session["_id"], "-c", str(cfg), "-o", str(out)])
        assert res.exit_code == 0, res.output
        import keras
        model = keras.models.load_model(out)
        assert model.name == "digits_cnn" and any("conv2d" in layer.name for layer in model.layers)
        # Validated on the module's own load_data split.
        res = CliRunner().invoke(cli, ["model", "validate", session["_id"], "-c", str(cfg), "--data", "module",
                                       "--json"])
        assert res.exit_code == 0, res.output
        assert abs(json.loads(res.stdout)["metrics"]["accuracy"] - models[-1]["metrics"]["accuracy"]) <= 1e-6
    finally:
        store.close()


def test_user_errors_reach_the_user_and_are_not_retried(fabric_state, mongo_url, module_dir, tmp_path):
    broken = tmp_path / "digits_cnn.py"
    source = (module_dir / "digits_cnn.py").read_text()
    broken.write_text(source.replace("    rng = np.random.default_rng(seed)\n",
                                     "    rng = np.random.default_rng(seed)\n    raise ValueError('no shards today')\n"))
    db = "user_module_broken"
    cfg = write_config(tmp_path / "cfg.yaml", mongo_url, db, rounds=1, extra=USER_MODULE)
    res = _start(cfg)
    assert res.exit_code == 1, res.output
    assert "error in the user module digits_cnn.py (partition): ValueError: no shards today" in res.output
    assert 'File "digits_cnn.py"' in res.output and "in partition" in res.output
    store, session = _session(mongo_url, db)
    try:
        assert session["state"] == "failed" and "no shards today" in session["error"]
        inits = [a for a in store.attempts(session["_id"]) if a["client"] == "_fl_server_init"]
        assert len(inits) == 1 and inits[0]["error_class"] == "application_error"  # not retried
        assert any("no shards today" in e.get("message", "") for e in store.events(session["_id"]))
    finally:
        store.close()
