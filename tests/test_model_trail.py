"""flcommon.trail: the record of what produced a global model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flcommon import trail

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"


def test_code_hash_covers_the_function_and_flcommon_but_not_the_platform_entries(tmp_path):
    fn = tmp_path / "fl_server_aggregator"
    shutil.copytree(FUNCTIONS / "fl_server_aggregator", fn)
    here = trail.code_hash(str(FUNCTIONS / "fl_server_aggregator"))
    assert trail.code_hash(str(fn)) == here  # the same code, wherever it is unpacked
    (fn / "__main__.py").write_text("# another platform's entry\n")
    (fn / "main.py").unlink()
    trail.code_hash.cache_clear()
    assert trail.code_hash(str(fn)) == here
    (fn / "fl_server_aggregator.py").write_text((fn / "fl_server_aggregator.py").read_text() + "\n# changed\n")
    trail.code_hash.cache_clear()
    assert trail.code_hash(str(fn)) != here


def test_trail_of_an_aggregated_model():
    spec = {"model": "small", "clients": ["client_0", "client_1"], "strategy": {"name": "fedavg"},
            "mode": "async", "user_module": {"name": "m.py", "sha256": "ab" * 32, "model_params": {}}}
    parent = {"round": 3, "blob_id": "blob3"}
    contributions = [{"client": "client_0", "round": 3, "staleness": 0, "num_examples": 10},
                     {"client": "client_1", "round": 2, "staleness": 1, "num_examples": 5},
                     {"client": "client_0", "round": 2, "staleness": 1, "num_examples": 10}]
    t = trail.model_trail(spec, str(FUNCTIONS / "fl_server_aggregator" / "fl_server_aggregator.py"),
                          parent=parent, contributions=contributions)
    assert t["parent"] == 3 and t["parent_blob"] == "blob3" and t["function"] == "fl_server_aggregator"
    assert (t["clients"], t["updates"], t["examples"], t["stale"]) == (2, 3, 25, 2)
    assert t["user_module"] == {"name": "m.py", "sha256": "ab" * 32} and t["mode"] == "async"
    assert t["config_hash"] == trail.spec_hash(spec) != trail.spec_hash(dict(spec, seed=1))
    assert len(t["code_hash"]) == 64
    init = trail.model_trail({"model": "small"}, str(FUNCTIONS / "fl_server_init" / "fl_server_init.py"))
    assert init["parent"] is None and init["updates"] == 0 and init["user_module"] is None


def test_a_user_module_that_cannot_be_read_is_a_model_trail_error_not_a_traceback(tmp_path):
    """`model export` and `report --mlflow` catch ModelTrailError: the user
    module's own errors (over its size limit, not a module) must become one."""
    from fedkeeper.model_trail import ModelTrailError, session_code
    doc = {"_id": "s", "spec": {"model": "user", "user_module": {"name": "mymodel", "sha256": "0" * 64}}}
    (tmp_path / "mymodel").mkdir()                       # a package directory without __init__.py
    with pytest.raises(ModelTrailError, match="__init__.py"):
        session_code(doc, tmp_path / "mymodel")
    (tmp_path / "mymodel.txt").write_text("x = 1\n")     # not a .py file
    with pytest.raises(ModelTrailError, match=".py file"):
        session_code(doc, tmp_path / "mymodel.txt")
