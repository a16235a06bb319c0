"""Differential privacy of model updates: clipping, Gaussian noise and
adaptive clipping, pure numpy. Accounting (what epsilon this buys) is the
keeper's (fedkeeper.privacy), which uses Google's dp-accounting.

Two modes, as a session's spec has them under `privacy`:

* central (DP-FedAvg, McMahan et al. 2018, user-level): the aggregator clips
  each client's delta to the norm bound C, sums the clipped deltas with
  equal weight, adds N(0, (z C)^2) to every coordinate of the sum and
  divides by the expected number of clients per round (a fixed
  denominator, so one client's presence moves the mean by at most
  C / clients_per_round). The bound is fixed, or adaptive (Andrew et al.
  2021): it follows a target quantile of the update norms, estimated from a
  noised count of the unclipped updates.

      dp = CentralDP(strategy, privacy_settings(spec["privacy"]), clip_norm, rng)
      dp.begin(reference); dp.add(delta) ...; new, state = dp.finish(global, state)
      dp.report()   # what may be stored: the bound used, the next one, noise std

* local: each client clips its own delta to C and adds N(0, (z C)^2) before
  it uploads anything (privatize_local), for clients that do not trust the
  server.

Noise comes from the numpy Generator the caller passes: tests seed it; the
functions draw it from OS entropy, since noise anyone can regenerate from
a stored seed protects nothing.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .entry import BadRequest
from .strategies.base import Arrays, Reference, StreamingStrategy

MODES = ("central", "local")

# Andrew et al. 2021's defaults (and TensorFlow Federated's).
ADAPTIVE_DEFAULTS: dict[str, Any] = {
    "initial": 0.1,               # the bound of the first round
    "target_quantile": 0.5,       # share of updates the bound should leave unclipped
    "learning_rate": 0.2,         # geometric step: C <- C * exp(-lr * (unclipped share - quantile))
    "clipped_count_stddev": None,  # None: clients_per_round / 20
}


# Adaptive clipping's learning rate at most: Andrew et al. use 0.2; past a
# few units the bound jumps by orders of magnitude each round.
MAX_LEARNING_RATE = 10.0


class PrivacyError(BadRequest):
    """Privacy settings that cannot be used (bad input to a function: a
    retry with the same session cannot help)."""


def _positive(settings: dict[str, Any], key: str, *, zero_ok: bool = False) -> float:
    value = settings.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero_ok):
        bound = "non-negative" if zero_ok else "positive"
        raise PrivacyError(f"privacy setting {key} must be a {bound} number, got {value!r}")
    return float(value)


def privacy_settings(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """A session spec's `privacy` block, checked: {mode, noise_multiplier,
    clip_norm (a number) or adaptive (a dict with every setting),
    clients_per_round}; None when the session has no DP."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PrivacyError(f"privacy must be a mapping, got {type(raw).__name__}")
    if raw.get("mode") in (None, "none"):
        return None
    mode = raw.get("mode")
    if mode not in MODES:
        raise PrivacyError(f"privacy mode must be one of {list(MODES)}, got {mode!r}")
    out: dict[str, Any] = {"mode": mode, "noise_multiplier": _positive(raw, "noise_multiplier", zero_ok=True)}
    per_round = raw.get("clients_per_round")
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise PrivacyError(f"privacy clients_per_round must be a positive integer, got {per_round!r}")
    out["clients_per_round"] = per_round
    clip = raw.get("clip_norm")
    if isinstance(clip, dict):
        if mode != "central":
            raise PrivacyError("adaptive clipping needs central DP: a client alone cannot estimate "
                               "the quantile of everyone's update norms")
        adaptive = {k: clip.get(k, d) if clip.get(k) is not None else d for k, d in ADAPTIVE_DEFAULTS.items()}
        _positive(adaptive, "initial")
        if _positive(adaptive, "learning_rate", zero_ok=True) > MAX_LEARNING_RATE:
            raise PrivacyError(f"privacy learning_rate must be at most {MAX_LEARNING_RATE:g}, "
                               f"got {adaptive['learning_rate']!r}")
        q = adaptive["target_quantile"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
            raise PrivacyError(f"privacy target_quantile must be in (0, 1), got {q!r}")
        if adaptive["clipped_count_stddev"] is None:
            adaptive["clipped_count_stddev"] = per_round / 20
        _positive(adaptive, "clipped_count_stddev", zero_ok=True)
        out["adaptive"] = adaptive
        out["clip_norm"] = float(adaptive["initial"])
    else:
        out["clip_norm"] = _positive(raw, "clip_norm")
        out["adaptive"] = None
    out["value_noise_multiplier"] = value_noise_multiplier(out)
    return out


def value_noise_multiplier(settings: dict[str, Any]) -> float:
    """The noise multiplier left for the deltas. With adaptive clipping the
    noised clipped count also spends privacy; Andrew et al. (2021, sec. 3.1)
    split the budget so that the pair is as private as one Gaussian
    mechanism with the configured multiplier z:
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)."""
    z = settings["noise_multiplier"]
    adaptive = settings.get("adaptive")
    if not adaptive or z == 0:
        return z
    sigma_b = adaptive["clipped_count_stddev"]
    if sigma_b == 0 or 2 * sigma_b <= z:
        raise PrivacyError(f"clipped_count_stddev {sigma_b} is too small for noise_multiplier {z}: "
                           f"it must exceed noise_multiplier / 2 = {z / 2}")
    return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


# --------------------------------------------------------------------------- primitives
def global_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of all arrays taken as one vector (computed in float64)."""
    return math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64, copy=False),
                                      a.ravel().astype(np.float64, copy=False))) for a in arrays))


def clip(arrays: Arrays, clip_norm: float) -> tuple[Arrays, float]:
    """Scale the arrays, in place, so that their global norm is at most
    clip_norm. Returns (arrays, norm before clipping)."""
    if not clip_norm > 0:
        raise PrivacyError(f"clip_norm must be positive, got {clip_norm!r}")
    norm = global_norm(arrays)
    if norm > clip_norm:
        # float32 rounding could leave the product a hair above the bound
        factor = np.float32(clip_norm / norm * (1 - 1e-6))
        for a in arrays:
            np.multiply(a, factor, out=a, casting="unsafe")
    return arrays, norm


def add_gaussian_noise(arrays: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    """Add N(0, std^2) to every coordinate, in place (float32 arrays)."""
    if std < 0 or not math.isfinite(std):
        raise PrivacyError(f"noise std must be a non-negative number, got {std!r}")
    if std == 0:
        return arrays
    for a in arrays:
        noise = rng.standard_normal(a.shape, dtype=np.float32)
        noise *= np.float32(std)
        np.add(a, noise, out=a, casting="unsafe")
    return arrays


def privatize_local(delta: Arrays, clip_norm: float, noise_multiplier: float,
                    rng: np.random.Generator) -> tuple[Arrays, float]:
    """Local DP: the client's own delta clipped to clip_norm plus
    N(0, (noise_multiplier clip_norm)^2) per coordinate, in place
    (float32). Returns (delta, its norm before clipping)."""
    delta = [np.asarray(d, dtype=np.float32) for d in delta]
    delta, norm = clip(delta, clip_norm)
    add_gaussian_noise(delta, noise_multiplier * clip_norm, rng)
    return delta, norm


# Largest change of the bound in one round, as a power of e: a noised share
# far off (a large learning rate or count noise) must not take the bound to
# 0 or to infinity, where it would never come back.
MAX_LOG_STEP = 20.0


def adaptive_clip_update(clip_norm: float, unclipped: int, counted: int, clients: int, adaptive: dict[str, Any],
                         rng: np.random.Generator, noised: bool = True) -> tuple[float, float]:
    """Andrew et al. 2021, geometric update: the share of the `counted`
    updates whose norm was at most the bound moves the bound toward the
    target quantile, C <- C * exp(-lr * (share - target)). Each update adds
    its bit minus 1/2 to the count, so that one client more or less moves
    the count by 1/2 at most: the sensitivity value_noise_multiplier's
    split assumes. The count gets N(0, sigma_b^2) (not when `noised` is
    False: a session without noise), is divided by the expected clients,
    and 1/2 is added back. Returns (new bound, noised share)."""
    centred = unclipped - counted / 2
    if noised:
        centred += rng.normal(0.0, adaptive["clipped_count_stddev"])
    share = centred / clients + 0.5
    step = -adaptive["learning_rate"] * (share - adaptive["target_quantile"])
    new = clip_norm * math.exp(min(MAX_LOG_STEP, max(-MAX_LOG_STEP, step)))
    return new, share


# --------------------------------------------------------------------------- central DP
class CentralDP:
    """DP-FedAvg around a streaming (FedAvg-family) strategy: every delta is
    clipped and counts once whatever its number of examples; the noised sum
    over the expected number of clients is the mean delta handed to the
    strategy's server step (FedAvgM, FedAdam... post-process it)."""

    def __init__(self, strategy: StreamingStrategy, settings: dict[str, Any], clip_norm: float,
                 rng: np.random.Generator):
        if not isinstance(strategy, StreamingStrategy):
            raise PrivacyError(f"central DP needs a FedAvg-family strategy; {strategy.name} holds "
                               f"every update and has no bounded sensitivity")
        self.strategy = strategy
        self.settings = settings
        self.clip_norm = float(clip_norm)
        self.rng = rng
        self.norms: list[float] = []
        self.next_clip_norm = self.clip_norm
        self.noised_unclipped_share: float | None = None

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def stateful(self) -> bool:
        return self.strategy.stateful

    @property
    def count(self) -> int:
        return self.strategy.count

    def begin(self, reference: Reference) -> None:
        self.norms = []
        self.strategy.begin(reference)

    def add(self, delta: Arrays, weight: float = 1.0, mass: float | None = None) -> None:
        """Clip and add with weight 1: user-level DP bounds what one client
        moves, so example counts and staleness weights are not used."""
        delta = [np.asarray(d, dtype=np.float32) for d in delta]
        delta, norm = clip(delta, self.clip_norm)
        self.strategy.add(delta, 1.0, 1.0)
        self.norms.append(norm)

    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum."""
        return self.settings["value_noise_multiplier"] * self.clip_norm

    def finish(self, global_weights: Arrays, state: Arrays | None = None) -> tuple[Arrays, Arrays | None]:
        s = self.strategy
        if s.reference is None or not s.count:
            return s.finish(global_weights, state)  # raises the strategy's own error
        if state is not None:
            s.check_state(state)
        total = s.acc
        s.acc = []
        add_gaussian_noise(total, self.noise_std(), self.rng)
        denominator = np.float32(self.settings["clients_per_round"])
        for a in total:
            np.divide(a, denominator, out=a)
        adaptive = self.settings.get("adaptive")
        if adaptive:
            unclipped = sum(1 for n in self.norms if n <= self.clip_norm)
            self.next_clip_norm, self.noised_unclipped_share = adaptive_clip_update(
                self.clip_norm, unclipped, len(self.norms), self.settings["clients_per_round"], adaptive, self.rng,
                noised=self.settings["noise_multiplier"] > 0)
        return s.step(global_weights, total, state)

    def shares(self) -> list[float]:
        return [1.0 / self.settings["clients_per_round"]] * self.count

    def report(self) -> dict[str, Any]:
        """What the aggregation may record: the bound, the noise and the
        next bound. Neither the norms nor the raw clipped count: they are
        not noised, and would leak what the noise hides."""
        out = {"mode": "central", "clip_norm": self.clip_norm, "noise_std": self.noise_std(),
               "noise_multiplier": self.settings["noise_multiplier"], "clients": self.count,
               "denominator": self.settings["clients_per_round"]}
        if self.settings.get("adaptive"):
            out["next_clip_norm"] = self.next_clip_norm
            out["noised_unclipped_share"] = self.noised_unclipped_share
        return out


# --------------------------------------------------------------------------- what the functions call
def central_dp(spec: dict[str, Any], strategy: StreamingStrategy, current_model: dict[str, Any]) -> CentralDP | None:
    """The aggregator's DP wrapper for a session with central DP, else None.
    With adaptive clipping the bound is the one the previous aggregation
    stored with the current model (the configured initial one at first)."""
    settings = privacy_settings(spec.get("privacy"))
    if settings is None or settings["mode"] != "central":
        return None
    clip_norm = settings["clip_norm"]
    previous = (current_model.get("privacy") or {}).get("next_clip_norm") if settings["adaptive"] else None
    if isinstance(previous, (int, float)) and not isinstance(previous, bool) and math.isfinite(previous) \
            and previous > 0:
        clip_norm = float(previous)
    return CentralDP(strategy, settings, clip_norm, np.random.default_rng())


def local_dp_delta(spec: dict[str, Any], delta: Arrays) -> Arrays:
    """The client's delta as it may leave the client: clipped and noised
    under local DP, untouched otherwise. Nothing about the clipping is
    reported (whether the delta was clipped is itself about the data)."""
    settings = privacy_settings(spec.get("privacy"))
    if settings is None or settings["mode"] != "local":
        return delta
    out, _ = privatize_local(delta, settings["clip_norm"], settings["noise_multiplier"], np.random.default_rng())
    return out


def local_dp_weights(spec: dict[str, Any], global_weights: Arrays, new_weights: Arrays) -> Arrays:
    """New weights whose delta from the global model went through
    local_dp_delta (in the model's dtypes)."""
    settings = privacy_settings(spec.get("privacy"))
    if settings is None or settings["mode"] != "local":
        return new_weights
    delta = local_dp_delta(spec, [np.asarray(n, np.float32) - np.asarray(g, np.float32)
                                  for n, g in zip(new_weights, global_weights)])
    return [(np.asarray(g, np.float32) + d).astype(np.asarray(n).dtype, copy=False)
            for g, d, n in zip(global_weights, delta, new_weights)]


def masked_upload(db, bound: dict[str, str], spec: dict[str, Any], session: str, rnd: int, client: str,
                  attempt: int, global_weights: Arrays, new_weights: Arrays, num_examples: int):
    """Under secure aggregation, store the client's masked delta instead of
    its weights and return (blob id, values clipped to the field's bound);
    (None, 0) for a session without it (the caller stores the weights).
    Secure aggregation's code, and the `cryptography` package under it,
    load only for such a session."""
    if not spec.get("secure_aggregation"):
        return None, 0
    from .secagg.client import masked_update
    delta = [np.asarray(n, np.float32) - np.asarray(g, np.float32) for n, g in zip(new_weights, global_weights)]
    return masked_update(db, bound, spec, session, rnd, client, attempt, delta, num_examples)
