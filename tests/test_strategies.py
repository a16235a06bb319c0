"""Every aggregation strategy against a hand computation on small arrays,
server state carried across rounds, Krum against an outlier, the FedProx
proximal term in the client, and the package's fitness for function zips
(numpy and the standard library only)."""
from __future__ import annotations

import io
import math
import subprocess
import sys
import weakref
import zipfile

import numpy as np
import pytest

from fedkeeper.artifacts import build_artifact
from flcommon.strategies import STRATEGIES, StrategyError, get_strategy
from reference_fedavg import fedavg

F32 = np.float32
REF = [((3,), np.dtype(F32))]
GLOBAL = [1.0, 2.0, 3.0]
# Three clients' deltas and example weights used by most tests.
D1, W1 = [1.0, 0.0, -2.0], 1
D2, W2 = [3.0, 6.0, 0.0], 2
D3, W3 = [-1.0, 3.0, 4.0], 1
# Their weighted mean: (1*D1 + 2*D2 + 1*D3) / 4
#   = [(1 + 6 - 1) / 4, (0 + 12 + 3) / 4, (-2 + 0 + 4) / 4] = [1.5, 3.75, 0.5]
MEAN1 = [1.5, 3.75, 0.5]
# The second round of the two-round tests: one client with this delta.
MEAN2 = [1.0, -1.0, 0.2]


def arr(values) -> list[np.ndarray]:
    return [np.array(values, dtype=F32)]


def run(strategy, deltas, global_weights=GLOBAL, state=None):
    strategy.begin(REF)
    for delta, weight in deltas:
        strategy.add(arr(delta), weight)
    new, new_state = strategy.finish(arr(global_weights), state)
    return [float(v) for v in new[0]], new_state


def three_clients():
    return [(D1, W1), (D2, W2), (D3, W3)]


def close(got, expected, tol=1e-5):
    return np.allclose(np.asarray(got, dtype=np.float64), expected, atol=tol, rtol=0)


# ---------------------------------------------------------------- fedavg / fedprox

@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_server_side(name):
    new, state = run(get_strategy(name), three_clients())
    # GLOBAL + MEAN1 = [1 + 1.5, 2 + 3.75, 3 + 0.5]
    assert close(new, [2.5, 5.75, 3.5]) and state is None
    # With a server learning rate: GLOBAL + 0.5 * MEAN1
    new, _ = run(get_strategy({"name": name, "server_lr": 0.5}), three_clients())
    assert close(new, [1.75, 3.875, 3.25])
    strategy = get_strategy(name)
    run(strategy, three_clients())
    assert strategy.shares() == [0.25, 0.5, 0.25]


def test_fedavg_on_deltas_equals_the_weighted_mean_of_the_weights():
    rng = np.random.default_rng(0)
    g = [rng.standard_normal((4, 3)).astype(F32), rng.standard_normal(3).astype(F32)]
    clients = [([a + rng.standard_normal(a.shape).astype(F32) for a in g], n) for n in (5, 9, 2)]
    strategy = get_strategy("fedavg")
    strategy.begin([(a.shape, a.dtype) for a in g])
    for weights, n in clients:
        strategy.add([w - a for w, a in zip(weights, g)], n)
    new, _ = strategy.finish([a.copy() for a in g])
    direct = fedavg([([w.copy() for w in weights], n) for weights, n in clients], [(a.shape, a.dtype) for a in g])
    assert all(np.allclose(a, b, atol=1e-6) and a.dtype == F32 for a, b in zip(new, direct))


def test_fedprox_reads_mu():
    assert get_strategy("fedprox").mu == 0.01
    assert get_strategy({"name": "fedprox", "mu": 0.5}).mu == 0.5


# ---------------------------------------------------------------- fedavgm

