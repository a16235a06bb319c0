"""Privacy accounting with Google's dp-accounting: the epsilon a DP session
has spent, for its delta, after a number of rounds.

central: each round is the Gaussian mechanism (noise multiplier z on a sum
of deltas clipped to C) on a sample of clients. FedKeeper draws a fixed
number of clients per round; the accounting treats that as Poisson sampling
with q = clients_per_round / total_clients, as TensorFlow Federated and
Flower do for DP-FedAvg. T rounds are T such events composed.

local: a client's noised delta reaches the server whenever it is selected,
so sampling amplifies nothing against the server. Two data sets of one
client can move its clipped delta by up to 2C (anything inside the ball),
so each release is a Gaussian mechanism with multiplier z / 2. The bound
assumes the client took part in every round (the worst case for any one
client).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")

# Integer orders only: dp-accounting's fractional orders below 2 fail to
# converge for small q and log a warning per order. Up to 512 keeps tight
# bounds for small epsilons as well.
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 384, 512)


class AccountingError(ValueError):
    """Parameters the accountant cannot use."""


def dp_event(mode: str, noise_multiplier: float, sampling_rate: float, rounds: int) -> dp_accounting.DpEvent:
    """The DpEvent of `rounds` rounds of a session (see the module's text)."""
    if mode not in ("central", "local"):
        raise AccountingError(f"privacy mode must be central or local, got {mode!r}")
    if not 0 < sampling_rate <= 1:
        raise AccountingError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0:
        raise AccountingError(f"rounds must not be negative, got {rounds}")
    if mode == "central":
        one = dp_accounting.GaussianDpEvent(noise_multiplier)
        if sampling_rate < 1:
            one = dp_accounting.PoissonSampledDpEvent(sampling_rate, one)
    else:
        one = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    return dp_accounting.SelfComposedDpEvent(one, rounds)


def epsilon(mode: str, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon after `rounds` rounds for the given delta; 0 for no round,
    inf without noise."""
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event = dp_event(mode, noise_multiplier, sampling_rate, rounds)
    acc = rdp.RdpAccountant(RDP_ORDERS) if accountant == "rdp" else pld.PLDAccountant()
    # dp-accounting logs through absl on numerical corner cases; the keeper's
    # terminal is not the place for them.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    except (ArithmeticError, ValueError) as exc:   # e.g. a noise multiplier of 1e-300
        raise AccountingError(f"the {accountant.upper()} accountant cannot compute epsilon for noise multiplier "
                              f"{noise_multiplier:g} over {rounds} round(s): {exc}") from None
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class PrivacyBudget:
    """A session's DP parameters and what they spend.

    `noise_multiplier` is the configured total z: with adaptive clipping the
    deltas get less (flcommon.privacy.value_noise_multiplier) and the pair
    of mechanisms together is accounted as one Gaussian with z."""

    mode: str
    noise_multiplier: float
    clients_per_round: int
    total_clients: int
    delta: float
    rounds: int
    target_epsilon: float | None = None
    accountant: str = "rdp"

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.total_clients

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.mode, self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant)

    def configured_epsilon(self) -> float:
        """The epsilon the configured number of rounds would spend."""
        return self.epsilon_after(self.rounds)

    def next_round_exceeds(self, rounds_done: int) -> float | None:
        """The epsilon round rounds_done + 1 would bring the session to, when
        it exceeds target_epsilon; None when it stays within (or no target)."""
        if self.target_epsilon is None:
            return None
        after = self.epsilon_after(rounds_done + 1)
        return after if after > self.target_epsilon else None

    def rounds_within_target(self, limit: int | None = None) -> int:
        """How many rounds fit in target_epsilon (up to `limit`, default the
        configured rounds); binary search, epsilon grows with rounds."""
        limit = self.rounds if limit is None else limit
        if self.target_epsilon is None:
            return limit
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon_after(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid - 1
        return lo


def describe_epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"
