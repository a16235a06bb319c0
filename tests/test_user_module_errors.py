"""What a user module gets wrong is refused with a message that names the
module and the problem, never as a crash or a traceback: its model failing
while it trains or evaluates inside the functions, a model whose input does
not take the data, train and test samples of different shapes, subclassed
models (accepted), weights that cannot be stored, parameters that are not
JSON, a module `deploy --dry-run` cannot bundle, and `.keras` exports that
would not load."""
from __future__ import annotations

import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import flcommon.user_code as user_code
from fedkeeper.cli import main as cli
from fedkeeper.config import ConfigError, load_config
from fedkeeper.model_trail import ModelTrailError, export_model
from fedkeeper.store import connect
from flcommon import store as fs
from flcommon import trail
from flcommon.blobs import BlobError, iter_arrays, write_arrays
from flcommon.user_code import (USER_CODE_MARK, BuiltinCode, ModuleCode, UserCodeError, check_data, code_for,
                                content_hash, load_module, module_files)

from session_config import write_user_module_config
from test_functions import call, make_session

DIGITS = (8, 8, 1)  # the built-in digits data the sessions below train on


def _write(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """bundle(name, body): the module as a function artifact carries it
    (fk_user/ next to flcommon/), and the spec entry a session started with
    it records."""
    def put(name: str, body: str) -> dict:
        root = tmp_path / "fk_user"
        path = _write(root / name, body)
        monkeypatch.setattr(user_code, "bundled_root", lambda: root)
        return {"name": name, "sha256": content_hash(module_files(path)), "model_params": {}, "data_params": {}}
    trail.code_hash.cache_clear()
    yield put
    # The trail's code hash is kept per process and covered this module:
    # later tests of this process hash the checkout's functions alone.
    trail.code_hash.cache_clear()


def _code(tmp_path: Path, name: str, body: str) -> ModuleCode:
    path = _write(tmp_path / name, body)
    return ModuleCode(load_module(path), path, BuiltinCode({}), {}, {}, "h")


# ---------------------------------------------------------------- errors while training and evaluating

RAISES_IN_TRAINING = """\
    import keras


    class Buggy(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                raise RuntimeError("a bug in my layer")
            return x


    def build_model(input_shape, num_classes):
        inputs = keras.Input(input_shape)
        x = Buggy()(keras.layers.Flatten()(inputs))
        return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    """


def test_an_error_of_the_users_model_in_training_is_the_users_and_not_retried(fn_db, bundle):
    sid = make_session(fn_db, user_module=bundle("buggy_layer.py", RAISES_IN_TRAINING))
    assert "error" not in call("fl_server_init", fn_db, session=sid, round=0, attempt=1)
    # An application error (an `error` result), not a crash that propagates and is retried.
    out = call("fl_client", fn_db, session=sid, round=0, client="client_0", attempt=1)
    error = out["error"]
    assert error.startswith(f"bad request: {USER_CODE_MARK} buggy_layer.py (training): RuntimeError"), error
    assert "a bug in my layer" in error and 'File "buggy_layer.py"' in error and "in call" in error
    assert "\x1b" not in error  # Keras' bold markers are gone
    assert fn_db[fs.UPDATES].count_documents({"session": sid}) == 0


RAISES_IN_EVALUATION = """\
    import keras
    import tensorflow as tf


    class OneAtATime(keras.layers.Layer):
        def call(self, x, training=None):
            if not training:
                tf.debugging.assert_less(tf.shape(x)[0], 2, message="evaluates one sample at a time")
            return x


    def build_model(input_shape, num_classes):
        inputs = keras.Input(input_shape)
        x = OneAtATime()(keras.layers.Flatten()(inputs))
        return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    """


def test_an_error_of_the_users_model_in_evaluation_is_the_users(fn_db, bundle):
    sid = make_session(fn_db, clients=2, user_module=bundle("one_at_a_time.py", RAISES_IN_EVALUATION))
    call("fl_server_init", fn_db, session=sid, round=0, attempt=1)
    for c in range(2):
        assert "error" not in call("fl_client", fn_db, session=sid, round=0, client=f"client_{c}", attempt=1)
    out = call("fl_server_aggregator", fn_db, session=sid, round=0, clients=["client_0", "client_1"])
    error = out["error"]
    assert error.startswith(f"bad request: {USER_CODE_MARK} one_at_a_time.py (evaluation):"), error
    assert "evaluates one sample at a time" in error and "\x1b" not in error
    # TensorFlow's own stack in its message is cut to the user's frames, as the traceback is.
    assert 'File "one_at_a_time.py", line 8, in call' in error
    assert "site-packages" not in error and "<frozen" not in error
    assert fn_db[fs.MODELS].count_documents({"session": sid, "round": 1}) == 0


def test_escape_codes_are_stripped_from_user_errors(tmp_path):
    code = _code(tmp_path, "loud_errors.py", """\
        def build_model(input_shape, num_classes):
            raise ValueError("\\x1b[1mbold\\x1b[0m and \\x1b]8;;https://x\\x07link\\x1b]8;;\\x07")
        """)
    with pytest.raises(UserCodeError) as err:
        code.build_model(DIGITS, 10)
    assert "ValueError: bold and link" in str(err.value) and "\x1b" not in str(err.value)


# ---------------------------------------------------------------- shapes

def test_a_model_whose_input_does_not_take_the_samples_is_refused(tmp_path):
    code = _code(tmp_path, "mnist_sized.py", """\
        import keras

        def build_model(input_shape, num_classes):
            return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                     keras.layers.Dense(num_classes, activation="softmax")])
        """)
    with pytest.raises(UserCodeError) as err:
        code.build_model(DIGITS, 10)
    assert str(err.value) == (f"{USER_CODE_MARK} mnist_sized.py (build_model): the model's input shape is "
                              "(None, 28, 28, 1), but the samples have shape (8, 8, 1): build the model for the "
                              "input_shape it is given")


def test_train_and_test_samples_of_different_shapes_are_refused():
    x, y = np.zeros((6, 8, 8, 1), np.float32), np.arange(6) % 3
    with pytest.raises(UserCodeError) as err:
        check_data((x, y, x[:3, :4, :4], y[:3]), "m.py")
    assert str(err.value) == (f"{USER_CODE_MARK} m.py (load_data): x_train's samples have shape (8, 8, 1) but "
                              "x_test's have shape (4, 4, 1); both splits must hold samples of one shape")
    assert check_data((x, y, x[:3], y[:3]), "m.py")[2].shape == (3, 8, 8, 1)


def test_config_validate_refuses_a_module_whose_test_samples_differ(tmp_path):
    _write(tmp_path / "split_shapes.py", """\
        import keras
        import numpy as np

        def build_model(input_shape, num_classes):
            return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                     keras.layers.Dense(num_classes, activation="softmax")])

        def load_data():
            x, y = np.zeros((40, 8, 8, 1), np.float32), np.arange(40) % 10
            return x[:30], y[:30], x[30:, :4, :4], y[30:]
        """)
    cfg = write_user_module_config(tmp_path, "split_shapes.py")
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "scenarios.federated_learning.user_module (split_shapes.py)" in res.output
    assert "x_test's have shape (4, 4, 1)" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- subclassed models

SUBCLASSED = """\
    import keras


    class Net(keras.Model):
        def __init__(self, num_classes, **kwargs):
            super().__init__(**kwargs)
            self.flat = keras.layers.Flatten()
            self.out = keras.layers.Dense(num_classes, activation="softmax")

        def call(self, x):
            return self.out(self.flat(x))


    def build_model(input_shape, num_classes):
        return Net(num_classes)
    """


def test_a_subclassed_model_is_built_and_trains(fn_db, mongo_url, tmp_path, bundle):
    code = _code(tmp_path / "direct", "subclassed_check.py", SUBCLASSED)
    model = code.build_model(DIGITS, 10)
    # Called once on zeros of the input shape: its weights exist.
    assert [tuple(w.shape) for w in model.get_weights()] == [(64, 10), (10,)]
    sid = make_session(fn_db, clients=2, user_module=bundle("subclassed.py", SUBCLASSED))
    assert call("fl_server_init", fn_db, session=sid, round=0, attempt=1)["num_params"] == 650
    for c in range(2):
        assert "error" not in call("fl_client", fn_db, session=sid, round=0, client=f"client_{c}", attempt=1)
    agg = call("fl_server_aggregator", fn_db, session=sid, round=0, clients=["client_0", "client_1"])
    assert agg["model_round"] == 1 and agg["accuracy"] > 0.1
    # Its weights export as .npz; as .keras it is refused (Net has no get_config), with what to do.
    store = connect(mongo_url, fn_db.name)
    try:
        spec = store.session(sid)["spec"]
        doc = store.model(sid, 1)
        assert export_model(store, sid, spec, doc, tmp_path / "net.npz")["arrays"] == 2
        with pytest.raises(ModelTrailError) as err:
            export_model(store, sid, spec, doc, tmp_path / "net.keras", code_for(spec))
    finally:
        store.close()
    text = str(err.value)
    assert text.startswith("the model cannot be saved as .keras: NotImplementedError")
    assert "register_keras_serializable" in text and ".npz" in text
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["net.npz"]


# ---------------------------------------------------------------- weights that cannot be stored

def test_arrays_that_could_not_be_read_back_are_not_written():
    import io
    for bad in (np.zeros(3, ml_dtypes.bfloat16), np.array(["a"]), np.zeros(2, [("a", "f4")]),
                np.zeros(2, "datetime64[s]")):
        with pytest.raises(BlobError) as err:
            write_arrays(io.BytesIO(), [np.zeros(2, np.float32), bad])
        assert str(err.value).startswith(f"array 1 ({len(bad)} {bad.dtype}) cannot be stored: only plain numbers")
    buf = io.BytesIO()
    write_arrays(buf, [np.zeros(2, np.float16), np.ones(3, bool), np.arange(2, dtype=np.complex64)])
    assert [a.dtype for a in iter_arrays(buf.getvalue())] == [np.float16, bool, np.complex64]


def test_a_model_with_weights_of_an_unstorable_dtype_is_refused(tmp_path):
    code = _code(tmp_path, "half_brained.py", """\
        import keras

        def build_model(input_shape, num_classes):
            inputs = keras.Input(input_shape)
            x = keras.layers.Dense(8, dtype="bfloat16")(keras.layers.Flatten()(inputs))
            return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x))
        """)
    with pytest.raises(UserCodeError) as err:
        code.build_model(DIGITS, 10)
    text = str(err.value)
    assert text.startswith(f"{USER_CODE_MARK} half_brained.py (build_model): weight ")
    assert "has dtype bfloat16, which FedKeeper cannot store" in text and "use float32" in text


# ---------------------------------------------------------------- parameters

def test_parameters_that_are_not_json_are_a_config_error(tmp_path):
    _write(tmp_path / "params.py", "def build_model(input_shape, num_classes, **kw):\n    return None\n")
    cfg = write_user_module_config(tmp_path, "{path: params.py, data_params: {seed: 2024-01-01}}")
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(cfg)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert ("scenarios.federated_learning.user_module.data_params.seed: 2024-01-01 is a date, not a JSON value"
            in res.output)
    assert "quote it" in res.output
    for value, key, words in (("{a: [1, 2024-01-01T10:00:00]}", "model_params.a", "at [1] is a datetime"),
                              ("{big: 100000000000000000000}", "model_params.big", "64-bit"),
                              ("{s: !!set {x}}", "model_params.s", "is a set"),
                              ("{x: .nan}", "model_params.x", "finite")):
        with pytest.raises(ConfigError) as err:
            load_config(write_user_module_config(tmp_path, f"{{path: params.py, model_params: {value}}}"))
        assert err.value.path == f"scenarios.federated_learning.user_module.{key}", str(err.value)
        assert words in err.value.message, str(err.value)
    params = "{a: [1, 'x', null, {b: 1.5}], t: true}"
    cfg = load_config(write_user_module_config(tmp_path, f"{{path: params.py, model_params: {params}}}"))
    assert cfg.scenarios["federated_learning"].user_module.model_params == {"a": [1, "x", None, {"b": 1.5}], "t": True}


# ---------------------------------------------------------------- deploy --dry-run

def test_dry_run_refuses_a_module_it_cannot_bundle_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("def build_model(input_shape, num_classes):\n    pass\n")
    pkg = tmp_path / "heavy"
    _write(pkg / "__init__.py", "def build_model(input_shape, num_classes):\n    pass\n")
    (pkg / "weights.bin").write_bytes(b"\0" * 5000)
    monkeypatch.setattr(user_code, "MAX_MODULE_BYTES", 4096)
    for module, words in (("notes.txt", "a user module is a .py file or a package directory"),
                          ("heavy", "larger than")):
        cfg = write_user_module_config(tmp_path, module)
        res = CliRunner().invoke(cli, ["deploy", "--dry-run", "-c", str(cfg)])
        assert res.exit_code == 2, (module, res.output)
        assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.exception
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, res.output
        assert lines[0].startswith(f"Error: scenarios.federated_learning.user_module ({module}): "), res.output
        assert words in lines[0], res.output


# ---------------------------------------------------------------- .keras exports that would not load

LAMBDA = """\
    import keras


    def build_model(input_shape, num_classes):
        inputs = keras.Input(input_shape)
        x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
        return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(
            keras.layers.Flatten()(x)))
    """


def test_a_keras_export_that_would_not_load_back_is_refused(fn_db, mongo_url, tmp_path, bundle):
    sid = make_session(fn_db, clients=2, user_module=bundle("doubled.py", LAMBDA))
    call("fl_server_init", fn_db, session=sid, round=0, attempt=1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    store = connect(mongo_url, fn_db.name)
    try:
        spec = store.session(sid)["spec"]
        with pytest.raises(ModelTrailError) as err:
            export_model(store, sid, spec, store.model(sid, 0), out_dir / "m.keras", code_for(spec))
    finally:
        store.close()
    text = str(err.value)
    assert text.startswith("the saved .keras file does not load back (keras.models.load_model): ValueError: "
                           "Requested the deserialization of a `Lambda` layer"), text
    assert "register_keras_serializable" in text and "export the raw weights as .npz" in text
    assert not list(out_dir.iterdir())  # neither the file nor its temporary
