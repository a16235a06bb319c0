"""The checks every client update passes before any strategy
(flcommon.strategies) sees its delta: fl_server_aggregator checks each
update whole, so a rejected update never touches the aggregate."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class UpdateRejected(ValueError):
    """This update cannot be counted; the message is the recorded reason."""


def check_layout(arrays: Sequence[np.ndarray], reference: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
    """The update has the model's arrays: their number, shapes and dtypes."""
    if len(arrays) != len(reference):
        raise UpdateRejected(f"update has {len(arrays)} arrays, the model has {len(reference)}")
    for i, (a, (shape, dtype)) in enumerate(zip(arrays, reference)):
        if a.shape != shape:
            raise UpdateRejected(f"array {i} has shape {a.shape}, expected {shape}")
        if a.dtype != dtype:
            # Strict: a float64 update would also double the aggregator's memory.
            raise UpdateRejected(f"array {i} has dtype {a.dtype}, expected {dtype}")


FINITE_BLOCK = 1 << 18  # elements checked at a time: the mask numpy builds stays small


def all_finite(a: np.ndarray) -> bool:
    """np.isfinite(a).all(), a block at a time, so the boolean mask is never
    as large as a layer (a quarter of a float32 model's largest array)."""
    flat = a.reshape(-1, order="A")
    if flat.size <= FINITE_BLOCK:   # one mask of at most a block: no buffer to slice
        return bool(np.isfinite(flat).all())
    mask = np.empty(min(flat.size, FINITE_BLOCK), dtype=bool)
    for start in range(0, flat.size, FINITE_BLOCK):
        block = flat[start:start + FINITE_BLOCK]
        if not np.isfinite(block, out=mask[:block.size]).all():
            return False
    return True


def subtract_base(arrays: list[np.ndarray], base: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The update's delta against the model it was trained from, computed in
    place (the update's arrays become the delta), each array checked to be
    finite. One finiteness check covers both: a NaN or inf in the update
    stays one in the delta. `base` may be a stream (a stale update's model,
    read array by array), so at most one of its arrays is held here."""
    count = 0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught by the finiteness check
        for i, (a, g) in enumerate(zip(arrays, base)):
            if g.shape != a.shape:
                raise UpdateRejected(f"array {i} does not match the base model's shape {g.shape}")
            np.subtract(a, g, out=a, casting="unsafe")
            if not all_finite(a):
                raise UpdateRejected(f"array {i} contains NaN or inf (or does once the base model is subtracted)")
            count += 1
    if count != len(arrays):
        raise UpdateRejected(f"the base model has {count} arrays, the update {len(arrays)}")
    return arrays
