"""The interface every aggregation strategy implements, and what they share.

A strategy turns the global model of round R, the clients' deltas (each
client's weights minus the global model it trained from) with their
weights, and the server state it left after the previous round into model
R+1 and its new state:

    strategy = get_strategy(spec["strategy"])
    strategy.begin(reference)                  # [(shape, dtype)] of the model
    strategy.add(delta, weight, mass)          # once per accepted update
    new_weights, new_state = strategy.finish(global_weights, state)
    strategy.shares()                          # each added update's share in the result

Memory: *streaming* strategies (fedavg, fedprox, fedavgm, fedadam,
fedyogi, fedadagrad) keep one float32 accumulator of the model's size,
whatever the number of updates. *Holding* strategies (median,
trimmed_mean, krum) need every delta at once and keep all of them: memory
grows with the number of updates in the round (n x model size).

Only numpy and the standard library are imported: the package is bundled
into every function zip.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Reference = Sequence[tuple[tuple[int, ...], np.dtype]]
Arrays = list[np.ndarray]

# Every strategy setting and its default, defined here once: the keeper's
# config (fedkeeper.config's StrategyConfig) takes its defaults from this
# table, and a session spec without a setting gets the same value here.
DEFAULTS: dict[str, Any] = {
    "server_lr": None,        # None: the strategy's own default (default_server_lr)
    "server_momentum": 0.9,   # fedavgm
    "beta1": 0.9,             # fedadam, fedyogi, fedadagrad
    "beta2": 0.99,            # fedadam, fedyogi
    "tau": 1e-3,              # fedadam, fedyogi, fedadagrad
    "mu": 0.01,               # fedprox (applied by the client)
    "trim_ratio": 0.1,        # trimmed_mean
    "byzantine": 1,           # krum
}


class StrategyError(ValueError):
    """Bad strategy settings, a server state that does not fit the model, or
    nothing to aggregate."""


def number(settings: dict[str, Any], key: str, minimum: float, maximum: float | None = None, *,
           above_minimum: bool = False, below_maximum: bool = True) -> float:
    """A numeric setting (its default when absent), checked against its
    bounds: [minimum, maximum) unless told otherwise."""
    value = settings.get(key)
    if value is None:
        value = DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StrategyError(f"strategy setting {key} must be a number, got {value!r}")
    if (value <= minimum if above_minimum else value < minimum) or \
            (maximum is not None and (value >= maximum if below_maximum else value > maximum)):
        low = "(" if above_minimum else "["
        high = (")" if below_maximum else "]") if maximum is not None else ")"
        raise StrategyError(f"strategy setting {key}={value} is outside {low}{minimum}, "
                            f"{maximum if maximum is not None else 'inf'}{high}")
    return float(value)


class Strategy:
    """Aggregation of one round: begin(), add() per update, finish().

    add() takes ownership of the delta's arrays and may overwrite them;
    finish() may overwrite the global weights and the state it is given.
    An instance can be reused round after round (begin() resets it); server
    state lives outside, in what finish() returns, so that it can be stored
    between rounds that run in different function invocations."""

    name = ""
    streaming = True          # one accumulator; False: holds every delta of the round
    stateful = False          # finish() returns server state to keep for the next round
    default_server_lr = 1.0

    def __init__(self, settings: dict[str, Any] | None = None):
        settings = dict(settings or {})
        # Every setting, at its default where absent or None (a model_dump()
        # of the config has every key).
        self.settings = {k: v if settings.get(k) is None else settings[k] for k, v in DEFAULTS.items()}
        self.settings["name"] = self.name
        if settings.get("server_lr") is None:
            self.server_lr = self.default_server_lr
        else:
            self.server_lr = number(settings, "server_lr", 0.0, above_minimum=True)
        self.settings["server_lr"] = self.server_lr
        self.reference: list[tuple[tuple[int, ...], np.dtype]] | None = None
        self._weights: list[float] = []
        self._masses: list[float] = []

    # ---------------------------------------------------------------- protocol
    def begin(self, reference: Reference) -> None:
        self.reference = [(tuple(int(n) for n in s), np.dtype(d)) for s, d in reference]
        self._weights, self._masses = [], []
        self._begin()

    def add(self, delta: Arrays, weight: float, mass: float | None = None) -> None:
        """`weight` multiplies the delta in the sum; `mass` (default: the
        weight) is what the sum is divided by. The aggregator passes
        examples x staleness damping as the weight and the examples as the
        mass, so a late update is damped even when every update of the round
        is late (as in FedBuff), instead of being normalised back up."""
        if self.reference is None:
            raise StrategyError("begin() must be called before add()")
        mass = weight if mass is None else mass
        for what, value in (("weight", weight), ("mass", mass)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value) or value <= 0:
                raise StrategyError(f"an update's {what} must be a positive number, got {value!r}")
        if len(delta) != len(self.reference):
            raise StrategyError(f"delta has {len(delta)} arrays, the model has {len(self.reference)}")
        for i, (d, (shape, _)) in enumerate(zip(delta, self.reference)):
            if d.shape != shape:
                raise StrategyError(f"delta array {i} has shape {d.shape}, expected {shape}")
        self._add(delta, float(weight))
        self._weights.append(float(weight))
        self._masses.append(float(mass))

    def finish(self, global_weights: Arrays, state: Arrays | None = None) -> tuple[Arrays, Arrays | None]:
        """Model R+1 (in the reference dtypes) and the state to store, or
        None for a stateless strategy."""
        if self.reference is None or not self._weights:
            raise StrategyError("no update to aggregate")
        if len(global_weights) != len(self.reference):
            raise StrategyError(f"global model has {len(global_weights)} arrays, the deltas {len(self.reference)}")
        if state is not None:
            self.check_state(state)
        return self._finish(global_weights, state)

    def shares(self) -> list[float]:
        """Each added update's share in the aggregate, in the order added:
        weight / total mass. They sum to 1 unless late updates were damped;
        the shortfall is how much the damping shrank the step."""
        total = sum(self._masses)
        return [w / total for w in self._weights]

    @property
    def count(self) -> int:
        return len(self._weights)

    def check_state(self, state: Arrays) -> None:
        expected = self.state_layout()
        if len(state) != len(expected) or any(s.shape != shape for s, shape in zip(state, expected)):
            raise StrategyError(f"stored server state ({len(state)} arrays) does not fit {self.name} "
                                f"on this model ({len(expected)} arrays)")

    def state_layout(self) -> list[tuple[int, ...]]:
        """Shapes of the arrays of this strategy's server state."""
        return []

    # ---------------------------------------------------------------- to implement
    def _begin(self) -> None:
        raise NotImplementedError

    def _add(self, delta: Arrays, weight: float) -> None:
        raise NotImplementedError

    def _finish(self, global_weights: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays | None]:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    def apply(self, global_weights: Arrays, step: Arrays, lr: float) -> Arrays:
        """global + lr * step, computed in place on `step`, cast to the model's dtypes."""
        out = []
        for s, g, (_, dtype) in zip(step, global_weights, self.reference):
            if lr != 1.0:
                np.multiply(s, np.float32(lr), out=s)
            np.add(s, g, out=s, casting="unsafe")
            out.append(s.astype(dtype, copy=False))
        return out


