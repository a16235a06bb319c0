"""`fedkeeper config validate` checks a scenario's user module without
training: it imports, has the interface's signatures, imports only what the
function runtime provides, and builds a model of the declared shapes with
the right output size. A broken one is refused with exit 2 and a message
that names it and says what is wrong."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from session_config import write_user_module_config

ROOT = Path(__file__).resolve().parent.parent


def _validate(cfg: Path):
    return CliRunner().invoke(cli, ["config", "validate", "-c", str(cfg)])


def _module(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / name).write_text(textwrap.dedent(body))
    return name


def test_the_example_module_is_valid(tmp_path):
    shutil.copy(ROOT / "examples" / "digits_cnn.py", tmp_path / "digits_cnn.py")
    res = _validate(write_user_module_config(tmp_path, "digits_cnn.py"))
    assert res.exit_code == 0, res.output
    assert "user_module digits_cnn.py: defines build_model, load_data, partition" in res.output
    assert "input (8, 8, 1) (declared by the module) with output (None, 10)" in res.output


def test_broken_modules_are_refused_with_exit_2(tmp_path):
    cases = {
        "import_error.py": ("from numpy import no_such_name\n", ["import_error.py", "(import)", "ImportError",
                                                                 "no_such_name", "line 1"]),
        "syntax.py": ("def build_model(input_shape, num_classes)\n    pass\n", ["syntax.py", "SyntaxError"]),
        "signature.py": ("def build_model(input_shape):\n    pass\n",
                         ["signature.py", "build_model(input_shape)", "cannot be called"]),
        "no_build.py": ("def load_data():\n    return None\n", ["no_build.py", "defines no build_model"]),
        "foreign.py": ("import torch\n\ndef build_model(input_shape, num_classes):\n    pass\n",
                       ["foreign.py imports torch", "runtime tensorflow"]),
        "wrong_output.py": ("""\
            INPUT_SHAPE = (8, 8, 1)
            NUM_CLASSES = 10

            def build_model(input_shape, num_classes):
                import keras
                inputs = keras.Input(shape=input_shape)
                x = keras.layers.Flatten()(inputs)
                return keras.Model(inputs, keras.layers.Dense(num_classes - 3, activation="softmax")(x))
            """, ["wrong_output.py", "(None, 7)", "expected (None, 10)"]),
        "raises.py": ("""\
            INPUT_SHAPE = (8, 8, 1)
            NUM_CLASSES = 10

            def helper(n):
                return [1, 2][n]

            def build_model(input_shape, num_classes):
                return helper(5)
            """, ["raises.py (build_model)", "IndexError", 'File "raises.py", line 5, in helper',
                  "error in the user module"]),
    }
    for name, (body, words) in cases.items():
        sub = tmp_path / name.removesuffix(".py")
        sub.mkdir()
        res = _validate(write_user_module_config(sub, _module(sub, name, body)))
        assert res.exit_code == 2, (name, res.output)
        assert "scenarios.federated_learning.user_module" in res.output, (name, res.output)
        for w in words:
            assert w in res.output, (name, w, res.output)
        assert "user_module_probe" not in res.output and "flcommon" not in res.output, (name, res.output)


def test_missing_module_path_is_refused(tmp_path):
    res = _validate(write_user_module_config(tmp_path, "nowhere.py"))
    assert res.exit_code == 2 and "nowhere.py" in res.output and "no such file" in res.output


@pytest.mark.parametrize("name,words", [("main.py", "its name 'main' is taken where the functions run"),
                                        ("statistics.py", "its name 'statistics' is taken"),
                                        ("fl_client.py", "its name 'fl_client' is a FedKeeper function's")])
def test_a_module_named_as_something_the_functions_hold_is_refused(tmp_path, name, words):
    """main.py passed validate, then failed on the HTTP platforms only,
    where functions-framework holds the source's main.py as `main`."""
    shutil.copy(ROOT / "examples" / "digits_cnn.py", tmp_path / name)
    res = _validate(write_user_module_config(tmp_path, name))
    assert res.exit_code == 2 and words in res.output, res.output


def test_a_model_that_outputs_logits_is_refused(tmp_path):
    """FedKeeper trains on probabilities: a last layer without softmax
    trained to 0.19 where the same model with it reached 0.91."""
    module = _module(tmp_path, "logits.py", """\
        import keras

        INPUT_SHAPE, NUM_CLASSES = (8, 8, 1), 10


        def build_model(input_shape, num_classes):
            inputs = keras.Input(input_shape)
            return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))
        """)
    res = _validate(write_user_module_config(tmp_path, module))
    assert res.exit_code == 2 and "not class probabilities" in res.output and "softmax" in res.output, res.output
