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


FINITE_BLOCK = 1 << 18  # elements checked at a time: the buffer numpy fills stays small

# Largest |value| a delta may hold. Finite is not enough: a client that sends
# 3e37 passes a finiteness check, and weighted by its examples it overflows
# the float32 sum to inf, a global model no later update can move (every
# delta against it is inf too). Weights of 1e24 are no model's; a million
# clients of ten million examples each at this bound still sum below
# float32's maximum (3.4e38).
MAX_ABS_DELTA = 1e24


def all_within(a: np.ndarray, bound: float) -> bool:
    """Every value finite with |value| <= bound: the largest |value| of a
    block at a time (NaN fails the comparison, inf the bound), so the
    buffer is never as large as a layer."""
    flat = a.reshape(-1, order="A")
    if flat.size == 0:
        return True
    buf = np.empty(min(flat.size, FINITE_BLOCK), dtype=flat.dtype)
    for start in range(0, flat.size, FINITE_BLOCK):
        block = flat[start:start + FINITE_BLOCK]
        if not np.abs(block, out=buf[:block.size]).max() <= bound:
            return False
    return True


def subtract_base(arrays: list[np.ndarray], base: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The update's delta against the model it was trained from, computed in
    place (the update's arrays become the delta), each array checked to be
    finite and within MAX_ABS_DELTA. One check covers both: a NaN or inf in
    the update stays one in the delta. `base` may be a stream (a stale
    update's model, read array by array), so at most one of its arrays is
    held here."""
    count = 0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught by the check
        for i, (a, g) in enumerate(zip(arrays, base)):
            if g.shape != a.shape:
                raise UpdateRejected(f"array {i} does not match the base model's shape {g.shape}")
            np.subtract(a, g, out=a, casting="unsafe")
            if not all_within(a, MAX_ABS_DELTA):
                raise UpdateRejected(f"array {i} contains NaN, inf or a change beyond {MAX_ABS_DELTA:g} "
                                     "(or does once the base model is subtracted)")
            count += 1
    if count != len(arrays):
        raise UpdateRejected(f"the base model has {count} arrays, the update {len(arrays)}")
    return arrays
