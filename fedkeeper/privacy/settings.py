"""training.privacy and training.secure_aggregation: the config blocks,
where they do not compose with the rest of training, what the session spec
carries to the functions, and what `config validate` says about them.

    privacy:
      mode: central | local
      noise_multiplier: 1.0
      clip_norm: 1.0             # or: adaptive, or {adaptive: {initial, target_quantile, ...}}
      delta: 1e-5
      target_epsilon: 8          # optional
      accountant: rdp            # rdp | pld
    secure_aggregation: true     # or {threshold: 0.6, scale: 16777216, stage_deadline_s: 60,
                                 #     neighbours: log}

The config package holds these models as fields; their rules live here,
with the mechanisms they configure (flcommon.privacy, flcommon.secagg).
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from flcommon.privacy import ADAPTIVE_DEFAULTS, MAX_LEARNING_RATE, PrivacyError, privacy_settings
from flcommon.secagg.field import DEFAULT_SCALE
from flcommon.secagg.graph import degree
from flcommon.strategies import STRATEGIES


class _Block(BaseModel):
    """Refuses unknown keys, naming the known key a misspelt one meant."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _misspelt(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    hint = difflib.get_close_matches(str(key), list(cls.model_fields), n=1, cutoff=0.6)
                    if hint:
                        raise ValueError(f"{key}: unknown key; did you mean {hint[0]}?")
        return data


# Below this a noise multiplier is noise in name only, and the accountants
# fail on the smallest ones (dp-accounting divides by z squared).
MIN_NOISE_MULTIPLIER = 1e-3


class AdaptiveClipping(_Block):
    """Andrew et al. 2021: the bound follows a quantile of the update norms."""

    initial: float = Field(ADAPTIVE_DEFAULTS["initial"], gt=0)
    target_quantile: float = Field(ADAPTIVE_DEFAULTS["target_quantile"], gt=0, lt=1)
    learning_rate: float = Field(ADAPTIVE_DEFAULTS["learning_rate"], ge=0, le=MAX_LEARNING_RATE)
    clipped_count_stddev: Optional[float] = Field(None, ge=0)  # None: clients_per_round / 20


class PrivacyConfig(_Block):
    mode: Literal["central", "local"]
    noise_multiplier: float = Field(ge=0)
    clip_norm: Union[float, AdaptiveClipping]
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: Optional[float] = Field(None, gt=0)
    accountant: Literal["rdp", "pld"] = "rdp"

    @model_validator(mode="before")
    @classmethod
    def _adaptive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        clip = data.get("clip_norm")
        if clip == "adaptive":
            return {**data, "clip_norm": {}}
        if isinstance(clip, dict):
            if set(clip) != {"adaptive"}:
                raise ValueError("clip_norm: a number, `adaptive`, or {adaptive: {initial, target_quantile, "
                                 "learning_rate, clipped_count_stddev}}")
            inner = clip["adaptive"]
            if inner is True or inner is None:
                return {**data, "clip_norm": {}}
            if not isinstance(inner, dict):
                # a number here would otherwise be taken for a fixed clip norm
                raise ValueError(f"clip_norm.adaptive: true or a mapping of {{initial, target_quantile, "
                                 f"learning_rate, clipped_count_stddev}}, got {inner!r}")
            return {**data, "clip_norm": inner}
        if isinstance(clip, (int, float)) and not isinstance(clip, bool) and not clip > 0:
            raise ValueError(f"clip_norm must be positive, got {clip}")
        return data

    @model_validator(mode="after")
    def _some_noise_or_none(self):
        if 0 < self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise ValueError(f"noise_multiplier {self.noise_multiplier:g} protects nothing (epsilon past 10^7 in one "
                             f"round); use 0 for no noise, or at least {MIN_NOISE_MULTIPLIER:g}")
        return self

    @model_validator(mode="after")
    def _composes(self):
        if self.mode == "local" and self.adaptive:
            raise ValueError("clip_norm: adaptive clipping needs mode: central (a client alone cannot "
                             "estimate the quantile of everyone's update norms)")
        return self

    @field_serializer("clip_norm")
    def _clip_norm_as_written(self, clip: Union[float, AdaptiveClipping]) -> Any:
        # Dumped as it is written, so that a dump reads back (config show, sweeps).
        return {"adaptive": clip.model_dump()} if isinstance(clip, AdaptiveClipping) else clip

    @property
    def adaptive(self) -> bool:
        return isinstance(self.clip_norm, AdaptiveClipping)

    def spec(self, clients_per_round: int) -> dict[str, Any]:
        """The session spec's `privacy` block, as flcommon.privacy reads it
        (checked by it too: a noise multiplier the adaptive split cannot
        reach is refused here, before anything is deployed)."""
        clip = self.clip_norm.model_dump() if self.adaptive else self.clip_norm
        out = {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "clip_norm": clip,
               "clients_per_round": clients_per_round}
        privacy_settings(out)
        return out

    def budget(self, clients_per_round: int, total_clients: int, rounds: int):
        from .accountant import PrivacyBudget  # dp-accounting loads only here
        return PrivacyBudget(mode=self.mode, noise_multiplier=self.noise_multiplier,
                             clients_per_round=clients_per_round, total_clients=total_clients, delta=self.delta,
                             rounds=rounds, target_epsilon=self.target_epsilon, accountant=self.accountant)


