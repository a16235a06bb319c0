"""A user module travels in the artifacts of the functions that run user
code, under fk_user/, and its content enters their hash: changing it
redeploys those functions and no other."""
from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest

from fedkeeper.artifacts import build_artifact
from fedkeeper.config import ConfigError, load_config
from fedkeeper.user_module import USER_CODE_FUNCTIONS, artifact_members, spec_entry
from flcommon.user_code import content_hash, module_files
from session_config import write_user_module_config

ROOT = Path(__file__).resolve().parent.parent


def _artifact(cfg_path: Path, function: str, entry: str = "openwhisk"):
    cfg = load_config(cfg_path)
    _, scen = cfg.scenario(None)
    return build_artifact(function, entry, artifact_members(cfg, scen, function))


def test_user_module_is_bundled_and_hashed_into_user_code_functions_only(tmp_path):
    shutil.copy(ROOT / "examples" / "digits_cnn.py", tmp_path / "digits_cnn.py")
    (tmp_path / "plain").mkdir()
    with_module = write_user_module_config(tmp_path, "{path: digits_cnn.py, model_params: {filters: 4}}", clients=2)
    without = write_user_module_config(tmp_path / "plain", None, clients=2)
    for fn in USER_CODE_FUNCTIONS:
        for entry in ("openwhisk", "http"):
            art = _artifact(with_module, fn, entry)
            names = zipfile.ZipFile(io.BytesIO(art.data)).namelist()
            assert "fk_user/digits_cnn.py" in names and "flcommon/user_code.py" in names
            assert art.sha256 != _artifact(without, fn, entry).sha256
    assert _artifact(with_module, "nodeinfo").sha256 == _artifact(without, "nodeinfo").sha256
    assert _artifact(with_module, "fl_insights").sha256 == _artifact(without, "fl_insights").sha256
    before = {fn: _artifact(with_module, fn).sha256 for fn in USER_CODE_FUNCTIONS}
    again = {fn: _artifact(with_module, fn).sha256 for fn in USER_CODE_FUNCTIONS}
    assert before == again  # reproducible: an unchanged module never redeploys
    (tmp_path / "digits_cnn.py").write_text((tmp_path / "digits_cnn.py").read_text() + "\n# tuned\n")
    after = {fn: _artifact(with_module, fn).sha256 for fn in USER_CODE_FUNCTIONS}
    assert all(after[fn] != before[fn] for fn in USER_CODE_FUNCTIONS)
    cfg = load_config(with_module)
    entry = spec_entry(cfg, cfg.scenario(None)[1])
    assert entry == {"name": "digits_cnn.py", "sha256": content_hash(module_files(tmp_path / "digits_cnn.py")),
                     "model_params": {"filters": 4}, "data_params": {}}


def test_a_missing_module_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write_user_module_config(tmp_path, "gone.py"))
    assert "gone.py: no such file or directory" in str(err.value)
    assert "user_module" in str(err.value)
