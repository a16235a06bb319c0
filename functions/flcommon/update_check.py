"""The checks every client update passes before any strategy
(flcommon.strategies) sees its delta: fl_server_aggregator checks each
update whole, so a rejected update never touches the aggregate."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class UpdateRejected(ValueError):
    """This update cannot be counted; the message is the recorded reason."""


def check_update(arrays: Sequence[np.ndarray], reference: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
    if len(arrays) != len(reference):
        raise UpdateRejected(f"update has {len(arrays)} arrays, the model has {len(reference)}")
    for i, (a, (shape, dtype)) in enumerate(zip(arrays, reference)):
        if a.shape != shape:
            raise UpdateRejected(f"array {i} has shape {a.shape}, expected {shape}")
        if a.dtype != dtype:
            # Strict: a float64 update would also double the aggregator's memory.
            raise UpdateRejected(f"array {i} has dtype {a.dtype}, expected {dtype}")
        if not np.isfinite(a).all():
            raise UpdateRejected(f"array {i} contains NaN or inf")
