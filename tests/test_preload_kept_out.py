"""A module kept out while a runtime's modules load (`!name` in
fedkeeper/local/prewarm.py, KEPT_OUT_OF_KERAS in flcommon): an optional
import of it is skipped, and it imports as usual afterwards. Keras imports
scikit-learn only for its wrappers; the functions and the local platforms'
preloads import Keras without it."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedkeeper.local.prewarm import preload_for

ROOT = Path(__file__).resolve().parent.parent

OPTIONAL_USER = """\
try:
    import fk_optional_dep
    HAS_DEP = True
except ImportError:
    HAS_DEP = False
"""


@pytest.fixture
def optional_modules(tmp_path, monkeypatch):
    """fk_optional_user imports fk_optional_dep if it can."""
    (tmp_path / "fk_optional_dep.py").write_text("VALUE = 7\n")
    (tmp_path / "fk_optional_user.py").write_text(OPTIONAL_USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("fk_optional_dep", "fk_optional_user"):
        sys.modules.pop(name, None)
    gc.unfreeze()   # the preload froze this test process's objects (preloading.py)


def assert_kept_out_then_importable() -> None:
    assert sys.modules["fk_optional_user"].HAS_DEP is False
    assert "fk_optional_dep" not in sys.modules
    import fk_optional_dep
    assert fk_optional_dep.VALUE == 7


def test_the_fabric_workers_preload_keeps_a_module_out_while_the_others_load(optional_modules):
    from fedkeeper.local.fabric import worker
    worker._import_all(["!fk_optional_dep", "fk_optional_user"])
    assert_kept_out_then_importable()


def test_the_cloud_functions_instances_preload_keeps_a_module_out_while_the_others_load(optional_modules):
    from fedkeeper.local.cloud_functions.function_host import Preloaded
    loaded = Preloaded(["!fk_optional_dep", "fk_optional_user"])
    assert loaded.done.wait(30)
    assert_kept_out_then_importable()


def test_a_module_already_imported_is_not_kept_out(optional_modules):
    from fedkeeper.local.fabric import worker
    import fk_optional_dep
    worker._import_all(["!fk_optional_dep", "fk_optional_user"])
    assert sys.modules["fk_optional_user"].HAS_DEP is True
    assert sys.modules["fk_optional_dep"] is fk_optional_dep


def test_the_tensorflow_runtime_preloads_keras_without_scikit_learn():
    modules = preload_for("tensorflow")
    assert "!sklearn" in modules
    assert modules.index("!sklearn") < modules.index("tensorflow")


def test_the_functions_import_keras_without_scikit_learn_which_imports_later():
    """In a fresh process, as a cold start on a cluster: the functions'
    first import of Keras and the digits data set leave scikit-learn out;
    it imports afterwards, and only keras.wrappers' estimators miss it."""
    code = """
import sys
from flcommon.architectures import load_keras
keras = load_keras()
assert load_keras() is keras
assert "tensorflow" in sys.modules and "sklearn" not in sys.modules, "sklearn imported with keras"
from keras.src.wrappers import utils
assert utils.sklearn is None
from flcommon.data import load_digits_split
assert len(load_digits_split()[0]) > 1000 and "sklearn" not in sys.modules, "sklearn imported for the digits"
import sklearn.base
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "functions")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
