"""How a scenario trains: model parameters, the strategy (its settings'
defaults come from flcommon.strategies, where the strategies live), retries,
the round mode, and fl_insights."""
from __future__ import annotations

from typing import Literal, Optional, Union

from flcommon.entry import MAX_ROUND
from flcommon.strategies import DEFAULTS as STRATEGY_DEFAULTS
from flcommon.strategies import STRATEGIES as STRATEGY_CLASSES
from flcommon.strategies import StrategyError, get_strategy
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..privacy.settings import PrivacyConfig, SecureAggregationConfig, refusal
from .clusters import Strict

STRATEGIES = tuple(STRATEGY_CLASSES)
# numpy's legacy seeding and keras.utils.set_random_seed take 32-bit seeds.
MAX_SEED = 2**32 - 1


class ModelParams(Strict):
    lr: float = Field(1e-3, gt=0)
    optim: Literal["adam", "nadam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1)
    local_epochs: int = Field(1, ge=0)  # 0: no training (measures system overhead)

    @field_validator("lr", "momentum", "local_epochs", mode="before")
    @classmethod
    def _from_string(cls, v):
        # FedKeeper writes numbers as strings: lr: "1e-3", local_epochs: "5".
        if isinstance(v, str):
            try:
                return float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        return v

    @field_validator("optim", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v


class RetryConfig(Strict):
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(15.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1)
    # A first attempt that crashed or returned an error is retried at once
    # (backoff from the second failure), and with fast_while_delivering so
    # is every one while its cluster delivers at least half its recent
    # attempts; timeouts,
    # throttling and platform errors always back off
    # (fedkeeper.keeper.attempts.RetryPolicy.retry_delay).
    fast_first_retry: bool = True
    fast_while_delivering: bool = True

    @model_validator(mode="after")
    def _order(self):
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_s ({self.backoff_s})")
        return self


class HedgingConfig(Strict):
    """training.hedging: an attempt running past `factor` times the
    `percentile` of its round peers' durations (once `min_peers` of them
    delivered; of its warm peers only, once that many warm ones did) gets
    one speculative attempt; the first result wins."""

    enabled: bool = False
    percentile: float = Field(0.9, gt=0, le=1)
    factor: float = Field(1.5, ge=1)
    min_peers: int = Field(3, ge=1)


class StrategyConfig(Strict):
    """training.strategy: a name, or a mapping with the name and its settings.

    Settings a strategy does not use are ignored; every one has a default,
    defined once in flcommon.strategies.DEFAULTS (see docs/strategies.md).
    The bounds here are the ones the strategies enforce; a setting the chosen
    strategy refuses is refused here too, before anything is deployed."""

    name: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    server_lr: Optional[float] = Field(STRATEGY_DEFAULTS["server_lr"], gt=0)
    server_momentum: float = Field(STRATEGY_DEFAULTS["server_momentum"], ge=0, lt=1)
    beta1: float = Field(STRATEGY_DEFAULTS["beta1"], ge=0, lt=1)
    beta2: float = Field(STRATEGY_DEFAULTS["beta2"], ge=0, lt=1)
    tau: float = Field(STRATEGY_DEFAULTS["tau"], gt=0)
    mu: float = Field(STRATEGY_DEFAULTS["mu"], ge=0)
    trim_ratio: float = Field(STRATEGY_DEFAULTS["trim_ratio"], ge=0, lt=0.5)
    byzantine: int = Field(STRATEGY_DEFAULTS["byzantine"], ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v):
        if isinstance(v, str):
            return {"name": v.lower()}
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            return {**v, "name": v["name"].lower()}
        return v

    @model_validator(mode="after")
    def _accepted_by_strategy(self):
        try:
            get_strategy(self.model_dump())
        except StrategyError as exc:
            raise ValueError(str(exc)) from None
        return self


class TrainingConfig(Strict):
    """What FedKeeper lacked; every key has a default (see README)."""

    rounds: int = Field(20, gt=0)
    target_accuracy: Optional[float] = Field(None, gt=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    strategy: StrategyConfig = StrategyConfig()
    retries: RetryConfig = RetryConfig()
    hedging: HedgingConfig = HedgingConfig()
    quorum: float = Field(0.8, gt=0, le=1)
    round_deadline_s: float = Field(600.0, gt=0)
    attempt_grace_s: float = Field(10.0, ge=0)
    # sync: a round waits for its clients (quorum + deadline).
    # semi_async: a round closes at quorum; stragglers keep running and their
    #   updates join a later round, down-weighted by staleness, while they
    #   are at most staleness_tolerance rounds old.
    # async: FedBuff; clients are re-invoked as soon as they finish and the
    #   server aggregates every buffer_size updates (a "round" is one server step).
    mode: Literal["sync", "semi_async", "async"] = "sync"
    staleness_tolerance: int = Field(2, ge=0)
    staleness_exponent: float = Field(0.5, ge=0)   # weight = (1 + staleness) ** -exponent
    buffer_size: Optional[int] = Field(None, gt=0)  # async; default: half the clients per round
    selection: Literal["random", "reliability"] = "random"
    exploration: float = Field(0.2, ge=0, le=1)    # reliability: share of picks made at random
    # Differential privacy and secure aggregation (docs/privacy.md); their
    # rules live with them in fedkeeper.privacy.settings.
    privacy: Optional[PrivacyConfig] = None
    secure_aggregation: Union[bool, SecureAggregationConfig] = False
    # flat: one aggregator reads every update. hierarchical: a combiner per
    # client cluster (fl_combiner) sums its clients' updates, the aggregator
    # combines the partial sums (flcommon.partials). After the keys it
    # depends on, so that its check sees them.
    aggregation: Literal["flat", "hierarchical"] = "flat"

    @field_validator("rounds")
    @classmethod
    def _rounds_the_functions_accept(cls, v):
        # Every payload's round number is checked against MAX_ROUND by the
        # functions; a longer session would fail at that round, not here.
        if v > MAX_ROUND:
            raise ValueError(f"at most {MAX_ROUND} rounds: the functions refuse round numbers beyond that")
        return v

    @field_validator("aggregation")
    @classmethod
    def _hierarchical_composes(cls, v, info: ValidationInfo):
        if v != "hierarchical":
            return v
        strategy = info.data.get("strategy")
        if strategy is not None and not STRATEGY_CLASSES[strategy.name].streaming:
            raise ValueError(f"hierarchical needs a streaming strategy (the FedAvg family or a server "
                             f"optimizer); {strategy.name} needs every update at once, not partial sums")
        if info.data.get("privacy") is not None or info.data.get("secure_aggregation"):
            raise ValueError("hierarchical cannot be combined with privacy or secure_aggregation: "
                             "combiners would see, clip or unmask what only the server may")
        return v

    @model_validator(mode="after")
    def _privacy_composes(self):
        why = refusal(self.privacy, self.secure_aggregation, self.strategy.name, self.mode,
                      selection=self.selection, hedging=self.hedging.enabled)
        if why:
            raise ValueError(why)
        return self


class InsightsConfig(Strict):
    """fl_insights: the byte bound of its warm cache of decoded updates and
    query results, and the cluster it runs on (default: the server's)."""

    cache_mb: float = Field(512.0, ge=0)
    cluster: Optional[str] = None
