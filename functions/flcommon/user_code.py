"""The model-and-data interface every session trains through.

A session's code is one object with three methods:

  build_model(input_shape, num_classes)  -> a Keras model whose output is
                                            (batch, num_classes) probabilities
  load_data()                            -> (x_train, y_train, x_test, y_test)
  partition(labels, n_clients, seed)     -> one index array per client

`BuiltinCode` provides them from the built-in models (`cnn`, `nn`, `small`)
and data sets (`digits`, `npz`). `ModuleCode` provides them from a user
module (`scenarios.<s>.user_module`): a Python file or package defining

  build_model(input_shape, num_classes, **model_params)
  load_data(**data_params)                         (optional)
  partition(labels, n_clients, seed)               (optional)

and takes what the module does not define from the built-ins. The keeper
bundles the module into every training function's artifact under
`USER_DIR`, and records its content hash in the session's spec; a function
refuses to run a session whose hash differs from the code it carries.

Whatever the user's code raises becomes a `UserCodeError`: a `BadRequest`,
so the function answers it as an application error, with the user's
traceback (frames of the user's files only) in its message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .entry import BadRequest

#: the folder next to flcommon/ that carries a bundled user module
USER_DIR = "fk_user"
#: the words that mark an error as coming from the user's code (the keeper looks for them)
USER_CODE_MARK = "error in the user module"
MAX_MODULE_BYTES = 8 * 1024 * 1024   # a user module's files, all together
MAX_TRACEBACK_CHARS = 3000
INTERFACE = ("build_model", "load_data", "partition")

_loaded: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


class UserCodeError(BadRequest):
    """The user's module failed to import, or one of its functions raised or
    returned something unusable. The message names the module and carries
    the user's traceback."""


# --------------------------------------------------------------------------- files and hash

def _skipped(rel: Path) -> bool:
    return any(part == "__pycache__" or part.startswith(".") for part in rel.parts) or rel.suffix == ".pyc"


