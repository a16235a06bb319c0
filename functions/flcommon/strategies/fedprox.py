"""FedProx (Li et al., 2020): FedAvg on the server; the clients minimise

    F_k(w) + (mu / 2) * ||w - w_global||^2

which keeps their local models near the global one on heterogeneous data.
The proximal term is added by the client's training step
(flcommon.models.train reads the strategy's `mu`); the server side is FedAvg.
"""
from __future__ import annotations

from typing import Any

from .base import number
from .fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.mu = number(self.settings, "mu", 0.0)
