"""A round's closing record from the attempts the keeper wrote
(fedkeeper/keeper/round_records.py): the same documents, in the same
order, as the store holds, without reading them back; a resumed round's
are read from the store."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedkeeper.keeper.attempts import RetryPolicy, Slot
from fedkeeper.keeper.dispatch import Dispatcher
from fedkeeper.keeper.errors import SessionError
from fedkeeper.keeper.events import RoundEvents
from fedkeeper.keeper.round_records import RoundRecords
from fedkeeper.providers import ErrorClass, Outcome
from keeper_fakes import FakeClock, FakePlatforms, FakeStore, fake_keeper
from test_keeper_session import interrupted_with_four_running


def test_only_the_rounds_begun_are_kept_each_until_it_is_taken():
    records = RoundRecords()
    records.begin("s", 1)
    records.inserted([{"_id": i, "session": "s", "round": r, "client": c, "attempt": a, "state": "submitting"}
                      for i, (r, c, a) in enumerate([(1, "client_2", 1), (1, "client_10", 1), (0, "client_1", 1),
                                                     (1, "client_2", 2)])])
    records.changed([(0, {"state": "failed"}), (2, {"state": "succeeded"}), (3, {"state": "succeeded"})])
    assert [(d["client"], d["attempt"], d["state"]) for d in records.take("s", 1)] == [
        ("client_10", 1, "submitting"), ("client_2", 1, "failed"), ("client_2", 2, "succeeded")]
    assert records.take("s", 1) is None and records.take("s", 0) is None
    records.changed([(0, {"state": "hedged"})])   # a straggler of a round already closed: nothing kept


def _round_events(keeper) -> dict[int, list[dict]]:
    """Each round's attempts as its `round` event carries them."""
    seen: dict[int, list[dict]] = {}

    def on_event(kind: str, data: dict) -> None:
        if kind == "round":
            seen[data["report"].round] = data["attempts"]
    keeper.progress = on_event
    return seen


def test_a_rounds_record_is_what_the_store_holds_and_is_not_read_back(tmp_path):
    def crash_first(function, payload, attempt):   # client_1 crashes once a round: a retry on record
        if function == "fl_client" and payload["client"] == "client_1" and attempt == 1:
            return Outcome("", False, ErrorClass.APPLICATION_ERROR, "crashed")
        return "ok"
    keeper, store, _, _ = fake_keeper(tmp_path, crash_first, rounds=2)
    seen = _round_events(keeper)
    asked = []
    read = store.attempts
    store.attempts = lambda sid, rnd=None: asked.append(rnd) or read(sid, rnd)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished" and [r.retries for r in summary.rounds] == [1, 1]
    for rnd in (0, 1):
        assert seen[rnd] == read("s1", rnd)
    assert {a["function"] for a in seen[0]} == {"fl_server_init", "fl_client", "fl_server_aggregator"}
    assert {a["function"] for a in seen[1]} == {"fl_client", "fl_server_aggregator"}
    assert [a["state"] for a in seen[0] if a["client"] == "client_1"] == ["failed", "succeeded"]
    assert 0 not in asked and 1 not in asked   # adopt() asks about no round: a fresh one has none


def test_a_resumed_rounds_record_is_read_from_the_store(tmp_path):
    keeper, store, provider, clock, running = interrupted_with_four_running(tmp_path, ("after", 1.0))
    seen = _round_events(keeper)
    asked = []
    read = store.attempts
    store.attempts = lambda sid, rnd=None: asked.append(rnd) or read(sid, rnd)
    assert keeper.start(resume="s1", deploy=False).state == "finished"
    assert seen[0] == read("s1", 0) and {a["_id"] for a in running} <= {a["_id"] for a in seen[0]}
    assert asked.count(0) == 2   # adopted from the store, and its record read back


def _invoker(store, *, invoked, then_fail=False):
    """fl_invoker as the dispatcher calls it: writes `running` and a platform
    id on the attempts of the clients in `invoked` itself, as the function
    does, then answers (or fails, after invoking them)."""
    def call(cluster, session, rnd, function, **args):
        assert function == "fl_invoker"
        for c in args["calls"]:
            if c["client"] in invoked:
                doc = next(a for a in store.invocations.values()
                           if (a["session"], a["round"], a["client"], a["attempt"]) ==
                           (session, rnd, c["client"], c["attempt"]))
                doc.update(platform_id=f"act-{c['client']}", state="running", via="invoker")
        if then_fail:
            raise SessionError("fl_invoker: the cluster stopped answering")
        return {"failed": [{"client": c["client"], "error": "refused"} for c in args["calls"]
                           if c["client"] not in invoked]}
    return call


@pytest.mark.parametrize("then_fail", [False, True], ids=["answered", "failed after invoking"])
def test_what_fl_invoker_writes_on_the_attempts_reaches_the_rounds_record(then_fail):
    store, clock = FakeStore(), FakeClock()
    # one cluster whose clients fl_invoker invokes: none is invoked directly
    platforms = FakePlatforms({"c1": SimpleNamespace(platform="fake")}, via_invoker=["c1"])
    d = Dispatcher(platforms, store, RetryPolicy(), RoundEvents(), clock=clock, sleep=clock.sleep)
    d.round_records.begin("s", 0)
    d.call = _invoker(store, invoked={"client_0", "client_2"}, then_fail=then_fail)
    table = d.table(Slot(f"client_{i}", "c1", 0) for i in range(3))
    d.submit("s", 0, table, table.begin(list(table)))
    kept = d.round_records.take("s", 0)
    assert kept == store.attempts("s", 0)
    assert [(a["client"], a.get("platform_id")) for a in kept] == [
        ("client_0", "act-client_0"), ("client_1", None), ("client_2", "act-client_2")]
    d.close()
