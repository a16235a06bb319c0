"""Time to 0.93 test accuracy for the main job (config-local.yaml: digits over
10 clients on a local OpenWhisk and a local Cloud Functions cluster, embedded
MongoDB), from a cold start: fresh state directory, no warm workers.

    .venv/bin/python bench/bench_main_job.py [--config config-local.yaml] [--target 0.93]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "config-local.yaml"))
    ap.add_argument("--target", type=float, default=0.93)
    args = ap.parse_args()
    from fedkeeper.cli import run_start
    from fedkeeper.config import load_config
    from fedkeeper.store import connect
    from fedkeeper.store.embedded import EmbeddedMongo
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDKEEPER_STATE_DIR"] = str(Path(tmp) / "state")
        os.environ["FEDKEEPER_LOG_DIR"] = str(Path(tmp) / "logs")
        cfg = load_config(args.config)
        t0 = time.time()
        rc = run_start(cfg, None, keep_services=True)
        total = time.time() - t0
        mongo = EmbeddedMongo(Path(tmp) / "state" / "mongo")
        store = connect(mongo.running_url(), cfg.scenario()[1].mongo_config.db)
        sess = store.latest_session()
        rounds = store.rounds(sess["_id"])
        hit = next((r for r in rounds if (r.get("accuracy") or 0) >= args.target), None)
        first = rounds[0]
        print()
        print(f"exit status {rc}; {len(rounds)} rounds; final accuracy {rounds[-1].get('accuracy'):.4f}")
        print(f"wall time, command start to end (deploy, cold starts, init, rounds): {total:.1f} s")
        print(f"round 1 (cold workers, Keras build): {first['ended'] - first['started']:.1f} s")
        if hit:
            print(f"reached {args.target} after round {hit['round'] + 1}: "
                  f"{hit['ended'] - sess['created']:.1f} s after the session started, "
                  f"{hit['ended'] - t0:.1f} s after the command started")
        else:
            print(f"did not reach {args.target}")
        store.close()
        from fedkeeper.local import shutdown_local_services
        shutdown_local_services(Path(tmp) / "state")
        mongo.stop()


if __name__ == "__main__":
    main()