class SecureAggregationConfig(_Block):
    threshold: Optional[float] = Field(None, gt=0, le=1)   # share of U1; None: more than half
    scale: float = Field(DEFAULT_SCALE, gt=0, lt=2 ** 40)
    # How long each key stage (advertise, share, unmask) waits for its
    # clients; None: training.round_deadline_s. A client still running then
    # is out of the stage, and the threshold decides whether the round goes on.
    stage_deadline_s: Optional[float] = Field(None, gt=0)
    # SecAgg+'s sparse graph (flcommon/secagg/graph.py): each client masks
    # with and shares among k neighbours, a number from 2 or `log`
    # (2 x ceil(log2 n)); None: every pair of clients.
    neighbours: Optional[Union[Literal["log"], int]] = None

    @model_validator(mode="after")
    def _neighbours(self):
        n = self.neighbours
        if n is not None and n != "log" and not 2 <= n <= 10_000:
            raise ValueError(f"neighbours: `log` or a number of neighbours from 2, got {n}")
        return self

    def spec(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "scale": self.scale, "neighbours": self.neighbours}


def secure_aggregation(value: Union[bool, SecureAggregationConfig, None]) -> SecureAggregationConfig | None:
    """training.secure_aggregation as its settings (None: off)."""
    if value is True:
        return SecureAggregationConfig()
    return value or None


def refusal(privacy: PrivacyConfig | None, secure: Union[bool, SecureAggregationConfig, None],
            strategy: str, mode: str, selection: str = "random", hedging: bool = False) -> Optional[str]:
    """Why these settings do not compose with the strategy, round mode,
    client selection and hedging (docs/privacy.md), or None."""
    streaming = STRATEGIES[strategy].streaming
    if privacy is not None:
        if mode != "sync":
            return (f"privacy needs mode: sync (with {mode}, a client's update can join a later round, "
                    "and per-round sampling no longer describes what was released)")
        if privacy.mode == "central" and not streaming:
            return (f"privacy mode central needs a FedAvg-family strategy; {strategy} holds every update "
                    "and has no bounded per-client sensitivity")
        if privacy.mode == "central" and selection != "random":
            return (f"privacy mode central needs selection: random; the accounting counts on clients sampled "
                    f"uniformly, and {selection} picks them by their past")
        if privacy.mode == "local" and hedging:
            return ("privacy mode local cannot be combined with hedging: a hedge trains its client again and "
                    "uploads a second, independently noised copy, which the accounting does not count")
    if secure_aggregation(secure) is not None:
        if mode != "sync":
            return f"secure_aggregation needs mode: sync (late updates cannot join a masked sum; mode is {mode})"
        if not streaming:
            return (f"secure_aggregation needs a FedAvg-family strategy; {strategy} needs every update on "
                    "its own, and the server only ever sees their sum")
        if privacy is not None and privacy.mode == "central":
            return ("privacy mode central cannot be combined with secure_aggregation: the server would need "
                    "each update to clip it; use mode: local")
    return None


def scenario_refusal(privacy: PrivacyConfig | None, clients_per_round: int) -> Optional[str]:
    """What only the clients per round can tell (the adaptive noise split)."""
    if privacy is None:
        return None
    try:
        privacy.spec(clients_per_round)
    except PrivacyError as exc:
        return str(exc)
    return None


def describe(privacy: PrivacyConfig | None, secure: Union[bool, SecureAggregationConfig, None],
             clients_per_round: int, total_clients: int, rounds: int) -> list[str]:
    """What `config validate` prints: the epsilon the configured rounds
    would spend, how many fit in the target, secure aggregation's threshold."""
    lines = []
    if privacy is not None:
        budget = privacy.budget(clients_per_round, total_clients, rounds)
        eps = budget.configured_epsilon()
        shown = "inf (no noise)" if math.isinf(eps) else f"{eps:.3g}"
        lines.append(f"privacy: {privacy.mode} DP, noise multiplier {privacy.noise_multiplier:g}, "
                     f"{'adaptive clipping' if privacy.adaptive else f'clip norm {privacy.clip_norm:g}'}; "
                     f"{rounds} rounds spend epsilon {shown} at delta {privacy.delta:g} "
                     f"(q = {budget.sampling_rate:.3g}, {privacy.accountant.upper()})")
        if privacy.target_epsilon is not None:
            fit = budget.rounds_within_target()
            lines.append(f"privacy: target_epsilon {privacy.target_epsilon:g} allows {fit} of the {rounds} rounds"
                         + ("" if fit == rounds else "; training stops there"))
        if privacy.delta >= 1 / total_clients:
            lines.append(f"privacy: warning: delta {privacy.delta:g} is not below 1 / total_num_clients "
                         f"({1 / total_clients:.3g})")
    sa = secure_aggregation(secure)
    if sa is not None:
        share = "more than half" if sa.threshold is None else f"{sa.threshold:g}"
        if sa.neighbours is None:
            graph = "every pair of clients"
            holders = "each round's clients"
        else:
            k = degree(sa.neighbours, clients_per_round)
            graph = (f"SecAgg+ graph of {k} neighbours per client" if k is not None
                     else "every pair of clients (neighbours cover the round)")
            holders = "a client and its neighbours" if k is not None else "each round's clients"
        lines.append(f"secure_aggregation: pairwise masking over {graph}, threshold {share} of {holders}, "
                     f"3 extra invocations per client per round")
    return lines


def scenario_lines(scenario: Any) -> list[str]:
    """describe() for a config scenario (`config validate`)."""
    t, ci = scenario.training, scenario.clients_info
    if ci is None or (t.privacy is None and secure_aggregation(t.secure_aggregation) is None):
        return []
    return describe(t.privacy, t.secure_aggregation, ci.num_clients_per_round, ci.total_num_clients, t.rounds)
