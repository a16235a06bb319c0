"""Differential privacy core: clipping bounds every contribution, the noise
has the calibrated standard deviation (statistical, fixed seeds), adaptive
clipping moves the bound toward the target quantile, and the keeper's
epsilon is what dp-accounting gives for the same parameters computed here
independently."""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedkeeper.privacy.accountant import AccountingError, PrivacyBudget, epsilon
from flcommon.privacy import (CentralDP, PrivacyError, adaptive_clip_update, clip, global_norm,
                              privacy_settings, privatize_local, value_noise_multiplier)
from flcommon.strategies import get_strategy

F32 = np.float32
SHAPES = [(30, 20), (20,), (7, 3, 2)]
REF = [(s, np.dtype(F32)) for s in SHAPES]


def delta_with_norm(rng, norm):
    arrays = [rng.standard_normal(s).astype(F32) for s in SHAPES]
    scale = norm / global_norm(arrays)
    return [a * F32(scale) for a in arrays]


def settings(**kw):
    raw = {"mode": "central", "noise_multiplier": 0.0, "clip_norm": 1.0, "clients_per_round": 4}
    raw.update(kw)
    return privacy_settings(raw)


def zeros():
    return [np.zeros(s, F32) for s in SHAPES]


# ---------------------------------------------------------------- clipping

def test_clipping_bounds_every_delta_and_leaves_small_ones_alone():
    rng = np.random.default_rng(1)
    for norm in [0.01, 0.5, 0.999, 1.0, 1.5, 40.0, 1e6]:
        d = delta_with_norm(rng, norm)
        before = [a.copy() for a in d]
        clipped, measured = clip(d, 1.0)
        assert measured == pytest.approx(norm, rel=1e-5)
        assert global_norm(clipped) <= 1.0
        if norm <= 1.0:
            assert all(np.array_equal(a, b) for a, b in zip(clipped, before))
        else:
            # same direction, norm at the bound
            assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
            cos = sum(float((a * b).sum()) for a, b in zip(clipped, before)) / (global_norm(before))
            assert cos == pytest.approx(1.0, rel=1e-4)


def test_central_dp_bounds_what_one_client_moves():
    """With the noise off, replacing one client's delta by anything moves the
    aggregate by at most 2C / clients_per_round, and adding or removing a
    client by at most C / clients_per_round, however large its delta."""
    rng = np.random.default_rng(2)
    s = settings(clip_norm=0.5, clients_per_round=4)
    others = [delta_with_norm(rng, n) for n in (0.1, 3.0, 0.7)]
    outlier = delta_with_norm(rng, 1e5)

    def aggregate(deltas):
        dp = CentralDP(get_strategy("fedavg"), s, s["clip_norm"], np.random.default_rng(0))
        dp.begin(REF)
        for d in deltas:
            dp.add([a.copy() for a in d], weight=1000.0)  # example weights are ignored
        new, _ = dp.finish(zeros())
        return new

    without = aggregate(others)
    with_outlier = aggregate(others + [outlier])
    moved = global_norm([a - b for a, b in zip(with_outlier, without)])
    assert moved <= 0.5 / 4 + 1e-6
    assert moved == pytest.approx(0.5 / 4, rel=1e-4)  # the outlier is clipped to the bound, not dropped
    # The unclipped ones count in full: 0.1 and the two clipped to 0.5, / 4.
    expected = [sum(clip([x.copy() for x in d], 0.5)[0][i] for d in others) / 4 for i in range(len(SHAPES))]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(without, expected))


def test_local_dp_clips_the_clients_delta_before_noise():
    rng = np.random.default_rng(3)
    d, norm = privatize_local(delta_with_norm(rng, 9.0), clip_norm=2.0, noise_multiplier=0.0,
                              rng=np.random.default_rng(0))
    assert norm == pytest.approx(9.0, rel=1e-5)
    assert global_norm(d) <= 2.0


# ---------------------------------------------------------------- noise calibration

