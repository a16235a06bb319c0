"""A module kept out while a runtime's modules load (`!name` in
fedkeeper/local/prewarm.py, KEPT_OUT_OF_KERAS in flcommon): an optional
import of it is skipped, and it imports as usual afterwards. Keras imports
scikit-learn only for its wrappers, TensorFlow's legacy Keras SciPy and
h5py; the functions and the local platforms' preloads import Keras without
them."""
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


def test_the_tensorflow_runtime_preloads_keras_without_what_the_functions_keep_out():
    sys.path.insert(0, str(ROOT / "functions"))
    try:
        from flcommon.architectures import KEPT_OUT_OF_KERAS
    finally:
        sys.path.remove(str(ROOT / "functions"))
    modules = preload_for("tensorflow")
    kept_out = [m[1:] for m in modules if m.startswith("!")]
    assert sorted(kept_out) == sorted(KEPT_OUT_OF_KERAS) == ["h5py", "scipy", "sklearn"]
    assert all(modules.index(f"!{m}") < modules.index("tensorflow") for m in kept_out)


def test_the_functions_import_keras_without_scikit_learn_scipy_or_h5py_which_import_later():
    """In a fresh process, as a cold start on a cluster: the functions'
    first import of Keras and the digits data set leave scikit-learn, SciPy
    and h5py out; they import afterwards, only the legacy parts that took
    their absence miss them, and a model still saves as .keras."""
    code = """
import os, sys, tempfile
from flcommon.architectures import build, load_keras
keras = load_keras()
assert load_keras() is keras
assert "tensorflow" in sys.modules, "no tensorflow"
for name in ("sklearn", "scipy", "h5py"):
    assert name not in sys.modules, name + " imported with keras"
from keras.src.wrappers import utils
assert utils.sklearn is None
from flcommon.data import load_digits_split
assert len(load_digits_split()[0]) > 1000 and "sklearn" not in sys.modules, "sklearn imported for the digits"
import sklearn.base, scipy.sparse, h5py
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.keras")
    model = build("small", (8, 8, 1), 10, seed=1)
    model.save(path)
    again = keras.saving.load_model(path)
    assert all((a == b).all() for a, b in zip(model.get_weights(), again.get_weights()))
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "functions")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
