"""The built-in Keras architectures (`data_sampling.model`), apart from
training so that the user-code interface can build them without importing
the training loop. Importing this module sets TensorFlow's thread and log
settings before Keras is first imported, and `load_keras` is how the
functions import Keras."""
from __future__ import annotations

import gc
import os
import sys
import threading
from typing import Any, Sequence

# One intra-op thread per worker: several workers share few cores, and
# oversubscribed thread pools make every one of them slower.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from .entry import BadRequest  # noqa: E402

MODELS = ("cnn", "nn", "small")

#: Kept out of sys.modules while Keras is first imported. Keras imports
#: scikit-learn, when it is installed, only for its keras.wrappers
#: estimators, which no function uses: in the tensorflow runtime (which
#: carries scikit-learn for insights and the digits file) that is about 1 s
#: of CPU and 60 MB in every process that imports TensorFlow (measured with
#: `python -X importtime` and /usr/bin/time). SciPy and h5py are imported,
#: when they can be, by TensorFlow's own legacy Keras (tensorflow.python.keras,
#: which FedKeeper never uses: its sparse-input checks and .h5 saving) and by
#: Keras' legacy .h5 format: 178 modules and about 0.27 s of the import's
#: 4.1-4.6 s of CPU (medians of six runs each). Keras' own .keras saving
#: imports h5py when it saves. A function that needs any of them imports it
#: later as usual; only keras.wrappers' estimators, Keras' legacy .h5 format
#: and TensorFlow's legacy Keras then say it is missing. The local platforms'
#: preloads keep the same modules out (fedkeeper/local/prewarm.py).
KEPT_OUT_OF_KERAS = ("sklearn", "scipy", "h5py")
_keras_lock = threading.Lock()
_keras: Any = None   # set once Keras is wholly imported (sys.modules has it while it is half)


def load_keras() -> Any:
    """The keras module, imported once per process without scikit-learn."""
    global _keras
    if _keras is None:
        with _keras_lock:
            if _keras is None:
                held = [name for name in KEPT_OUT_OF_KERAS if name not in sys.modules]
                for name in held:
                    sys.modules[name] = None   # `import name` raises ImportError while it is there
                # Keras imports TensorFlow: some 460,000 objects that live as
                # long as the process. The cyclic collector's passes over them
                # while they are created cost 0.5-0.8 s of a cold start's
                # 3.9-4.4 s import, and free almost nothing.
                collecting = gc.isenabled()
                gc.disable()
                try:
                    import keras
                finally:
                    if collecting:
                        gc.enable()
                    for name in held:
                        if name in sys.modules and sys.modules[name] is None:
                            del sys.modules[name]
                _keras = keras
    return _keras


def build(name: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None):
    keras = load_keras()
    layers = keras.layers
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
        raise BadRequest(f"unknown model {name!r}; expected one of {MODELS}")
    out = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inp, out, name=name)
