"""Write a stored global model to a file: `.keras` (the architecture the
session trained, its weights, compiled as training compiled it, so that
`keras.models.load_model(path).evaluate(...)` works at once) or `.npz` (the
raw weights, one array per member `arr_0000`, `arr_0001`, ..., pickle-free).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from flcommon import store as fs
from flcommon.blobs import BlobError, write_arrays
from flcommon.entry import BadRequest

from .catalog import ModelTrailError

SUFFIXES = (".keras", ".npz")


def weights_of(store, session: str, doc: dict[str, Any]) -> list[np.ndarray]:
    blob = doc.get("blob_id")
    if blob is None:
        raise ModelTrailError(f"model {doc['round']} of session {session} has no blob in the store")
    try:
        return store.get_arrays(blob)
    except BlobError as exc:
        raise ModelTrailError(f"model {doc['round']} of session {session} cannot be read: {exc}") from None


def data_shape(store, session: str) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a session's data: from its test
    split, which fl_server_init stores with the initial model."""
    part = store.db[fs.PARTITIONS].find_one({"session": session, "client": "_test"}, {"blob_id": 1})
    init = store.db[fs.MODELS].find_one({"session": session, "round": 0}, {"num_classes": 1})
    if part is None or init is None or not init.get("num_classes"):
        raise ModelTrailError(f"session {session} has no stored test split or class count, so the "
                              "architecture cannot be rebuilt; export it as .npz instead")
    try:
        x = next(iter(fs.stream_arrays(store.db, part["blob_id"])))
    except (BlobError, StopIteration) as exc:
        raise ModelTrailError(f"session {session}'s stored test split cannot be read: {exc}") from None
    return tuple(int(d) for d in x.shape[1:]), int(init["num_classes"])


def test_split(store, session: str) -> tuple[np.ndarray, np.ndarray]:
    part = store.db[fs.PARTITIONS].find_one({"session": session, "client": "_test"}, {"blob_id": 1})
    if part is None:
        raise ModelTrailError(f"session {session} has no stored test split")
    try:
        x, y = store.get_arrays(part["blob_id"])
    except (BlobError, ValueError) as exc:
        raise ModelTrailError(f"session {session}'s stored test split cannot be read: {exc}") from None
    return x, y


def _atomic_target(out: Path) -> Path:
    return out.with_name(f".{out.stem}.{os.getpid()}.part{out.suffix}")


def keras_model(code, spec: dict[str, Any], weights: list[np.ndarray], input_shape, num_classes: int):
    """The session's architecture with `weights`, compiled with the loss,
    metric and optimizer training used."""
    from flcommon.models import _optimizer, _settings  # the training functions' own choices
    model = code.build_model(input_shape, num_classes)
    try:
        model.set_weights(weights)
    except ValueError as exc:
        raise ModelTrailError(f"the stored weights do not fit {code.label}: {exc}") from None
    optim, lr, momentum = _settings(spec)
    model.compile(optimizer=_optimizer(optim, lr, momentum), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    # Its slots built (as fresh as training starts them), so that the saved
    # optimizer loads whole instead of being skipped with a warning.
    model.optimizer.build(model.trainable_variables)
    return model


def _save_keras(model, path: Path) -> None:
    """`model.save(path)`, then loaded back as a user would load it (safe
    mode, in this process, where the user module's registered classes are
    known): a file that would not load is refused, not left behind."""
    from flcommon.architectures import load_keras
    keras = load_keras()
    advice = ("register the model's own classes with @keras.saving.register_keras_serializable() and give "
              "them get_config(), avoid Lambda layers, or export the raw weights as .npz instead")
    try:
        model.save(path)
    except (NotImplementedError, TypeError, ValueError) as exc:  # a class Keras cannot serialise
        raise ModelTrailError(f"the model cannot be saved as .keras: {type(exc).__name__}: "
                              f"{_first_line(exc)}; {advice}") from None
    try:
        keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - whatever stops it loading makes the file useless
        raise ModelTrailError(f"the saved .keras file does not load back (keras.models.load_model): "
                              f"{type(exc).__name__}: {_first_line(exc)}; {advice}") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= 300 else text[:297] + "..."


def export_model(store, session: str, spec: dict[str, Any], doc: dict[str, Any], out: Path,
                 code=None) -> dict[str, Any]:
    """Write model `doc` of `session` to `out` (by its suffix); `code` is
    the session's model code (flcommon.user_code), needed for .keras.
    Returns what was written. The file appears whole or not at all."""
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ModelTrailError(f"{out}: the file name must end in .keras (a Keras model) or .npz (raw weights)")
    if out.parent and not out.parent.exists():
        raise ModelTrailError(f"{out.parent} does not exist")
    if not out.parent.is_dir():
        raise ModelTrailError(f"{out.parent} is not a directory")
    weights = weights_of(store, session, doc)
    model = None
    if out.suffix == ".keras":
        if code is None:
            raise ModelTrailError("a .keras export needs the session's model code")
        input_shape, num_classes = data_shape(store, session)
        try:
            model = keras_model(code, spec, weights, input_shape, num_classes)
        except BadRequest as exc:  # the user's build_model failed, or a built-in name is unknown
            raise ModelTrailError(str(exc)) from None
    tmp = _atomic_target(out)
    try:
        if model is None:
            with open(tmp, "wb") as f:
                write_arrays(f, weights)
        else:
            _save_keras(model, tmp)
        tmp.replace(out)
        size = out.stat().st_size
    except BlobError as exc:
        raise ModelTrailError(f"model {doc['round']} of session {session} cannot be written: {exc}") from None
    except OSError as exc:  # unwritable, a directory in the way, a full disk
        raise ModelTrailError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        # The temporary file may never have been created (its folder is not
        # writable); failing to remove it must not hide why the export failed.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    metrics = doc.get("metrics") or {}
    return {"session": session, "round": int(doc["round"]), "file": str(out), "format": out.suffix[1:],
            "bytes": size, "arrays": len(weights),
            "num_params": int(sum(w.size for w in weights)),
            "accuracy": metrics.get("accuracy"), "loss": metrics.get("loss")}