def test_fedavgm_keeps_its_velocity_across_rounds():
    new1, v1 = run(get_strategy("fedavgm"), three_clients())
    # v1 = 0.9 * 0 + MEAN1 = [1.5, 3.75, 0.5]; x1 = GLOBAL + 1.0 * v1
    assert close(v1[0], [1.5, 3.75, 0.5])
    assert close(new1, [2.5, 5.75, 3.5])
    # A fresh instance: everything carried between rounds is the state
    # (which finish() may overwrite, hence the copies).
    new2, v2 = run(get_strategy("fedavgm"), [(MEAN2, 3)], global_weights=new1, state=[v1[0].copy()])
    # v2 = 0.9 * v1 + MEAN2 = [1.35 + 1, 3.375 - 1, 0.45 + 0.2] = [2.35, 2.375, 0.65]
    assert close(v2[0], [2.35, 2.375, 0.65])
    # x2 = x1 + v2 = [2.5 + 2.35, 5.75 + 2.375, 3.5 + 0.65]
    assert close(new2, [4.85, 8.125, 4.15])
    # server_lr and server_momentum are honoured: v = 0.5 * v1 + MEAN2, x = x1 + 0.1 * v
    new2, v2 = run(get_strategy({"name": "fedavgm", "server_lr": 0.1, "server_momentum": 0.5}),
                   [(MEAN2, 1)], global_weights=new1, state=v1)
    assert close(v2[0], [0.75 + 1, 1.875 - 1, 0.25 + 0.2])
    assert close(new2, [2.5 + 0.175, 5.75 + 0.0875, 3.5 + 0.045])


# ---------------------------------------------------------------- adaptive server optimizers
# tau = 0.5 so that v starts at tau^2 = 0.25; beta1 0.9, beta2 0.99, server_lr 1.

ADAPTIVE = {"server_lr": 1.0, "beta1": 0.9, "beta2": 0.99, "tau": 0.5}
M1 = [0.15, 0.375, 0.05]          # m1 = 0.9 * 0 + 0.1 * MEAN1
M2 = [0.235, 0.2375, 0.065]       # m2 = 0.9 * M1 + 0.1 * MEAN2 = [0.135 + 0.1, 0.3375 - 0.1, 0.045 + 0.02]
V1 = {  # v0 = 0.25; MEAN1^2 = [2.25, 14.0625, 0.25]
    # Adam: 0.99 * 0.25 + 0.01 * MEAN1^2 = 0.2475 + [0.0225, 0.140625, 0.0025]
    "fedadam": [0.27, 0.388125, 0.25],
    # Yogi: 0.25 - 0.01 * MEAN1^2 * sign(0.25 - MEAN1^2), signs [-1, -1, 0]
    "fedyogi": [0.2725, 0.390625, 0.25],
    # Adagrad: 0.25 + MEAN1^2
    "fedadagrad": [2.5, 14.3125, 0.5],
}
V2 = {  # MEAN2^2 = [1, 1, 0.04]
    # Adam: 0.99 * V1 + 0.01 * MEAN2^2 = [0.2673 + 0.01, 0.38424375 + 0.01, 0.2475 + 0.0004]
    "fedadam": [0.2773, 0.39424375, 0.2479],
    # Yogi: signs of V1 - MEAN2^2 are [-1, -1, +1]: [0.2725 + 0.01, 0.390625 + 0.01, 0.25 - 0.0004]
    "fedyogi": [0.2825, 0.400625, 0.2496],
    # Adagrad: V1 + MEAN2^2
    "fedadagrad": [3.5, 15.3125, 0.54],
}


def adaptive_step(x, m, v, tau=0.5, lr=1.0):
    """x + lr * m / (sqrt(v) + tau), coordinate by coordinate."""
    return [xi + lr * mi / (math.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v)]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_over_two_rounds(name):
    new1, state1 = run(get_strategy(dict(ADAPTIVE, name=name)), three_clients())
    assert len(state1) == 2  # m, then v
    assert close(state1[0], M1) and close(state1[1], V1[name])
    expected1 = adaptive_step(GLOBAL, M1, V1[name])
    assert close(new1, expected1)
    # e.g. fedadam, first coordinate: 1 + 0.15 / (sqrt(0.27) + 0.5) = 1 + 0.15 / 1.0196152 = 1.1471143
    if name == "fedadam":
        assert close(new1[0], 1.1471143)
    new2, state2 = run(get_strategy(dict(ADAPTIVE, name=name)), [(MEAN2, 7)], global_weights=new1,
                       state=state1)
    assert close(state2[0], M2) and close(state2[1], V2[name])
    assert close(new2, adaptive_step(expected1, M2, V2[name]))


