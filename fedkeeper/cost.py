"""What a session would cost on the platforms it ran on (docs/cost.md).

Every attempt document that ran the function is one invocation the
platform bills: its duration, rounded up to the platform's billing
increment, times the function's memory (GB-seconds) and the CPU clock that
comes with that memory (GHz-seconds), plus a charge per invocation. Prices
are each platform's defaults (the provider classes' `default_prices`, from
public price sheets) with a cluster's `pricing` block laid over them.

Free tiers are not subtracted: a free tier is shared by everything on a
billing account in a month, so one session's share of it is unknowable;
the figures are what the session adds at list price.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flcommon.update_stats import finite_or_none

from .config import Config, ConfigError
from .providers import Prices, ProviderError, platform_prices, provider_class
from .runtime import FUNCTION_DEFAULTS


@dataclass
class Charge:
    """Usage and money of one or more billed invocations."""

    cost: float = 0.0
    gb_seconds: float = 0.0
    ghz_seconds: float = 0.0
    invocations: int = 0

    def add(self, other: "Charge") -> None:
        self.cost += other.cost
        self.gb_seconds += other.gb_seconds
        self.ghz_seconds += other.ghz_seconds
        self.invocations += other.invocations

    def as_dict(self) -> dict[str, Any]:
        return {"cost": self.cost, "gb_seconds": self.gb_seconds, "ghz_seconds": self.ghz_seconds,
                "invocations": self.invocations}


def billed_ms(duration_ms: float, increment_ms: int) -> int:
    """Duration rounded up to the billing increment; a started invocation
    is billed at least one increment."""
    inc = max(1, int(increment_ms))
    # A float such as 300.00000001 ms from a clock difference is 300 ms.
    steps = math.ceil(round(float(duration_ms), 6) / inc)
    return max(1, steps) * inc


# Error classes (ErrorClass values) of an attempt that never ran the
# function: refused (a 429, Knative's overload 503), never delivered
# (refused connection, DNS, TLS) or with no function to run (404). On the
# HTTP platforms such an attempt still has a platform id (the keeper makes
# the execution id before sending) and a duration (the keeper's request
# time), so neither shows that the platform ran anything.
NOT_RUN = frozenset({"throttled", "unreachable", "function_missing"})


def measured_ms(attempt: dict[str, Any]) -> float | None:
    """The attempt's recorded duration; None when it has none or it is not
    a finite number (stores outlive the versions that wrote them)."""
    return finite_or_none(attempt.get("duration_ms"))


def invoked(attempt: dict[str, Any]) -> bool:
    """The attempt ran on the platform: it has a platform id or a recorded
    duration, and did not fail in a way that shows the function never ran.
    One refused at submission (no platform id) or answered 429 is not billed."""
    if attempt.get("error_class") in NOT_RUN:
        return False
    return bool(attempt.get("platform_id")) or measured_ms(attempt) is not None


def attempt_charge(attempt: dict[str, Any], prices: Prices, memory_mb: float) -> Charge:
    """What one attempt costs. One without a measured duration (lost, or
    abandoned at a round deadline) is charged its invocation only: how long
    it ran is not known."""
    if not invoked(attempt):
        return Charge()
    charge = Charge(invocations=1, cost=prices.per_million_invocations / 1e6)
    duration = measured_ms(attempt)
    if duration is not None:
        seconds = billed_ms(duration, prices.billing_increment_ms) / 1000.0
        charge.gb_seconds = memory_mb / 1024.0 * seconds
        charge.ghz_seconds = prices.cpu_ghz(memory_mb) * seconds
        charge.cost += charge.gb_seconds * prices.per_gb_second + charge.ghz_seconds * prices.per_ghz_second
    return charge


class PriceBook:
    """Prices and function memory per cluster, from the config when there
    is one, else from the platform defaults and the runtime's defaults."""

    def __init__(self, cfg: Config | None = None, scenario: str | None = None):
        self.cfg = cfg
        self.clusters = cfg.providers.clusters() if cfg is not None else {}
        self.scenario = None
        if cfg is not None:
            try:
                self.scenario = cfg.scenario(scenario)[1]
            except ConfigError:  # a session of a scenario the config no longer has
                self.scenario = None
        self._prices: dict[tuple[str, str], Prices] = {}

    def prices(self, cluster: str, platform: str) -> Prices:
        key = (cluster, platform)
        if key not in self._prices:
            known = self.clusters.get(cluster)
            if known is not None:
                section, ccfg = known
                try:
                    base = provider_class(section, getattr(ccfg, "kind", "remote")).default_prices
                except ProviderError:  # provider not importable: the platform's prices
                    base = platform_prices(platform)
                self._prices[key] = base.overridden(getattr(ccfg, "pricing", None))
            else:
                self._prices[key] = platform_prices(platform)
        return self._prices[key]

    def memory_mb(self, attempt: dict[str, Any]) -> float:
        """The memory recorded on the attempt, else what the config deploys
        the function with, else the runtime's default for the function."""
        recorded = finite_or_none(attempt.get("memory_mb"))
        if recorded is not None and recorded > 0:
            return recorded
        function = attempt.get("function") or "fl_client"
        known = self.clusters.get(attempt.get("cluster", ""))
        if self.scenario is not None and known is not None:
            fc = self.scenario.functions.get(function, {}).get(known[0])
            if fc is not None and fc.memory is not None:
                return float(fc.memory)
        return float(FUNCTION_DEFAULTS.get(function, FUNCTION_DEFAULTS["nodeinfo"])["memory_mb"])


