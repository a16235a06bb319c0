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
update read while the current one is added."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from flcommon import store
from flcommon.context import database, global_model, ids, session_spec
from flcommon.entry import BadRequest, require
from flcommon.partials import PARTIALS, PartialSum, write_partial
from flcommon.update_stream import aggregate

MAX_CLUSTER_NAME = 200


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    return {"round": doc["round"], "cluster": doc["cluster"], "combined": len(doc.get("clients", [])),
            "rejected_count": len(doc.get("rejected", [])), "num_examples": doc.get("num_examples", 0)}


def cluster_clients(db, session: str, rnd: int, cluster: str) -> list[str]:
    """The clients of `cluster` listed for round `rnd`'s aggregation, in
    the round's order, each once."""
    doc = db[store.SESSIONS].find_one({"_id": session}, {"clusters": 1})
    if doc is None:
        raise BadRequest(f"no session {session!r} in the store")
    clusters = doc.get("clusters")
    if not isinstance(clusters, dict):
        raise BadRequest(f"session {session} records no cluster for its clients")
    rdoc = db[store.ROUNDS].find_one({"session": session, "round": rnd}, {"included": 1})
    included = (rdoc or {}).get("included")
    if not isinstance(included, list):
        raise BadRequest(f"round {rnd} of session {session} lists no clients for aggregation yet")
    return [c for c in dict.fromkeys(included) if isinstance(c, str) and clusters.get(c) == cluster]


def combine(db, session: str, rnd: int, cluster: str, clients: list[str], weights: list[np.ndarray],
            exponent: float) -> dict[str, Any]:
    """Stream `clients`' round-`rnd` updates into one partial and store it;
    returns the partial's document, or {"error": ...} when none is valid."""
    t0 = time.perf_counter()
    partial = PartialSum()
    accepted, rejected = aggregate(db, session, rnd, [(c, rnd) for c in clients], weights, partial, exponent,
                                   use_partials=False)
    for r in rejected:
        if r.pop("mark"):
            db[store.UPDATES].update_one({"session": session, "round": r["round"], "client": r["client"],
                                          "status": {"$ne": "accepted"}},
                                         {"$set": {"status": "rejected", "reason": r["reason"]}})
    if not accepted:
        return {"error": f"round {rnd}: cluster {cluster} has no valid update to combine",
                "rejected_count": len(rejected)}
    return write_partial(db, session, rnd, cluster, partial, accepted, rejected, time.perf_counter() - t0)


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
    clients = cluster_clients(db, session, rnd, cluster)
    if not clients:
        return {"error": f"round {rnd}: no client of cluster {cluster} is listed for aggregation",
                "rejected_count": 0}
    _, weights = global_model(db, session, rnd)
    doc = combine(db, session, rnd, cluster, clients, weights, float(exponent))
    return doc if "error" in doc else _result(doc)