def test_central_noise_std_matches_the_calibration():
    """All-zero deltas: what comes out is only the noise on the sum divided
    by clients_per_round; its std times clients_per_round is z * C."""
    z, c, m = 1.3, 0.7, 5
    s = settings(noise_multiplier=z, clip_norm=c, clients_per_round=m)
    big = [((400, 250), np.dtype(F32))]  # 100k coordinates
    dp = CentralDP(get_strategy("fedavg"), s, c, np.random.default_rng(42))
    dp.begin(big)
    for _ in range(3):
        dp.add([np.zeros((400, 250), F32)])
    new, _ = dp.finish([np.zeros((400, 250), F32)])
    measured = float(np.std(new[0], dtype=np.float64)) * m
    # std of a 100k-sample std estimate is ~ sigma / sqrt(2n) = 0.22%; 1.5% is > 6 of those
    assert measured == pytest.approx(z * c, rel=0.015)
    assert abs(float(np.mean(new[0], dtype=np.float64))) * m < 0.02 * z * c
    assert dp.report()["noise_std"] == pytest.approx(z * c)


def test_local_noise_std_matches_the_calibration():
    z, c = 0.8, 1.5
    d, _ = privatize_local([np.zeros(100_000, F32)], clip_norm=c, noise_multiplier=z,
                           rng=np.random.default_rng(7))
    assert float(np.std(d[0], dtype=np.float64)) == pytest.approx(z * c, rel=0.015)


