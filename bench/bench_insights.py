"""Latency of `fedkeeper insights` queries with fl_insights' warm cache,
against the same queries with the cache off (every call reads every update
from the store).

    .venv/bin/python bench/bench_insights.py [--clients 50] [--rounds 10] [--model-mb 1.05]
        [--in-process] [--cold 3] [--warm 20] [--no-cache 5] [--json]

Plants a session in a fresh embedded store (SecantusDB): `--clients` clients
in two groups, `--rounds` rounds of float32 updates of `--model-mb` MB each,
aggregated the way the aggregator records it (contributions, weights). Then,
for `contributions` and `clusters` over all rounds:

  cold         the first query of a new worker (fl_insights removed and
               deployed again before each), caches empty
  warm         the same query again: answered from the query cache
  warm-updates the same query with cache "updates": recomputed from the
               decoded updates the worker keeps, the query cache skipped
  no-cache     cache off: every call reads every update and model from the
               store (the baseline)

By default fl_insights runs as deployed on the local fabric (a local
OpenWhisk cluster), invoked through the provider exactly as the CLI does;
latency is the keeper's wall time per query, including fetching an answer
stored as a GridFS reference. --in-process calls the function's handler in
this process instead (cold = a freshly loaded module). Goal: warm median at
least 3x faster than no-cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedkeeper.local.store import EmbeddedMongo  # noqa: E402
from flcommon import store as fs  # noqa: E402
from flcommon.auth import signed  # noqa: E402

SESSION = "bench-insights"
WORKLOADS = ("contributions", "clusters")


def plant(db, clients: int, rounds: int, model_mb: float, seed: int = 0) -> int:
    """Two groups of clients; returns the bytes of one update blob."""
    rng = np.random.default_rng(seed)
    n = int(model_mb * 1e6 / 4)
    shapes = [(n * 7 // 10,), (n * 2 // 10,), (n - n * 7 // 10 - n * 2 // 10,)]
    names = [f"client_{i}" for i in range(clients)]
    db[fs.SESSIONS].insert_one({"_id": SESSION, "spec": {"model": "synthetic", "clients": names}})
    model = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    directions = [[rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shapes] for _ in range(2)]
    db[fs.MODELS].insert_one({"session": SESSION, "round": 0,
                              "blob_id": fs.put_arrays(db, model, f"{SESSION}/model/000.npz",
                                                       {"kind": "model", "session": SESSION, "round": 0})})
    for r in range(rounds):
        total = np.zeros(sum(int(np.prod(s)) for s in shapes), np.float64)
        counts = {c: int(rng.integers(100, 400)) for c in names}
        weight_sum = sum(counts.values())
        for i, c in enumerate(names):
            noise = 0.002
            delta = [d + rng.standard_normal(d.shape, dtype=np.float32) * noise for d in directions[i % 2]]
            blob = fs.put_arrays(db, [m + d for m, d in zip(model, delta)], f"{SESSION}/update/{r:03d}/{c}.npz",
                                 {"kind": "update", "session": SESSION, "round": r, "client": c})
            w = counts[c] / weight_sum
            total += np.concatenate([d.ravel() for d in delta]) * w
            db[fs.UPDATES].insert_one({"session": SESSION, "round": r, "client": c, "attempt": 1, "blob_id": blob,
                                       "num_examples": counts[c], "metrics": {"loss": float(rng.random())},
                                       "status": "accepted", "aggregated_in": r, "staleness": 0, "weight": w})
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        model = [m + total[offsets[j]:offsets[j + 1]].astype(np.float32).reshape(m.shape)
                 for j, m in enumerate(model)]
        db[fs.MODELS].insert_one({
            "session": SESSION, "round": r + 1,
            "blob_id": fs.put_arrays(db, model, f"{SESSION}/model/{r + 1:03d}.npz",
                                     {"kind": "model", "session": SESSION, "round": r + 1}),
            "contributions": [{"client": c, "round": r, "staleness": 0, "num_examples": counts[c],
                               "weight": counts[c] / weight_sum} for c in names], "rejected": []})
    doc = db[f"{fs.BUCKET}.files"].find_one({"metadata.kind": "update"}, {"length": 1})
    return int(doc["length"])


# --------------------------------------------------------------------------- the two ways of calling

class FabricTarget:
    """fl_insights deployed on a local OpenWhisk cluster, queried as the CLI does."""

    where = "deployed on the local fabric (local OpenWhisk cluster), invoked through the provider"

    def __init__(self, tmp: Path, url: str, db_name: str, cache_mb: float):
        os.environ["FEDKEEPER_STATE_DIR"] = str(tmp / "state")
        from fedkeeper.config import load_config
        from fedkeeper.insights import InsightsClient
        from fedkeeper.runtime import Runtime
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(textwrap.dedent(f"""\
            name: bench_insights
            providers:
              openwhisk:
                bench_ow: {{kind: local}}
            scenarios:
              federated_learning:
                server_config: {{server_cluster_name: bench_ow}}
                mongo_config: {{url: "{url}", db: {db_name}}}
                insights: {{cache_mb: {cache_mb}}}
            """))
        self.rt = Runtime.open(load_config(cfg_path), None)
        self.client = InsightsClient(self.rt)
        self.client.deploy()

    def new_worker(self) -> None:
        self.rt.provider(self.client.cluster).remove("fl_insights")
        self.client.deploy()

    def query(self, what: str, cache) -> dict:
        return self.client.query(SESSION, what, cache=cache)

    def close(self) -> None:
        self.rt.close()


class InProcessTarget:
    """The function's handler through its OpenWhisk entry, in this process."""

    where = "in-process: the function's handle() through its OpenWhisk entry"

    def __init__(self, url: str, db_name: str, cache_mb: float):
        from flcommon.entry import openwhisk_main
        self.entry = openwhisk_main
        self.secret = "bench-secret"
        self.bound = {"FK_STORE_URL": url, "FK_STORE_DB": db_name, "FK_TOKEN_SECRET": self.secret,
                      "FK_FUNCTION": "fl_insights", "FK_INSIGHTS_CACHE_MB": str(cache_mb)}
        self.db = fs.database(url, db_name)
        self.new_worker()

    def new_worker(self) -> None:
        spec = importlib.util.spec_from_file_location("_bench_fl_insights",
                                                      ROOT / "functions" / "fl_insights" / "fl_insights.py")
        self.mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.mod
        spec.loader.exec_module(self.mod)

    def query(self, what: str, cache) -> dict:
        payload = {"function": "fl_insights", "session": SESSION, "what": what}
        if cache is not True:
            payload["cache"] = cache
        t0 = time.perf_counter()
        out = self.entry(self.mod.handle, {**self.bound, **signed(self.secret, payload)})
        if "error" in out:
            raise RuntimeError(out["error"])
        fetched = 0
        if "result_ref" in out:
            from bson import ObjectId
            raw = fs.get_arrays(self.db, ObjectId(out["result_ref"]))[0].tobytes()
            out["data"], fetched = json.loads(raw), len(raw)
        out.update(wall_seconds=time.perf_counter() - t0, result_fetched_bytes=fetched)
        return out

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- measuring