def _round_of(attempt: dict[str, Any]) -> int | None:
    """The attempt's round; None when it has none or not a whole number."""
    rnd = attempt.get("round")
    if isinstance(rnd, bool):
        return None
    if isinstance(rnd, int):
        return rnd
    if isinstance(rnd, float) and rnd.is_integer():
        return int(rnd)
    return None


# What the estimate reads of each attempt document: a long session's
# documents, with their results and errors, are far larger.
COST_FIELDS = ("cluster", "platform", "function", "round", "platform_id", "duration_ms", "memory_mb", "error_class")


def attempts_cost(attempts: list[dict[str, Any]], book: PriceBook) -> dict[str, Any]:
    """Cost of a list of attempt documents, in total, per round and per cluster."""
    total = Charge()
    per_round: dict[int, Charge] = {}
    per_cluster: dict[str, Charge] = {}
    cluster_meta: dict[str, dict[str, Any]] = {}
    for a in attempts:
        cluster, platform = str(a.get("cluster") or ""), str(a.get("platform") or "")
        prices = book.prices(cluster, platform)
        charge = attempt_charge(a, prices, book.memory_mb(a))
        total.add(charge)
        rnd = _round_of(a)
        if rnd is not None:  # an attempt without a usable round is in the totals, in no round
            per_round.setdefault(rnd, Charge()).add(charge)
        per_cluster.setdefault(cluster, Charge()).add(charge)
        cluster_meta.setdefault(cluster, {"platform": platform, "currency": prices.currency,
                                          "prices_source": prices.source})
    currencies = {m["currency"] for m in cluster_meta.values()}
    return {
        # Sums over clusters priced in different currencies are not money;
        # the per-cluster figures are.
        "currency": currencies.pop() if len(currencies) == 1 else ("mixed" if currencies else "USD"),
        "total": total.cost, "gb_seconds": total.gb_seconds, "ghz_seconds": total.ghz_seconds,
        "invocations": total.invocations,
        "per_round": {r: c.as_dict() for r, c in sorted(per_round.items())},
        "per_cluster": {k: {**c.as_dict(), **cluster_meta[k]} for k, c in sorted(per_cluster.items())},
    }


def session_cost(store, session: str, cfg: Config | None = None) -> dict[str, Any]:
    """Estimated cost of a session from its attempt documents: {"currency",
    "total", "gb_seconds", "ghz_seconds", "invocations", "per_round":
    {round: {...}}, "per_cluster": {cluster: {...}}}. Without a config, the
    platforms' default prices and the runtime's default memory apply."""
    doc = store.session(session) or {}
    book = PriceBook(cfg, doc.get("scenario"))
    return attempts_cost(store.attempts(session, fields=COST_FIELDS), book)


def format_money(amount: float | None, currency: str = "USD") -> str:
    """A cost for a table: enough digits for the small sums of a session."""
    if amount is None:
        return "-"
    symbol = {"USD": "$", "EUR": "€", "GBP": "£"}.get(currency)
    text = f"{amount:.6f}" if amount < 1 else f"{amount:,.2f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency}"
