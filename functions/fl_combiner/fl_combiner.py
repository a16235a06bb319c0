"""fl_combiner: the first level of hierarchical aggregation
(training.aggregation: hierarchical). Runs on a client cluster and turns
that cluster's round-R updates into one partial aggregate: the weighted mean
delta of its clients, their total weight and examples, stored with the list
of the clients it counted (flcommon.partials). fl_server_aggregator then adds
the partials instead of reading every update.

Payload: {session, round: R, cluster_name: the cluster}. Its size does not
grow with the clients: the combiner finds them in the store, as the clients
the keeper listed for round R's aggregation (the round document's
`included`, written before any combiner runs) whose cluster, on the session
document, is this one.

Updates are streamed and checked exactly as the aggregator does
(flcommon.update_stream): one accumulator of the model's size, the next
update read while the current one is added.

With `follow_s` (seconds) the combiner is started while its round still
runs, as FEDn's combiners are: it folds its cluster's round-R updates into
its partial as they arrive, so that when the keeper closes the round (the
round document gets its `included` list) only the updates not folded yet
are left to read. An update folded that the round then does not list (one
that came after the deadline) cannot be taken out of a float sum exactly:
the partial is then started again from the listed updates alone. A round
that outlasts `follow_s` ends the call with nothing stored, and the keeper
runs the combiner again once the round is closed."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pymongo

from flcommon import store
from flcommon.context import database, global_model, ids, session_spec
from flcommon.entry import BadRequest, require
from flcommon.partials import PARTIALS, PartialSum, write_partial
from flcommon.update_stream import aggregate

MAX_CLUSTER_NAME = 200
MAX_FOLLOW_S = 3600.0
POLL_S = (0.05, 0.5)   # between looks for arrivals: the first, and the most once none come


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    return {"round": doc["round"], "cluster": doc["cluster"], "combined": len(doc.get("clients", [])),
            "rejected_count": len(doc.get("rejected", [])), "num_examples": doc.get("num_examples", 0)}


def _clusters(db, session: str) -> dict[str, Any]:
    doc = db[store.SESSIONS].find_one({"_id": session}, {"clusters": 1})
    if doc is None:
        raise BadRequest(f"no session {session!r} in the store")
    clusters = doc.get("clusters")
    if not isinstance(clusters, dict):
        raise BadRequest(f"session {session} records no cluster for its clients")
    return clusters


def _listed(db, session: str, rnd: int, cluster: str, clusters: dict[str, Any]) -> list[str] | None:
    """The clients of `cluster` the keeper listed for round `rnd`'s
    aggregation, in the round's order, each once; None while it lists none."""
    rdoc = db[store.ROUNDS].find_one({"session": session, "round": rnd}, {"included": 1, "state": 1})
    included = (rdoc or {}).get("included")
    if not isinstance(included, list):
        return None
    if rdoc.get("state") == "failed":
        raise BadRequest("the round failed: there is nothing to combine")
    return list(dict.fromkeys(c for c in included if isinstance(c, str) and clusters.get(c) == cluster))


def _selected(db, session: str, rnd: int, cluster: str, clusters: dict[str, Any]) -> list[str]:
    """The clients of `cluster` selected for round `rnd` (the round document
    has them before any follower starts): the only ones whose updates a
    follower looks for, whatever the number of clients the session has."""
    rdoc = db[store.ROUNDS].find_one({"session": session, "round": rnd}, {"selected": 1}) or {}
    selected = rdoc.get("selected")
    if not isinstance(selected, list):
        return []
    return list(dict.fromkeys(c for c in selected if isinstance(c, str) and clusters.get(c) == cluster))


def cluster_clients(db, session: str, rnd: int, cluster: str) -> list[str]:
    """The clients of `cluster` listed for round `rnd`'s aggregation."""
    listed = _listed(db, session, rnd, cluster, _clusters(db, session))
    if listed is None:
        raise BadRequest("the round lists no clients for aggregation yet")
    return listed


def combine(db, session: str, rnd: int, cluster: str, clients: list[str], weights: list[np.ndarray],
            exponent: float) -> dict[str, Any]:
    """Stream `clients`' round-`rnd` updates into one partial and store it;
    returns the partial's document, or {"error": ...} when none is valid."""
    return Following(db, session, rnd, cluster, weights, exponent).finish(clients)


