"""Coordinate-wise trimmed mean (Yin et al., 2018): for every coordinate,
drop the k largest and the k smallest values over the round's n deltas,
k = floor(trim_ratio * n), and average the remaining n - 2k.

    x_{t+1} = x_t + server_lr * trimmed_mean_i(delta_i)

With k = 0 (few updates or trim_ratio 0) it is the plain unweighted mean.
Example weights and staleness weights are not used: each update is one
vote. Holds every delta of the round (n x model size).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Arrays, HoldingStrategy, number


class TrimmedMean(HoldingStrategy):
    name = "trimmed_mean"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.trim_ratio = number(self.settings, "trim_ratio", 0.0, 0.5)

    def trimmed(self, n: int) -> int:
        """Values cut at each end of n; the epsilon keeps 0.3 * 10 at 3."""
        return int(math.floor(self.trim_ratio * n + 1e-9))

    def combine(self) -> Arrays:
        n = self.count
        k = self.trimmed(n)
        out = []
        for i in range(len(self.reference)):
            values = self.stacked(i)
            values.sort(axis=0)
            out.append(values[k:n - k].mean(axis=0, dtype=np.float64).astype(np.float32))
        return out
