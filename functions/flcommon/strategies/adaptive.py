"""The adaptive server optimizers of Reddi et al., "Adaptive Federated
Optimization" (ICLR 2021), Algorithm 2, on the example-weighted mean delta
delta_t of round t:

    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t          (m_{-1} = 0)
    v_t     = <FedAdagrad | FedYogi | FedAdam rule>            (v_{-1} = tau^2)
    x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)

No bias correction, as in the paper. The state (m, v) is stored between
rounds as one blob: the m arrays, then the v arrays. Streaming: one float32
accumulator, plus m and v.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Arrays, StreamingStrategy, number


class AdaptiveServerOptimizer(StreamingStrategy):
    stateful = True
    default_server_lr = 0.01

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.beta1 = number(self.settings, "beta1", 0.0, 1.0)
        self.beta2 = number(self.settings, "beta2", 0.0, 1.0)
        self.tau = number(self.settings, "tau", 0.0, above_minimum=True)

    def state_layout(self) -> list[tuple[int, ...]]:
        shapes = [shape for shape, _ in self.reference]
        return shapes + shapes

    def update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """v_{t-1} -> v_t in place; delta_sq (delta_t squared) may be overwritten."""
        raise NotImplementedError

    def step(self, global_weights: Arrays, mean_delta: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays]:
        k = len(self.reference)
        if state is None:
            m = [np.zeros(shape, np.float32) for shape, _ in self.reference]
            v = [np.full(shape, self.tau ** 2, np.float32) for shape, _ in self.reference]
        else:
            m = [np.asarray(a, dtype=np.float32) for a in state[:k]]
            v = [np.asarray(a, dtype=np.float32) for a in state[k:]]
        for mi, vi, d in zip(m, v, mean_delta):
            self.update_v(vi, np.square(d))
            np.multiply(mi, np.float32(self.beta1), out=mi)
            np.multiply(d, np.float32(1.0 - self.beta1), out=d)
            np.add(mi, d, out=mi)
            # The step m / (sqrt(v) + tau), written into the delta's memory.
            np.sqrt(vi, out=d)
            np.add(d, np.float32(self.tau), out=d)
            np.divide(mi, d, out=d)
        return self.apply(global_weights, mean_delta, self.server_lr), m + v