def test_adaptive_defaults_follow_reddi_et_al():
    """v starts at tau^2 (1e-6 by default), server_lr defaults to 0.01."""
    new, (m, v) = run(get_strategy("fedadam"), [([0.0, 1.0, -2.0], 1)], global_weights=[0.0, 0.0, 0.0])
    # v1 = 0.99 * 1e-6 + 0.01 * [0, 1, 4]; m1 = 0.1 * delta
    assert close(v, [0.99e-6, 0.01 + 0.99e-6, 0.04 + 0.99e-6], tol=1e-8)
    assert close(m, [0.0, 0.1, -0.2])
    # x1 = 0.01 * m1 / (sqrt(v1) + 1e-3): [0, 0.001 / (0.1000050 + 0.001), -0.002 / (0.2000025 + 0.001)]
    assert close(new, [0.0, 0.001 / (math.sqrt(0.01 + 0.99e-6) + 1e-3),
                       -0.002 / (math.sqrt(0.04 + 0.99e-6) + 1e-3)], tol=1e-7)


# ---------------------------------------------------------------- robust aggregators

def test_median():
    # Coordinate-wise over D1, D2, D3: median(1, 3, -1) = 1, median(0, 6, 3) = 3, median(-2, 0, 4) = 0
    new, state = run(get_strategy("median"), three_clients())
    assert close(new, [1 + 1, 2 + 3, 3 + 0]) and state is None
    # Example weights do not count: the same with other weights.
    assert run(get_strategy("median"), [(D1, 100), (D2, 1), (D3, 1)])[0] == new
    # An even count takes the mean of the two middle values; D4 = [10, -10, 1]:
    #   sorted [-1, 1, 3, 10] -> 2; [-10, 0, 3, 6] -> 1.5; [-2, 0, 1, 4] -> 0.5
    strategy = get_strategy("median")
    new, _ = run(strategy, three_clients() + [([10.0, -10.0, 1.0], 1)])
    assert close(new, [1 + 2, 2 + 1.5, 3 + 0.5])
    assert strategy.shares() == [0.25] * 4


FIVE = [(D1, 1), (D2, 2), (D3, 1), ([10.0, -10.0, 1.0], 5), ([0.0, 1.0, 2.0], 1)]


def test_trimmed_mean():
    # trim_ratio 0.2 of 5 -> k = 1 value cut at each end of every coordinate:
    #   [1, 3, -1, 10, 0]  sorted [-1, 0, 1, 3, 10] -> mean(0, 1, 3) = 4/3
    #   [0, 6, 3, -10, 1]  sorted [-10, 0, 1, 3, 6] -> mean(0, 1, 3) = 4/3
    #   [-2, 0, 4, 1, 2]   sorted [-2, 0, 1, 2, 4]  -> mean(0, 1, 2) = 1
    new, state = run(get_strategy({"name": "trimmed_mean", "trim_ratio": 0.2}), FIVE)
    assert close(new, [1 + 4 / 3, 2 + 4 / 3, 3 + 1]) and state is None
    # The default 0.1 of 5 -> k = floor(0.5) = 0: the unweighted mean
    #   [13 / 5, 0 / 5, 5 / 5]
    new, _ = run(get_strategy("trimmed_mean"), FIVE)
    assert close(new, [1 + 2.6, 2 + 0.0, 3 + 1.0])
    trimmed = get_strategy({"name": "trimmed_mean", "trim_ratio": 0.3})
    assert [trimmed.trimmed(n) for n in (1, 3, 4, 10)] == [0, 0, 1, 3]