def test_noise_is_reproducible_with_a_seed_and_differs_without():
    s = settings(noise_multiplier=1.0)

    def once(rng):
        dp = CentralDP(get_strategy("fedavg"), s, 1.0, rng)
        dp.begin(REF)
        dp.add(zeros())
        return dp.finish(zeros())[0]

    a, b = once(np.random.default_rng(5)), once(np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = once(np.random.default_rng())
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_adaptive_clipping_splits_the_noise_multiplier():
    s = settings(noise_multiplier=1.0, clip_norm={"initial": 0.5, "clipped_count_stddev": 2.0}, clients_per_round=40)
    # (1 - (2*2)^-2)^-1/2 = (1 - 1/16)^-1/2
    assert s["value_noise_multiplier"] == pytest.approx((1 - 1 / 16) ** -0.5)
    assert value_noise_multiplier(s) > 1.0
    with pytest.raises(PrivacyError, match="too small"):
        settings(noise_multiplier=2.0, clip_norm={"clipped_count_stddev": 0.5})
    # default sigma_b: clients_per_round / 20
    assert settings(clip_norm={}, clients_per_round=40)["adaptive"]["clipped_count_stddev"] == 2.0


# ---------------------------------------------------------------- adaptive clipping

def test_adaptive_clipping_moves_the_bound_to_the_target_quantile():
    """Update norms uniform in [1, 3]: the median is 2 and the 0.8 quantile
    2.6. From far below and far above, the bound ends near the quantile."""
    for target, quantile_norm in [(0.5, 2.0), (0.8, 2.6)]:
        for start in (0.05, 50.0):
            rng = np.random.default_rng(11)
            adaptive = {"initial": start, "target_quantile": target, "learning_rate": 0.2,
                        "clipped_count_stddev": 1.0}
            c, trail = start, []
            for _ in range(300):
                norms = rng.uniform(1.0, 3.0, size=20)
                c, _ = adaptive_clip_update(c, int((norms <= c).sum()), 20, 20, adaptive, rng)
                trail.append(c)
            late = np.mean(trail[-100:])
            assert late == pytest.approx(quantile_norm, rel=0.12), (target, start, late)


def test_one_client_moves_the_clipped_count_by_half_at_most():
    """The noise split (value_noise_multiplier) holds only if one client
    more or less moves the count by 1/2: each adds its bit minus 1/2."""
    adaptive = {"initial": 1.0, "target_quantile": 0.5, "learning_rate": 0.2, "clipped_count_stddev": 1.0}
    rng = np.random.default_rng(0)
    clients = 10

    def centred_count(unclipped, counted):
        _, share = adaptive_clip_update(1.0, unclipped, counted, clients, adaptive, rng, noised=False)
        return (share - 0.5) * clients

    for unclipped, counted in [(0, 0), (3, 7), (7, 7), (0, 9)]:
        base = centred_count(unclipped, counted)
        assert centred_count(unclipped + 1, counted + 1) - base == pytest.approx(0.5)   # one more, unclipped
        assert centred_count(unclipped, counted + 1) - base == pytest.approx(-0.5)      # one more, clipped


def test_the_adaptive_bound_stays_finite_and_positive_whatever_the_noised_share():
    adaptive = {"initial": 1.0, "target_quantile": 0.5, "learning_rate": 10.0, "clipped_count_stddev": 1e6}
    rng = np.random.default_rng(1)
    for _ in range(50):
        c, _ = adaptive_clip_update(1.0, 3, 5, 5, adaptive, rng)
        assert 0 < c < math.inf


def test_without_noise_the_adaptive_bound_is_the_same_whatever_the_rng():
    """noise_multiplier 0 claims no privacy: the count is not noised either,
    so a clipping-only session is reproducible."""
    s = settings(noise_multiplier=0.0, clip_norm={"initial": 1.0, "clipped_count_stddev": 2.0},
                 clients_per_round=4)
    bounds = set()
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        dp = CentralDP(get_strategy("fedavg"), s, 1.0, rng)
        dp.begin(REF)
        for n in (0.5, 2.0, 3.0):
            dp.add(delta_with_norm(np.random.default_rng(0), n))
        dp.finish(zeros())
        bounds.add(dp.report()["next_clip_norm"])
    assert len(bounds) == 1


def test_central_dp_reports_the_next_adaptive_bound():
    rng = np.random.default_rng(4)
    s = settings(noise_multiplier=0.0, clip_norm={"initial": 0.1, "clipped_count_stddev": 0.0,
                                                  "learning_rate": 0.2}, clients_per_round=4)
    dp = CentralDP(get_strategy("fedavg"), s, 0.1, rng)
    dp.begin(REF)
    for n in (1.0, 2.0, 3.0, 4.0):  # all above the bound: it must grow
        dp.add(delta_with_norm(rng, n))
    dp.finish(zeros())
    r = dp.report()
    assert r["noised_unclipped_share"] == 0.0
    assert r["next_clip_norm"] == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    assert "norms" not in r and "unclipped" not in r  # raw, unnoised figures are never reported


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("raw, message", [
    ({"mode": "both", "noise_multiplier": 1, "clip_norm": 1, "clients_per_round": 2}, "mode"),
    ({"mode": "central", "noise_multiplier": -1, "clip_norm": 1, "clients_per_round": 2}, "noise_multiplier"),
    ({"mode": "central", "noise_multiplier": 1, "clip_norm": 0, "clients_per_round": 2}, "clip_norm"),
    ({"mode": "central", "noise_multiplier": 1, "clip_norm": 1, "clients_per_round": 0}, "clients_per_round"),
    ({"mode": "local", "noise_multiplier": 1, "clip_norm": {"initial": 1}, "clients_per_round": 2}, "adaptive"),
    ({"mode": "central", "noise_multiplier": 1, "clip_norm": {"target_quantile": 1.0}, "clients_per_round": 2},
     "target_quantile"),
])
def test_bad_settings_are_refused(raw, message):
    with pytest.raises(PrivacyError, match=message):
        privacy_settings(raw)


def test_no_privacy_block_means_no_dp():
    assert privacy_settings(None) is None
    assert privacy_settings({"mode": None}) is None


def test_central_dp_refuses_robust_aggregators():
    with pytest.raises(PrivacyError, match="FedAvg-family"):
        CentralDP(get_strategy("median"), settings(), 1.0, np.random.default_rng(0))


# ---------------------------------------------------------------- accounting

def independent_epsilon(mode, z, q, rounds, delta, accountant):
    """The same parameters through dp-accounting, written out here."""
    if mode == "central":
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    else:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), rounds)
    acc = rdp.RdpAccountant(orders=list(range(2, 65)) + [80, 96, 128, 192, 256, 384, 512]) \
        if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mode, z, per_round, total, rounds, accountant", [
    ("central", 1.0, 5, 10, 10, "rdp"),
    ("central", 0.8, 10, 100, 50, "rdp"),
    ("central", 2.0, 10, 10, 5, "rdp"),     # q = 1: no sampling
    ("local", 4.0, 5, 10, 10, "rdp"),
    ("central", 1.1, 5, 10, 3, "pld"),
])
def test_epsilon_is_dp_accountings(mode, z, per_round, total, rounds, accountant):
    budget = PrivacyBudget(mode=mode, noise_multiplier=z, clients_per_round=per_round, total_clients=total,
                           delta=1e-5, rounds=rounds, accountant=accountant)
    expected = independent_epsilon(mode, z, per_round / total, rounds, 1e-5, accountant)
    assert budget.configured_epsilon() == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.inf


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    b = PrivacyBudget("central", 1.0, 5, 10, 1e-5, 20)
    eps = [b.epsilon_after(r) for r in (0, 1, 5, 20)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    assert PrivacyBudget("central", 2.0, 5, 10, 1e-5, 20).configured_epsilon() < eps[-1]
    assert math.isinf(PrivacyBudget("central", 0.0, 5, 10, 1e-5, 20).configured_epsilon())
    # Local DP gets no amplification from sampling: it spends more.
    assert PrivacyBudget("local", 1.0, 5, 10, 1e-5, 20).configured_epsilon() > eps[-1]


def test_target_epsilon_stops_before_the_round_that_would_exceed_it():
    b = PrivacyBudget("central", 1.0, 5, 10, 1e-5, 50, target_epsilon=8.0)
    fit = b.rounds_within_target()
    assert 0 < fit < 50
    assert b.epsilon_after(fit) <= 8.0 < b.epsilon_after(fit + 1)
    assert b.next_round_exceeds(fit - 1) is None
    assert b.next_round_exceeds(fit) == pytest.approx(b.epsilon_after(fit + 1))
    assert PrivacyBudget("central", 1.0, 5, 10, 1e-5, 50).next_round_exceeds(49) is None


def test_bad_accounting_parameters_are_refused():
    with pytest.raises(AccountingError, match="delta"):
        epsilon("central", 1.0, 0.5, 3, 0.0)
    with pytest.raises(AccountingError, match="sampling"):
        epsilon("central", 1.0, 1.5, 3, 1e-5)
    with pytest.raises(AccountingError, match="accountant"):
        epsilon("central", 1.0, 0.5, 3, 1e-5, "moments")
    # dp-accounting's own failure (it divides by z squared) is one error, naming the multiplier
    with pytest.raises(AccountingError, match="noise multiplier 1e-300"):
        epsilon("central", 1e-300, 0.25, 3, 1e-5)


# ---------------------------------------------------------------- what the functions call

def test_functions_get_central_dp_only_when_the_session_has_it():
    from flcommon.privacy import central_dp
    spec = {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "clients_per_round": 4}}
    dp = central_dp(spec, get_strategy("fedavg"), {})
    assert isinstance(dp, CentralDP) and dp.clip_norm == 0.5
    assert central_dp({}, get_strategy("fedavg"), {}) is None
    assert central_dp({"privacy": dict(spec["privacy"], mode="local")}, get_strategy("fedavg"), {}) is None
    adaptive = {"privacy": dict(spec["privacy"], clip_norm={"initial": 0.1, "clipped_count_stddev": 2.0})}
    assert central_dp(adaptive, get_strategy("fedavg"), {}).clip_norm == 0.1
    # the bound the previous aggregation stored with the model it wrote
    assert central_dp(adaptive, get_strategy("fedavg"), {"privacy": {"next_clip_norm": 0.37}}).clip_norm == 0.37
    assert central_dp(adaptive, get_strategy("fedavg"), {"privacy": {"next_clip_norm": -1}}).clip_norm == 0.1


def test_local_dp_weights_move_the_global_model_by_a_clipped_noised_delta():
    from flcommon.privacy import local_dp_weights
    rng = np.random.default_rng(8)
    g = [rng.standard_normal(s).astype(F32) for s in SHAPES]
    new = [a + d for a, d in zip(g, delta_with_norm(rng, 50.0))]
    spec = {"privacy": {"mode": "local", "noise_multiplier": 0.0, "clip_norm": 2.0, "clients_per_round": 3}}
    out = local_dp_weights(spec, g, new)
    assert global_norm([o - a for o, a in zip(out, g)]) == pytest.approx(2.0, rel=1e-4)
    assert all(o.dtype == F32 for o in out)
    noisy = local_dp_weights(dict(spec, privacy=dict(spec["privacy"], noise_multiplier=1.0)), g, new)
    assert global_norm([o - a for o, a in zip(noisy, g)]) > 2.0  # noise on top of the clipped delta
    assert local_dp_weights({}, g, new) is new
