"""Aggregation throughput and peak memory of the streaming FedAvg aggregator,
against a real MongoDB-wire-protocol server (the embedded SecantusDB).

    .venv/bin/python bench/bench_aggregation.py [--clients 10,50,200] [--model-mb 1,10]

For each (model size, clients): store that many float32 updates in GridFS
(write MB/s is what the clients' uploads cost the store, sequentially), then
time `aggregate()` (read + decode + check + accumulate every update) and
record the peak traced Python memory (numpy buffers included). Throughput is
update bytes aggregated per second; memory is reported as a multiple of the
model size, which must not grow with the number of clients.
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

from fedkeeper.store.embedded import EmbeddedMongo  # noqa: E402
from flcommon import store as fs  # noqa: E402


def load_aggregator():
    spec = importlib.util.spec_from_file_location(
        "_agg", ROOT / "functions" / "fl_server_aggregator" / "fl_server_aggregator.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,50,200")
    ap.add_argument("--model-mb", default="1,10")
    args = ap.parse_args()
    agg_mod = load_aggregator()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedMongo(Path(tmp) / "mongo")
        url, _ = server.start()
        try:
            db = fs.database(url, "bench")
            fs.ensure_function_indexes(db)
            print(f"{'model MB':>8} {'clients':>7} {'write MB/s':>10} {'agg s':>7} {'agg MB/s':>8} "
                  f"{'peak MB':>8} {'peak/model':>10}")
            for mb in [float(x) for x in args.model_mb.split(",")]:
                # A few layers of realistic proportions (one large dense kernel dominates).
                n = int(mb * 1e6 / 4)
                shapes = [(n * 7 // 10,), (n * 2 // 10,), (n - n * 7 // 10 - n * 2 // 10,)]
                reference = [(s, np.dtype(np.float32)) for s in shapes]
                model_bytes = n * 4
                rng = np.random.default_rng(0)
                base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
                for k in [int(x) for x in args.clients.split(",")]:
                    sid = f"b{mb}-{k}"
                    clients = [f"client_{i}" for i in range(k)]
                    t0 = time.perf_counter()
                    for i, c in enumerate(clients):
                        blob = fs.put_arrays(db, [b + i for b in base], "u.npz",
                                             {"kind": "update", "session": sid, "round": 0, "client": c})
                        db[fs.UPDATES].insert_one({"session": sid, "round": 0, "client": c, "attempt": 1,
                                                   "blob_id": blob, "num_examples": 1 + i % 7})
                    write = time.perf_counter() - t0
                    tracemalloc.start()
                    tracemalloc.reset_peak()
                    t0 = time.perf_counter()
                    agg, accepted, rejected = agg_mod.aggregate(db, sid, 0, clients, reference)
                    agg.result()
                    dt = time.perf_counter() - t0
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
                    del agg
                    assert len(accepted) == k and not rejected
                    total_mb = k * model_bytes / 1e6
                    print(f"{mb:>8.0f} {k:>7} {total_mb / write:>10.1f} {dt:>7.2f} {total_mb / dt:>8.1f} "
                          f"{peak / 1e6:>8.1f} {peak / model_bytes:>10.2f}", flush=True)
                    # Drop this cell's blobs so the next one starts from the same store size.
                    for d in db[fs.UPDATES].find({"session": sid}):
                        fs.delete_blob(db, d["blob_id"])
                    db[fs.UPDATES].delete_many({"session": sid})
        finally:
            server.stop()

if __name__ == "__main__":
    main()
