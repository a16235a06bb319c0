"""Client selection: `selection: reliability` prefers clients whose
invocations finish, keeps an `exploration` share of picks random, and is
deterministic given the seed and the attempt records; `selection: random`
stays the seeded uniform draw sync rounds always made."""
from __future__ import annotations

import textwrap
from collections import Counter

import numpy as np
import pytest
from bson import ObjectId

from fedkeeper.config import load_config
from fedkeeper.keeper import Keeper, select_clients
from fedkeeper.keeper.selection import reliability_score
from fedkeeper.runtime import Runtime
from flcommon.reliability import client_stats

RELIABLE = [f"client_{i}" for i in range(5)]
UNRELIABLE = [f"client_{i}" for i in range(5, 10)]


def attempt_records(session: str = "s") -> list[dict]:
    """Five attempts per client: the reliable ones all succeed, the
    unreliable ones fail four times out of five (crashes and timeouts)."""
    docs = []
    for i, client in enumerate(RELIABLE + UNRELIABLE):
        for n in range(5):
            if client in RELIABLE or n == 0:
                state, error = "succeeded", None
            else:
                state, error = ("failed", "developer_error") if n % 2 else ("timed_out", "timeout")
            docs.append({"_id": ObjectId(), "session": session, "round": n, "client": client, "attempt": 1,
                         "cluster": "steady" if client in RELIABLE else "flaky", "function": "fl_client",
                         "state": state, "error_class": error, "duration_ms": 800.0 + i,
                         "cold_start": n == 0})
    return docs


def scores_from(docs: list[dict]) -> dict[str, float]:
    stats = client_stats(docs)
    return {c: reliability_score(stats.get(c)) for c in RELIABLE + UNRELIABLE}


def test_without_exploration_the_most_reliable_clients_are_picked():
    scores = scores_from(attempt_records())
    assert min(scores[c] for c in RELIABLE) > max(scores[c] for c in UNRELIABLE)
    for seed in range(20):
        picked, explored = select_clients(RELIABLE + UNRELIABLE, 5, np.random.default_rng(seed), scores, 0.0)
        assert sorted(picked) == sorted(RELIABLE) and explored == []


def test_unreliable_clients_are_picked_less_and_the_exploration_share_is_honoured():
    scores = scores_from(attempt_records())
    k, exploration, draws = 5, 0.4, 400
    picks: Counter = Counter()
    explored_total = 0
    for seed in range(draws):
        picked, explored = select_clients(RELIABLE + UNRELIABLE, k, np.random.default_rng(seed), scores,
                                          exploration)
        assert len(picked) == len(set(picked)) == k
        # exploration * k is whole here: exactly that many random picks, the
        # others the best-scored clients.
        assert len(explored) == round(exploration * k)
        assert set(picked) - set(explored) <= set(RELIABLE)
        picks.update(picked)
        explored_total += len(explored)
    assert explored_total / (draws * k) == exploration
    assert min(picks[c] for c in RELIABLE) > max(picks[c] for c in UNRELIABLE)
    # Exploration gives the unreliable clients real chances to show they recovered.
    assert min(picks[c] for c in UNRELIABLE) > 0


def test_a_fractional_exploration_share_is_honoured_on_average():
    scores = scores_from(attempt_records())
    k, exploration, draws = 4, 0.3, 2000     # 1.2 random picks per selection
    explored = [len(select_clients(RELIABLE + UNRELIABLE, k, np.random.default_rng(s), scores,
                                   exploration)[1]) for s in range(draws)]
    assert set(explored) == {1, 2}
    assert abs(np.mean(explored) / k - exploration) < 0.02


