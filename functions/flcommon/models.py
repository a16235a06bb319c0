"""Keras models and local training, with a warm-worker model cache.

Building and compiling a Keras model costs far more than one small local
epoch, so a warm worker keeps one compiled model per (architecture, input
shape, optimizer settings) and only loads new weights for each invocation.
The optimizer's slots are reset between invocations: every round starts
local training from the new global model with a fresh optimizer, as
FedAvg assumes.

With the FedProx strategy the local objective gains the proximal term
(mu / 2) * ||w - w_global||^2, through a custom training step compiled once
per cached model; every other strategy trains with Keras' own step.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from flcommon.strategies import FedProx, StrategyError, get_strategy

# architectures first: it sets TensorFlow's threads before Keras is imported.
from .architectures import MODELS, build, load_keras  # noqa: F401  (build: the built-ins, for this module's callers)
from .entry import BadRequest
from .user_code import code_for

OPTIMIZERS = ("adam", "nadam", "sgd")
_cache: dict[tuple, Any] = {}
_fresh: dict[int, list[np.ndarray]] = {}  # id(model) -> its optimizer's initial variable values
_prox: dict[int, tuple[Any, list[Any], Any]] = {}  # id(model) -> (FedProx step, anchors, mu variable)
_lock = threading.Lock()


def _optimizer(optim: str, lr: float, momentum: float):
    keras = load_keras()
    if optim == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if optim == "nadam":
        return keras.optimizers.Nadam(learning_rate=lr)
    if optim == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise BadRequest(f"unknown optimizer {optim!r}; expected one of {OPTIMIZERS}")


def compiled(name: str, input_shape: Sequence[int], num_classes: int, optim: str = "adam",
             lr: float = 1e-3, momentum: float = 0.0, code=None):
    """`code`: the session's flcommon.user_code interface (default: the built-in `name`)."""
    key = (code.key if code is not None else name, tuple(input_shape), num_classes, optim, float(lr),
           float(momentum))
    model = _cache.get(key)
    if model is None:
        model = code.build_model(input_shape, num_classes) if code is not None else build(name, input_shape,
                                                                                          num_classes)
        model.compile(optimizer=_optimizer(optim, lr, momentum),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        # Build the optimizer's slots now and remember their initial values:
        # not every slot starts at zero (Nadam's u_product starts at 1).
        model.optimizer.build(model.trainable_variables)
        _fresh[id(model)] = [np.array(v.numpy()) for v in model.optimizer.variables]
        _cache[key] = model
    return model


def _reset_optimizer(model) -> None:
    """Back to a fresh optimizer (step count, moments, momentum) without
    building a new one, which would retrace the compiled train step."""
    for v, init in zip(model.optimizer.variables, _fresh[id(model)]):
        v.assign(init)


def _prox_step(model):
    """A compiled FedProx training step for this cached model: minimises the
    data loss plus (mu / 2) * ||w - anchor||^2, where the anchors hold the
    global weights of the invocation. Anchors and mu are variables, so a new
    round or another mu never retraces the step."""
    hit = _prox.get(id(model))
    if hit is None:
        keras = load_keras()
        import tensorflow as tf
        variables = model.trainable_variables
        anchors = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in variables]
        mu = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        data_loss = keras.losses.SparseCategoricalCrossentropy()

        @tf.function(reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = data_loss(y, pred)
                prox = tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(variables, anchors)])
                total = loss + 0.5 * mu * prox
            grads = tape.gradient(total, variables)
            model.optimizer.apply_gradients(zip(grads, variables))
            correct = tf.equal(tf.argmax(pred, axis=-1), tf.cast(y, tf.int64))
            return loss, tf.reduce_mean(tf.cast(correct, tf.float32))

        hit = _prox[id(model)] = (step, anchors, mu)
    return hit


def _batch_step(model, mu: float):
    """The function that trains on one batch and returns its metrics: Keras'
    own step, or the FedProx step anchored at the model's current weights."""
    if mu <= 0:
        return lambda xb, yb: model.train_on_batch(xb, yb, return_dict=True)
    step, anchors, mu_var = _prox_step(model)
    for a, v in zip(anchors, model.trainable_variables):
        a.assign(v.value)
    mu_var.assign(mu)

    def prox_batch(xb, yb):
        loss, accuracy = step(xb, yb)
        return {"loss": loss, "accuracy": accuracy}
    return prox_batch


