"""Stragglers: a sync session with crashes and real timeouts, divided by the
same session without faults, with and without hedged re-invocation.

    .venv/bin/python bench/bench_stragglers.py [--clients 20] [--rounds 5] [--crash 0.2] [--timeout 0.1]
    .venv/bin/python bench/bench_stragglers.py --smoke

Each session is a real sync session on the local fabric (embedded MongoDB,
model "small", `local_epochs: 0`: clients read the global model and write it
back, with the real aggregator), all clients on one local OpenWhisk cluster
of its own (a fresh namespace, so no session inherits another's warm
workers), same seed and settings. Faulted sessions inject, per fl_client
activation, `crash` (the worker dies under it: a fast failure, a retry after
backoff and a cold start) and `timeout` (the activation is held until the
function's time limit, as a real overrun is). The limit is --limit-x times
the median warm client duration, measured in a first calibration session
without faults. Hedging is training.hedging with its defaults (p90 x 1.5,
3 peers).

Reported per session: wall time from the first round's start to the last
round's end, client attempts, hedged attempts (and how many won), timed out
and crashed attempts; then each faulted session divided by the fault-free
session with the same hedging setting, and by the fault-free session
without hedging.
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

DB = "bench_stragglers"


def config(tmp: Path, tag: str, args: argparse.Namespace, *, faults: bool, hedging: bool,
           limit_ms: int) -> Path:
    cluster = f"ow_{tag}"
    fault_line = (f"\n      faults: {{crash: {args.crash}, timeout: {args.timeout}, seed: 23, "
                  f"functions: [fl_client]}}" if faults else "")
    p = tmp / f"bench-{tag}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: stragglers_{tag}
        providers:
          openwhisk:
            {cluster}:
              kind: local""") + fault_line + textwrap.dedent(f"""
        scenarios:
          federated_learning:
            server_config: {{server_cluster_name: {cluster}}}
            clients_info: {{total_num_clients: {args.clients}, num_clients_per_round: {args.clients},
                            clusters: {{{cluster}: {args.clients}}}}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: embedded, db: {DB}}}
            model_params: {{local_epochs: 0}}
            training:
              rounds: {args.rounds}
              seed: 7
              quorum: 0.8
              round_deadline_s: 600
              retries: {{max_attempts: 4, backoff_s: 0.2, backoff_max_s: 2}}
              hedging: {{enabled: {str(hedging).lower()}}}
            functions:
              fl_client:
                openwhisk: {{memory: "128", timeout: "{limit_ms}"}}
        """))
    return p


def client_attempts(store, session: str) -> list[dict]:
    return [a for a in store.attempts(session) if a["client"].startswith("client_")]


def figures(store, session: str) -> dict:
    rounds = store.rounds(session)
    attempts = client_attempts(store, session)
    hedges = [a for a in attempts if a.get("hedge")]
    return {
        "wall_s": max(r["ended"] for r in rounds) - min(r["started"] for r in rounds),
        "state": store.session(session).get("state"),
        "attempts": len(attempts),
        "hedges": len(hedges),
        "hedges_won": sum(1 for a in hedges if a["state"] == "succeeded"),
        "timed_out": sum(1 for a in attempts if a.get("error_class") == "timeout"),
        # Cold code loads past limit + init grace: the machine, not the fault plan.
        "init_timeouts": sum(1 for a in attempts if "during initialization" in (a.get("error") or "")),
        "crashed": sum(1 for a in attempts if a["state"] == "failed" and a.get("error_class") != "timeout"),
    }


def warm_median_s(store, session: str) -> float:
    durations = [a["duration_ms"] / 1000 for a in client_attempts(store, session)
                 if a["round"] > 0 and a["state"] == "succeeded" and a.get("duration_ms") is not None]
    return statistics.median(durations)