def test_krum_picks_the_honest_update_next_to_its_neighbours():
    honest = {"h1": [1.0, 1.0, 1.0], "h2": [1.0, 2.0, 1.0], "h3": [2.0, 1.0, 1.0], "h4": [2.0, 2.0, 3.0]}
    far = [20.0, -20.0, 20.0]
    # n = 5, f = 1: each delta is scored by its n - f - 2 = 2 nearest neighbours.
    # Squared distances: h1-h2 1, h1-h3 1, h1-h4 6, h2-h3 2, h2-h4 5, h3-h4 5,
    #   far-h1 19^2+21^2+19^2 = 1163, far-h2 1206, far-h3 1126, far-h4 18^2+22^2+17^2 = 1097.
    # Scores: h1 1+1 = 2, h2 1+2 = 3, h3 1+2 = 3, h4 5+5 = 10, far 1097+1126 = 2223.
    order = [("far", far), ("h2", honest["h2"]), ("h1", honest["h1"]), ("h3", honest["h3"]),
             ("h4", honest["h4"])]
    strategy = get_strategy({"name": "krum", "byzantine": 1})
    new, state = run(strategy, [(delta, 50 if name == "far" else 1) for name, delta in order])
    assert close(new, [1 + 1, 2 + 1, 3 + 1]) and state is None  # GLOBAL + h1
    assert strategy.shares() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert strategy.deltas == []  # released once the round is aggregated


def test_krum_scores_and_fallbacks():
    strategy = get_strategy({"name": "krum", "byzantine": 1})
    strategy.begin(REF)
    for d in ([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]):
        strategy.add(arr(d), 1)
    # n = 3 < f + 3: scored by the single nearest neighbour:
    #   [0,0,0]: min(1, 75) = 1; [1,0,0]: min(1, 16+25+25) = 1; [5,5,5]: 66. The tie goes to the first.
    assert list(strategy.scores()) == [1.0, 1.0, 66.0]
    new, _ = strategy.finish(arr(GLOBAL))
    assert close(new[0], GLOBAL) and strategy.shares() == [1.0, 0.0, 0.0]
    # n = 2: nothing to tell them apart: their coordinate-wise median (= mean).
    strategy = get_strategy("krum")
    new, _ = run(strategy, [(D1, 1), (D2, 9)])
    assert close(new, [1 + 2, 2 + 3, 3 - 1]) and strategy.shares() == [0.5, 0.5]
    # n = 1: that delta.
    assert close(run(get_strategy("krum"), [(D3, 1)])[0], [1 - 1, 2 + 3, 3 + 4])


# ---------------------------------------------------------------- interface

def test_streaming_strategies_do_not_hold_the_deltas():
    """A streaming strategy folds each delta into its accumulator; a robust
    one keeps every delta of the round, as documented."""
    for name, cls in STRATEGIES.items():
        strategy = get_strategy(name)
        strategy.begin(REF)
        delta = arr(D1)
        ref = weakref.ref(delta[0])
        strategy.add(delta, 1)
        del delta
        assert (ref() is None) == cls.streaming, name


def test_get_strategy_and_bad_settings():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                               "median", "trimmed_mean", "krum"}
    assert get_strategy(None).name == "fedavg" and get_strategy("FedAdam").name == "fedadam"
    full = {"name": "fedyogi", "server_lr": None, "server_momentum": 0.9, "beta1": 0.9, "beta2": 0.99,
            "tau": 1e-3, "mu": 0.01, "trim_ratio": 0.1, "byzantine": 1}  # StrategyConfig.model_dump()
    assert get_strategy(full).server_lr == 0.01
    assert get_strategy("fedavgm").server_lr == 1.0 and get_strategy("median").server_lr == 1.0
    for bad, reason in ((("nope"), "unknown strategy"), ({"name": "trimmed_mean", "trim_ratio": 0.5}, "trim_ratio"),
                        ({"name": "fedadam", "beta1": 1.0}, "beta1"), ({"name": "krum", "byzantine": 1.5}, "byzantine"),
                        ({"name": "fedavg", "server_lr": 0}, "server_lr"), ({"name": "fedadam", "tau": 0}, "tau"),
                        ({"name": "fedavgm", "server_momentum": "high"}, "server_momentum"), (3, "name or a mapping")):
        with pytest.raises(StrategyError, match=reason):
            get_strategy(bad)
    strategy = get_strategy("fedadam")
    strategy.begin(REF)
    with pytest.raises(StrategyError, match="no update"):
        strategy.finish(arr(GLOBAL))
    for weight in (0, -1, float("nan"), True):
        with pytest.raises(StrategyError, match="weight"):
            strategy.add(arr(D1), weight)
    with pytest.raises(StrategyError, match="shape"):
        strategy.add([np.zeros(4, F32)], 1)
    strategy.add(arr(D1), 1)
    with pytest.raises(StrategyError, match="does not fit fedadam"):
        strategy.finish(arr(GLOBAL), arr(D1))  # only m, no v


