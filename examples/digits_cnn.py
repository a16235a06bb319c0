"""A FedKeeper user module: a small CNN on scikit-learn's bundled 8x8
handwritten digits (no download).

Name it in a scenario (the path is relative to the config file):

    scenarios:
      federated_learning:
        user_module: examples/digits_cnn.py
        # or, with keyword arguments for build_model and load_data:
        # user_module: {path: examples/digits_cnn.py, model_params: {filters: 16}, data_params: {test_fraction: 0.25}}

The interface (docs/models.md): build_model is required; load_data and
partition are optional (without them the scenario's training_test_data and
data_sampling.partition apply). Import only what the functions' runtime
(`tensorflow`: numpy, scikit-learn, keras, tensorflow) provides.
"""
import numpy as np

# Shapes `fedkeeper config validate` builds the model for without loading data.
INPUT_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


def build_model(input_shape, num_classes, filters=16, dense=32):
    """A Keras model mapping a batch of `input_shape` samples to
    `num_classes` probabilities (softmax). FedKeeper compiles it."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape))
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation="relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def load_data(test_fraction=0.25, seed=0):
    """(x_train, y_train, x_test, y_test): images in [0, 1] with a channel
    axis, integer labels. Runs once per session, in fl_server_init, which
    stores each client's partition and the test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


def partition(labels, n_clients, seed):
    """One array of training-sample indices per client: here two label
    shards per client (a non-IID split), dealt out at random."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, 2 * n_clients)
    deal = rng.permutation(len(shards))
    return [np.concatenate([shards[s] for s in deal[i::n_clients]]) for i in range(n_clients)]
