"""A combiner that follows its round (fl_combiner with follow_s): it folds
its cluster's updates as they arrive, so that when the round closes only
the updates it has not folded yet are read; the model is the flat one
within float tolerance, an update the round does not list is never
counted (the partial starts again without it), and a round that outlasts
follow_s leaves nothing stored. The clock and the pauses are injected."""
from __future__ import annotations

import numpy as np

from flcommon import store as fs
from flcommon.partials import PARTIALS
from test_aggregator import _model, _put_update
from test_functions import call, load
from test_hierarchical import CLIENTS, CLUSTERS, _close, _sessions

ALPHA = CLUSTERS["alpha"]


class Round:
    """Clients delivering one by one, at each pause the combiner takes;
    the round closes (its clients listed) after the last one."""

    def __init__(self, db, sids, updates, included):
        self.db, self.sids, self.updates, self.included = db, sids, list(updates), included
        self.now = 0.0
        self.pauses = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.pauses += 1
        if self.updates:
            client, arrays = self.updates.pop(0)
            for sid in self.sids:
                _put_update(self.db, sid, 0, client, [a.copy() for a in arrays])
        elif self.included is not None:
            _close(self.db, self.sids[-1], 0, self.included)


def _updates(db, sid, clients, seed=7):
    base = _model(db, sid, 0)
    rng = np.random.default_rng(seed)
    return [(c, [(w + rng.standard_normal(w.shape) * 0.1).astype(w.dtype) for w in base]) for c in clients]


def _follow(db, sid, rnd_, cluster="alpha", follow_s=60.0, folds=None, selected=CLIENTS):
    # What the keeper writes as the round starts: the clients it selected.
    db[fs.ROUNDS].update_one({"session": sid, "round": 0}, {"$set": {"selected": selected, "state": "running"}},
                             upsert=True)
    mod = load("fl_combiner")
    if folds is not None:   # what each fold reads, in order
        real = mod.aggregate

        def recording(db_, session, rnd, wanted, *a, **kw):
            folds.append([c for c, _ in wanted])
            return real(db_, session, rnd, wanted, *a, **kw)
        mod.aggregate = recording
    try:
        _, weights = mod.global_model(db, sid, 0)
        return mod.follow(db, sid, 0, cluster, weights, 0.5, follow_s, clock=rnd_.clock, sleep=rnd_.sleep)
    finally:
        if folds is not None:
            mod.aggregate = real


def test_a_following_combiner_folds_updates_as_they_arrive_and_equals_flat(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    rnd_ = Round(db, (flat, hier), _updates(db, flat, CLIENTS), CLIENTS)
    folds: list[list[str]] = []
    doc = _follow(db, hier, rnd_, folds=folds)
    # Alpha's three updates were folded as each came; none was left for the close.
    assert [c for fold in folds for c in fold] == ALPHA and all(len(f) <= 1 for f in folds)
    assert folds[-1] == [] and [c["client"] for c in doc["clients"]] == ALPHA
    beta = call("fl_combiner", db, session=hier, round=0, cluster_name="beta")
    assert beta["combined"] == 3
    out_flat = call("fl_server_aggregator", db, session=flat, round=0, clients=CLIENTS)
    out_hier = call("fl_server_aggregator", db, session=hier, round=0, clients=CLIENTS)
    assert out_flat["accepted"] == out_hier["accepted"] == 6
    assert all(p["used"] for p in db[PARTIALS].find({"session": hier}))
    w_flat, w_hier = _model(db, flat, 1), _model(db, hier, 1)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_flat, w_hier)) <= 1e-6


def test_an_update_folded_that_the_round_does_not_list_is_not_counted(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    listed = [c for c in CLIENTS if c != "client_1"]   # client_1 delivered after the deadline
    rnd_ = Round(db, (flat, hier), _updates(db, flat, CLIENTS), listed)
    folds: list[list[str]] = []
    doc = _follow(db, hier, rnd_, folds=folds)
    assert "client_1" in [c for fold in folds for c in fold]   # folded while the round ran ...
    assert folds[-1] == ["client_0", "client_2"]                # ... so the partial started again
    assert [c["client"] for c in doc["clients"]] == ["client_0", "client_2"]
    call("fl_combiner", db, session=hier, round=0, cluster_name="beta")
    call("fl_server_aggregator", db, session=flat, round=0, clients=listed)
    out = call("fl_server_aggregator", db, session=hier, round=0, clients=listed)
    assert out["accepted"] == 5
    by = {c["client"]: c.get("combined_by") for c in db[fs.MODELS].find_one({"session": hier, "round": 1})
          ["contributions"]}
    assert "client_1" not in by and by["client_0"] == by["client_2"] == "alpha"
    w_flat, w_hier = _model(db, flat, 1), _model(db, hier, 1)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_flat, w_hier)) <= 1e-6


def test_a_round_that_outlasts_follow_s_leaves_nothing_stored(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    rnd_ = Round(db, (hier,), _updates(db, flat, ALPHA[:1]), None)   # the round never closes
    assert _follow(db, hier, rnd_, follow_s=5.0) is None
    assert rnd_.now >= 5.0 and db[PARTIALS].count_documents({}) == 0
    # Closed later, the combiner run again (without follow_s) counts it.
    _close(db, hier, 0, ALPHA[:1])
    assert call("fl_combiner", db, session=hier, round=0, cluster_name="alpha")["combined"] == 1


def test_a_following_combiner_stops_on_a_failed_round_and_checks_follow_s(fn_db):
    db = fn_db
    _, hier = _sessions(db, "fedavg")
    db[fs.ROUNDS].insert_one({"session": hier, "round": 0, "state": "failed", "included": ALPHA[:1]})
    out = call("fl_combiner", db, session=hier, round=0, cluster_name="alpha", follow_s=30)
    assert "failed: there is nothing to combine" in out["error"]
    for bad in (0, -1, True, 1e9, "5"):
        out = call("fl_combiner", db, session=hier, round=0, cluster_name="alpha", follow_s=bad)
        assert "follow_s must be a number of seconds" in out["error"]


def test_a_refused_update_the_round_does_not_list_needs_no_new_start(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    listed = [c for c in CLIENTS if c != "client_1"]
    updates = _updates(db, flat, CLIENTS)
    updates[[c for c, _ in updates].index("client_1")] = ("client_1", [np.zeros(3, np.float32)])   # wrong shape
    rnd_ = Round(db, (hier,), updates, listed)
    folds: list[list[str]] = []
    doc = _follow(db, hier, rnd_, folds=folds)
    assert [c for fold in folds for c in fold] == ALPHA and folds[-1] == []   # nothing read twice
    assert [c["client"] for c in doc["clients"]] == ["client_0", "client_2"]
    assert db[fs.UPDATES].find_one({"session": hier, "client": "client_1"})["status"] == "rejected"


def test_a_following_combiner_looks_only_for_the_rounds_selected_clients_of_its_cluster(fn_db):
    db = fn_db
    flat, hier = _sessions(db, "fedavg")
    selected = ["client_0", "client_2", "client_3"]   # client_1 is not in this round
    rnd_ = Round(db, (hier,), _updates(db, flat, CLIENTS), selected)   # ... yet an update of it is stored
    folds: list[list[str]] = []
    doc = _follow(db, hier, rnd_, folds=folds, selected=selected)
    assert [c for fold in folds for c in fold] == ["client_0", "client_2"]
    assert [c["client"] for c in doc["clients"]] == ["client_0", "client_2"]
