"""Flat against hierarchical aggregation of one round, side by side, against
a real MongoDB-wire-protocol server (the embedded SecantusDB).

    .venv/bin/python bench/bench_hierarchical.py [--clusters 2] [--clients 100] [--model-mb 1] [--arrival-ms 20]
    .venv/bin/python bench/bench_hierarchical.py --smoke      # tiny sizes, to check it runs

Two measures, each flat and hierarchical side by side:

1. Every update already stored (`clusters x clients` float32 updates
   planted once), then:
   - flat: the aggregator's streaming aggregate() reads every update, then
     FedAvg's finish();
   - hierarchical: one combiner per cluster (fl_combiner's work: stream its
     cluster's updates into a partial, store it), run at the same time in
     separate processes as they would on their clusters, then the top level
     adds the partials (aggregate() finds them) and finishes.
2. What a round pays after its last update arrives, which is what the keeper
   runs (combiners follow their round): a round is played, its updates
   written one every --arrival-ms, alternating clusters, while one combiner
   per cluster follows it (fl_combiner.follow in its own process); the
   round is closed (its clients listed) right after the last update, as the
   keeper closes it. Hierarchical: from the last update's write to the
   model (the followers' remainder and partials, then the top level). Flat:
   the aggregator starts at the close and reads every update, so what it
   pays after the last update is its whole time of measure 1.

Prints the times, the ratios, and the largest absolute difference between
the flat model and each hierarchical one. The combiners share this
machine's cores and the one store process, where on real clusters each has
its own.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "functions"))

from fedkeeper.local.store import EmbeddedMongo  # noqa: E402
from flcommon import store as fs  # noqa: E402
from flcommon.partials import PARTIALS  # noqa: E402
from flcommon.strategies import get_strategy  # noqa: E402
from flcommon.update_stream import aggregate  # noqa: E402
from fl_combiner.fl_combiner import combine as combine_cluster, follow  # noqa: E402

SMOKE = {"clusters": 2, "clients": 4, "model_mb": 0.05}
SESSION = "bench-h"     # measure 1: every update stored first
FOLLOWED = "bench-f"    # measure 2: a round its combiners follow


def model(mb: float) -> list[np.ndarray]:
    n = int(mb * 1e6 / 4)
    shapes = [(n * 7 // 10,), (n * 2 // 10,), (n - n * 7 // 10 - n * 2 // 10,)]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def updates(base, clusters: dict[str, list[str]]):
    """(client, update, examples) of every client, the clusters alternating."""
    rng = np.random.default_rng(1)
    made = {c: ([b + rng.standard_normal(b.shape).astype(np.float32) * 0.01 for b in base], 1 + i % 7)
            for clients in clusters.values() for i, c in enumerate(clients)}
    width = max(len(cs) for cs in clusters.values())
    return [(cs[i], *made[cs[i]]) for i in range(width) for cs in clusters.values() if i < len(cs)]


def put(db, session: str, client: str, update, examples: int) -> None:
    blob = fs.put_arrays(db, update, "u.npz", {"kind": "update", "session": session, "round": 0, "client": client})
    db[fs.UPDATES].insert_one({"session": session, "round": 0, "client": client, "attempt": 1,
                               "blob_id": blob, "num_examples": examples, "status": "received"})


def combine(url: str, mb: float, cluster: str, clients: list[str]) -> float:
    """One combiner's work, in its own process; returns its seconds."""
    db = fs.database(url, "bench")
    base = model(mb)
    t0 = time.perf_counter()
    doc = combine_cluster(db, SESSION, 0, cluster, clients, base, 0.5)
    if "error" in doc or doc["rejected"] or len(doc["clients"]) != len(clients):
        raise SystemExit(f"combiner {cluster} rejected updates: {doc.get('error') or doc['rejected'][:3]}")
    return time.perf_counter() - t0


def follower(url: str, mb: float, cluster: str, clients: int) -> float:
    """One combiner following the round, in its own process; returns the
    wall-clock time (time.time) at which its partial was stored."""
    db = fs.database(url, "bench")
    doc = follow(db, FOLLOWED, 0, cluster, model(mb), 0.5, follow_s=600.0)
    if doc is None or "error" in doc or doc["rejected"] or len(doc["clients"]) != clients:
        raise SystemExit(f"follower {cluster} failed: {doc if doc is None or 'error' in doc else doc['rejected'][:3]}")
    return time.time()


def warm(url: str) -> None:
    fs.database(url, "bench").command("ping")


def top_level(db, session: str, everyone, base) -> list[np.ndarray]:
    strategy = get_strategy("fedavg")
    accepted, _ = aggregate(db, session, 0, everyone, base, strategy)
    assert len(accepted) == len(everyone)
    assert all(p.get("used") for p in db[PARTIALS].find({"session": session}))
    return strategy.finish([b.copy() for b in base], None)[0]


