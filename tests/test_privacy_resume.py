"""A central-DP session interrupted and resumed (`--resume`) on the keeper's
fakes (tests/keeper_fakes.py, no TensorFlow): epsilon after every round,
before and after the interruption, is what dp-accounting gives for an
uninterrupted session of the same rounds, computed here on its own; and a
session is not resumed with privacy settings other than those it started
with (only target_epsilon, where training stops, may change)."""
from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp

from fedkeeper.keeper import Keeper, SessionError, SessionInterrupted
from fedkeeper.runtime import Runtime
from keeper_fakes import FakeClock, FakeProvider, fake_config, fake_keeper

DELTA = 1e-5
Z, PER_ROUND, TOTAL, ROUNDS = 1.1, 4, 8, 4
PRIVACY = f"""\
    privacy: {{mode: central, noise_multiplier: {Z}, clip_norm: 1.0, delta: {DELTA}, accountant: rdp}}
    """


def keeper_on(tmp_path, store, training):
    """A keeper for a config with `training`, on an existing store (a
    resume with another config)."""
    folder = tmp_path / "other"
    folder.mkdir()
    cfg = fake_config(folder, rounds=ROUNDS, clients=TOTAL, per_round=PER_ROUND, training=training)
    rt = Runtime.open(cfg, need_store=False)
    rt.store = store
    clock = FakeClock()
    provider = FakeProvider("c1", store, clock)
    rt.providers["c1"] = provider
    rt.deploy = lambda placements, on_done=None, max_workers=8: []
    return Keeper(rt, clock=clock, sleep=clock.sleep), provider


def independent_epsilon(rounds: int) -> float:
    """dp-accounting on its own: T Poisson-sampled Gaussian mechanisms."""
    q = PER_ROUND / TOTAL
    acc = rdp.RdpAccountant(orders=list(range(2, 65)) + [80, 96, 128, 192, 256, 384, 512])
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(Z)), rounds))
    return acc.get_epsilon(DELTA)


def interrupted_session(tmp_path, after_round: int = 1):
    """A session stopped by Ctrl-C once round `after_round` (store numbering) is done."""
    keeper, store, provider, clock = fake_keeper(tmp_path, rounds=ROUNDS, clients=TOTAL, per_round=PER_ROUND,
                                                 training=PRIVACY)

    def interrupt(kind, data):
        if kind == "round" and data["report"].round == after_round:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1")
    return keeper, store


def test_a_resumed_central_dp_session_spends_what_an_uninterrupted_one_does(tmp_path):
    keeper, store = interrupted_session(tmp_path, after_round=1)
    before = [r["epsilon"] for r in store.rounds("s1") if r.get("state") == "done"]
    assert len(before) == 2
    keeper.progress = lambda kind, data: None
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds_this_run == ROUNDS - 2
    stored = [r["epsilon"] for r in store.rounds("s1")]
    expected = [independent_epsilon(r) for r in range(1, ROUNDS + 1)]
    assert stored[:2] == before
    assert stored == pytest.approx(expected, rel=1e-9)
    assert [r.epsilon for r in summary.rounds] == pytest.approx(expected, rel=1e-9)

    # The same rounds without the interruption spend the same epsilon, round by round.
    fresh = tmp_path / "uninterrupted"
    fresh.mkdir()
    whole, whole_store, _, _ = fake_keeper(fresh, rounds=ROUNDS, clients=TOTAL, per_round=PER_ROUND,
                                           training=PRIVACY)
    assert whole.start(session_id="s2").state == "finished"
    assert [r["epsilon"] for r in whole_store.rounds("s2")] == stored


@pytest.mark.parametrize("changed, named", [
    (PRIVACY.replace(f"noise_multiplier: {Z}", "noise_multiplier: 2.0"), "noise_multiplier: 2.0"),
    (PRIVACY.replace(f"delta: {DELTA}", "delta: 1e-06"), "delta: 1e-06"),
    (PRIVACY.replace("mode: central", "mode: local"), "mode: local"),
    (PRIVACY.replace("accountant: rdp", "accountant: pld"), "accountant: pld"),
    ("", "the config now says off"),
])
def test_resume_is_refused_when_the_privacy_settings_changed(tmp_path, changed, named):
    _, store = interrupted_session(tmp_path)
    rounds_before = store.rounds("s1")
    keeper, provider = keeper_on(tmp_path, store, changed)
    with pytest.raises(SessionError) as info:
        keeper.start(resume="s1", deploy=False)
    message = str(info.value)
    assert message.startswith("session s1 was started with training.privacy {")
    assert named in message and "resume it with the config it started with" in message
    assert store.rounds("s1") == rounds_before and provider.invoked == []


def test_a_changed_target_epsilon_is_no_reason_to_refuse(tmp_path):
    _, store = interrupted_session(tmp_path)
    keeper, _ = keeper_on(tmp_path, store, PRIVACY.replace("accountant: rdp", "accountant: rdp, target_epsilon: 50"))
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished"
    assert [r["epsilon"] for r in store.rounds("s1")] == pytest.approx(
        [independent_epsilon(r) for r in range(1, ROUNDS + 1)], rel=1e-9)
