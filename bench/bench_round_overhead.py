"""Round overhead of the keeper: round wall time minus the slowest client's
function duration, against clients per round, with no-op training.

    .venv/bin/python bench/bench_round_overhead.py [--clients 10,100,1000] [--rounds 3]
                                                   [--concurrency 100] [--aggregation hierarchical]

Each setting is a real session on the local fabric (half the clients on a
local OpenWhisk cluster, half on a local Cloud Functions cluster) with an
embedded MongoDB, `local_epochs: 0` (clients read the global model and write
it back as their update, so blob I/O is inside the function duration) and
the real aggregator. Round 0 carries the cold starts and is reported apart.
Overhead covers dispatch, tracking, the attempt records, the aggregator
invocation (a real FedAvg over the round's updates plus evaluation) and the
round bookkeeping; `per client` divides it by the clients, and should fall
as they grow. A second table splits each round's time from the keeper's
own records: before its first invocation, invoking the round's clients,
from the last client the keeper saw deliver to the aggregator's call, the
aggregator's call, and after it.

`--concurrency` is how many activations one fl_client worker of the local
OpenWhisk takes at once (limits.concurrency) and how many requests the local
Cloud Functions instance serves at once. A cloud runs a round's clients side
by side; with one activation a worker, the fabric's 2 GB of user memory
holds about a dozen no-op workers, 500 clients would queue in waves, and the
queue would count as overhead. `--concurrency 1` measures that too.

`--aggregation hierarchical` runs the same sessions with a combiner per
cluster that folds its clients' updates in as they arrive
(`training.aggregation`), so that the aggregator, once the round's last
client ends, only combines the two clusters' partial aggregates.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config(tmp: Path, clients: int, rounds: int, concurrency: int = 1, aggregation: str = "flat") -> Path:
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
            training: {{rounds: {rounds}, seed: 1, round_deadline_s: 600, aggregation: {aggregation}}}
            functions:
              fl_client:
                # A no-op client needs ~60 MB; at 128 MB a worker, the fabric's memory
                # budget keeps the aggregator's warm worker beside the clients' workers.
                openwhisk: {{memory: "128", timeout: "120000", concurrency: {concurrency}}}
                google: {{concurrency: {concurrency}}}
        """))
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,100,1000", help="clients per round, one session each")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per session (round 0 is the cold one)")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="activations per fl_client worker / requests per Cloud Functions instance")
    ap.add_argument("--aggregation", choices=("flat", "hierarchical"), default="flat",
                    help="training.aggregation: hierarchical folds updates in per cluster during the round")
    ap.add_argument("--smoke", action="store_true", help="4 clients, 2 rounds (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.rounds = "4", 2
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.store import connect
    rows, split = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDKEEPER_STATE_DIR"] = str(Path(tmp) / "state")
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")
        for k in [int(x) for x in args.clients.split(",")]:
            cfg = load_config(config(Path(tmp), k, args.rounds, args.concurrency, args.aggregation))
            rc = run_start(cfg, None, keep_services=True)
            assert rc == 0, f"session with {k} clients failed"
            from fedkeeper.local.store import EmbeddedMongo
            url = EmbeddedMongo(Path(tmp) / "state" / "mongo").running_url()
            store = connect(url, "bench")
            sess = store.latest_session()
            over, walls, slowest, aggregator, phases = [], [], [], [], []
            for r in store.rounds(sess["_id"]):
                every = store.attempts(sess["_id"], r["round"])
                attempts = [a for a in every if a["client"].startswith("client_") and a["state"] == "succeeded"]
                agg_calls = [a for a in every if a["function"] == "fl_server_aggregator" and a["state"] == "succeeded"]
                agg = [a["finished"] - a["submitted"] for a in agg_calls]
                wall = r["ended"] - r["started"]
                slow = max(a["duration_ms"] for a in attempts) / 1000
                if r["round"] == 0:
                    cold = (wall, slow)
                    continue
                walls.append(wall)
                slowest.append(slow)
                over.append(wall - slow)
                aggregator.append(sum(agg))
                sent = [a["submitted"] for a in attempts]
                last_seen = max(a["finished"] for a in attempts)
                phases.append((min(sent) - r["started"], max(sent) - min(sent),
                               agg_calls[0]["submitted"] - last_seen, sum(agg),
                               r["ended"] - agg_calls[-1]["finished"]))
            store.close()
            rows.append((k, cold, statistics.median(walls), statistics.median(slowest),
                         statistics.median(over), statistics.median(aggregator)))
            split.append((k, [statistics.median(p[i] for p in phases) for i in range(5)]))
        from fedkeeper.local import shutdown_local_services
        from fedkeeper.local.store import EmbeddedMongo
        shutdown_local_services(Path(tmp) / "state")
        EmbeddedMongo(Path(tmp) / "state" / "mongo").stop()
    print()
    print(f"concurrency {args.concurrency}, {args.aggregation} aggregation; medians over rounds 1..{args.rounds - 1}")
    print(f"{'clients':>7} {'round0 wall s':>13} {'wall s':>7} {'slowest fn s':>12} {'overhead s':>10} "
          f"{'of it aggregator s':>18} {'overhead/client ms':>18}")
    for k, cold, wall, slow, ov, agg in rows:
        print(f"{k:>7} {cold[0]:>13.2f} {wall:>7.2f} {slow:>12.3f} {ov:>10.3f} {agg:>18.3f} "
              f"{ov / k * 1000:>18.2f}")
    print(f"\nwhere a round's time goes, medians in s (keeper's records)\n{'clients':>7} {'to 1st invoke':>13} "
          f"{'invoking':>9} {'last delivery to aggregator':>27} {'aggregator':>10} {'after it':>8}")
    for k, (first, invoking, to_agg, agg, after) in split:
        print(f"{k:>7} {first:>13.3f} {invoking:>9.3f} {to_agg:>27.3f} {agg:>10.3f} {after:>8.3f}")
    for (k1, *_, ov1, _), (k2, *_, ov2, _) in zip(rows, rows[1:]):
        trend = "falls" if ov2 / k2 < ov1 / k1 else "rises"
        print(f"per-client overhead {trend} from {k1} to {k2} clients: "
              f"{ov1 / k1 * 1000:.2f} -> {ov2 / k2 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
