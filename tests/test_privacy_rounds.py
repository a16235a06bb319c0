"""What a round mode asks of privacy (fedkeeper.privacy.rounds): the
session spec, epsilon after each round as dp-accounting gives it, and the
target-epsilon stop with its message, recorded and announced."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedkeeper.privacy.accountant import PrivacyBudget
from fedkeeper.privacy.rounds import RoundPrivacy, stored_epsilon
from fedkeeper.privacy.settings import PrivacyConfig


class Recorder:
    def __init__(self):
        self.events, self.emitted = [], []

    def event(self, session, kind, message, **data):
        self.events.append((session, kind, message, data))

    def emit(self, kind, **data):
        self.emitted.append((kind, data))


def training(privacy=None, secure=False, rounds=20):
    return SimpleNamespace(privacy=privacy, secure_aggregation=secure, rounds=rounds, round_deadline_s=60.0)


def make(privacy, rounds=20):
    rec = Recorder()
    ci = SimpleNamespace(num_clients_per_round=25, total_num_clients=100)
    rp = RoundPrivacy.for_session(training(privacy, rounds=rounds), ci, None, rec,
                                  {f"client_{i}": "c" for i in range(100)}, rec, failure=RuntimeError)
    return rp, rec


def test_nothing_to_do_without_privacy():
    rp, _ = make(None)
    assert rp is None


def test_epsilon_after_each_round_is_dp_accountings():
    p = PrivacyConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0)
    rp, _ = make(p)
    for r in (1, 5, 20):
        assert rp.epsilon_after(r) == pytest.approx(PrivacyBudget("central", 1.0, 25, 100, 1e-5, 20).epsilon_after(r))
    assert rp.session_spec() == {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0,
                                             "clients_per_round": 25}, "secure_aggregation": None}
    assert rp.stop_before("s", 19) is None  # no target: never stops


def test_target_epsilon_stops_with_a_clear_message():
    p = PrivacyConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0, target_epsilon=5.0)
    rp, rec = make(p)
    fit = PrivacyBudget("central", 1.0, 25, 100, 1e-5, 20, target_epsilon=5.0).rounds_within_target()
    assert all(rp.stop_before("s", r) is None for r in range(fit))
    message = rp.stop_before("s", fit)
    assert message and f"round {fit + 1} would bring epsilon to" in message and "target_epsilon 5" in message
    assert f"training stops after {fit} round(s)" in message
    assert rec.events[0][1] == "privacy_budget" and rec.events[0][3]["target_epsilon"] == 5.0
    assert rec.emitted == [("warning", {"message": message})]


def test_no_noise_has_no_finite_epsilon_to_store():
    rp, _ = make(PrivacyConfig(mode="local", noise_multiplier=0.0, clip_norm=1.0))
    assert stored_epsilon(rp.epsilon_after(3)) is None
    assert stored_epsilon(2.5) == 2.5 and stored_epsilon(None) is None


def test_a_resume_keeps_secure_aggregations_threshold_and_scale_but_may_change_its_stage_deadline():
    from fedkeeper.privacy.rounds import resume_refusal
    from fedkeeper.privacy.settings import SecureAggregationConfig

    def rp(**kw):
        return RoundPrivacy(None, SecureAggregationConfig(**kw), None, None, 4, None, None, RuntimeError)

    started = rp(threshold=0.6)
    doc = {"_id": "s1", "spec": started.session_spec(),
           "training": {"privacy": None, "secure_aggregation": started.secure.model_dump()}}
    assert resume_refusal(doc, rp(threshold=0.6, stage_deadline_s=30)) is None
    refused = resume_refusal(doc, rp(threshold=0.8))
    assert refused.startswith("session s1 was started with training.secure_aggregation {threshold: 0.6}, "
                              "the config now says {threshold: 0.8}")
    assert "the config now says off" in resume_refusal(doc, None)
    # A session started with secure_aggregation: true dumps a bool; it compares as its defaults.
    doc_true = {**doc, "spec": rp().session_spec(), "training": {"secure_aggregation": True}}
    assert resume_refusal(doc_true, rp()) is None
    # A session stored before `neighbours` existed resumes with it left at its default, not with it set.
    doc_old = {**doc_true, "spec": {"secure_aggregation": {"threshold": None, "scale": 2.0 ** 24}}}
    assert resume_refusal(doc_old, rp()) is None
    assert "{neighbours: log}" in resume_refusal(doc_old, rp(neighbours="log"))
