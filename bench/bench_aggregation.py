"""Aggregation throughput and peak memory of the streaming FedAvg aggregator,
against a real MongoDB-wire-protocol server (the embedded SecantusDB).

    .venv/bin/python bench/bench_aggregation.py [--clients 10,50,200] [--model-mb 1,10]
    .venv/bin/python bench/bench_aggregation.py --smoke      # tiny sizes, for the test suite

For each (model size, clients): store that many float32 updates in GridFS
(write MB/s is what the clients' uploads cost the store, sequentially), time
reading every update's chunks without decoding them (store MB/s: the speed
the aggregator can at best reach), then time the aggregator's `aggregate()`
(read + decode + check + delta + accumulate every update) and the strategy's
`finish()`, then run it again under tracemalloc for the peak traced Python
memory (numpy buffers included; the global model, allocated before, is not
counted). Throughput is update bytes aggregated per second; memory is
reported as a multiple of the model size, which must not grow with the
number of clients.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "functions"))

from fedkeeper.local.store import EmbeddedMongo  # noqa: E402
from flcommon import store as fs  # noqa: E402
from flcommon.strategies import get_strategy  # noqa: E402

SMOKE = {"clients": "3", "model_mb": "0.05"}


def load_aggregator():
    spec = importlib.util.spec_from_file_location(
        "_agg", ROOT / "functions" / "fl_server_aggregator" / "fl_server_aggregator.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def store_read_seconds(db, blob_ids) -> float:
    """Every blob's chunks read front to back, nothing decoded."""
    t0 = time.perf_counter()
    for blob in blob_ids:
        for _ in db[f"{fs.BUCKET}.chunks"].find({"files_id": blob}, {"data": 1}).sort("n", 1).batch_size(16):
            pass
    return time.perf_counter() - t0


def bench_cell(db, agg_mod, mb: float, k: int) -> str:
    # A few layers of realistic proportions (one large dense kernel dominates).
    n = int(mb * 1e6 / 4)
    shapes = [(n * 7 // 10,), (n * 2 // 10,), (n - n * 7 // 10 - n * 2 // 10,)]
    model_bytes = n * 4
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    sid = f"b{mb}-{k}"
    clients = [f"client_{i}" for i in range(k)]
    blobs = []
    t0 = time.perf_counter()
    for i, c in enumerate(clients):
        blob = fs.put_arrays(db, [b + i for b in base], "u.npz",
                             {"kind": "update", "session": sid, "round": 0, "client": c})
        db[fs.UPDATES].insert_one({"session": sid, "round": 0, "client": c, "attempt": 1,
                                   "blob_id": blob, "num_examples": 1 + i % 7})
        blobs.append(blob)
    write = time.perf_counter() - t0
    read = store_read_seconds(db, blobs)
    wanted = [(c, 0) for c in clients]
    # Timed untraced (tracing every allocation slows Python code down),
    # then run again under tracemalloc for the peak memory.
    strategy = get_strategy("fedavg")
    t0 = time.perf_counter()
    accepted, rejected = agg_mod.aggregate(db, sid, 0, wanted, base, strategy)
    new, _ = strategy.finish(base, None)
    dt = time.perf_counter() - t0
    del new
    strategy = get_strategy("fedavg")
    tracemalloc.start()
    tracemalloc.reset_peak()
    agg_mod.aggregate(db, sid, 0, wanted, base, strategy)
    new, _ = strategy.finish(base, None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if len(accepted) != k or rejected:
        raise SystemExit(f"aggregation rejected updates: {rejected[:3]}")
    # Every update is base + i, weighted by 1 + i % 7: the result is base + the weighted mean of i.
    w = np.array([1 + i % 7 for i in range(k)], dtype=np.float64)
    shift = float((w * np.arange(k)).sum() / w.sum())
    if not np.allclose(new[0][:1000], base[0][:1000] + shift, atol=1e-3 * max(1.0, shift)):
        raise SystemExit("aggregate is wrong")
    del new
    # Drop this cell's blobs so the next one starts from the same store size.
    for blob in blobs:
        fs.delete_blob(db, blob)
    db[fs.UPDATES].delete_many({"session": sid})
    total_mb = k * model_bytes / 1e6
    return (f"{mb:>8g} {k:>7} {total_mb / write:>10.1f} {total_mb / read:>10.1f} {dt:>7.2f} "
            f"{total_mb / dt:>8.1f} {peak / 1e6:>8.1f} {peak / model_bytes:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="10,50,200", help="comma-separated client counts")
    ap.add_argument("--model-mb", default="1,10", help="comma-separated model sizes in MB")
    ap.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}), to check the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.model_mb = SMOKE["clients"], SMOKE["model_mb"]
    agg_mod = load_aggregator()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedMongo(Path(tmp) / "mongo")
        url, _ = server.start()
        try:
            db = fs.database(url, "bench")
            fs.ensure_function_indexes(db)
            print(f"{'model MB':>8} {'clients':>7} {'write MB/s':>10} {'store MB/s':>10} {'agg s':>7} "
                  f"{'agg MB/s':>8} {'peak MB':>8} {'peak/model':>10}")
            for mb in [float(x) for x in args.model_mb.split(",")]:
                for k in [int(x) for x in args.clients.split(",")]:
                    print(bench_cell(db, agg_mod, mb, k), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
