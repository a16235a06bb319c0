"""The order in which a round's clients are invoked: every cluster starts on
its clients at once, whatever their order in the round."""
from __future__ import annotations

from fedkeeper.keeper.attempts import RUNNING, RetryPolicy, Slot
from fedkeeper.keeper.dispatch import Dispatcher, across_clusters
from fedkeeper.keeper.events import RoundEvents
from keeper_fakes import FakeClock, FakePlatforms, FakeProvider, FakeStore


def test_slots_are_taken_from_each_cluster_in_turn_each_clusters_in_order():
    slots = [Slot(f"client_{i}", c) for i, c in enumerate(["a", "a", "a", "a", "b", "c", "b"])]
    order = [(s.client, s.cluster) for s in across_clusters(slots)]
    assert order == [("client_0", "a"), ("client_4", "b"), ("client_5", "c"),
                     ("client_1", "a"), ("client_6", "b"), ("client_2", "a"), ("client_3", "a")]
    assert across_clusters([]) == []


def _two_clusters(store: FakeStore, clock: FakeClock, log: list[tuple[str, str]]) -> FakePlatforms:
    """Two fake clusters that log every invocation in one list."""
    providers = {c: FakeProvider(c, store, clock) for c in ("c1", "c2")}
    for name, p in providers.items():
        invoke = p.invoke

        def logged(fn, payload, _invoke=invoke, _name=name):
            log.append((_name, payload["client"]))
            return _invoke(fn, payload)
        p.invoke = logged
    return FakePlatforms(providers)


def test_a_round_whose_clients_are_listed_cluster_by_cluster_is_invoked_across_clusters():
    store, clock, log = FakeStore(), FakeClock(), []
    d = Dispatcher(_two_clusters(store, clock, log), store, RetryPolicy(), RoundEvents(), clock=clock,
                   sleep=clock.sleep)
    d.INVOKE_THREADS = 1   # one sender: the log is the order sent
    placement = ["c1"] * 4 + ["c2"] * 2
    table = d.table(Slot(f"client_{i}", c, 0) for i, c in enumerate(placement))
    d.submit("s", 0, table, table.begin(list(table)))
    assert log == [("c1", "client_0"), ("c2", "client_4"), ("c1", "client_1"), ("c2", "client_5"),
                   ("c1", "client_2"), ("c1", "client_3")]
    # Recorded before any invocation, in the round's own order; all running.
    assert [d["client"] for d in store.invocations.values()] == [f"client_{i}" for i in range(6)]
    assert all(s.state == RUNNING for s in table)
    d.close()
