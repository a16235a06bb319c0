"""Round overhead of the keeper: round wall time minus the slowest client's
function duration, against clients per round, with no-op training.

    .venv/bin/python bench/bench_round_overhead.py [--clients 10,50,100] [--rounds 4]

Each setting is a real session on the local fabric (half the clients on a
local OpenWhisk cluster, half on a local Cloud Functions cluster) with an
embedded MongoDB, `local_epochs: 0` (clients read the global model and write
it back as their update, so blob I/O is inside the function duration) and
the real aggregator. Round 0 carries the cold starts and is reported apart.
Overhead covers dispatch, tracking, the attempt records, the aggregator
invocation (a real FedAvg over the round's updates plus evaluation) and the
round bookkeeping.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config(tmp: Path, clients: int, rounds: int) -> Path:
    ow = clients // 2
    p = tmp / f"bench-{clients}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: overhead{clients}
        providers:
          openwhisk: {{local_ow: {{kind: local}}}}
          google: {{local_gcf: {{kind: local}}}}
        scenarios:
          federated_learning:
            server_config: {{server_cluster_name: local_ow}}
            clients_info: {{total_num_clients: {clients}, num_clients_per_round: {clients},
                            ow_clients_count: {ow}, gcf_clients_count: {clients - ow}}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: embedded, db: bench}}
            model_params: {{local_epochs: 0}}
            training: {{rounds: {rounds}, seed: 1, round_deadline_s: 600}}
            functions:
              fl_client:
                # A no-op client needs ~60 MB; 128 MB keeps 50 warm workers within the
                # fabric's memory budget, so the aggregator's warm worker is not evicted.
                openwhisk: {{memory: "128", timeout: "120000"}}
        """))
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,50,100")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="4 clients, 2 rounds (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.rounds = "4", 2
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.store import connect
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDKEEPER_STATE_DIR"] = str(Path(tmp) / "state")
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")
        for k in [int(x) for x in args.clients.split(",")]:
            cfg = load_config(config(Path(tmp), k, args.rounds))
            t0 = time.time()
            rc = run_start(cfg, None, keep_services=True)
            assert rc == 0, f"session with {k} clients failed"
            from fedkeeper.local.store import EmbeddedMongo
            url = EmbeddedMongo(Path(tmp) / "state" / "mongo").running_url()
            store = connect(url, "bench")
            sess = store.latest_session()
            over, walls, slowest = [], [], []
            for r in store.rounds(sess["_id"]):
                attempts = [a for a in store.attempts(sess["_id"], r["round"])
                            if a["client"].startswith("client_") and a["state"] == "succeeded"]
                wall = r["ended"] - r["started"]
                slow = max(a["duration_ms"] for a in attempts) / 1000
                if r["round"] == 0:
                    cold = (wall, slow)
                    continue
                walls.append(wall)
                slowest.append(slow)
                over.append(wall - slow)
            store.close()
            rows.append((k, cold, statistics.median(walls), statistics.median(slowest),
                         statistics.median(over), time.time() - t0))
        from fedkeeper.local import shutdown_local_services
        from fedkeeper.local.store import EmbeddedMongo
        shutdown_local_services(Path(tmp) / "state")
        EmbeddedMongo(Path(tmp) / "state" / "mongo").stop()
    print()
    print(f"{'clients':>7} {'round0 wall s':>13} {'wall s':>7} {'slowest fn s':>12} {'overhead s':>10} "
          f"{'overhead/client ms':>18}")
    for k, cold, wall, slow, ov, _ in rows:
        print(f"{k:>7} {cold[0]:>13.2f} {wall:>7.2f} {slow:>12.3f} {ov:>10.3f} {ov / k * 1000:>18.1f}")


if __name__ == "__main__":
    main()
