"""Coordinate-wise median (Yin et al., 2018): every coordinate of the
aggregate delta is the median of that coordinate over the round's deltas
(for an even count, the mean of the two middle values).

    x_{t+1} = x_t + server_lr * median_i(delta_i)

Robust to fewer than half of the updates being arbitrary. Example weights
and staleness weights are not used: each update is one vote. Holds every
delta of the round (n x model size).
"""
from __future__ import annotations

import numpy as np

from .base import Arrays, HoldingStrategy


class Median(HoldingStrategy):
    name = "median"

    def combine(self) -> Arrays:
        return [np.median(self.stacked(i), axis=0).astype(np.float32, copy=False)
                for i in range(len(self.reference))]
