"""Plain weighted FedAvg over whole weights: the reference the strategies and
the training loop are checked against in tests (not shipped in functions)."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def fedavg(updates: Iterable[tuple[list[np.ndarray], int]],
           reference: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    acc = [np.zeros(shape, dtype=np.float64) for shape, _ in reference]
    total = 0
    for arrays, n in updates:
        for a, w in zip(acc, arrays):
            a += np.asarray(w, dtype=np.float64) * n
        total += n
    return [(a / total).astype(dtype) for a, (_, dtype) in zip(acc, reference)]