def slowest_code_load_s(store, session: str) -> float:
    return max((a.get("init_ms") or 0) / 1000 for a in client_attempts(store, session))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--crash", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=0.1, help="share of activations held to the limit")
    ap.add_argument("--limit-x", type=float, default=10.0, help="function limit / median client duration")
    ap.add_argument("--min-limit-ms", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="6 clients, 2 rounds (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.rounds = 6, 2
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.local import shutdown_local_services
    from fedkeeper.local.store import EmbeddedMongo
    from fedkeeper.store import connect

    rows: dict[tuple[bool, bool], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        os.environ["FEDKEEPER_STATE_DIR"] = str(state)
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")

        def run(tag: str, *, faults: bool, hedging: bool, limit_ms: int) -> tuple[dict, float]:
            t0 = time.time()
            rc = run_start(load_config(config(Path(tmp), tag, args, faults=faults, hedging=hedging,
                                              limit_ms=limit_ms)), None, keep_services=True)
            store = connect(EmbeddedMongo(state / "mongo").running_url(), DB)
            try:
                sess = store.latest_session()
                f = figures(store, sess["_id"])
                median = warm_median_s(store, sess["_id"]) if rc == 0 else float("nan")
                f["code_load_s"] = slowest_code_load_s(store, sess["_id"])
            finally:
                store.close()
            f["rc"], f["total_s"] = rc, time.time() - t0
            return f, median

        try:
            # Calibration: the median warm client duration sets the limit.
            calib, median = run("calib", faults=False, hedging=False, limit_ms=60000)
            limit_ms = max(args.min_limit_ms, round(args.limit_x * median * 1000))
            # A code load (cold start: after every crash and timeout) gets the
            # limit plus INIT_GRACE_S; a limit it cannot meet would time out
            # every cold start, which no platform operator would configure.
            from fedkeeper.local.fabric.watchdog import INIT_GRACE_S
            load_floor_ms = round((2 * calib["code_load_s"] - INIT_GRACE_S) * 1000)
            raised = load_floor_ms > limit_ms
            limit_ms = max(limit_ms, load_floor_ms)
            for faults in (False, True):
                for hedging in (False, True):
                    tag = f"{'f' if faults else 'c'}{'h' if hedging else 'n'}"
                    rows[(faults, hedging)], _ = run(tag, faults=faults, hedging=hedging, limit_ms=limit_ms)
        finally:
            shutdown_local_services(state)
            EmbeddedMongo(state / "mongo").stop()

    print()
    print(f"sync, {args.clients} clients x {args.rounds} rounds, no-op clients; faulted: crash {args.crash:.0%}, "
          f"real timeout {args.timeout:.0%} of fl_client activations; median warm client duration "
          f"{median * 1000:.0f} ms, function limit {limit_ms} ms ({limit_ms / 1000 / median:.1f}x"
          + (f"; raised above {args.limit_x:g}x so a cold code load ({calib['code_load_s']:.1f} s in "
             f"calibration) fits twice in limit + init grace)" if raised else ")"))
    print(f"{'faults':>6} {'hedging':>7} {'rc':>3} {'wall s':>7} {'attempts':>8} {'hedges':>6} {'won':>4} "
          f"{'timed out':>9} {'of them init':>12} {'crashed':>7}")
    for (faults, hedging), f in rows.items():
        print(f"{'yes' if faults else 'no':>6} {'on' if hedging else 'off':>7} {f['rc']:>3} {f['wall_s']:>7.2f} "
              f"{f['attempts']:>8} {f['hedges']:>6} {f['hedges_won']:>4} {f['timed_out']:>9} {f['init_timeouts']:>12} "
              f"{f['crashed']:>7}")
    base = rows[(False, False)]["wall_s"]
    print()
    print(f"faulted / fault-free, hedging off: {rows[(True, False)]['wall_s'] / base:.2f}x")
    print(f"faulted / fault-free, hedging on:  {rows[(True, True)]['wall_s'] / rows[(False, True)]['wall_s']:.2f}x"
          f"  (against fault-free without hedging: {rows[(True, True)]['wall_s'] / base:.2f}x)")
    if any(f["rc"] != 0 for f in rows.values()) or any(f["init_timeouts"] for f in rows.values()):
        print("NOTE: a session failed or cold code loads timed out; the ratios above do not measure "
              "hedging alone (rerun on an idle machine, or raise --min-limit-ms)")


if __name__ == "__main__":
    main()
