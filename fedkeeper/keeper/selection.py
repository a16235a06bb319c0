"""Client selection policies.

A policy picks k clients of the candidates for one round. `random` is the
seeded uniform draw; `reliability` prefers clients whose invocations finish.
A new policy is a `SelectionPolicy` subclass registered under the name
`training.selection` gives it:

    @register
    class Fastest(SelectionPolicy):
        name = "fastest"
        def pick(self, session, rnd, candidates, k, seed): ...

Every policy is deterministic for a given seed and store content.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from flcommon.reliability import ENDED, client_stats, cluster_stats

from .events import client_index

POLICIES: dict[str, type["SelectionPolicy"]] = {}


def register(cls: type["SelectionPolicy"]) -> type["SelectionPolicy"]:
    POLICIES[cls.name] = cls
    return cls


class SelectionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, training: Any, client_cluster: dict[str, str], store: Any):
        self.training = training
        self.client_cluster = client_cluster
        self.store = store

    @abstractmethod
    def pick(self, session: str, rnd: int, candidates: list[str], k: int, seed: list[int]) -> list[str]:
        """k of `candidates` (sorted by client index, k <= len(candidates))."""


@register
class RandomSelection(SelectionPolicy):
    """Uniform, seeded by (seed, round[, draw])."""

    name = "random"

    def pick(self, session, rnd, candidates, k, seed):
        return np.random.default_rng(seed).choice(candidates, size=k, replace=False).tolist()


def reliability_score(stats: dict[str, Any] | None, prior: float = 0.5, weight: float = 2.0) -> float:
    """Expected chance a client finishes, from its flcommon.reliability
    figures: its success rate smoothed towards `prior` (as if `weight`
    attempts of prior evidence), so a client seen once is neither favoured
    nor shunned for ever."""
    if not stats:
        return prior
    return (stats["succeeded"] + prior * weight) / (stats["attempts"] + weight)


def select_clients(candidates: list[str], k: int, rng: np.random.Generator,
                   scores: dict[str, float], exploration: float) -> tuple[list[str], list[str]]:
    """Reliability-based selection: (picked, explored).

    Most picks go to the best-scored candidates (ties broken at random); an
    `exploration` share is drawn at random from the others, so a client that
    failed early still gets the chances that would show it recovered, and
    never-tried clients get tried. The share is honoured in expectation when
    `exploration * k` is not whole (the fraction decides one extra pick).
    Deterministic for a given rng state, candidates and scores."""
    k = min(k, len(candidates))
    exact = exploration * k
    n_explore = int(math.floor(exact))
    if rng.random() < exact - n_explore:
        n_explore += 1
    n_explore = min(n_explore, k)
    order = rng.permutation(len(candidates))
    ranked = sorted((int(i) for i in order), key=lambda i: -scores.get(candidates[i], 0.0))
    best = [candidates[i] for i in ranked[:k - n_explore]]
    rest = [c for c in candidates if c not in set(best)]
    explored = rng.choice(rest, size=n_explore, replace=False).tolist() if n_explore else []
    return best + explored, explored


@register
class ReliabilitySelection(SelectionPolicy):
    """By each client's reliability score over this session's ended
    attempts, with the `exploration` share at random (select_clients)."""

    name = "reliability"

    def __init__(self, training, client_cluster, store):
        super().__init__(training, client_cluster, store)
        self._scores_for: tuple[Any, ...] = (None, None, {})  # (session, round, scores)

    def pick(self, session, rnd, candidates, k, seed):
        picked, _ = select_clients(candidates, k, np.random.default_rng(seed + [1]),
                                   self.scores(session, rnd), self.training.exploration)
        return picked

    def scores(self, session: str, rnd: int) -> dict[str, float]:
        """client -> smoothed chance that its invocation finishes, from this
        session's own ended client attempts. A client's success rate is
        smoothed towards its cluster's score rather than a flat prior:
        crashes, timeouts and throttling are mostly the platform's doing, so
        a client seldom or never tried inherits what its cluster has shown.

        Read once per round: async tops up clients after every completion,
        and re-reading every attempt of the session each time would grow
        with the session's length."""
        if self._scores_for[:2] == (session, rnd):
            return self._scores_for[2]
        docs = self.store.ended_client_attempts(session, ENDED)
        per_cluster = {c: reliability_score(st) for c, st in cluster_stats(docs).items()}
        per_client = client_stats(docs)
        scores = {c: reliability_score(per_client.get(c), prior=per_cluster.get(cluster, 0.5))
                  for c, cluster in self.client_cluster.items()}
        self._scores_for = (session, rnd, scores)
        return scores


def make_policy(name: str, training: Any, client_cluster: dict[str, str], store: Any) -> SelectionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"training.selection: no selection policy {name!r}; "
                         f"known: {', '.join(sorted(POLICIES))}") from None
    return cls(training, client_cluster, store)


class Selector:
    """The session's selection: which clients, how many, which seed."""

    def __init__(self, policy: SelectionPolicy, per_round: int):
        self.policy = policy
        self.per_round = per_round

    @property
    def clients(self) -> list[str]:
        return sorted(self.policy.client_cluster, key=client_index)

    def select(self, session: str, rnd: int, candidates: list[str] | None = None,
               k: int | None = None, draw: int = 0) -> list[str]:
        """k clients of `candidates` (default: all) for round `rnd`; `draw`
        numbers the selections made for one round (async makes several)."""
        clients = self.clients if candidates is None else sorted(candidates, key=client_index)
        k = min(self.per_round if k is None else k, len(clients))
        if k <= 0:
            return []
        seed = [self.policy.training.seed, rnd] + ([draw] if draw else [])
        return sorted(self.policy.pick(session, rnd, clients, k, seed), key=client_index)
