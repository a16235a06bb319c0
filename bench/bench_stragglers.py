"""Stragglers: a sync session with crashes and real timeouts, divided by the
same session without faults, with and without hedged re-invocation.

    .venv/bin/python bench/bench_stragglers.py [--clients 10] [--rounds 8] [--crash 0.2] [--timeout 0.1] [--timeline]
        [--local-epochs 0]
    .venv/bin/python bench/bench_stragglers.py --smoke

Every session is a real sync session on the local fabric (embedded MongoDB,
model "small", `local_epochs: 0` unless --local-epochs says otherwise: a
client reads the global model and writes it back, with the real
aggregator), its clients on one local OpenWhisk
cluster, same seed and settings. All sessions share one fabric namespace,
so each starts from the warm workers the one before left, and the fault
sequence (a pure function of seed, namespace and invocation number) restarts
from its seed in each faulted session: the faulted sessions with and without
hedging see the same faults until their invocations diverge.

1. Calibration: a fault-free session with a generous limit; its warm rounds
   give the median client duration, and the function limit is --limit-x
   times it, at least --min-limit-ms (5 s by default: on a shared two-core
   machine a fresh worker's first run swings past 10x the warm median, and
   a limit it cannot meet times out every attempt after a crash).
   A new limit is a new action version, so the first measured session's
   first round loads every worker's code again, all at once: the limit is
   raised, and says so, when the slowest such load of the calibration
   (times 2) would not fit in the limit plus the fabric's init grace, or
   the slowest first run of a fresh worker (times 2) in the limit.
2. Four measured sessions with that limit: fault-free and faulted, hedging
   off and on (training.hedging: p90 x 1.5 and 3 peers by default; see
   --hedge-percentile, --hedge-factor) and min_peers half the round
   (--hedge-min-peers; see below). Faulted sessions inject per fl_client
   activation `crash` (the worker dies under it: a fast failure, then a
   retry, at once the first time: retries.fast_first_retry, backed off
   after that) and `timeout` (held until the limit, then recorded as
   a time-limit overrun, as OpenWhisk does). Either way the worker is gone
   (or held): the next attempt that finds no idle warm worker is a cold
   start, which is what --timeline shows dominating on a loaded machine.

Why min_peers is half the round here: with the config's default of 3, the
threshold is set by the three fastest clients of a round; on a loaded
two-core machine ordinary clients then ran past it and were hedged (45 of
100 fault-free client runs in one run), the hedges' extra workers competed
for the cores, and the fault-free rounds with hedging took ten times as
long as without.

The clients get 512 MB (--client-memory-mb), what a TensorFlow function
needs on a real cluster, and the cluster three TensorFlow stem cells
(--stem-cells; the cluster config's `stem_cells`), about the cold starts a
round's crashes and held activations ask for. A stem cell serves only an
action given at least its memory: with 128 MB clients, every cold start
after a crash started a bare process and imported numpy and pymongo (about
1 s on two loaded cores, against 0.2-0.3 s from a stem cell), which the
faulted sessions paid three or four times a round.

Only rounds after the first count: round 0 carries the cold starts of a
new limit's code loads, which are the machine's, not the fault plan's. The
fabric gets --user-memory-mb so that the clients of a round run at once
(the bench is about the keeper's handling of stragglers, not queueing).
Printed per session: the summed wall time of the counted rounds, client
attempts, hedges (and how many won), timed-out and crashed attempts, cold
starts; then faulted / fault-free with hedging off and on. --timeline
lists the faulted sessions' attempts other than a first success.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB = "bench_stragglers"
NAMESPACE = "stragglers"


def config(tmp: Path, tag: str, args: argparse.Namespace, *, faults: bool, hedging: bool,
           limit_ms: int, rounds: int) -> Path:
    cluster = f"ow_{tag}"
    fault_line = (f", faults: {{crash: {args.crash}, timeout: {args.timeout}, seed: {args.fault_seed}, "
                  f"functions: [fl_client]}}" if faults else "")
    p = tmp / f"bench-{tag}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: stragglers_{tag}
        providers:
          openwhisk:
            {cluster}: {{kind: local, namespace: {NAMESPACE}, user_memory_mb: {args.user_memory_mb},
                         stem_cells: {{tensorflow: {args.stem_cells}}}{fault_line}}}
        scenarios:
          federated_learning:
            server_config: {{server_cluster_name: {cluster}}}
            clients_info: {{total_num_clients: {args.clients}, num_clients_per_round: {args.clients},
                            clusters: {{{cluster}: {args.clients}}}}}
            data_sampling: {{model: small, batch_size: 16}}
            mongo_config: {{url: embedded, db: {DB}}}
            model_params: {{local_epochs: {args.local_epochs}}}
            training:
              rounds: {rounds}
              seed: 7
              quorum: 0.8
              round_deadline_s: 600
              retries: {{max_attempts: 8, backoff_s: {args.backoff_s}, backoff_max_s: 2}}
              hedging: {{enabled: {str(hedging).lower()}, percentile: {args.hedge_percentile},
                        factor: {args.hedge_factor}, min_peers: {args.hedge_min_peers}}}
            functions:
              fl_client:
                openwhisk: {{memory: "{args.client_memory_mb}", timeout: "{limit_ms}ms"}}
        """))
    return p


