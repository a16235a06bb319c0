"""The checks every client update passes, and streaming FedAvg over whole
weights in pure numpy.

fl_server_aggregator checks each update with check_update() before any
strategy (fedkeeper.strategies) sees its delta. StreamingFedAvg averages
client weights directly, for in-process use where there is no global model
to take deltas against; the aggregator's `fedavg` strategy gives the same
result. Memory stays O(model size) whatever the number of clients: one
float32 accumulator plus the one update being checked. Each update is
checked whole before it is added, so a rejected update never touches the
aggregate.
"""
from __future__ import annotations

from typing import Iterable, Sequence

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


class StreamingFedAvg:
    def __init__(self, reference: Sequence[tuple[tuple[int, ...], np.dtype]]):
        self.reference = [(tuple(s), np.dtype(d)) for s, d in reference]
        self.acc = [np.zeros(s, dtype=np.float32) for s, _ in self.reference]
        self.total = 0

    def add(self, arrays: list[np.ndarray], num_examples: int) -> None:
        check_update(arrays, self.reference)
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
            raise UpdateRejected(f"num_examples must be a positive integer, got {num_examples!r}")
        for acc, a in zip(self.acc, arrays):
            # In place on the decoded array (ours to reuse): no temporaries.
            np.multiply(a, np.float32(num_examples), out=a, casting="unsafe")
            np.add(acc, a, out=acc, casting="unsafe")
        self.total += int(num_examples)

    def result(self) -> list[np.ndarray]:
        if self.total == 0:
            raise UpdateRejected("no valid update to aggregate")
        out = []
        for acc, (_, dtype) in zip(self.acc, self.reference):
            np.divide(acc, np.float32(self.total), out=acc)
            out.append(acc.astype(dtype, copy=False))
        return out


def fedavg(updates: Iterable[tuple[list[np.ndarray], int]],
           reference: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    agg = StreamingFedAvg(reference)
    for arrays, n in updates:
        agg.add(arrays, n)
    return agg.result()