def test_selection_is_deterministic_given_seed_and_records():
    scores = scores_from(attempt_records())
    runs = [select_clients(RELIABLE + UNRELIABLE, 5, np.random.default_rng([7, 3, 1]), scores, 0.4)
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    different = {tuple(select_clients(RELIABLE + UNRELIABLE, 5, np.random.default_rng(s), scores, 0.4)[0])
                 for s in range(20)}
    assert len(different) > 1


@pytest.fixture
def make_keeper(tmp_path, store, mongo_url, isolated_dirs):
    """Keepers on the test's store for a given selection setting; no
    cluster is contacted (selection reads only the store)."""
    runtimes = []

    def make(selection: str, exploration: float) -> Keeper:
        cfg = tmp_path / f"cfg-{len(runtimes)}.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            name: selection
            providers:
              openwhisk:
                steady: {{kind: local}}
                flaky: {{kind: local}}
            scenarios:
              federated_learning:
                clients_info:
                  total_num_clients: 10
                  num_clients_per_round: 4
                  clusters: {{steady: 5, flaky: 5}}
                mongo_config: {{url: "{mongo_url}", db: {store.db.name}}}
                training: {{seed: 11, selection: {selection}, exploration: {exploration}}}
            """))
        rt = Runtime.open(load_config(cfg))
        runtimes.append(rt)
        return Keeper(rt)

    yield make
    for rt in runtimes:
        rt.close()


def test_keeper_selects_from_the_sessions_own_attempt_records(store, make_keeper):
    # Records of this session and, with the opposite picture, of another
    # session: only the session's own records count.
    store.insert_attempts(attempt_records("mine"))
    other = attempt_records("other")
    for d in other:
        d["state"] = "failed" if d["client"] in RELIABLE else "succeeded"
    store.insert_attempts(other)
    greedy = make_keeper("reliability", 0.0)
    for rnd in range(5):
        picked = greedy.selection.select("mine", rnd)
        assert len(picked) == 4 and set(picked) <= set(RELIABLE)
    # With an exploration share of 0.5, two of four picks are random: over
    # rounds the unreliable clients are picked, but less than the reliable.
    exploring = make_keeper("reliability", 0.5)
    counts = Counter(c for rnd in range(60) for c in exploring.selection.select("mine", rnd))
    assert sum(counts[c] for c in UNRELIABLE) > 0
    assert sum(counts[c] for c in RELIABLE) > 2 * sum(counts[c] for c in UNRELIABLE)
    # The same seed, round and records give the same clients.
    again = make_keeper("reliability", 0.5)
    assert [again.selection.select("mine", r) for r in range(10)] == [exploring.selection.select("mine", r) for r in range(10)]
    # Only candidates are picked (clients busy elsewhere are left out in
    # semi_async and async), the reliable ones first.
    candidates = UNRELIABLE[:3] + RELIABLE[:2]
    picked = greedy.selection.select("mine", 0, candidates=candidates)
    assert len(picked) == 4 and set(RELIABLE[:2]) <= set(picked) <= set(candidates)


def test_clients_never_tried_inherit_their_clusters_record(store, make_keeper):
    # Only two clients of each cluster have records; the others were never
    # invoked. The clean cluster's untried clients rank above every client
    # of the crashing cluster, tried or not.
    tried = {"client_0", "client_1", "client_5", "client_6"}
    store.insert_attempts([d for d in attempt_records("mine") if d["client"] in tried])
    keeper = make_keeper("reliability", 0.0)
    scores = keeper.selection.policy.scores("mine", 0)
    assert min(scores[c] for c in RELIABLE) > max(scores[c] for c in UNRELIABLE)
    assert scores["client_2"] < scores["client_0"]      # its own record still counts most
    for rnd in range(10):
        picked = keeper.selection.select("mine", rnd)
        assert {"client_0", "client_1"} <= set(picked) <= set(RELIABLE)


def test_random_selection_ignores_records_and_keeps_the_seeded_draw(store, make_keeper):
    store.insert_attempts(attempt_records("mine"))
    keeper = make_keeper("random", 0.2)
    clients = RELIABLE + UNRELIABLE
    for rnd in range(5):
        expected = sorted(np.random.default_rng([11, rnd]).choice(clients, size=4, replace=False).tolist(),
                          key=lambda c: int(c.split("_")[1]))
        assert keeper.selection.select("mine", rnd) == expected


def test_scores_are_read_once_per_round(store, make_keeper):
    """async selects after every completion: the records are read once per
    round, and the next round sees what arrived meanwhile."""
    keeper = make_keeper("reliability", 0.0)
    before = keeper.selection.policy.scores("mine", 0)
    store.insert_attempts(attempt_records("mine"))
    assert keeper.selection.policy.scores("mine", 0) == before
    after = keeper.selection.policy.scores("mine", 1)
    assert min(after[c] for c in RELIABLE) > max(after[c] for c in UNRELIABLE)


def test_a_new_selection_policy_plugs_in_by_name():
    from types import SimpleNamespace

    from fedkeeper.keeper.selection import POLICIES, SelectionPolicy, Selector, make_policy, register

    @register
    class LowestIndex(SelectionPolicy):
        name = "lowest_index_test"

        def pick(self, session, rnd, candidates, k, seed):
            return candidates[:k]

    try:
        clients = {f"client_{i}": "a" for i in (3, 1, 2, 0)}
        selector = Selector(make_policy("lowest_index_test", SimpleNamespace(seed=0), clients, None), 2)
        assert selector.select("s", 0) == ["client_0", "client_1"]
        assert selector.select("s", 0, candidates=["client_3", "client_2"], k=1) == ["client_2"]
    finally:
        POLICIES.pop("lowest_index_test")
    with pytest.raises(ValueError, match="no selection policy 'nope'"):
        make_policy("nope", SimpleNamespace(seed=0), {}, None)


def test_attempts_the_keeper_left_unsent_or_closed_as_stray_say_nothing_about_their_client():
    docs = attempt_records()
    one = [d for d in docs if d["client"] == "client_0"]
    before = client_stats(docs)["client_0"]
    for extra in ({"unsent": True}, {"stray": True}):
        docs.append({**one[0], "_id": ObjectId(), "attempt": 2, "state": "abandoned", **extra})
    after = client_stats(docs)["client_0"]
    assert after == before and after["success_rate"] == 1.0
    docs.append({**one[0], "_id": ObjectId(), "attempt": 3, "state": "abandoned"})   # a deadline's: it counts
    assert client_stats(docs)["client_0"]["attempts"] == before["attempts"] + 1
