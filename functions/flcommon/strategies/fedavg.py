"""FedAvg (McMahan et al., 2017): the example-weighted mean of the deltas.

    x_{t+1} = x_t + server_lr * sum_i w_i delta_i / sum_i w_i

With the default server_lr 1 this is exactly the weighted mean of the
clients' weights. Streaming: one float32 accumulator.
"""
from __future__ import annotations

from .base import Arrays, StreamingStrategy


class FedAvg(StreamingStrategy):
    name = "fedavg"

    def step(self, global_weights: Arrays, mean_delta: Arrays, state: Arrays | None) -> tuple[Arrays, None]:
        return self.apply(global_weights, mean_delta, self.server_lr), None
