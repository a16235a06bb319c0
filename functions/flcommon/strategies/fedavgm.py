"""FedAvgM (Hsu et al., 2019): server momentum on the mean delta.

    v_t     = server_momentum * v_{t-1} + delta_t        (v_{-1} = 0)
    x_{t+1} = x_t + server_lr * v_t

delta_t is the example-weighted mean delta of round t. The velocity v is the
server state, stored between rounds. Streaming: one float32 accumulator.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Arrays, StreamingStrategy, number


class FedAvgM(StreamingStrategy):
    name = "fedavgm"
    stateful = True
    default_server_lr = 1.0

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.momentum = number(self.settings, "server_momentum", 0.0, 1.0)

    def state_layout(self) -> list[tuple[int, ...]]:
        return [shape for shape, _ in self.reference]

    def step(self, global_weights: Arrays, mean_delta: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays]:
        if state is None:
            state = [np.zeros(shape, np.float32) for shape, _ in self.reference]
        velocity = [np.asarray(v, dtype=np.float32) for v in state]
        for v, d in zip(velocity, mean_delta):
            np.multiply(v, np.float32(self.momentum), out=v)
            np.add(v, d, out=v)
            np.copyto(d, v)  # the step is the velocity; reuse the delta's memory for it
        return self.apply(global_weights, mean_delta, self.server_lr), velocity
