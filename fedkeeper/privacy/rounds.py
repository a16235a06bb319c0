"""What a round mode asks of privacy, in one object (None when the session
uses neither DP nor secure aggregation):

    privacy = RoundPrivacy.for_session(training, clients_info, dispatcher, store, client_cluster, events,
                                       failure=SessionError)
    privacy.session_spec()                        # what the functions read
    resume_refusal(session_doc, privacy)          # a resumed session keeps its privacy settings
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
            stages = SecAggStages(dispatcher, store, client_cluster,
                                  secure.stage_deadline_s or training.round_deadline_s, secure.threshold,
                                  emit=events.emit, neighbours=secure.neighbours)
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


#: settings a resumed session may change: where training stops, how long a stage waits
_MAY_CHANGE = {"privacy": ("target_epsilon",), "secure_aggregation": ("stage_deadline_s",)}


def resume_refusal(doc: dict[str, Any], privacy: RoundPrivacy | None) -> str | None:
    """Why a stored session cannot be resumed with the privacy settings of
    `privacy` (None: the config has neither DP nor secure aggregation), or
    None. Epsilon composes the rounds done with the rounds to come, which
    describes what was released only if every round ran the same mechanism
    (mode, noise, clipping, sampling rate) and is accounted for the same
    delta with the same accountant; secure aggregation's sets and shares
    belong to its threshold and quantization. Only target_epsilon (where
    training stops) and stage_deadline_s may change."""
    spec = doc.get("spec") or {}
    training = doc.get("training") or {}
    now_spec = privacy.session_spec() if privacy is not None else {}
    now_training = {"privacy": privacy.privacy.model_dump() if privacy and privacy.privacy else None,
                    "secure_aggregation": privacy.secure.model_dump() if privacy and privacy.secure else None}
    for key in ("privacy", "secure_aggregation"):
        before, after = spec.get(key), now_spec.get(key)
        if "training" in doc:   # what only the keeper reads (delta, accountant) is in the training dump
            before = _comparable(key, before, training.get(key))
            after = _comparable(key, after, now_training[key])
        if before != after:
            if before and after:   # name only what differs
                keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                before, after = ({k: side.get(k) for k in keys} for side in (before, after))
            return (f"session {doc.get('_id')} was started with training.{key} {_shown(before)}, the config now "
                    f"says {_shown(after)}; epsilon and secure aggregation hold only over rounds run with the "
                    "same settings: resume it with the config it started with")
    return None


def _comparable(key: str, spec_block: Any, training_block: Any) -> Any:
    """One side of a privacy block as compared on resume: the session spec's
    block and the training dump's, less what may change."""
    if not spec_block and not isinstance(training_block, dict):
        return None
    merged = {**(training_block if isinstance(training_block, dict) else {}), **(spec_block or {})}
    for name in _MAY_CHANGE[key]:
        merged.pop(name, None)
    # A setting left at its default (None) compares equal to one a session
    # written before the setting existed does not carry.
    return {k: v for k, v in merged.items() if v is not None}


def _shown(block: Any) -> str:
    if not block:
        return "off"
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(block.items())) + "}"