def module_files(path: Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of a user module: the file itself, or every
    file of a package directory (prefixed with its name), sorted. Bounded in
    total size; a missing or empty module is an error."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".py":
            raise UserCodeError(f"{USER_CODE_MARK} {path.name}: a user module is a .py file or a package directory")
        items = [(path.name, path)]
    elif path.is_dir():
        if not (path / "__init__.py").is_file():
            raise UserCodeError(f"{USER_CODE_MARK} {path.name}: a package directory needs an __init__.py")
        items = [((Path(path.name) / p.relative_to(path)).as_posix(), p)
                 for p in sorted(path.rglob("*")) if p.is_file() and not _skipped(p.relative_to(path))]
    else:
        raise UserCodeError(f"{USER_CODE_MARK} {path}: no such file or directory")
    out, total = [], 0
    for rel, p in sorted(items):
        # Read no more than the budget left: a data set left in the package
        # must be refused, not loaded into memory first.
        with open(p, "rb") as f:
            data = f.read(MAX_MODULE_BYTES - total + 1)
        total += len(data)
        if total > MAX_MODULE_BYTES:
            raise UserCodeError(f"{USER_CODE_MARK} {path.name}: larger than {MAX_MODULE_BYTES // 2**20} MB; "
                                "keep data out of the module and load it in load_data")
        out.append((rel, data))
    return out


def content_hash(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (path, size, bytes) of each file, in path order."""
    h = hashlib.sha256()
    for rel, data in sorted(files):
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def bundled_root() -> Path:
    """Where an artifact carries the user module: next to flcommon/."""
    return Path(__file__).resolve().parent.parent / USER_DIR


# --------------------------------------------------------------------------- errors

def user_traceback(exc: BaseException, module: Path) -> str:
    """The traceback of `exc` cut to the frames in the user's files (the
    module file, or the files of the package directory), with paths relative
    to the module's folder; only the exception itself when no frame is the
    user's (a syntax error, say)."""
    module = Path(module).resolve()
    root = module.parent
    te = traceback.TracebackException.from_exception(exc)
    frames = [f for f in te.stack if _under(f.filename, module)]
    for f in frames:
        f.filename = _relative(f.filename, root)
    if getattr(te, "filename", None) and _under(te.filename, module):  # SyntaxError's own location
        te.filename = _relative(te.filename, root)
    te.stack = traceback.StackSummary.from_list(frames)
    te.__cause__ = te.__context__ = None
    text = "".join(te.format()) if frames else "".join(te.format_exception_only())
    text = _own_frames_only(text, module, root)
    if len(text) > MAX_TRACEBACK_CHARS:  # the end says what went wrong; keep it
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


_FRAME_LINE = re.compile(r'^\s*File "([^"]+)", line \d+, in .*$')


def _own_frames_only(text: str, module: Path, root: Path) -> str:
    """TensorFlow puts a stack of its own in the message of an error raised
    while a graph runs ("defined at (most recent call last): File ..."):
    keep only its frames in the user's files, relative to the module's
    folder, as for the traceback."""
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        m = _FRAME_LINE.match(line)
        if m and (Path(m.group(1)).is_absolute() or m.group(1).startswith("<")):  # "<frozen runpy>"
            if not _under(m.group(1), module):
                continue
            line = line.replace(m.group(1), _relative(m.group(1), root))
        if not line.strip() and out and not out[-1].strip():
            continue  # the dropped frames leave runs of blank lines
        out.append(line)
    return "".join(out)


def _relative(filename: str, root: Path) -> str:
    return Path(filename).resolve().relative_to(root).as_posix()


def _under(filename: str, root: Path) -> bool:
    """Whether `filename` is `root` (a file) or inside it (a folder)."""
    try:
        Path(filename).resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


# Terminal escape sequences (CSI, OSC and two-byte ones): Keras puts bold
# markers around the messages of errors raised inside a layer's call().
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _user_error(path: Path, what: str, exc: BaseException) -> UserCodeError:
    # The first line of the message heads the error; the traceback below
    # ends with the whole of it (Keras' and TensorFlow's run to many lines).
    # It travels to the keeper's records and terminal as plain text.
    head = next((line for line in str(exc).splitlines() if line.strip()), "")
    return UserCodeError(strip_ansi(f"{USER_CODE_MARK} {Path(path).name} ({what}): {type(exc).__name__}: {head}\n"
                                    f"{user_traceback(exc, path)}".rstrip()))


def _stays_a_crash(exc: BaseException) -> bool:
    """Failures of the worker rather than of the user's model: out of memory
    (Python's or TensorFlow's) may pass on another worker, so they stay
    crashes, which the keeper retries; Ctrl-C stays Ctrl-C."""
    if isinstance(exc, (KeyboardInterrupt, MemoryError)):
        return True
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    return errors is not None and isinstance(exc, errors.ResourceExhaustedError)


# --------------------------------------------------------------------------- loading

#: Module names a function's process has or may import that are not in the
#: keeper's: the entry files of the platforms (functions-framework imports
#: the source's main.py as `main`) and FedKeeper's shared package. A user
#: module of such a name passed `config validate` and then failed on the
#: HTTP platforms only.
TAKEN_NAMES = frozenset({"main", "__main__", "flcommon"})


def load_module(path: Path):
    """Import a user module (a .py file or a package directory) by path.
    Its folder is appended to sys.path (never ahead of installed packages)
    so that a package's own absolute imports work."""
    path = Path(path).resolve()
    name = path.stem if path.is_file() else path.name
    init = path if path.is_file() else path / "__init__.py"
    if not init.is_file():
        raise UserCodeError(f"{USER_CODE_MARK} {path.name}: no such module file ({init.name} missing)")
    if name in TAKEN_NAMES or name in sys.stdlib_module_names:
        raise UserCodeError(f"{USER_CODE_MARK} {path.name}: its name {name!r} is taken where the functions run "
                            "(the platforms' entry files, FedKeeper's own package, the standard library); "
                            "rename the user module")
    existing = sys.modules.get(name)
    if existing is not None and not _under(getattr(existing, "__file__", None) or "", path.parent):
        raise UserCodeError(f"{USER_CODE_MARK} {path.name}: its name {name!r} is already an installed "
                            "module; rename the user module")
    # Keras first, as the functions import it (flcommon.architectures.load_keras):
    # a module importing it itself gets the same Keras wherever it runs.
    from .architectures import load_keras
    load_keras()
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(path)] if path.is_dir() else None)
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - whatever the user's import raises
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _user_error(path, "import", exc) from None
    return module