def _fit(model, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, seed: int,
         mu: float = 0.0) -> dict[str, float]:
    """Seeded mini-batch epochs with `train_on_batch` (or the FedProx step
    when mu > 0).

    `model.fit` builds a tf.data pipeline and callbacks on every call, which
    for a client's few hundred samples costs several times the training
    itself (measured: 0.42 s against 0.09 s for 2 epochs of the small model).
    Returns the last epoch's example-weighted mean loss and accuracy (the
    loss without the proximal term)."""
    train_batch = _batch_step(model, mu)
    rng = np.random.default_rng(seed)
    n = len(y)
    batch_size = max(1, min(int(batch_size), n))
    metrics: dict[str, float] = {}
    for _ in range(epochs):
        order = rng.permutation(n)
        sums: dict[str, float] = {}
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out = train_batch(x[idx], y[idx])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        metrics = {k: v / n for k, v in sums.items()}
    return metrics


def _settings(spec: dict[str, Any]) -> tuple[str, float, float]:
    return (str(spec.get("optim", "adam")), float(spec.get("lr", 1e-3)), float(spec.get("momentum", 0.0) or 0.0))


def proximal_mu(spec: dict[str, Any]) -> float:
    """FedProx's mu when the session trains with FedProx, else 0."""
    try:
        strategy = get_strategy(spec.get("strategy"))
    except StrategyError as exc:
        raise BadRequest(str(exc)) from None
    return strategy.mu if isinstance(strategy, FedProx) else 0.0


def train(spec: dict[str, Any], weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
          num_classes: int, seed: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """Local training from `weights`; returns new weights and last-epoch metrics.

    With local_epochs 0 the weights come back untouched and Keras is never
    imported: a no-op client that still reads and writes its blobs, for
    measuring what the system itself costs per round."""
    epochs = int(spec.get("local_epochs", 1))
    if epochs == 0:
        return [np.array(w) for w in weights], {}
    mu = proximal_mu(spec)
    code = code_for(spec)
    # No keras.utils.set_random_seed here: changing TF's global seed makes
    # every cached tf.function retrace (0.04 s -> 0.24 s per client). These
    # models have no stochastic layers; the batch order comes from `seed`.
    with _lock:  # functions-framework may run requests on threads
        # Through the session's code: what a user's model raises while it
        # trains is an error in the user module, not a crash to retry.
        return code.run("training", _train, spec, code, weights, x, y, num_classes, epochs, seed, mu)


def _train(spec: dict[str, Any], code, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
           num_classes: int, epochs: int, seed: int, mu: float) -> tuple[list[np.ndarray], dict[str, float]]:
    model = compiled(spec["model"], x.shape[1:], num_classes, *_settings(spec), code=code)
    model.set_weights(weights)
    _reset_optimizer(model)  # a new round: no momentum carried over from the last one
    metrics = _fit(model, x, y, epochs, int(spec.get("batch_size", 10)), seed, mu)
    return [np.asarray(w) for w in model.get_weights()], metrics


def evaluate(spec: dict[str, Any], weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
             num_classes: int, batch_size: int = 256) -> dict[str, float]:
    code = code_for(spec)
    with _lock:
        return code.run("evaluation", _evaluate, spec, code, weights, x, y, num_classes, batch_size)


def _evaluate(spec: dict[str, Any], code, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
              num_classes: int, batch_size: int) -> dict[str, float]:
    model = compiled(spec["model"], x.shape[1:], num_classes, *_settings(spec), code=code)
    model.set_weights(weights)
    sums = {"loss": 0.0, "accuracy": 0.0}
    for start in range(0, len(y), batch_size):
        out = model.test_on_batch(x[start:start + batch_size], y[start:start + batch_size], return_dict=True)
        m = len(y[start:start + batch_size])
        for k in sums:
            sums[k] += float(out[k]) * m
    return {k: v / max(1, len(y)) for k, v in sums.items()}


def initial_weights(name: str, input_shape: Sequence[int], num_classes: int, seed: int,
                    code=None) -> list[np.ndarray]:
    if code is None:
        return [np.asarray(w) for w in build(name, input_shape, num_classes, seed=seed).get_weights()]
    keras = load_keras()
    keras.utils.set_random_seed(seed)
    return [np.asarray(w) for w in code.build_model(input_shape, num_classes).get_weights()]
