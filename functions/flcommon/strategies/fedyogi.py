"""FedYogi (Reddi et al., 2021, Algorithm 2):

    v_t = v_{t-1} - (1 - beta2) * delta_t^2 * sign(v_{t-1} - delta_t^2)

v changes additively, by at most (1 - beta2) * delta_t^2 a round, so it
neither forgets large past steps as fast as Adam's nor grows without bound
as Adagrad's. See adaptive.py for m_t and the model step."""
from __future__ import annotations

import numpy as np

from .adaptive import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"

    def update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        sign = np.sign(v - delta_sq)
        np.multiply(delta_sq, np.float32(1.0 - self.beta2), out=delta_sq)
        np.multiply(delta_sq, sign, out=delta_sq)
        np.subtract(v, delta_sq, out=v)
