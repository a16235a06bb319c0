"""fl_combiner: the first level of hierarchical aggregation
(training.aggregation: hierarchical). Runs on a client cluster and turns
that cluster's round-R updates into one partial aggregate: the weighted mean
delta of its clients, their total weight and examples, stored with the list
of the clients it counted (flcommon.partials). fl_server_aggregator then adds
the partials instead of reading every update.

Payload: {session, round: R, cluster_name: the cluster, clients: [ids of the cluster's
clients that delivered their round-R update]}.

Updates are streamed and checked exactly as the aggregator does
(flcommon.update_stream): one accumulator of the model's size, the next
update read while the current one is added."""
from __future__ import annotations

import time
from typing import Any

from flcommon import store
from flcommon.context import database, global_model, ids, session_spec
from flcommon.entry import BadRequest, require
from flcommon.partials import PARTIALS, PartialSum, write_partial
from flcommon.update_stream import aggregate

MAX_CLUSTER_NAME = 200


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    return {"round": doc["round"], "cluster": doc["cluster"], "combined": len(doc.get("clients", [])),
            "rejected_count": len(doc.get("rejected", [])), "num_examples": doc.get("num_examples", 0)}


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    cluster = require(payload, "cluster_name", str)
    if not 0 < len(cluster) <= MAX_CLUSTER_NAME:
        raise BadRequest(f"cluster_name must be a name of 1 to {MAX_CLUSTER_NAME} characters")
    clients = require(payload, "clients", list)
    if not clients or not all(isinstance(c, str) for c in clients):
        raise BadRequest("clients must list the ids of the cluster's clients that delivered")
    wanted = list(dict.fromkeys((c, rnd) for c in clients))
    db = database(bound)
    done = db[PARTIALS].find_one({"session": session, "round": rnd, "cluster": cluster})
    if done is not None:  # idempotent: a retried combiner changes nothing
        return _result(done)
    spec = session_spec(db, session)
    exponent = spec.get("staleness_exponent", 0.5)
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not exponent >= 0:
        raise BadRequest(f"session staleness_exponent must be a non-negative number, got {exponent!r}")
    t0 = time.perf_counter()
    _, weights = global_model(db, session, rnd)
    partial = PartialSum()
    accepted, rejected = aggregate(db, session, rnd, wanted, weights, partial, exponent, use_partials=False)
    del weights
    for r in rejected:
        if r.pop("mark"):
            db[store.UPDATES].update_one({"session": session, "round": r["round"], "client": r["client"],
                                          "status": {"$ne": "accepted"}},
                                         {"$set": {"status": "rejected", "reason": r["reason"]}})
    if not accepted:
        return {"error": f"round {rnd}: cluster {cluster} has no valid update to combine",
                "rejected_count": len(rejected)}
    doc = write_partial(db, session, rnd, cluster, partial, accepted, rejected, time.perf_counter() - t0)
    return _result(doc)