def signature_problems(module) -> list[str]:
    """What is wrong with the functions a module defines, against the
    interface; [] when nothing is."""
    problems = []
    fn = getattr(module, "build_model", None)
    if fn is None:
        problems.append("defines no build_model(input_shape, num_classes, **model_params)")
    for name, positional in (("build_model", 2), ("load_data", 0), ("partition", 3)):
        fn = getattr(module, name, None)
        if fn is None:
            continue
        if not callable(fn):
            problems.append(f"{name} is not a function")
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        try:
            sig.bind(*range(positional))
        except TypeError:
            want = {"build_model": "(input_shape, num_classes, **model_params)",
                    "load_data": "(**data_params)", "partition": "(labels, n_clients, seed)"}[name]
            problems.append(f"{name}{sig} cannot be called as {name}{want}")
    return problems


# --------------------------------------------------------------------------- the interface

class BuiltinCode:
    """The built-in models and data sets, as the session's spec names them."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.key = spec.get("model", "small")  # flcommon.models caches compiled models by it
        self.label = f"built-in model {spec.get('model', 'small')}"

    def build_model(self, input_shape: Sequence[int], num_classes: int):
        from .architectures import build
        return build(self.spec.get("model", "small"), input_shape, num_classes)

    def load_data(self, credentials: dict[str, str] | None = None) -> tuple[np.ndarray, ...]:
        """`credentials`: those bound for the data URL (data_url.py)."""
        from .data import load_dataset
        return load_dataset(self.spec.get("data", {}), credentials)

    def partition(self, labels: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
        from .data import partition
        p = self.spec.get("partition", {})
        return partition(labels, n_clients, p.get("method", "iid"), seed,
                         float(p.get("alpha", 0.5)), int(p.get("shards_per_client", 2)))

    def run(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run code that drives the model (training, evaluation): the
        built-in models are FedKeeper's own, so what they raise stays as is."""
        return fn(*args, **kwargs)


