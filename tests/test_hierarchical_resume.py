"""A session keeps the aggregation it started with: the session spec
records training.aggregation, and --resume with another setting is
refused with one line naming both, before anything is invoked."""
from __future__ import annotations

import pytest

from fedkeeper.keeper import Keeper, SessionError, SessionInterrupted
from fedkeeper.runtime import Runtime
from keeper_fakes import FakeClock, FakeProvider, fake_config, fake_keeper


@pytest.fixture(autouse=True)
def _dirs(isolated_dirs):
    return isolated_dirs


def _interrupted(tmp_path):
    keeper, store, _, _ = fake_keeper(tmp_path, rounds=3, clients=4, per_round=4)

    def interrupt(kind, data):
        if kind == "round" and data["report"].round == 0:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1")
    return store


def _keeper_on(tmp_path, store, training):
    folder = tmp_path / "other"
    folder.mkdir()
    rt = Runtime.open(fake_config(folder, rounds=3, clients=4, per_round=4, training=training), need_store=False)
    rt.store = store
    clock = FakeClock()
    provider = FakeProvider("c1", store, clock)
    rt.providers["c1"] = provider
    rt.deploy = lambda placements, on_done=None, max_workers=8: []
    return Keeper(rt, clock=clock, sleep=clock.sleep), provider


def test_resuming_with_another_aggregation_is_refused_in_one_line(tmp_path):
    store = _interrupted(tmp_path)
    assert store.session("s1")["spec"]["aggregation"] == "flat"
    rounds_before = store.rounds("s1")
    keeper, provider = _keeper_on(tmp_path, store, "aggregation: hierarchical\n")
    with pytest.raises(SessionError) as info:
        keeper.start(resume="s1", deploy=False)
    assert str(info.value) == ("session s1 was started with training.aggregation: flat, the config now says "
                               "hierarchical; resume it with the config it started with")
    assert store.rounds("s1") == rounds_before and provider.invoked == []


def test_resuming_with_the_same_aggregation_goes_on(tmp_path):
    store = _interrupted(tmp_path)
    keeper, _ = _keeper_on(tmp_path, store, "aggregation: flat\n")
    assert keeper.start(resume="s1", deploy=False).state == "finished"
