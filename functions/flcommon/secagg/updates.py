"""Model updates in and out of the field: a client's delta weighted by its
number of examples, flattened and quantized; the server's decoded sum
divided by the survivors' examples is FedAvg's weighted mean delta."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import field

Reference = Sequence[tuple[tuple[int, ...], np.dtype]]


def encode_update(delta: Sequence[np.ndarray], num_examples: int, max_clients: int,
                  scale: float = field.DEFAULT_SCALE) -> tuple[np.ndarray, int]:
    """num_examples * delta as field elements; returns (vector, values
    clipped to the overflow bound)."""
    if num_examples < 1:
        raise field.FieldError(f"num_examples must be positive, got {num_examples}")
    flat = np.concatenate([np.asarray(d, dtype=np.float64).ravel() for d in delta]) if delta else np.zeros(0)
    return field.quantize(flat * num_examples, scale, max_clients)


def decode_mean(total: np.ndarray, total_examples: int, reference: Reference,
                scale: float = field.DEFAULT_SCALE) -> list[np.ndarray]:
    """The weighted mean delta, float32, shaped as the model."""
    values = field.dequantize(total, scale) / total_examples
    sizes = [int(np.prod(shape)) for shape, _ in reference]
    if values.size != sum(sizes):
        raise field.FieldError(f"sum has {values.size} values, the model {sum(sizes)}")
    out, at = [], 0
    for (shape, _), n in zip(reference, sizes):
        out.append(values[at:at + n].astype(np.float32).reshape(shape))
        at += n
    return out


def error_bound(clients: int, total_examples: int, scale: float = field.DEFAULT_SCALE) -> float:
    """Largest difference, per coordinate, between decode_mean and the float
    weighted mean (before the float32 cast): each client's rounding moves
    its weighted value by at most 0.5 / scale."""
    return clients * 0.5 / scale / total_examples
