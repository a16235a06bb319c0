"""Provider.call: how a blocking call (init, aggregation, combiners) waits
for its outcome. A fake clock and sleep, no platform."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import pytest

from fedkeeper.providers import base
from fedkeeper.providers.base import ErrorClass, Invocation, Outcome, Provider, ProviderContext, poll_delay


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class _LandsAt(Provider):
    """An invocation whose outcome the platform shows from `lands_at` on."""
    platform = "fake"

    def __init__(self, clock: _Clock, lands_at: float):
        super().__init__("c", None, ProviderContext(state_dir=Path("unused")))
        self.clock, self.lands_at, self.looks = clock, lands_at, 0

    def deploy(self, spec, artifact):
        raise NotImplementedError

    def remove(self, name: str) -> bool:
        return False

    def exists(self, name: str) -> bool:
        return True

    def invoke(self, name: str, payload: dict[str, Any]) -> Invocation:
        return Invocation(function=name, platform_id="a1", submitted_at=0.0)

    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        self.looks += 1
        if self.clock.now >= self.lands_at:
            return [Outcome(platform_id="a1", ok=True, result={"x": 1})]
        return []


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    # base's own name for the time module, not the module itself: other
    # threads of the test process keep the real clock
    monkeypatch.setattr(base, "time", SimpleNamespace(monotonic=c.monotonic, sleep=c.sleep, time=time.time))
    return c


@pytest.mark.parametrize("lands_at", [0.28, 2.0, 30.0, 299.0])
def test_an_outcome_is_seen_soon_after_it_lands_in_few_looks(clock, lands_at):
    p = _LandsAt(clock, lands_at)
    out = p.call("fl_server_aggregator", {}, timeout_s=600)
    assert out.ok and out.result == {"x": 1}
    # seen within a tenth of the wait (or one poll_s), and a second at most, of landing
    assert clock.now - lands_at <= min(1.0, max(0.05, 0.1 * lands_at)) + 1e-9
    # 10 poll_s steps to 0.5 s, about 31 steps of 10% to 10 s, then one a second
    assert p.looks <= 10 + 32 + max(0.0, lands_at - 10) + 1


def test_the_wait_ends_at_the_timeout_as_a_timeout(clock):
    p = _LandsAt(clock, float("inf"))
    out = p.call("fl_server_init", {}, timeout_s=5)
    assert not out.ok and out.error_class == ErrorClass.TIMEOUT and out.platform_id == "a1"
    assert clock.now == pytest.approx(5.0)    # the last sleep is cut to the deadline


def test_an_outcome_landing_at_the_deadline_is_seen(clock):
    p = _LandsAt(clock, 5.0)
    out = p.call("fl_server_init", {}, timeout_s=5)
    assert out.ok and clock.now == pytest.approx(5.0)


def test_poll_delay_bounds():
    assert poll_delay(0.0, 0.05) == 0.05
    assert poll_delay(3.0, 0.05) == pytest.approx(0.3)
    assert poll_delay(1e6, 0.05) == base.POLL_MAX_S
    assert poll_delay(0.0, 0.01) == 0.01
