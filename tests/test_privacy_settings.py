"""training.privacy and training.secure_aggregation as config blocks: the
shapes accepted, what is refused where it does not compose, the session
spec, and what `config validate` prints (the epsilon dp-accounting gives)."""
from __future__ import annotations

import pydantic
import pytest

from fedkeeper.privacy.accountant import PrivacyBudget
from fedkeeper.privacy.settings import (AdaptiveClipping, PrivacyConfig, SecureAggregationConfig, describe,
                                        refusal, scenario_refusal, secure_aggregation)


def central(**kw):
    return PrivacyConfig(**{"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0, **kw})


def test_clip_norm_is_a_number_or_adaptive():
    assert central().clip_norm == 1.0 and not central().adaptive
    assert central(clip_norm="adaptive").clip_norm == AdaptiveClipping()
    p = central(clip_norm={"adaptive": {"initial": 0.5, "target_quantile": 0.7}})
    assert p.adaptive and p.clip_norm.initial == 0.5 and p.clip_norm.learning_rate == 0.2
    assert central(clip_norm={"adaptive": True}).clip_norm == AdaptiveClipping()
    for bad in (0, -1, {"initial": 1}, {"adaptive": {"quantile": 0.5}}, {"adaptive": {"learning_rate": 11}}):
        with pytest.raises(pydantic.ValidationError):
            central(clip_norm=bad)
    # a number under `adaptive` is not taken for a fixed clip norm
    for bad in (0.5, False, "yes"):
        with pytest.raises(pydantic.ValidationError, match="clip_norm.adaptive: true or a mapping"):
            central(clip_norm={"adaptive": bad})


def test_a_noise_multiplier_is_zero_or_large_enough_to_account_for():
    assert central(noise_multiplier=0).noise_multiplier == 0
    assert central(noise_multiplier=1e-3).noise_multiplier == 1e-3
    for tiny in (1e-300, 1e-4):
        with pytest.raises(pydantic.ValidationError, match="protects nothing"):
            central(noise_multiplier=tiny)


def test_misspelt_and_unknown_keys_are_refused():
    with pytest.raises(pydantic.ValidationError, match="did you mean noise_multiplier"):
        PrivacyConfig(mode="central", noise_multiplyer=1.0, clip_norm=1.0)
    with pytest.raises(pydantic.ValidationError, match="mode"):
        central(mode="global")
    with pytest.raises(pydantic.ValidationError):
        central(delta=1.0)
    with pytest.raises(pydantic.ValidationError, match="needs mode: central"):
        PrivacyConfig(mode="local", noise_multiplier=1.0, clip_norm="adaptive")


@pytest.mark.parametrize("privacy, secure, strategy, mode, message", [
    (central(), False, "fedavg", "sync", None),
    (central(), False, "fedadam", "sync", None),
    (central(), False, "median", "sync", "FedAvg-family"),
    (central(), False, "krum", "sync", "FedAvg-family"),
    (central(mode="local"), False, "median", "sync", None),     # noise added by clients: post-processing
    (central(), False, "fedavg", "async", "needs mode: sync"),
    (central(mode="local"), False, "fedavg", "semi_async", "needs mode: sync"),
    (None, True, "fedavg", "sync", None),
    (None, True, "trimmed_mean", "sync", "FedAvg-family"),
    (None, {"threshold": 0.6}, "fedavg", "async", "needs mode: sync"),
    (central(), True, "fedavg", "sync", "cannot be combined"),
    (central(mode="local"), True, "fedavg", "sync", None),
])
def test_what_does_not_compose_is_refused(privacy, secure, strategy, mode, message):
    if isinstance(secure, dict):
        secure = SecureAggregationConfig(**secure)
    why = refusal(privacy, secure, strategy, mode)
    assert (why is None) if message is None else (message in why)


@pytest.mark.parametrize("privacy, selection, hedging, message", [
    (central(), "reliability", False, "needs selection: random"),
    (central(), "random", True, None),                    # the aggregator sees raw updates anyway
    (central(mode="local"), "reliability", False, None),  # local DP counts on no sampling
    (central(mode="local"), "random", True, "cannot be combined with hedging"),
    (None, "reliability", True, None),
])
def test_selection_and_hedging_that_the_accounting_does_not_describe_are_refused(privacy, selection, hedging,
                                                                                 message):
    why = refusal(privacy, None, "fedavg", "sync", selection=selection, hedging=hedging)
    assert (why is None) if message is None else (message in why)


def test_session_spec_is_what_the_functions_read():
    spec = central(clip_norm="adaptive").spec(clients_per_round=40)
    assert spec["mode"] == "central" and spec["clients_per_round"] == 40
    assert spec["clip_norm"]["initial"] == 0.1 and spec["clip_norm"]["clipped_count_stddev"] is None
    # The adaptive split cannot reach this noise multiplier with 4 clients (sigma_b = 0.2).
    assert "too small" in scenario_refusal(central(clip_norm="adaptive"), clients_per_round=4)
    assert scenario_refusal(central(), clients_per_round=4) is None
    assert secure_aggregation(True).spec() == {"threshold": None, "scale": 2.0 ** 24, "neighbours": None}
    assert SecureAggregationConfig(neighbours="log").spec()["neighbours"] == "log"
    with pytest.raises(ValueError, match="neighbours"):
        SecureAggregationConfig(neighbours=1)
    lines = describe(None, SecureAggregationConfig(neighbours="log"), 100, 100, 3)
    assert "SecAgg+ graph of 14 neighbours per client" in lines[0] and "a client and its neighbours" in lines[0]
    assert secure_aggregation(False) is None


def test_validate_prints_the_epsilon_of_the_configured_rounds():
    p = central(target_epsilon=5.0)
    lines = describe(p, False, clients_per_round=25, total_clients=100, rounds=20)
    eps = PrivacyBudget("central", 1.0, 25, 100, 1e-5, 20).configured_epsilon()
    assert f"epsilon {eps:.3g}" in lines[0] and "q = 0.25" in lines[0]
    fit = PrivacyBudget("central", 1.0, 25, 100, 1e-5, 20, target_epsilon=5.0).rounds_within_target()
    assert f"allows {fit} of the 20 rounds" in lines[1] and fit < 20
    lines = describe(central(noise_multiplier=0.0), True, 10, 10, 3)
    assert "inf (no noise)" in lines[0] and "warning: delta" not in " ".join(lines)
    assert "secure_aggregation" in lines[-1]
    assert any("warning: delta" in line for line in describe(central(delta=0.5), False, 1, 2, 1))


def test_config_validate_prints_each_scenarios_epsilon(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "fedkeeper.cli", "config", "validate", "-c",
                          str(root / "examples" / "config-privacy.yaml")], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "FEDKEEPER_STATE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    eps = PrivacyBudget("central", 1.0, 25, 100, 1e-5, 20).configured_epsilon()
    assert "scenario federated_learning: privacy: central DP" in out.stdout
    assert f"20 rounds spend epsilon {eps:.3g} at delta 1e-05" in out.stdout
    assert "scenario secure: secure_aggregation: pairwise masking" in out.stdout


def test_the_training_config_asks_the_privacy_refusal_about_selection_and_hedging():
    from fedkeeper.config.training import TrainingConfig
    dp = {"mode": "local", "noise_multiplier": 1.0, "clip_norm": 1.0}
    TrainingConfig(privacy=dp)
    with pytest.raises(pydantic.ValidationError, match="cannot be combined with hedging"):
        TrainingConfig(privacy=dp, hedging={"enabled": True})
    with pytest.raises(pydantic.ValidationError, match="needs selection: random"):
        TrainingConfig(privacy={**dp, "mode": "central"}, selection="reliability")