class StreamingStrategy(Strategy):
    """Keeps sum_i w_i * delta_i in one float32 accumulator; finish() hands
    sum_i w_i * delta_i / sum_i m_i (the weighted mean delta, damped for
    late updates) to step()."""

    streaming = True

    def _begin(self) -> None:
        self.acc = [np.zeros(shape, dtype=np.float32) for shape, _ in self.reference]

    def _add(self, delta: Arrays, weight: float) -> None:
        w = np.float32(weight)
        for acc, d in zip(self.acc, delta):
            if d.dtype == np.float32 and d.flags.writeable:
                # In place on the delta (ours to reuse): no temporaries.
                np.multiply(d, w, out=d)
                np.add(acc, d, out=acc)
            else:
                acc += np.asarray(d, dtype=np.float32) * w

    def _finish(self, global_weights: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays | None]:
        mean = self.acc
        total = np.float32(sum(self._masses))
        for a in mean:
            np.divide(a, total, out=a)
        self.acc = []  # handed over: finish() is called once per begin()
        return self.step(global_weights, mean, state)

    def step(self, global_weights: Arrays, mean_delta: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays | None]:
        """The server update from the weighted mean delta (float32, may be
        overwritten)."""
        raise NotImplementedError


class HoldingStrategy(Strategy):
    """Keeps every delta of the round (as float32): robust statistics need
    them all at once, so memory is n x model size. Example weights are not
    used: every update is one vote, whatever its size or staleness."""

    streaming = False

    def _begin(self) -> None:
        self.deltas: list[Arrays] = []

    def _add(self, delta: Arrays, weight: float) -> None:
        self.deltas.append([np.asarray(d, dtype=np.float32) for d in delta])

    def stacked(self, i: int) -> np.ndarray:
        """Array i of every delta, stacked on a new first axis; array i is
        then released from the held deltas (each is stacked once)."""
        out = np.stack([d[i] for d in self.deltas])
        for d in self.deltas:
            d[i] = None
        return out

    def shares(self) -> list[float]:
        return [1.0 / self.count] * self.count

    def _finish(self, global_weights: Arrays, state: Arrays | None) -> tuple[Arrays, Arrays | None]:
        combined = self.combine()
        self.deltas = []
        return self.apply(global_weights, combined, self.server_lr), None

    def combine(self) -> Arrays:
        """The robust aggregate delta (float32)."""
        raise NotImplementedError