class Following:
    """A partial folded while its round runs: what it counted and refused."""

    def __init__(self, db, session: str, rnd: int, cluster: str, weights: list[np.ndarray], exponent: float):
        self.db, self.session, self.rnd, self.cluster = db, session, rnd, cluster
        self.weights, self.exponent = weights, exponent
        self.restart()

    def restart(self) -> None:
        self.partial = PartialSum()
        self.accepted: list[dict[str, Any]] = []
        self.refused: dict[str, dict[str, Any]] = {}
        self.t0 = time.perf_counter()

    @property
    def counted(self) -> set[str]:
        return {a["client"] for a in self.accepted}

    @property
    def seen(self) -> set[str]:
        return self.counted | set(self.refused)

    def fold(self, clients: list[str]) -> None:
        accepted, rejected = aggregate(self.db, self.session, self.rnd, [(c, self.rnd) for c in clients],
                                       self.weights, self.partial, self.exponent, use_partials=False)
        self.accepted += accepted
        marks = [pymongo.UpdateOne({"session": self.session, "round": r["round"], "client": r["client"],
                                    "status": {"$ne": "accepted"}},
                                   {"$set": {"status": "rejected", "reason": r["reason"]}})
                 for r in rejected if r["mark"]]
        if marks:
            self.db[store.UPDATES].bulk_write(marks, ordered=False)
        for r in rejected:
            self.refused[r["client"]] = r

    def finish(self, listed: list[str]) -> dict[str, Any]:
        """Fold what `listed` names and was not folded yet, and store the partial."""
        # Only a counted update the round does not list forces a new start:
        # a refused one added nothing to the sum.
        if self.counted - set(listed):
            self.restart()
        seen = self.seen
        self.fold([c for c in listed if c not in seen])
        rejected = [{k: v for k, v in self.refused[c].items() if k != "mark"} for c in listed if c in self.refused]
        if not self.accepted:
            return {"error": f"cluster {self.cluster} has no valid update to combine",
                    "rejected_count": len(rejected)}
        return write_partial(self.db, self.session, self.rnd, self.cluster, self.partial, self.accepted, rejected,
                             time.perf_counter() - self.t0)


def follow(db, session: str, rnd: int, cluster: str, weights: list[np.ndarray], exponent: float, follow_s: float,
           clock=time.monotonic, sleep=time.sleep) -> dict[str, Any] | None:
    """Fold the cluster's round-`rnd` updates as they arrive until the round
    lists its clients (then store the partial and return its document) or
    `follow_s` passes (then return None: nothing is stored)."""
    clusters = _clusters(db, session)
    members = _selected(db, session, rnd, cluster, clusters)
    run = Following(db, session, rnd, cluster, weights, exponent)
    until, pause = clock() + follow_s, POLL_S[0]
    while True:
        listed = _listed(db, session, rnd, cluster, clusters)
        if listed is not None:
            # A cluster none of whose clients the round lists has nothing to store, and is no failure.
            return run.finish(listed) if listed else {"round": rnd, "cluster": cluster, "clients": []}
        if clock() >= until:
            return None
        seen = run.seen
        waiting = [c for c in members if c not in seen]
        arrived = sorted(d["client"] for d in store.find_in(
            db[store.UPDATES], {"session": session, "round": rnd, "status": "received"}, "client", waiting,
            {"client": 1}))
        if arrived:
            run.fold(arrived)
            pause = POLL_S[0]
        else:
            sleep(min(pause, max(0.0, until - clock())))
            pause = min(pause * 2, POLL_S[1])


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    cluster = require(payload, "cluster_name", str)
    if not 0 < len(cluster) <= MAX_CLUSTER_NAME:
        raise BadRequest(f"cluster_name must be a name of 1 to {MAX_CLUSTER_NAME} characters")
    db = database(bound)
    done = db[PARTIALS].find_one({"session": session, "round": rnd, "cluster": cluster})
    if done is not None:  # idempotent: a retried combiner changes nothing
        return _result(done)
    spec = session_spec(db, session)
    exponent = spec.get("staleness_exponent", 0.5)
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not exponent >= 0:
        raise BadRequest(f"session staleness_exponent must be a non-negative number, got {exponent!r}")
    follow_s = payload.get("follow_s")
    if follow_s is not None:
        if isinstance(follow_s, bool) or not isinstance(follow_s, (int, float)) or not 0 < follow_s <= MAX_FOLLOW_S:
            raise BadRequest(f"follow_s must be a number of seconds in (0, {MAX_FOLLOW_S:g}]")
        _, weights = global_model(db, session, rnd)
        doc = follow(db, session, rnd, cluster, weights, float(exponent), float(follow_s))
        if doc is None:
            return {"following": "the round did not close in time: nothing stored", "round": rnd,
                    "cluster": cluster}
        return doc if "error" in doc else _result(doc)
    clients = cluster_clients(db, session, rnd, cluster)
    if not clients:
        return {"error": f"no client of cluster {cluster} is listed for aggregation",
                "rejected_count": 0}
    _, weights = global_model(db, session, rnd)
    doc = combine(db, session, rnd, cluster, clients, weights, float(exponent))
    return doc if "error" in doc else _result(doc)
