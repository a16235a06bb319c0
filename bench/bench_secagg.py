"""What secure aggregation adds to a round, against plain FedAvg, on a real
MongoDB-wire-protocol server (the embedded SecantusDB).

    .venv/bin/python bench/bench_secagg.py [--clients 10,30] [--params 100000,1000000] [--dropouts 0,0.2]
                                           [--neighbours full,log]
    .venv/bin/python bench/bench_secagg.py --smoke      # tiny sizes, for the test suite

For each (model size, clients, dropout share) one round runs plain and then
secure once per neighbour graph (`full`: every pair of clients, as Bonawitz
et al.; `log` or a number: SecAgg+'s sparse graph, each client masking with
and sharing among k neighbours), all on the same deltas: plain (each
client stores its float32 update, the aggregator's aggregate() + finish())
and secure (fl_secagg_client's advertise and share
stages through its OpenWhisk entry, each client's masked upload, a share of
the clients dropping after they shared, the unmask stage, the aggregator's
secure_aggregate() + finish()). Reported per round:

  invocations   client invocations (secure: 1 training + 3 stage ones each)
  store KB      bytes written to the store: updates (GridFS chunks) and, for
                secure, the key, share and reveal documents
  client ms     the clients' work besides training, summed over clients:
                plain: storing the update; secure: the three stages,
                quantizing, masking and storing the masked vector
  server ms     the aggregation (secure: unmasking included)
  graph (k)     full, or the k neighbours of each client in SecAgg+'s graph
  masks         mask expansions (a PRG stream of the model's length each):
                the survivors' self and pairwise masks / the server's
                (survivors' self masks, dropouts' pairwise masks); counted,
                so free of the machine's noise
  max |diff|    the secure model against the plain one (quantization error)

Function start-up and network time are not included: on a FaaS platform
each extra invocation also costs its platform overhead (see
bench_invocations.py for that per invocation).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import bson
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "functions"))

from fedkeeper.local.store import EmbeddedMongo  # noqa: E402
from flcommon import store as fs  # noqa: E402
from flcommon.auth import signed  # noqa: E402
from flcommon.entry import BadRequest, openwhisk_main  # noqa: E402
from flcommon.secagg import graph, relay, session as sa_session  # noqa: E402
from flcommon.secagg.client import masked_update  # noqa: E402
from flcommon.secagg.server import secure_aggregate  # noqa: E402
from flcommon.strategies import get_strategy  # noqa: E402

SMOKE = {"clients": "8", "params": "2000", "dropouts": "0,0.25", "neighbours": "full,4"}
TOKEN = "bench-token-secret"
CLIENT_SECRET = "bench-client-secret-0123456789"


def load(function: str):
    spec = importlib.util.spec_from_file_location(f"_{function}", ROOT / "functions" / function / f"{function}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def chunk_bytes(db, session: str, kind: str) -> int:
    ids = [f["_id"] for f in db[f"{fs.BUCKET}.files"].find({"metadata.session": session, "metadata.kind": kind})]
    return sum(len(c["data"]) for c in db[f"{fs.BUCKET}.chunks"].find({"files_id": {"$in": ids}}, {"data": 1}))


def doc_bytes(db, session: str) -> int:
    return sum(len(bson.encode(d)) for d in db[relay.SECAGG].find({"session": session}))


def setup(db, sid: str, clients: list[str], n_params: int, secure: bool, neighbours=None):
    sa = ({"neighbours": neighbours} if neighbours else True) if secure else None
    db[fs.SESSIONS].insert_one({"_id": sid, "spec": {"model": "bench", "clients": clients, "strategy": "fedavg",
                                                     "secure_aggregation": sa}})
    shapes = [(n_params * 7 // 10,), (n_params - n_params * 7 // 10,)]
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    deltas = {c: [rng.normal(0, 0.01, s).astype(np.float32) for s in shapes] for c in clients}
    examples = {c: 10 + i % 7 for i, c in enumerate(clients)}
    for c in clients:
        db[fs.PARTITIONS].insert_one({"session": sid, "client": c, "num_examples": examples[c]})
    return base, deltas, examples


def plain_round(db, agg, clients, n_params, tag):
    sid = f"plain-{tag}"
    base, deltas, examples = setup(db, sid, clients, n_params, secure=False)
    client_s = 0.0
    for c in clients:
        t0 = time.perf_counter()
        blob = fs.put_arrays(db, [b + d for b, d in zip(base, deltas[c])], "u.npz",
                             {"kind": "update", "session": sid, "round": 0, "client": c})
        client_s += time.perf_counter() - t0
        db[fs.UPDATES].insert_one({"session": sid, "round": 0, "client": c, "attempt": 1, "blob_id": blob,
                                   "num_examples": examples[c], "status": "received"})
    strategy = get_strategy("fedavg")
    t0 = time.perf_counter()
    agg.aggregate(db, sid, 0, [(c, 0) for c in clients], [b.copy() for b in base], strategy)
    new, _ = strategy.finish([b.copy() for b in base])
    server_s = time.perf_counter() - t0
    return {"invocations": len(clients), "bytes": chunk_bytes(db, sid, "update"), "client_s": client_s,
            "server_s": server_s, "model": new}


def secure_round(db, stage_handle, clients, n_params, dropped, tag, neighbours=None):
    sid = f"secure-{tag}"
    base, deltas, examples = setup(db, sid, clients, n_params, secure=True, neighbours=neighbours)
    host, port = db.client.address
    bound = {"FK_STORE_URL": f"mongodb://{host}:{port}/", "FK_STORE_DB": db.name, "FK_TOKEN_SECRET": TOKEN,
             "FK_CLIENT_SECRET": CLIENT_SECRET}
    spec = db[fs.SESSIONS].find_one({"_id": sid})["spec"]
    client_s, invocations = 0.0, 0

    def stage(c, name):
        nonlocal client_s, invocations
        body = signed(TOKEN, {"session": sid, "round": 0, "client": c, "stage": name})
        t0 = time.perf_counter()
        out = openwhisk_main(stage_handle, {**bound, **body})
        client_s += time.perf_counter() - t0
        invocations += 1
        if "error" in out:
            raise SystemExit(f"{name} of {c}: {out['error']}")

    for c in clients:
        stage(c, "advertise")
    relay.set_sets(db, sid, 0, u1=clients)
    for c in clients:
        stage(c, "share")
    relay.set_sets(db, sid, 0, u2=clients)
    survivors = [c for c in clients if c not in dropped]
    for c in survivors:
        t0 = time.perf_counter()
        blob, _ = masked_update(db, bound, spec, sid, 0, c, 1, deltas[c], examples[c])
        client_s += time.perf_counter() - t0
        invocations += 1
        db[fs.UPDATES].insert_one({"session": sid, "round": 0, "client": c, "attempt": 1, "blob_id": blob,
                                   "num_examples": examples[c], "masked": True, "status": "received"})
    relay.set_sets(db, sid, 0, u3=survivors)
    # As the keeper does: survivors the dropouts split in the graph reveal nothing.
    split = graph.parts(graph.neighbours(sa_session.context(sid, 0), clients, neighbours), survivors)
    if len(split) > 1:
        return {"refused": f"the survivors fall into {len(split)} unconnected parts of the neighbour graph"}
    for c in survivors:
        stage(c, "unmask")
    strategy = get_strategy("fedavg")
    t0 = time.perf_counter()
    try:
        secure_aggregate(db, sid, 0, [(c, 0) for c in survivors], [b.copy() for b in base], strategy, spec)
    except BadRequest as exc:   # a neighbourhood lost more than its threshold allows
        return {"refused": str(exc)}
    new, _ = strategy.finish([b.copy() for b in base])
    server_s = time.perf_counter() - t0
    # The plain reference over the same survivors.
    total = sum(examples[c] for c in survivors)
    ref = [b + sum(deltas[c][i] * examples[c] for c in survivors) / total for i, b in enumerate(base)]
    diff = max(float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(new, ref))
    # Mask expansions (one PRG stream of the model's length each), counted
    # from the graph: what the timings measure, free of the machine's noise.
    g = graph.neighbours(sa_session.context(sid, 0), clients, neighbours)
    peers = {c: (set(clients) - {c}) if g is None else set(g[c]) for c in clients}
    client_masks = sum(1 + len(peers[c]) for c in survivors)
    server_masks = len(survivors) + sum(len(peers[d] & set(survivors)) for d in dropped)
    return {"invocations": invocations, "bytes": chunk_bytes(db, sid, "masked") + doc_bytes(db, sid),
            "client_s": client_s, "server_s": server_s, "diff": diff, "masks": (client_masks, server_masks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="10,30", help="comma-separated client counts")
    ap.add_argument("--params", default="100000,1000000", help="comma-separated model sizes (parameters)")
    ap.add_argument("--dropouts", default="0,0.2", help="comma-separated shares of clients dropping after share")
    ap.add_argument("--neighbours", default="full,log",
                    help="comma-separated neighbour graphs: full (every pair), log, or a number of neighbours")
    ap.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}), to check the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.params, args.dropouts, args.neighbours = (SMOKE["clients"], SMOKE["params"],
                                                                      SMOKE["dropouts"], SMOKE["neighbours"])
    graphs = [None if g == "full" else (g if g == "log" else int(g)) for g in args.neighbours.split(",")]
    agg = load("fl_server_aggregator")
    stage_handle = load("fl_secagg_client").handle
    print(f"{'params':>9} {'clients':>7} {'drop':>4} {'graph':>5} | {'invocations':>11} {'store KB':>17} "
          f"{'client ms':>17} {'server ms':>15} {'masks':>11} | {'max |diff|':>10}")
    print(f"{'':>9} {'':>7} {'':>4} {'(k)':>5} | {'plain/secure':>11} {'plain / secure':>17} {'plain / secure':>17} "
          f"{'plain / secure':>15} {'clnt / srv':>11} |")
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedMongo(Path(tmp) / "mongo")
        url, _ = server.start()
        try:
            db = fs.database(url, "bench_secagg")
            fs.ensure_function_indexes(db)
            # One tiny round each way first, so that the first row does not
            # carry imports and first connections.
            plain_round(db, agg, ["client_0", "client_1", "client_2"], 100, "warmup")
            secure_round(db, stage_handle, ["client_0", "client_1", "client_2"], 100, set(), "warmup")
            for n_params in [int(x) for x in args.params.split(",")]:
                for k in [int(x) for x in args.clients.split(",")]:
                    for share in [float(x) for x in args.dropouts.split(",")]:
                        clients = [f"client_{i}" for i in range(k)]
                        dropped = set(clients[:int(share * k)])
                        if k - len(dropped) < max(2, k // 2 + 1):
                            print(f"{n_params:>9} {k:>7} {share:>4g} | skipped: survivors below the threshold")
                            continue
                        tag = f"{n_params}-{k}-{share}"
                        p = plain_round(db, agg, [c for c in clients if c not in dropped], n_params, tag)
                        for g in graphs:
                            degree = graph.degree(g, k)
                            shown = "full" if degree is None else str(degree)
                            s = secure_round(db, stage_handle, clients, n_params, dropped, f"{tag}-{g}", g)
                            head = f"{n_params:>9} {k:>7} {share:>4g} {shown:>5} |"
                            if "refused" in s:
                                print(f"{head} refused: {s['refused']}", flush=True)
                                continue
                            print(f"{head} {p['invocations']:>5}/{s['invocations']:<5} "
                                  f"{p['bytes'] / 1e3:>8.0f} / {s['bytes'] / 1e3:<6.0f} "
                                  f"{p['client_s'] * 1e3:>8.0f} / {s['client_s'] * 1e3:<6.0f} "
                                  f"{p['server_s'] * 1e3:>6.0f} / {s['server_s'] * 1e3:<6.0f} "
                                  f"{s['masks'][0]:>5} / {s['masks'][1]:<3} | {s['diff']:>10.2e}",
                                  flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