def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def phase(target, what: str, name: str, repeats: int, cache, new_worker: bool = False) -> dict:
    rows = []
    for _ in range(repeats):
        if new_worker:
            target.new_worker()
        rows.append(target.query(what, cache))
    walls = [r["wall_seconds"] for r in rows]
    hits = sum(r["update_cache_hits"] + r["model_cache_hits"] for r in rows)
    misses = sum(r["update_cache_misses"] + r["model_cache_misses"] for r in rows)
    return {"workload": what, "phase": name, "n": repeats,
            "median_s": statistics.median(walls), "p95_s": p95(walls),
            "function_median_s": statistics.median(r["seconds"] for r in rows),
            "mb_read_per_call": statistics.mean(r["bytes_read"] for r in rows) / 1e6,
            "answer_kb": len(json.dumps(rows[-1]["data"])) / 1e3,
            "answer_by_reference": "result_ref" in rows[-1],
            "query_cache_hit_ratio": sum(1 for r in rows if r["from_cache"]) / repeats,
            "blob_cache_hit_ratio": hits / (hits + misses) if hits + misses else None,
            "cache_mb": rows[-1]["cache_bytes"] / 1e6, "data": rows[-1]["data"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model-mb", type=float, default=1.05)
    ap.add_argument("--cache-mb", type=float, default=1024)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--warm-updates", type=int, default=5)
    ap.add_argument("--no-cache", dest="no_cache", type=int, default=5)
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="3 clients x 2 rounds of 0.1 MB, one call a phase (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.rounds, args.model_mb = 3, 2, 0.1
        args.cold = args.warm = args.warm_updates = args.no_cache = 1
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = EmbeddedMongo(tmp / "mongo")
        url, _ = server.start()
        target = None
        try:
            db_name = "bench_insights"
            db = fs.database(url, db_name)
            fs.ensure_function_indexes(db)
            t0 = time.perf_counter()
            update_bytes = plant(db, args.clients, args.rounds, args.model_mb)
            planted_s = time.perf_counter() - t0
            target = InProcessTarget(url, db_name, args.cache_mb) if args.in_process \
                else FabricTarget(tmp, url, db_name, args.cache_mb)
            results = []
            for what in WORKLOADS:
                cold = phase(target, what, "cold", args.cold, True, new_worker=True)
                warm = phase(target, what, "warm", args.warm, True)
                updates = phase(target, what, "warm-updates", args.warm_updates, "updates")
                baseline = phase(target, what, "no-cache", args.no_cache, False)
                same = all(p["data"] == baseline["data"] for p in (cold, warm, updates))
                for p in (cold, warm, updates, baseline):
                    p["same_answer_as_no_cache"] = same
                    results.append(p)
        finally:
            if target is not None:
                target.close()
            server.stop()
    for r in results:
        r.pop("data")
    summary = {"setup": {"clients": args.clients, "rounds": args.rounds, "update_mb": update_bytes / 1e6,
                         "updates": args.clients * args.rounds, "cache_mb": args.cache_mb,
                         "planted_s": planted_s, "where": target.where, "cpus": os.cpu_count()},
               "phases": results}
    speedups = {}
    for what in WORKLOADS:
        by = {r["phase"]: r for r in results if r["workload"] == what}
        speedups[what] = {"warm": by["no-cache"]["median_s"] / by["warm"]["median_s"],
                          "warm-updates": by["no-cache"]["median_s"] / by["warm-updates"]["median_s"]}
    summary["speedup_vs_no_cache"] = speedups
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    s = summary["setup"]
    print(f"{s['clients']} clients x {s['rounds']} rounds = {s['updates']} updates of {s['update_mb']:.2f} MB "
          f"(planted in {s['planted_s']:.1f}s); cache bound {s['cache_mb']:g} MB; {s['cpus']} CPUs")
    print(f"fl_insights {s['where']}")
    head = (f"{'workload':<14}{'phase':<14}{'n':>3}{'median s':>10}{'p95 s':>9}{'fn med s':>10}"
            f"{'MB read':>9}{'answer KB':>10}{'query hit':>10}{'blob hit':>9}{'cache MB':>9}  same")
    print(head)
    for r in results:
        blob = "-" if r["blob_cache_hit_ratio"] is None else f"{r['blob_cache_hit_ratio']:.2f}"
        print(f"{r['workload']:<14}{r['phase']:<14}{r['n']:>3}{r['median_s']:>10.3f}{r['p95_s']:>9.3f}"
              f"{r['function_median_s']:>10.3f}{r['mb_read_per_call']:>9.1f}{r['answer_kb']:>9.1f}{'r' if r['answer_by_reference'] else ' '}"
              f"{r['query_cache_hit_ratio']:>10.2f}{blob:>9}{r['cache_mb']:>9.1f}  "
              f"{'yes' if r['same_answer_as_no_cache'] else 'NO'}")
    print("answer KB: the answer's JSON; r = returned as a GridFS reference and read by the keeper")
    for what, sp in speedups.items():
        verdict = "met" if sp["warm"] >= 3 else "NOT met"
        print(f"{what}: warm median {sp['warm']:.0f}x faster than no-cache (goal >= 3x: {verdict}); "
              f"recomputed from cached updates {sp['warm-updates']:.1f}x")


if __name__ == "__main__":
    main()
