"""Training time with `selection: reliability` against random selection,
under a 20% crash rate, side by side in one run.

    .venv/bin/python bench/bench_selection.py [--rounds 10] [--clients 10] [--per-round 5]
                                              [--crash 0.4] [--repeat 1]

Uniform crashes on every client would give selection nothing to learn, so
the crash rate depends on the client: half the clients run on a local
OpenWhisk cluster whose fl_client activations crash with probability
`--crash` (0.4 by default), the other half on a cluster without faults. A
uniformly random choice of clients therefore meets crashes on 20% of its
invocations overall, as one cluster-wide rate of 20% would.

Each session is a real sync session on the local fabric (embedded MongoDB,
model "small", digits, the real client and aggregator functions), with the
same seed, settings and fault seeds; only `selection` differs. A crash kills
the worker under the activation, so the client's retry pays a cold start as
well as the backoff. Each session gets clusters of its own (fresh namespaces
on the same fabric), so neither inherits the other's warm workers; with
--repeat the order alternates. Reported per session: wall time from the
first round's start to the last round's end, client invocations, retries
(attempts after a client's first in a round), failed attempts, the share of
invocations on the crashing cluster, and the final accuracy.
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


def config(tmp: Path, tag: str, selection: str, args: argparse.Namespace) -> Path:
    steady, flaky = f"steady_{tag}", f"flaky_{tag}"
    half = args.clients // 2
    p = tmp / f"bench-{tag}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: selection_{tag}
        providers:
          openwhisk:
            {steady}: {{kind: local}}
            {flaky}:
              kind: local
              faults: {{crash: {args.crash}, seed: 17, functions: [fl_client]}}
        scenarios:
          federated_learning:
            server_config: {{server_cluster_name: {steady}}}
            clients_info:
              total_num_clients: {args.clients}
              num_clients_per_round: {args.per_round}
              clusters: {{{steady}: {args.clients - half}, {flaky}: {half}}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: embedded, db: bench_selection}}
            model_params: {{lr: "1e-2", optim: adam, local_epochs: "1"}}
            training:
              rounds: {args.rounds}
              seed: 5
              quorum: 0.6
              round_deadline_s: 600
              retries: {{max_attempts: 4, backoff_s: 0.5, backoff_max_s: 4}}
              selection: {selection}
              exploration: {args.exploration}
            functions:
              fl_client:
                openwhisk: {{timeout: "60000", memory: "1024"}}
        """))
    return p


def session_figures(store, session: str, flaky_cluster: str) -> dict:
    rounds = store.rounds(session)
    attempts = [a for a in store.attempts(session) if a["client"].startswith("client_")]
    return {
        "wall_s": max(r["ended"] for r in rounds) - min(r["started"] for r in rounds),
        "rounds": len(rounds),
        "invocations": len(attempts),
        "retries": sum(1 for a in attempts if a["attempt"] > 1),
        "failed": sum(1 for a in attempts if a["state"] != "succeeded"),
        "flaky_share": sum(1 for a in attempts if a["cluster"] == flaky_cluster) / max(1, len(attempts)),
        "cold_starts": sum(1 for a in attempts if a.get("cold_start")),
        "accuracy": rounds[-1].get("accuracy"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--crash", type=float, default=0.4, help="crash rate of the flaky half's cluster")
    ap.add_argument("--exploration", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="2 rounds of 2 out of 4 clients, no crashes (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.clients, args.per_round, args.crash = 2, 4, 2, 0.0
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.local import shutdown_local_services
    from fedkeeper.store import connect
    from fedkeeper.local.store import EmbeddedMongo
    results: dict[str, list[dict]] = {"random": [], "reliability": []}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        os.environ["FEDKEEPER_STATE_DIR"] = str(state)
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")
        try:
            for rep in range(args.repeat):
                order = ["random", "reliability"] if rep % 2 == 0 else ["reliability", "random"]
                for selection in order:
                    tag = f"{selection[:3]}{rep}"
                    t0 = time.time()
                    rc = run_start(load_config(config(Path(tmp), tag, selection, args)), None,
                                   keep_services=True)
                    assert rc == 0, f"session with selection {selection} failed"
                    store = connect(EmbeddedMongo(state / "mongo").running_url(), "bench_selection")
                    sess = store.latest_session()
                    figures = session_figures(store, sess["_id"], f"flaky_{tag}")
                    figures["total_s"] = time.time() - t0
                    store.close()
                    results[selection].append(figures)
        finally:
            shutdown_local_services(state)
            EmbeddedMongo(state / "mongo").stop()
    half = args.clients // 2
    print()
    print(f"{args.rounds} sync rounds, {args.per_round} of {args.clients} clients per round; "
          f"{half} clients on a cluster crashing {args.crash:.0%} of fl_client activations, "
          f"{args.clients - half} on a cluster without faults "
          f"(random choice: {args.crash * half / args.clients:.0%} crashes overall); "
          f"exploration {args.exploration}")
    print(f"{'selection':>11} {'wall s':>8} {'invocations':>11} {'retries':>7} {'failed':>7} "
          f"{'on crashing cluster':>19} {'cold starts':>11} {'accuracy':>8}")
    for selection, runs in results.items():
        for f in runs:
            acc = f"{f['accuracy']:.4f}" if f["accuracy"] is not None else "-"
            print(f"{selection:>11} {f['wall_s']:>8.1f} {f['invocations']:>11} {f['retries']:>7} "
                  f"{f['failed']:>7} {f['flaky_share']:>19.0%} {f['cold_starts']:>11} {acc:>8}")
    if args.repeat > 1:
        for selection, runs in results.items():
            print(f"median wall time, {selection}: {statistics.median(f['wall_s'] for f in runs):.1f}s")


if __name__ == "__main__":
    main()