class ModuleCode:
    """A user module; what it does not define comes from `fallback`."""

    def __init__(self, module, path: Path, fallback: BuiltinCode, model_params: dict[str, Any],
                 data_params: dict[str, Any], sha256: str):
        self.module, self.path, self.fallback = module, Path(path), fallback
        self.model_params, self.data_params = dict(model_params), dict(data_params)
        self.name = self.path.name
        self.key = f"user:{sha256}:{sorted(self.model_params.items())!r}"
        self.label = f"user module {self.name}"

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the user's code may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise _user_error(self.path, what, exc) from None

    def run(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run code that drives the user's model (training, evaluation):
        what the model raises there (a custom layer's call(), a shape it
        does not take) is an error in the user's code as well, reported as
        `what`. What FedKeeper refuses itself (BadRequest, including the
        user's build_model failing) passes unchanged, and so do failures of
        the worker (out of memory)."""
        try:
            return fn(*args, **kwargs)
        except BadRequest:
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's model may raise anything
            if _stays_a_crash(exc):
                raise
            raise _user_error(self.path, what, exc) from None

    def build_model(self, input_shape: Sequence[int], num_classes: int):
        input_shape = tuple(int(d) for d in input_shape)
        model = self._call("build_model", self.module.build_model, input_shape, int(num_classes),
                           **self.model_params)
        check_model(model, input_shape, num_classes, self.name, self._call)
        return model

    def load_data(self, credentials: dict[str, str] | None = None) -> tuple[np.ndarray, ...]:
        fn = getattr(self.module, "load_data", None)
        if fn is None:
            return self.fallback.load_data(credentials)
        return check_data(self._call("load_data", fn, **self.data_params), self.name)

    def partition(self, labels: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
        fn = getattr(self.module, "partition", None)
        if fn is None:
            return self.fallback.partition(labels, n_clients, seed)
        parts = self._call("partition", fn, np.array(labels), int(n_clients), int(seed))
        return check_partition(parts, len(labels), n_clients, self.name)


def check_model(model: Any, input_shape: Sequence[int], num_classes: int, name: str,
                call: Callable | None = None) -> None:
    """A Keras model (functional, sequential or subclassed) that takes
    samples of `input_shape`, whose one output is (batch, num_classes), and
    whose weights are plain numbers (what a blob can hold). The model is
    called once on a batch of zeros, which also creates the weights of a
    subclassed model; `call(what, fn)` runs that call as the user's code."""
    from .architectures import load_keras
    from .blobs import plain_numbers
    keras = load_keras()
    where = f"{USER_CODE_MARK} {name} (build_model)"
    if not isinstance(model, keras.Model):
        raise UserCodeError(f"{where}: returned {type(model).__name__}, not a Keras model")
    input_shape = tuple(int(d) for d in input_shape)
    declared = _declared_inputs(model)
    if declared is not None:
        if len(declared) != 1:
            raise UserCodeError(f"{where}: the model has {len(declared)} inputs; one input taking samples of "
                                f"shape {input_shape} is expected")
        takes = tuple(None if d is None else int(d) for d in declared[0])[1:]
        if len(takes) != len(input_shape) or any(t is not None and t != d for t, d in zip(takes, input_shape)):
            raise UserCodeError(f"{where}: the model's input shape is {(None, *takes)}, but the samples have "
                                f"shape {input_shape}: build the model for the input_shape it is given")
    zeros = np.zeros((1, *input_shape), np.float32)
    out = (call or _plain_call)(f"build_model, the model called on a batch of zeros {zeros.shape}",
                                lambda: model(zeros, training=False))
    if isinstance(out, (list, tuple, dict)):
        raise UserCodeError(f"{where}: the model has {len(out)} outputs; one output of (batch, num_classes) "
                            "probabilities is expected")
    shape = tuple(getattr(out, "shape", ()))
    if shape[1:] != (num_classes,):
        raise UserCodeError(f"{where}: the model's output shape is {(None, *shape[1:])}, expected "
                            f"(None, {num_classes}) for {num_classes} classes")
    probabilities = np.asarray(out, dtype=np.float64)
    if not (np.all(probabilities >= -1e-6) and np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-3)):
        # FedKeeper compiles it with sparse categorical cross-entropy on
        # probabilities: logits train without an error, to poor accuracy.
        raise UserCodeError(f"{where}: the model's output is not class probabilities (its rows of "
                            f"{num_classes} must be non-negative and add up to 1): end it with a softmax "
                            "activation")
    for v in model.weights:
        dtype_name = str(getattr(v.dtype, "name", v.dtype))
        try:
            dtype = np.dtype(dtype_name)
        except TypeError:
            dtype = None
        if dtype is None or not plain_numbers(dtype):
            raise UserCodeError(
                f"{where}: weight {getattr(v, 'path', None) or v.name} has dtype {dtype_name}, which FedKeeper "
                "cannot store (only plain numbers: bool, int, uint, float, complex); use float32 (for mixed "
                "precision, the 'mixed_bfloat16' or 'mixed_float16' policy keeps the weights in float32)")


def _plain_call(what: str, fn: Callable) -> Any:
    return fn()


def _declared_inputs(model: Any) -> list[tuple] | None:
    """The input shapes a functional or sequential model was built with
    (batch axis first); None when it declares none (a subclassed model, a
    Sequential without an Input)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [tuple(t.shape) for t in inputs]


def check_data(data: Any, name: str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): numeric arrays, labels integral,
    as many labels as samples."""
    where = f"{USER_CODE_MARK} {name} (load_data)"
    if not isinstance(data, (tuple, list)) or len(data) != 4:
        raise UserCodeError(f"{where}: must return (x_train, y_train, x_test, y_test), "
                            f"got {type(data).__name__}")
    x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in data)
    for label, a in (("x_train", x_tr), ("y_train", y_tr), ("x_test", x_te), ("y_test", y_te)):
        if a.dtype.hasobject or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise UserCodeError(f"{where}: {label} is not a numeric array (dtype {a.dtype})")
    for xs, ys, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(xs) == 0 or len(xs) != len(ys):
            raise UserCodeError(f"{where}: the {split} split has {len(xs)} samples and {len(ys)} labels")
    if x_tr.shape[1:] != x_te.shape[1:]:
        # One model takes both: its input shape comes from x_train.
        raise UserCodeError(f"{where}: x_train's samples have shape {x_tr.shape[1:]} but x_test's have shape "
                            f"{x_te.shape[1:]}; both splits must hold samples of one shape")
    labels = []
    for y, label in ((y_tr, "y_train"), (y_te, "y_test")):
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot rows
            y = y.argmax(axis=1)
        y = y.reshape(-1)
        if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0:
            raise UserCodeError(f"{where}: {label} must hold class indices 0..C-1")
        labels.append(y.astype(np.int64))
    return (x_tr.astype(np.float32, copy=False), labels[0], x_te.astype(np.float32, copy=False), labels[1])


