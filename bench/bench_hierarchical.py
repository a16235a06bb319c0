"""Flat against hierarchical aggregation of one round, side by side, against
a real MongoDB-wire-protocol server (the embedded SecantusDB).

    .venv/bin/python bench/bench_hierarchical.py [--clusters 2] [--clients 100] [--model-mb 1]
    .venv/bin/python bench/bench_hierarchical.py --smoke      # tiny sizes, to check it runs

`clusters x clients` float32 updates are planted in the store once, then:
- flat: the aggregator's streaming aggregate() reads every update, then
  FedAvg's finish();
- hierarchical: one combiner per cluster (the fl_combiner's work: stream its
  cluster's updates into a partial, store it), run at the same time in
  separate processes as they would on their clusters, then the top level
  adds the partials (aggregate() finds them) and finishes.
Prints both times, their ratio, and the largest absolute difference between
the two models. The combiners share this machine's cores and the one store
process, where on real clusters each has its own.
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
from fl_combiner.fl_combiner import combine as combine_cluster  # noqa: E402

SMOKE = {"clusters": 2, "clients": 4, "model_mb": 0.05}
SESSION = "bench-h"


def model(mb: float) -> list[np.ndarray]:
    n = int(mb * 1e6 / 4)
    shapes = [(n * 7 // 10,), (n * 2 // 10,), (n - n * 7 // 10 - n * 2 // 10,)]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def plant(db, base, clusters: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(1)
    for clients in clusters.values():
        for i, c in enumerate(clients):
            update = [b + rng.standard_normal(b.shape).astype(np.float32) * 0.01 for b in base]
            blob = fs.put_arrays(db, update, "u.npz", {"kind": "update", "session": SESSION, "round": 0,
                                                       "client": c})
            db[fs.UPDATES].insert_one({"session": SESSION, "round": 0, "client": c, "attempt": 1,
                                       "blob_id": blob, "num_examples": 1 + i % 7, "status": "received"})


def combine(url: str, mb: float, cluster: str, clients: list[str]) -> float:
    """One combiner's work, in its own process; returns its seconds."""
    db = fs.database(url, "bench")
    base = model(mb)
    t0 = time.perf_counter()
    doc = combine_cluster(db, SESSION, 0, cluster, clients, base, 0.5)
    if "error" in doc or doc["rejected"] or len(doc["clients"]) != len(clients):
        raise SystemExit(f"combiner {cluster} rejected updates: {doc.get('error') or doc['rejected'][:3]}")
    return time.perf_counter() - t0


def warm(url: str) -> None:
    fs.database(url, "bench").command("ping")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--clients", type=int, default=100, help="clients per cluster")
    ap.add_argument("--model-mb", type=float, default=1.0)
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
            plant(db, base, clusters)
            spawn = multiprocessing.get_context("spawn")   # no store client carried over a fork
            with ProcessPoolExecutor(max_workers=args.clusters, mp_context=spawn) as pool:
                list(pool.map(warm, [url] * args.clusters))   # processes started before timing
                flat_s, flat = [], None
                hier_s, hier, comb_s = [], None, []
                for _ in range(2):   # the second run of each is the one reported (warm store)
                    db[PARTIALS].delete_many({})
                    strategy = get_strategy("fedavg")
                    t0 = time.perf_counter()
                    accepted, _ = aggregate(db, SESSION, 0, everyone, base, strategy)
                    flat, _ = strategy.finish([b.copy() for b in base], None)
                    flat_s.append(time.perf_counter() - t0)
                    assert len(accepted) == len(everyone)
                    t0 = time.perf_counter()
                    comb_s.append(max(pool.map(combine, [url] * args.clusters, [args.model_mb] * args.clusters,
                                               list(clusters), list(clusters.values()))))
                    strategy = get_strategy("fedavg")
                    accepted, _ = aggregate(db, SESSION, 0, everyone, base, strategy)
                    hier, _ = strategy.finish([b.copy() for b in base], None)
                    hier_s.append(time.perf_counter() - t0)
                    assert len(accepted) == len(everyone)
                    assert all(p.get("used") for p in db[PARTIALS].find({"session": SESSION}))
        finally:
            server.stop()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(flat, hier))
    print(f"{args.clusters} clusters x {args.clients} clients, model {args.model_mb:g} MB, fedavg")
    print(f"{'':14} {'seconds':>8}")
    print(f"{'flat':14} {flat_s[-1]:>8.3f}")
    print(f"{'hierarchical':14} {hier_s[-1]:>8.3f}   (slowest combiner {comb_s[-1]:.3f}, "
          f"top level {hier_s[-1] - comb_s[-1]:.3f})")
    print(f"ratio hierarchical / flat: {hier_s[-1] / flat_s[-1]:.2f}")
    print(f"max abs difference of the models: {diff:.2e}")


if __name__ == "__main__":
    main()
