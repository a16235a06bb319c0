"""FedAdam (Reddi et al., 2021, Algorithm 2):

    v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t^2

See adaptive.py for m_t and the model step."""
from __future__ import annotations

import numpy as np

from .adaptive import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"

    def update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        np.multiply(v, np.float32(self.beta2), out=v)
        np.multiply(delta_sq, np.float32(1.0 - self.beta2), out=delta_sq)
        np.add(v, delta_sq, out=v)