def client_attempts(store, session: str) -> list[dict]:
    return [a for a in store.attempts(session) if a["client"].startswith("client_") and a["round"] > 0]


def figures(store, session: str) -> dict:
    rounds = [r for r in store.rounds(session) if r["round"] > 0]
    attempts = client_attempts(store, session)
    hedges = [a for a in attempts if a.get("hedge")]
    walls = [r["ended"] - r["started"] for r in rounds]
    return {
        "wall_s": sum(walls),
        "median_round_s": statistics.median(walls) if walls else float("nan"),
        "max_round_s": max(walls) if walls else float("nan"),
        "attempts": len(attempts),
        "hedges": len(hedges),
        "hedges_won": sum(1 for a in hedges if a["state"] == "succeeded"),
        "timed_out": sum(1 for a in attempts if a.get("error_class") == "timeout"),
        "crashed": sum(1 for a in attempts if a["state"] == "failed" and a.get("error_class") != "timeout"),
        "cold": sum(1 for a in attempts if a.get("cold_start")),
        # Code loads past limit + init grace: the machine, not the fault plan.
        "init_timeouts": sum(1 for a in attempts if "during initialization" in (a.get("error") or "")),
        "failed_clients": sum(r.get("failed", 0) for r in rounds),
    }


def timeline(store, session: str) -> list[str]:
    """Each counted round's client attempts that were not a plain success,
    in seconds from the round's start (--timeline)."""
    lines = []
    for r in store.rounds(session):
        if r["round"] == 0:
            continue
        t0 = r["started"]
        lines.append(f"  round {r['round'] + 1}: {r.get('ended', float('nan')) - t0:.2f} s")
        attempts = [a for a in store.attempts(session, r["round"]) if a["client"].startswith("client_")]
        odd = {a["client"] for a in attempts if a["attempt"] > 1 or a["state"] != "succeeded"}
        for a in sorted((a for a in attempts if a["client"] in odd), key=lambda a: (a["client"], a["attempt"])):
            end = a.get("finished")
            lines.append(f"    {a['client']:>10} #{a['attempt']}{' hedge' if a.get('hedge') else '      '} "
                         f"{a['state']:>9} {a.get('error_class') or '':>17} submitted {a['submitted'] - t0:6.2f} "
                         f"ended {(end - t0) if end else float('nan'):6.2f} "
                         f"ran {(a.get('duration_ms') or 0) / 1000:6.2f}"
                         + (f" cold, code load {(a.get('init_ms') or 0) / 1000:.2f}" if a.get('cold_start') else "")
                         + _client_timings(a))
    return lines


def _client_timings(attempt: dict) -> str:
    """What fl_client said its run spent: reading the model and partition,
    training, storing the update (seconds)."""
    t = (attempt.get("result") or {}).get("timings") or {}
    parts = [f"{k[:-3]} {t[k] / 1000:.2f}" for k in ("load_ms", "train_ms", "store_ms")
             if isinstance(t.get(k), (int, float))]
    return f" ({', '.join(parts)})" if parts else ""