def test_the_package_runs_from_a_function_zip_with_numpy_alone(tmp_path):
    """Every function zip carries flcommon with its strategies and nothing of
    the keeper; importing the strategies from the unpacked zip pulls in
    nothing but numpy."""
    build_artifact.cache_clear()
    artifact = build_artifact("fl_server_aggregator", "openwhisk")
    names = zipfile.ZipFile(io.BytesIO(artifact.data)).namelist()
    assert {f"flcommon/strategies/{n}.py" for n in ("__init__", "base", *STRATEGIES)} <= set(names)
    assert not any(n.startswith("fedkeeper/") for n in names)
    build_artifact.cache_clear()
    assert build_artifact("fl_server_aggregator", "openwhisk").sha256 == artifact.sha256  # deterministic
    zipfile.ZipFile(io.BytesIO(artifact.data)).extractall(tmp_path)
    probe = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import flcommon.strategies as s; "
             f"assert s.__file__.startswith({str(tmp_path)!r}), s.__file__; "
             "mods = {m.split('.')[0] for m in sys.modules}; "
             "print(sorted(mods & {'pydantic', 'tensorflow', 'keras', 'pymongo', 'click', 'yaml', 'requests', "
             "'fedkeeper'})); print(sorted(m for m in sys.modules if m.startswith('flcommon')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    heavy, loaded = out.stdout.splitlines()
    assert heavy == "[]"
    assert all(m == "flcommon" or m.startswith("flcommon.strategies") for m in eval(loaded))


# ---------------------------------------------------------------- FedProx in the client

def test_fedprox_keeps_local_training_near_the_global_model():
    from flcommon import data, models
    x, y, _, _ = data.load_digits_split()
    x, y = x[:200], y[:200]
    w0 = models.initial_weights("small", (8, 8, 1), 10, seed=1)
    base = {"model": "small", "optim": "sgd", "lr": 0.1, "momentum": 0.0, "local_epochs": 2, "batch_size": 16}

    def distance(weights):
        return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(weights, w0)))

    plain, m_plain = models.train(dict(base, strategy="fedavg"), w0, x, y, 10, seed=7)
    prox, m_prox = models.train(dict(base, strategy={"name": "fedprox", "mu": 10.0}), w0, x, y, 10, seed=7)
    assert distance(prox) < 0.25 * distance(plain), (distance(prox), distance(plain))
    assert set(m_prox) == set(m_plain) == {"loss", "accuracy"}
    # mu = 0 is plain training, bit for bit; and a warm rerun repeats itself.
    zero, _ = models.train(dict(base, strategy={"name": "fedprox", "mu": 0.0}), w0, x, y, 10, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(zero, plain))
    again, _ = models.train(dict(base, strategy={"name": "fedprox", "mu": 10.0}), w0, x, y, 10, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(again, prox))
    # A tiny mu goes through the proximal step and matches Keras' own step:
    # same optimizer, same batches, the term adds nothing measurable.
    tiny, _ = models.train(dict(base, strategy={"name": "fedprox", "mu": 1e-12}), w0, x, y, 10, seed=7)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(tiny, plain))


def test_late_updates_are_damped_even_when_all_are_late():
    """FedBuff-style damping: the sum is divided by the examples (mass), not
    by the damped weights, so a round of late updates takes a smaller step.
    Two updates of 2 examples each, deltas 1 and 3, both damped by 0.5:
    (0.5*2*1 + 0.5*2*3) / (2 + 2) = 1.0, not the undamped mean 2.0."""
    s = get_strategy("fedavg")
    s.begin([((1,), np.float32)])
    s.add([np.array([1.0], np.float32)], 2 * 0.5, mass=2)
    s.add([np.array([3.0], np.float32)], 2 * 0.5, mass=2)
    new, _ = s.finish([np.array([10.0], np.float32)])
    assert new[0][0] == pytest.approx(11.0)
    assert s.shares() == pytest.approx([0.25, 0.25])
