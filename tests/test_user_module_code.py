"""flcommon.user_code: the interface built-ins and user modules share,
loading a module by path, checks on what user code returns, and errors
that carry the user's traceback (and nothing of ours)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from flcommon.entry import BadRequest
from flcommon.user_code import (USER_CODE_MARK, BuiltinCode, ModuleCode, UserCodeError, check_data,
                                check_partition, code_for, content_hash, load_module, module_files,
                                signature_problems)


def _write(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def test_builtins_are_an_instance_of_the_interface():
    code = code_for({"model": "small", "data": {"dataset": "digits"}, "partition": {"method": "iid"}})
    assert isinstance(code, BuiltinCode)
    x_tr, y_tr, x_te, y_te = code.load_data()
    assert x_tr.shape[1:] == (8, 8, 1) and len(x_tr) == len(y_tr)
    parts = code.partition(y_tr, 3, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y_tr)))
    model = code.build_model((8, 8, 1), 10)
    assert model.output_shape == (None, 10)


def test_content_hash_covers_names_and_bytes_of_a_package(tmp_path):
    pkg = tmp_path / "mypkg"
    _write(pkg / "__init__.py", "from .nets import build_model\n")
    _write(pkg / "nets.py", "def build_model(input_shape, num_classes):\n    return None\n")
    _write(pkg / "__pycache__" / "x.pyc", "junk")
    files = module_files(pkg)
    assert [rel for rel, _ in files] == ["mypkg/__init__.py", "mypkg/nets.py"]
    h = content_hash(files)
    (pkg / "nets.py").write_text((pkg / "nets.py").read_text() + "# changed\n")
    assert content_hash(module_files(pkg)) != h
    module = load_module(pkg)  # relative imports inside the package work
    assert callable(module.build_model) and signature_problems(module) == []


def test_user_errors_carry_only_the_users_frames(tmp_path):
    path = _write(tmp_path / "faulty_fl.py", """\
        def inner(n):
            return {}[n]

        def build_model(input_shape, num_classes):
            return inner("missing")

        def load_data():
            return [1, 2, 3]
        """)
    code = ModuleCode(load_module(path), path, BuiltinCode({}), {}, {}, "h")
    with pytest.raises(UserCodeError) as err:
        code.build_model((2,), 3)
    text = str(err.value)
    assert isinstance(err.value, BadRequest)  # an application error: refused, not retried as a crash
    assert text.startswith(f"{USER_CODE_MARK} faulty_fl.py (build_model): KeyError")
    assert 'File "faulty_fl.py", line 5, in build_model' in text and 'line 2, in inner' in text
    assert "user_code.py" not in text and str(tmp_path) not in text
    with pytest.raises(UserCodeError, match=r"load_data\): must return \(x_train"):
        code.load_data()


def test_import_errors_are_the_users(tmp_path):
    path = _write(tmp_path / "bad_import.py", "x = 1\nimport numpy.no_such_module\n")
    with pytest.raises(UserCodeError) as err:
        load_module(path)
    assert "(import): ModuleNotFoundError" in str(err.value) and 'bad_import.py", line 2' in str(err.value)
    syntax = _write(tmp_path / "bad_syntax.py", "def f(:\n")
    with pytest.raises(UserCodeError, match="SyntaxError") as err:
        load_module(syntax)
    assert str(tmp_path) not in str(err.value)


def test_signature_problems_name_the_function():
    import types
    m = types.SimpleNamespace(build_model=lambda shape: None, partition=lambda labels: None, load_data=3)
    problems = signature_problems(m)
    assert any(p.startswith("build_model(shape) cannot be called") for p in problems)
    assert any(p.startswith("partition(labels) cannot be called") for p in problems)
    assert "load_data is not a function" in problems
    assert signature_problems(types.SimpleNamespace()) == [
        "defines no build_model(input_shape, num_classes, **model_params)"]


def test_data_and_partition_checks():
    x, y = np.zeros((6, 2), np.float32), np.array([0, 1, 2, 0, 1, 2])
    got = check_data((x, np.eye(3)[y], x[:3], y[:3]), "m.py")
    assert got[1].tolist() == y.tolist() and got[0].dtype == np.float32  # one-hot labels accepted
    for bad, words in (((x, y[:5], x, y), "6 samples and 5 labels"),
                       ((x, y - 1.5, x, y), "class indices"),
                       ((x.astype(object), y, x, y), "not a numeric array")):
        with pytest.raises(UserCodeError, match=words):
            check_data(bad, "m.py")
    assert [p.tolist() for p in check_partition([[2, 0], [1]], 3, 2, "m.py")] == [[0, 2], [1]]
    for parts, words in (([[0], [1], [2]], "3 parts for 2 clients"), ([[0], []], "part 1"), ([[0], [7]], "part 1")):
        with pytest.raises(UserCodeError, match=words):
            check_partition(parts, 3, 2, "m.py")


def test_a_function_refuses_a_module_other_than_the_sessions(tmp_path):
    path = _write(tmp_path / "fk_user" / "mine.py", "def build_model(input_shape, num_classes):\n    return None\n")
    spec = {"model": "small", "user_module": {"name": "mine.py", "sha256": "0" * 64}}
    with pytest.raises(BadRequest, match="deploy the functions again"):
        code_for(spec, root=tmp_path / "fk_user")
    spec["user_module"]["sha256"] = content_hash(module_files(path))
    code = code_for(spec, root=tmp_path / "fk_user")
    assert isinstance(code, ModuleCode) and code.name == "mine.py"
    with pytest.raises(UserCodeError, match="returned NoneType, not a Keras model"):
        code.build_model((2,), 2)
    with pytest.raises(BadRequest, match="carries no user module"):
        code_for(dict(spec, user_module=dict(spec["user_module"], name="other.py")), root=tmp_path / "fk_user")


def test_a_package_over_its_size_limit_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    """A data set left in the package directory is refused having read no
    more than the limit, not after loading it into memory."""
    import tracemalloc
    import flcommon.user_code as uc
    monkeypatch.setattr(uc, "MAX_MODULE_BYTES", 1000)
    pkg = tmp_path / "mymodel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "data.bin").write_bytes(b"\0" * 20_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(UserCodeError, match="larger than"):
            uc.module_files(pkg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    (pkg / "data.bin").write_bytes(b"\0" * 900)
    assert [rel for rel, _ in uc.module_files(pkg)] == ["mymodel/__init__.py", "mymodel/data.bin"]
