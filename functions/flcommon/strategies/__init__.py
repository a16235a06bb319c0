"""Aggregation strategies: one module per strategy behind one interface
(base.Strategy), pure numpy, bundled into every function zip.

    strategy = get_strategy(spec["strategy"])   # a settings dict, a name, or None (fedavg)

docs/strategies.md describes each strategy, its settings and its memory use.
"""
from __future__ import annotations

from typing import Any

from .base import DEFAULTS, HoldingStrategy, Strategy, StrategyError, StreamingStrategy
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedprox import FedProx
from .fedyogi import FedYogi
from .krum import Krum
from .median import Median
from .trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, Krum)}


def strategy_settings(settings: dict[str, Any] | str | None) -> dict[str, Any]:
    """A session spec's `strategy` as a dict: the keeper writes
    StrategyConfig.model_dump(); a bare name and None (older sessions:
    fedavg) are accepted too."""
    if settings is None:
        return {"name": "fedavg"}
    if isinstance(settings, str):
        return {"name": settings}
    if not isinstance(settings, dict):
        raise StrategyError(f"strategy settings must be a name or a mapping, got {type(settings).__name__}")
    return dict(settings)


def get_strategy(settings: dict[str, Any] | str | None) -> Strategy:
    settings = strategy_settings(settings)
    name = str(settings.get("name") or "fedavg").lower()
    cls = STRATEGIES.get(name)
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return cls(settings)


__all__ = ["DEFAULTS", "STRATEGIES", "HoldingStrategy", "Strategy", "StrategyError", "StreamingStrategy",
           "get_strategy", "strategy_settings", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi",
           "FedAdagrad", "Median", "TrimmedMean", "Krum"]
