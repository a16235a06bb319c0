"""Running marks held for a while (fedkeeper/keeper/running_marks.py): an
attempt that ends soon is written twice, one still running gets its mark,
and an interrupted keeper writes the marks it held."""
from __future__ import annotations

from fedkeeper.keeper.running_marks import RunningMarks
from keeper_fakes import FakeClock, fake_keeper
from test_keeper_session import interrupted_with_four_running


def test_a_mark_is_due_after_its_hold_in_the_order_held():
    clock = FakeClock(100.0)
    marks = RunningMarks(clock, after_s=2.0)
    marks.hold("a", "s1", {"state": "running", "platform_id": "p-a"})
    clock.t = 101.0
    marks.hold("b", "s2", {"state": "running", "platform_id": "p-b"})
    assert marks.due() == []
    clock.t = 102.0
    assert marks.due() == [("a", "s1", {"state": "running", "platform_id": "p-a"})]
    assert len(marks) == 1 and marks.sessions == {"s1"}
    assert marks.due(everything=True) == [("b", "s2", {"state": "running", "platform_id": "p-b"})]
    assert len(marks) == 0 and marks.sessions == {"s1", "s2"}


def test_a_change_carries_the_mark_it_supersedes_held_or_written_and_its_own_fields_win():
    clock = FakeClock(100.0)
    marks = RunningMarks(clock, after_s=2.0)
    marks.hold("a", "s", {"state": "running", "platform_id": "p-a", "submitted": 100.0})
    marks.hold("b", "s", {"state": "running", "platform_id": "p-b", "submitted": 100.5})
    out = marks.with_changes([("a", {"state": "succeeded", "platform_id": "p-a2", "finished": 101.0}),
                              ("c", {"state": "failed"})])
    assert out == [("a", {"platform_id": "p-a2", "submitted": 100.0, "state": "succeeded", "finished": 101.0}),
                   ("c", {"state": "failed"})]
    clock.t = 103.0
    assert [m[0] for m in marks.due()] == ["b"]      # written in a batch: b is still running
    assert marks.with_changes([("b", {"state": "succeeded"})]) == [
        ("b", {"platform_id": "p-b", "submitted": 100.5, "state": "succeeded"})]
    assert marks.with_changes([("b", {"state": "failed"})]) == [("b", {"state": "failed"})]   # done with


def recording(store, clock):
    """The states written to each attempt document, with when, in order."""
    written: dict = {}
    update = store.update_attempts

    def update_attempts(changes):
        changes = list(changes)
        for doc_id, fields in changes:
            written.setdefault(doc_id, []).append((fields.get("state"), clock()))
        update(changes)
    store.update_attempts = update_attempts
    return written


def client_docs(store):
    return [a for a in store.invocations.values() if a["function"] == "fl_client"]


def test_attempts_that_end_within_the_hold_are_written_twice_with_their_platform_id(tmp_path):
    keeper, store, provider, clock = fake_keeper(tmp_path, rounds=2)
    written = recording(store, clock)
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    docs = client_docs(store)
    assert len(docs) == 8
    for a in docs:
        # the insert (submitting), then the outcome: no running mark between
        assert [state for state, _ in written[a["_id"]]] == ["succeeded"], a
        assert a["platform_id"].startswith("act-") and a["submitted"] <= a["finished"]


def test_an_attempt_still_running_after_the_hold_has_its_mark_written_in_a_batch(tmp_path):
    def behave(fn, p, n):
        return ("after", 10.0) if fn == "fl_client" else "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1)
    written = recording(store, clock)
    batches = []
    insert = store.insert_running_marks

    def insert_running_marks(sid, marks):
        batches.append((clock(), sid, [i for i, _ in marks]))
        insert(sid, marks)
    store.insert_running_marks = insert_running_marks
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    hold = keeper.dispatcher.running_marks.after_s
    docs = client_docs(store)
    # one batch for the four clients, written once their hold had passed
    assert [(sid, sorted(ids)) for _, sid, ids in batches] == [("s1", sorted(a["_id"] for a in docs))]
    assert all(a["submitted"] + hold <= batches[0][0] < a["submitted"] + hold + 0.5 for a in docs)
    for a in docs:
        # the attempt document itself: the insert, then the outcome only
        assert [s for s, _ in written[a["_id"]]] == ["succeeded"], a
        assert a["state"] == "succeeded" and a["platform_id"].startswith("act-")
    assert store.mark_batches == []   # dropped when the session ended


def test_an_interrupted_keeper_writes_the_marks_it_held(tmp_path):
    # interrupted at the first tick with four clients running: their
    # attempts are left `running` (the helper asserts it) ...
    keeper, store, provider, clock, running = interrupted_with_four_running(tmp_path, "hang")
    for a in running:
        # ... though interrupted well within the hold, while the marks were still held
        assert clock() - a["submitted"] < keeper.dispatcher.running_marks.after_s
        assert a["platform_id"].startswith("act-")


def test_marks_taken_from_several_threads_are_each_written_once():
    """Combiners write their attempts from threads of their own through
    the same dispatcher: every due mark goes to exactly one writer."""
    import sys
    import threading
    marks = RunningMarks(lambda: 0.0, after_s=0.0)
    taken: list[list] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(mine: list) -> None:
        try:
            while not done.is_set() or len(marks):
                mine += [doc_id for doc_id, _, _ in marks.due()]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # threads interleave between any two bytecodes
    try:
        threads = [threading.Thread(target=writer, args=(t,)) for t in taken]
        for t in threads:
            t.start()
        for i in range(20_000):
            marks.hold(i, "s", {"state": "running"})
        done.set()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert sorted(i for mine in taken for i in mine) == list(range(20_000))
