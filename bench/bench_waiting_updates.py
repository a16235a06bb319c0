"""What asking for the updates that wait for an aggregation costs on the
embedded store as a session grows: the question every semi_async round and
async step asks (one status, a range of rounds), answered through the
store's index (session, status, round) and, side by side, through the
range-first index (session, round, status) it replaced.

    .venv/bin/python bench/bench_waiting_updates.py [--rounds 200] [--clients 100] [--calls 5]
    .venv/bin/python bench/bench_waiting_updates.py --smoke     # 10 rounds x 10 clients (tests)

One fresh embedded store (as `mongo_config.url: embedded` starts it) holds
`rounds x clients` update documents (without data), the last round's still
waiting; each call counts and lists the waiting ones of the last quarter of
the rounds, as semi_async does (Store.count_received_updates and
Store.received_updates).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "functions"))

from fedkeeper.local.store import EmbeddedMongo  # noqa: E402
from fedkeeper.store import connect  # noqa: E402
from flcommon import store as fs  # noqa: E402

CURRENT = [("session", 1), ("status", 1), ("round", 1)]
RANGE_FIRST = [("session", 1), ("round", 1), ("status", 1)]


def seconds_per_call(store, rounds: int, calls: int) -> tuple[float, int]:
    lo = rounds - max(1, rounds // 4)
    t0 = time.perf_counter()
    for _ in range(calls):
        n = store.count_received_updates("s", lo, rounds)
        listed = store.received_updates("s", lo, rounds)
    assert n == len(listed)
    return (time.perf_counter() - t0) / calls, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="10 rounds x 10 clients (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.clients, args.calls = 10, 10, 2
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedMongo(Path(tmp) / "mongo")
        url, _ = server.start()
        try:
            store = connect(url, "bench_waiting")
            store.ensure_indexes()
            updates = store.db[fs.UPDATES]
            docs = [{"session": "s", "round": r, "client": f"client_{c}",
                     "status": "received" if r == args.rounds - 1 else "accepted"}
                    for r in range(args.rounds) for c in range(args.clients)]
            for i in range(0, len(docs), 5000):
                updates.insert_many(docs[i:i + 5000])
            current, waiting = seconds_per_call(store, args.rounds, args.calls)
            updates.drop_index("_".join(f"{k}_{v}" for k, v in CURRENT))
            updates.create_index(RANGE_FIRST)
            range_first, _ = seconds_per_call(store, args.rounds, args.calls)
            store.close()
        finally:
            server.stop()
    print()
    print(f"{len(docs)} updates ({args.rounds} rounds x {args.clients} clients), {waiting} waiting; "
          f"mean of {args.calls} calls (count and list)")
    print(f"{'index':<28} {'s per call':>10}")
    print(f"{'(session, status, round)':<28} {current:>10.4f}")
    print(f"{'(session, round, status)':<28} {range_first:>10.4f}")
    print(f"range-first / current: {range_first / current:.1f}x")


if __name__ == "__main__":
    main()
