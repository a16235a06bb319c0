"""Krum (Blanchard et al., 2017): pick the one delta closest to its
neighbours. With n deltas and at most f = byzantine faulty ones, each delta
i is scored by the sum of squared Euclidean distances to its n - f - 2
nearest other deltas; the delta with the smallest score is the aggregate:

    x_{t+1} = x_t + server_lr * delta_{argmin_i score(i)}

Ties go to the update added first. Krum's guarantee needs n >= 2f + 3; with
fewer updates it still runs, as follows:
  * n - f - 2 < 1 (n <= f + 2, n >= 3): each delta is scored by its single
    nearest neighbour;
  * n = 2: nothing tells the two apart, so the aggregate is their
    coordinate-wise median (= their unweighted mean);
  * n = 1: that delta.
Example weights and staleness weights are not used. Holds every delta of
the round (n x model size) plus the n x n distance matrix.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Arrays, HoldingStrategy, StrategyError, number


class Krum(HoldingStrategy):
    name = "krum"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        byzantine = number(self.settings, "byzantine", 0)
        if byzantine != int(byzantine):
            raise StrategyError(f"strategy setting byzantine must be a whole number, got {byzantine}")
        self.byzantine = int(byzantine)
        self.selected: int | None = None

    def _begin(self) -> None:
        super()._begin()
        self.selected = None

    def distances(self) -> np.ndarray:
        """Squared Euclidean distances between the held deltas (float64)."""
        n = len(self.deltas)
        dist = np.zeros((n, n))
        for a in range(len(self.reference)):
            for i in range(n):
                for j in range(i + 1, n):
                    diff = np.subtract(self.deltas[i][a], self.deltas[j][a], dtype=np.float64).ravel()
                    dist[i, j] += float(np.dot(diff, diff))
        return dist + dist.T

    def neighbours(self, n: int) -> int:
        return max(1, n - self.byzantine - 2)

    def scores(self) -> np.ndarray:
        dist = self.distances()
        n = len(dist)
        m = self.neighbours(n)
        # Each row without its own zero distance, nearest first.
        others = np.sort(dist[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)
        return others[:, :m].sum(axis=1)

    def combine(self) -> Arrays:
        n = self.count
        if n == 2:
            return [np.median(self.stacked(i), axis=0).astype(np.float32, copy=False)
                    for i in range(len(self.reference))]
        self.selected = 0 if n == 1 else int(np.argmin(self.scores()))
        return self.deltas[self.selected]

    def shares(self) -> list[float]:
        if self.selected is None:
            return super().shares()
        return [1.0 if i == self.selected else 0.0 for i in range(self.count)]