def check_partition(parts: Any, n: int, n_clients: int, name: str) -> list[np.ndarray]:
    where = f"{USER_CODE_MARK} {name} (partition)"
    try:
        parts = [np.asarray(p).reshape(-1) for p in parts]
    except TypeError:
        raise UserCodeError(f"{where}: must return one index array per client") from None
    if len(parts) != n_clients:
        raise UserCodeError(f"{where}: returned {len(parts)} parts for {n_clients} clients")
    for i, p in enumerate(parts):
        if len(p) == 0 or not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= n:
            raise UserCodeError(f"{where}: part {i} must be a non-empty array of indices in 0..{n - 1}")
    return [np.sort(p).astype(np.int64) for p in parts]


def code_for(spec: dict[str, Any], root: Path | None = None):
    """The session's code: its user module when the spec names one (loaded
    once per worker from `root`, the bundled copy by default, and checked
    against the spec's hash), else the built-ins."""
    builtin = BuiltinCode(spec)
    um = spec.get("user_module")
    if not um:
        return builtin
    if not isinstance(um, dict) or not isinstance(um.get("name"), str) or not isinstance(um.get("sha256"), str):
        raise BadRequest("session spec: user_module must be {name, sha256, model_params, data_params}")
    base = Path(root) if root is not None else bundled_root()
    path = base / um["name"]
    key = (str(path), um["sha256"])
    with _lock:
        module = _loaded.get(key)
        if module is None:
            if not path.exists():
                raise BadRequest(f"this function carries no user module {um['name']}: deploy the functions "
                                 "again from the session's config")
            have = content_hash(module_files(path))
            if have != um["sha256"]:
                raise BadRequest(f"this function carries user module {um['name']} {have[:12]}, but the session "
                                 f"was started with {um['sha256'][:12]}: deploy the functions again from the "
                                 "session's config, with the module as it was when the session started")
            module = _loaded[key] = load_module(path)
    return ModuleCode(module, path, builtin, um.get("model_params") or {}, um.get("data_params") or {},
                      um["sha256"])
