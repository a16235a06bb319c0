"""Keras models and local training, with a warm-worker model cache.

Building and compiling a Keras model costs far more than one small local
epoch, so a warm worker keeps one compiled model per (architecture, input
shape, optimizer settings) and only loads new weights for each invocation.
The optimizer's slots are reset between invocations: every round starts
local training from the new global model with a fresh optimizer, as
FedAvg assumes.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

# One intra-op thread per worker: several workers share few cores, and
# oversubscribed thread pools make every one of them slower.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

MODELS = ("cnn", "nn", "small")
_cache: dict[tuple, Any] = {}
_lock = threading.Lock()


def build(name: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None):
    import keras
    from keras import layers
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=tuple(input_shape))
    if name == "cnn":      # McMahan et al.'s MNIST CNN
        x = layers.Conv2D(32, 5, padding="same", activation="relu")(inp)
        x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Conv2D(64, 5, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Flatten()(x)
        x = layers.Dense(512, activation="relu")(x)
    elif name == "nn":     # FedKeeper's 2NN: Dense 500 -> classes
        x = layers.Flatten()(inp)
        x = layers.Dense(500, activation="relu")(x)
    elif name == "small":  # for 8x8 digits
        x = layers.Flatten()(inp)
        x = layers.Dense(64, activation="relu")(x)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    out = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inp, out, name=name)


def _optimizer(optim: str, lr: float, momentum: float):
    import keras
    if optim == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if optim == "nadam":
        return keras.optimizers.Nadam(learning_rate=lr)
    if optim == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {optim!r}")


def compiled(name: str, input_shape: Sequence[int], num_classes: int, optim: str = "adam",
             lr: float = 1e-3, momentum: float = 0.0):
    key = (name, tuple(input_shape), num_classes, optim, float(lr), float(momentum))
    model = _cache.get(key)
    if model is None:
        model = build(name, input_shape, num_classes)
        model.compile(optimizer=_optimizer(optim, lr, momentum),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        _cache[key] = model
    return model


def _reset_optimizer(model) -> None:
    opt = model.optimizer
    for v in getattr(opt, "variables", []):
        name = getattr(v, "path", None) or getattr(v, "name", "")
        if "learning_rate" in name:
            continue
        v.assign(np.zeros(v.shape, dtype=v.dtype))


def train(spec: dict[str, Any], weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
          num_classes: int, seed: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """Local training from `weights`; returns new weights and last-epoch metrics.

    With local_epochs 0 the weights come back untouched and Keras is never
    imported: a no-op client that still reads and writes its blobs, for
    measuring what the system itself costs per round."""
    if int(spec.get("local_epochs", 1)) == 0:
        return [np.array(w) for w in weights], {}
    import keras
    with _lock:  # functions-framework may run requests on threads
        model = compiled(spec["model"], x.shape[1:], num_classes, spec.get("optim", "adam"),
                         spec.get("lr", 1e-3), spec.get("momentum", 0.0))
        model.set_weights(weights)
        _reset_optimizer(model)
        keras.utils.set_random_seed(seed)
        hist = model.fit(x, y, epochs=int(spec.get("local_epochs", 1)),
                         batch_size=int(spec.get("batch_size", 10)), shuffle=True, verbose=0)
        metrics = {k: float(v[-1]) for k, v in hist.history.items()}
        return [np.asarray(w) for w in model.get_weights()], metrics


def evaluate(spec: dict[str, Any], weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
             num_classes: int) -> dict[str, float]:
    with _lock:
        model = compiled(spec["model"], x.shape[1:], num_classes, spec.get("optim", "adam"),
                         spec.get("lr", 1e-3), spec.get("momentum", 0.0))
        model.set_weights(weights)
        loss, acc = model.evaluate(x, y, batch_size=256, verbose=0)
        return {"loss": float(loss), "accuracy": float(acc)}


def initial_weights(name: str, input_shape: Sequence[int], num_classes: int, seed: int) -> list[np.ndarray]:
    return [np.asarray(w) for w in build(name, input_shape, num_classes, seed=seed).get_weights()]