def slowest_code_load_s(store, session: str) -> float:
    return max(((a.get("init_ms") or 0) / 1000 for a in store.attempts(session) if a["client"].startswith("client_")),
               default=0.0)


def slowest_cold_run_s(store, session: str) -> float:
    """The longest run of a freshly loaded worker (its first store
    connection and model read), code load excluded."""
    return max((((a.get("duration_ms") or 0) - (a.get("init_ms") or 0)) / 1000 for a in store.attempts(session)
                if a["client"].startswith("client_") and a.get("cold_start")), default=0.0)


def warm_median_s(store, session: str) -> float:
    durations = [a["duration_ms"] / 1000 for a in client_attempts(store, session)
                 if a["state"] == "succeeded" and not a.get("cold_start") and a.get("duration_ms") is not None]
    return statistics.median(durations)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8, help="rounds per session; the first is not counted")
    ap.add_argument("--local-epochs", type=int, default=0, help="model_params.local_epochs (0: no-op clients)")
    ap.add_argument("--crash", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=0.1, help="share of activations held to the limit")
    ap.add_argument("--limit-x", type=float, default=10.0, help="function limit / median client duration")
    # A limit a loaded machine's fresh workers cannot meet times out every
    # first run after a crash, so no worker ever warms up again.
    ap.add_argument("--min-limit-ms", type=int, default=5000)
    ap.add_argument("--backoff-s", type=float, default=0.2, help="training.retries.backoff_s")
    ap.add_argument("--fault-seed", type=int, default=23)
    ap.add_argument("--hedge-percentile", type=float, default=0.9, help="training.hedging.percentile")
    ap.add_argument("--hedge-factor", type=float, default=1.5, help="training.hedging.factor")
    ap.add_argument("--hedge-min-peers", type=int, default=None,
                    help="training.hedging.min_peers (default: half the clients; the config's default is 3)")
    # Held activations keep their worker (and its memory) until the limit:
    # room for them, so that queueing is not what is measured.
    ap.add_argument("--user-memory-mb", type=int, default=16384)
    ap.add_argument("--client-memory-mb", type=int, default=512, help="fl_client's memory limit")
    ap.add_argument("--stem-cells", type=int, default=3, help="the cluster's TensorFlow stem cells")
    ap.add_argument("--timeline", action="store_true", help="print the faulted sessions' odd attempts")
    ap.add_argument("--smoke", action="store_true", help="4 clients, 2 rounds, 3 s limit (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.rounds, args.min_limit_ms = 4, 2, 3000
    if args.hedge_min_peers is None:
        args.hedge_min_peers = max(3, args.clients // 2)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (the first round is not counted)")
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.local import shutdown_local_services
    from fedkeeper.local.store import EmbeddedMongo
    from fedkeeper.store import connect

    rows: dict[tuple[bool, bool], dict] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the local services on the way out
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        os.environ["FEDKEEPER_STATE_DIR"] = str(state)
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")

        def run(tag: str, *, faults: bool, hedging: bool, limit_ms: int, rounds: int) -> tuple[dict, float]:
            print(f"--- session {tag}", flush=True)
            t0 = time.time()
            rc = run_start(load_config(config(Path(tmp), tag, args, faults=faults, hedging=hedging,
                                              limit_ms=limit_ms, rounds=rounds)), None, keep_services=True)
            store = connect(EmbeddedMongo(state / "mongo").running_url(), DB)
            try:
                sid = store.latest_session()["_id"]
                f = figures(store, sid)
                median = warm_median_s(store, sid) if rc == 0 else float("nan")
                f["code_load_s"] = slowest_code_load_s(store, sid)
                f["cold_run_s"] = slowest_cold_run_s(store, sid) if rc == 0 else 0.0
                f["timeline"] = timeline(store, sid) if faults and args.timeline else []
            finally:
                store.close()
            f["rc"], f["total_s"] = rc, time.time() - t0
            return f, median

        try:
            calib, median = run("calib", faults=False, hedging=False, limit_ms=60000, rounds=3)
            from fedkeeper.local.fabric.watchdog import INIT_GRACE_S
            load_floor_ms = round(max(2 * calib["code_load_s"] - INIT_GRACE_S, 2 * calib["cold_run_s"]) * 1000)
            limit_ms = max(args.min_limit_ms, load_floor_ms, round(args.limit_x * median * 1000))
            raised = limit_ms > round(args.limit_x * median * 1000)
            # Fault-free sessions first: a faulted one leaves dead and held workers behind.
            for faults, hedging in ((False, False), (False, True), (True, False), (True, True)):
                tag = f"{'faulted' if faults else 'clean'}_{'hedged' if hedging else 'plain'}"
                rows[(faults, hedging)], _ = run(tag, faults=faults, hedging=hedging, limit_ms=limit_ms,
                                                 rounds=args.rounds)
        finally:
            shutdown_local_services(state)
            EmbeddedMongo(state / "mongo").stop()

    print()
    print(f"sync, {args.clients} clients x {args.rounds - 1} counted rounds (after one uncounted), "
          f"{'no-op clients' if args.local_epochs == 0 else f'{args.local_epochs} local epoch(s) a client'}; "
          f"faulted: crash {args.crash:.0%}, real timeout {args.timeout:.0%} of fl_client activations; "
          f"median warm client duration {median * 1000:.0f} ms, function limit {limit_ms} ms "
          f"({limit_ms / 1000 / median:.1f}x"
          + (f", raised above {args.limit_x:g}x: at least --min-limit-ms, a cold code load "
             f"({calib['code_load_s']:.1f} s in calibration) twice in limit + init grace and a fresh "
             f"worker's first run ({calib['cold_run_s']:.1f} s) twice in the limit" if raised else "")
          + f"); retries backoff {args.backoff_s:g} s; hedging at {args.hedge_factor:g} x p"
            f"{args.hedge_percentile * 100:g} of the round's delivered attempts, once {args.hedge_min_peers} delivered")
    print(f"{'faults':>6} {'hedging':>7} {'rc':>3} {'wall s':>7} {'median round s':>14} {'max round s':>11} "
          f"{'attempts':>8} {'hedges':>6} {'won':>4} {'timed out':>9} {'of them init':>12} {'crashed':>7} {'cold':>4}")
    for (faults, hedging), f in sorted(rows.items()):
        print(f"{'yes' if faults else 'no':>6} {'on' if hedging else 'off':>7} {f['rc']:>3} {f['wall_s']:>7.2f} "
              f"{f['median_round_s']:>14.2f} {f['max_round_s']:>11.2f} {f['attempts']:>8} {f['hedges']:>6} "
              f"{f['hedges_won']:>4} {f['timed_out']:>9} {f['init_timeouts']:>12} {f['crashed']:>7} {f['cold']:>4}")
    for (faults, hedging), f in sorted(rows.items()):
        if f["timeline"]:
            print(f"faulted session, hedging {'on' if hedging else 'off'}: attempts other than a first success")
            print("\n".join(f["timeline"]))
    plain, hedged = rows[(False, False)]["wall_s"], rows[(False, True)]["wall_s"]
    print()
    print(f"faulted / fault-free, hedging off: {rows[(True, False)]['wall_s'] / plain:.2f}x")
    print(f"faulted / fault-free, hedging on:  {rows[(True, True)]['wall_s'] / hedged:.2f}x"
          f"  (against fault-free without hedging: {rows[(True, True)]['wall_s'] / plain:.2f}x)")
    clean_timeouts = rows[(False, False)]["timed_out"] + rows[(False, True)]["timed_out"]
    if any(f["rc"] != 0 for f in rows.values()) or clean_timeouts or any(f["init_timeouts"] for f in rows.values()):
        print("NOTE: a session failed, a fault-free session timed out or a code load ran past the limit; the "
              "ratios do not measure the fault plan alone (rerun on an idle machine, or raise --min-limit-ms)")


if __name__ == "__main__":
    main()
