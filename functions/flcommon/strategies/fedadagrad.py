"""FedAdagrad (Reddi et al., 2021, Algorithm 2):

    v_t = v_{t-1} + delta_t^2

beta2 is not used. See adaptive.py for m_t and the model step."""
from __future__ import annotations

import numpy as np

from .adaptive import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"

    def update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        np.add(v, delta_sq, out=v)
