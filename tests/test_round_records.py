"""A round's closing record from the attempts the keeper wrote
(fedkeeper/keeper/round_records.py): the same documents, in the same
order, as the store holds, without reading them back; a resumed round's
are read from the store."""
from __future__ import annotations

from fedkeeper.keeper.round_records import RoundRecords
from fedkeeper.providers import ErrorClass, Outcome
from keeper_fakes import fake_keeper
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
