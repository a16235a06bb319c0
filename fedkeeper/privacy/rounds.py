"""What a round mode asks of privacy, in one object (None when the session
uses neither DP nor secure aggregation):

    privacy = RoundPrivacy.for_session(training, clients_info, dispatcher, store, client_cluster, events,
                                       failure=SessionError)
    privacy.session_spec()                        # what the functions read
    if privacy.stop_before(session, rnd): break   # target_epsilon
    trainers = privacy.before_training(session, rnd, selected)       # secure aggregation: u2
    included = privacy.before_aggregating(session, rnd, delivered)   # secure aggregation: u3
    privacy.epsilon_after(rnd + 1)                # for the round document and the progress line
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from .secagg_stages import SecAggStages, StageError
from .settings import secure_aggregation

log = logging.getLogger("fedkeeper.keeper")


class RoundPrivacy:
    def __init__(self, privacy: Any, secure: Any, budget: Any, stages: SecAggStages | None,
                 clients_per_round: int, emit: Callable[..., None], record: Callable[..., None],
                 failure: type[Exception]):
        self.privacy = privacy
        self.secure = secure
        self.budget = budget
        self.stages = stages
        self.clients_per_round = clients_per_round
        self.emit = emit
        self.record = record
        self.failure = failure
        self._epsilons: dict[int, float] = {}

    @classmethod
    def for_session(cls, training: Any, clients_info: Any, dispatcher: Any, store: Any,
                    client_cluster: dict[str, str], events: Any, failure: type[Exception]) -> "RoundPrivacy | None":
        privacy = getattr(training, "privacy", None)
        secure = secure_aggregation(getattr(training, "secure_aggregation", None))
        if privacy is None and secure is None:
            return None
        per_round = clients_info.num_clients_per_round if clients_info is not None else len(client_cluster)
        total = clients_info.total_num_clients if clients_info is not None else len(client_cluster)
        budget = privacy.budget(per_round, total, training.rounds) if privacy is not None else None
        stages = None
        if secure is not None:
            stages = SecAggStages(dispatcher, store, client_cluster, training.round_deadline_s,
                                  secure.threshold, emit=events.emit)
        return cls(privacy, secure, budget, stages, per_round, events.emit, store.event, failure)

    # ------------------------------------------------------------------ the session spec
    def session_spec(self) -> dict[str, Any]:
        return {"privacy": self.privacy.spec(self.clients_per_round) if self.privacy is not None else None,
                "secure_aggregation": self.secure.spec() if self.secure is not None else None}

    # ------------------------------------------------------------------ differential privacy
    def epsilon_after(self, rounds: int) -> float | None:
        """Epsilon once `rounds` rounds are done (None without DP; inf
        without noise, which JSON and the store cannot hold: reported as None
        there by the caller's formatting)."""
        if self.budget is None:
            return None
        if rounds not in self._epsilons:
            self._epsilons[rounds] = self.budget.epsilon_after(rounds)
        return self._epsilons[rounds]

    def stop_before(self, session: str, rnd: int) -> str | None:
        """The message that ends training before store round `rnd` when it
        would take epsilon past target_epsilon; None to go on."""
        if self.budget is None or self.budget.target_epsilon is None:
            return None
        after = self.budget.next_round_exceeds(rnd)
        if after is None:
            return None
        now = self.epsilon_after(rnd)
        message = (f"privacy budget: round {rnd + 1} would bring epsilon to {after:.3g}, above target_epsilon "
                   f"{self.budget.target_epsilon:g} (delta {self.budget.delta:g}); training stops after "
                   f"{rnd} round(s) at epsilon {now:.3g}")
        log.warning(message)
        self.record(session, "privacy_budget", message, epsilon=now, target_epsilon=self.budget.target_epsilon)
        self.emit("warning", message=message)
        return message

    # ------------------------------------------------------------------ secure aggregation
    def before_training(self, session: str, rnd: int, selected: list[str]) -> list[str]:
        if self.stages is None:
            return selected
        try:
            return self.stages.before_training(session, rnd, selected)
        except StageError as exc:
            raise self.failure(str(exc)) from None

    def before_aggregating(self, session: str, rnd: int, included: list[str]) -> list[str]:
        if self.stages is None:
            return included
        try:
            return self.stages.before_aggregating(session, rnd, included)
        except StageError as exc:
            raise self.failure(str(exc)) from None


def stored_epsilon(value: float | None) -> float | None:
    """Epsilon as a round document holds it: a finite number, or None."""
    return value if value is not None and math.isfinite(value) else None
