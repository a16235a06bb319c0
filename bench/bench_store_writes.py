"""What a written document costs the embedded store (SecantusDB), in its own
CPU, one by one, as a bulk and as one update_many, with and without
pymongo's retryable writes: why the embedded store's URL turns them off,
and why a round's cost at scale is the documents it writes per client.

    .venv/bin/python bench/bench_store_writes.py [--docs 3000]
    .venv/bin/python bench/bench_store_writes.py --smoke     # 50 documents (tests)

Each setting gets a fresh store in a temporary directory (started as
`mongo_config.url: embedded` starts it) and a collection with a unique
compound index like the updates'. The store's CPU is read from its process
before and after each step (in clock ticks of 10 ms: use a few thousand
documents). With retryable writes on, every write command adds to the
record the server checks each later write against, as a session's writes
do: the one-by-one steps write `--docs` commands each.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pymongo
from pymongo import UpdateOne

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(url: str, pid: int, n: int) -> dict[str, float]:
    proc = psutil.Process(pid)

    def cpu() -> float:
        t = proc.cpu_times()
        return t.user + t.system

    coll = pymongo.MongoClient(url)["bench"]["docs"]
    coll.create_index([("session", 1), ("round", 1), ("client", 1)], unique=True)
    out: dict[str, float] = {}

    def step(name: str, count: int, fn) -> None:
        c0, t0 = cpu(), time.perf_counter()
        fn()
        out[name] = (cpu() - c0) / count * 1000
        out[name + " wall"] = (time.perf_counter() - t0) / count * 1000

    def doc(rnd: int, i: int) -> dict:
        return {"session": "s", "round": rnd, "client": f"c{i}", "status": "received", "pad": "x" * 100}

    step("insert_many", n, lambda: coll.insert_many([doc(0, i) for i in range(n)]))
    step("insert_one", n, lambda: [coll.insert_one(doc(1, i)) for i in range(n)])
    step("update_one", n, lambda: [coll.update_one({"session": "s", "round": 1, "client": f"c{i}"},
                                                   {"$set": {"status": "accepted"}}) for i in range(n)])
    step("bulk UpdateOne", n, lambda: coll.bulk_write(
        [UpdateOne({"session": "s", "round": 0, "client": f"c{i}"}, {"$set": {"status": "accepted"}})
         for i in range(n)], ordered=False))
    step("update_many", n, lambda: coll.update_many({"session": "s", "round": 0}, {"$set": {"status": "done"}}))
    coll.database.client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=3000, help="documents per step")
    ap.add_argument("--smoke", action="store_true", help="50 documents (tests)")
    args = ap.parse_args()
    n = 50 if args.smoke else args.docs
    from fedkeeper.local.store import EmbeddedMongo
    rows = {}
    for label, options in (("retryable writes on (pymongo's default)", "retryWrites=true"),
                           ("the embedded URL's options", None)):
        with tempfile.TemporaryDirectory(prefix="fk-store-writes-") as tmp:
            server = EmbeddedMongo(Path(tmp) / "mongo")
            url, _ = server.start()
            try:
                pid = json.loads(server.info_file.read_text())["pid"]   # the running server's record
                if options:
                    url = url.split("?")[0] + "?" + options
                rows[label] = measure(url, int(pid), n)
            finally:
                server.stop()
    print()
    print(f"store CPU ms per document ({n} documents a step; wall ms in brackets)")
    steps = [k for k in next(iter(rows.values())) if not k.endswith(" wall")]
    print(f"{'setting':<40} " + " ".join(f"{s:>20}" for s in steps))
    for label, r in rows.items():
        print(f"{label:<40} " + " ".join(f"{r[s]:>9.3f} ({r[s + ' wall']:>7.3f})" for s in steps))


if __name__ == "__main__":
    main()