def stored_first(db, pool, url: str, args, clusters, everyone, base):
    """Measure 1: (flat s, flat model, hierarchical s, slowest combiner s, model)."""
    flat_s, hier_s, comb_s = [], [], []
    for _ in range(2):   # the second run of each is the one reported (warm store)
        db[PARTIALS].delete_many({"session": SESSION})
        strategy = get_strategy("fedavg")
        t0 = time.perf_counter()
        accepted, _ = aggregate(db, SESSION, 0, everyone, base, strategy)
        flat, _ = strategy.finish([b.copy() for b in base], None)
        flat_s.append(time.perf_counter() - t0)
        assert len(accepted) == len(everyone)
        t0 = time.perf_counter()
        comb_s.append(max(pool.map(combine, [url] * args.clusters, [args.model_mb] * args.clusters,
                                   list(clusters), list(clusters.values()))))
        hier = top_level(db, SESSION, everyone, base)
        hier_s.append(time.perf_counter() - t0)
    return flat_s[-1], flat, hier_s[-1], comb_s[-1], hier


def followed_round(db, pool, url: str, args, clusters, base):
    """Measure 2: (seconds from the last update to the model, of which the
    followers' part, the model)."""
    db[fs.SESSIONS].insert_one({"_id": FOLLOWED, "clusters": {c: k for k, cs in clusters.items() for c in cs}})
    made = updates(base, clusters)
    # As the keeper does: the round's selected clients are recorded before
    # its combiners start following it (they look only for those).
    db[fs.ROUNDS].insert_one({"session": FOLLOWED, "round": 0, "state": "running",
                              "selected": [c for c, _, _ in made]})
    running = [pool.submit(follower, url, args.model_mb, k, len(cs)) for k, cs in clusters.items()]
    for client, update, examples in made:
        put(db, FOLLOWED, client, update, examples)
        time.sleep(args.arrival_ms / 1000)
    last = time.time()   # the last update is stored; the keeper closes the round
    db[fs.ROUNDS].update_one({"session": FOLLOWED, "round": 0},
                             {"$set": {"state": "aggregating", "included": [c for c, _, _ in made]}})
    partials_at = max(f.result() for f in running)
    hier = top_level(db, FOLLOWED, [(c, 0) for c, _, _ in made], base)
    return time.time() - last, partials_at - last, hier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--clients", type=int, default=100, help="clients per cluster")
    ap.add_argument("--model-mb", type=float, default=1.0)
    ap.add_argument("--arrival-ms", type=float, default=20.0, help="pause after each update of the followed round")
    ap.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}), to check the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.clusters, args.clients, args.model_mb = SMOKE["clusters"], SMOKE["clients"], SMOKE["model_mb"]
    clusters = {f"cluster_{k}": [f"client_{k}_{i}" for i in range(args.clients)] for k in range(args.clusters)}
    everyone = [(c, 0) for cs in clusters.values() for c in cs]
    base = model(args.model_mb)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedMongo(Path(tmp) / "mongo")
        url, _ = server.start()
        try:
            db = fs.database(url, "bench")
            fs.ensure_function_indexes(db)
            for client, update, examples in updates(base, clusters):
                put(db, SESSION, client, update, examples)
            spawn = multiprocessing.get_context("spawn")   # no store client carried over a fork
            with ProcessPoolExecutor(max_workers=args.clusters, mp_context=spawn) as pool:
                list(pool.map(warm, [url] * args.clusters))   # processes started before timing
                flat_s, flat, hier_s, comb_s, hier = stored_first(db, pool, url, args, clusters, everyone, base)
                after_s, partials_s, followed = followed_round(db, pool, url, args, clusters, base)
        finally:
            server.stop()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(flat, hier))
    diff_followed = max(float(np.max(np.abs(a - b))) for a, b in zip(flat, followed))
    print(f"{args.clusters} clusters x {args.clients} clients, model {args.model_mb:g} MB, fedavg")
    print("1. every update stored before aggregation starts")
    print(f"{'  flat':16} {flat_s:>8.3f} s")
    print(f"{'  hierarchical':16} {hier_s:>8.3f} s   (slowest combiner {comb_s:.3f}, top level {hier_s - comb_s:.3f})")
    print(f"  ratio hierarchical / flat, every update stored: {hier_s / flat_s:.2f}")
    print(f"2. after the round's last update (updates {args.arrival_ms:g} ms apart, combiners following the round)")
    print(f"{'  flat':16} {flat_s:>8.3f} s   (it starts at the close: all of measure 1)")
    print(f"{'  hierarchical':16} {after_s:>8.3f} s   (followers' partials {partials_s:.3f}, "
          f"top level {after_s - partials_s:.3f})")
    print(f"  ratio hierarchical / flat after the last update: {after_s / flat_s:.2f}")
    print(f"max abs difference from the flat model: {diff:.2e} (1), {diff_followed:.2e} (2)")


if __name__ == "__main__":
    main()
