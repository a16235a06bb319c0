"""`python -m fedkeeper.local.fabric serve|up|down|status`: the fabric's own
command line (the keeper's is `fedkeeper fabric ...`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .entities import Settings, parse_stem_cells
from .service import fabric_down, fabric_status, fabric_up, serve


def _stem_cells(text: str) -> dict[str, int]:
    try:
        return parse_stem_cells(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedkeeper.local.fabric",
                                description="The embedded local OpenWhisk fabric.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the fabric in the foreground")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    d = Settings()
    s.add_argument("--user-memory-mb", type=int, default=d.user_memory_mb,
                   help="the sum of the memory limits of the workers (and stem cells) run at once, "
                        "as an OpenWhisk invoker's userMemory (default %(default)s)")
    s.add_argument("--stem-cells", type=_stem_cells, default=d.stem_cells, metavar="RUNTIME=N,...",
                   help="prewarmed workers per runtime (default: %(default)s; empty: none)")
    s.add_argument("--stem-memory-mb", type=int, default=d.stem_memory_mb,
                   help="what an untaken stem cell counts against the user memory")
    s.add_argument("--no-fork-stem-cells", dest="fork_stem_cells", action="store_false",
                   help="start every stem cell as its own process (importing its runtime's modules) "
                        "instead of forking it from the runtime's zygote")
    s.add_argument("--concurrent-invocations", type=int, default=d.concurrent_invocations)
    s.add_argument("--invocations-per-minute", type=int, default=d.invocations_per_minute)
    s.add_argument("--payload-limit", type=int, default=d.payload_limit)
    s.add_argument("--idle-s", type=float, default=d.idle_s)
    s.add_argument("--max-records", type=int, default=d.max_records,
                   help="activation records kept per namespace, at most")
    s.add_argument("--record-mb", type=float, default=d.record_bytes / 2 ** 20,
                   help="megabytes of activation records kept per namespace, at most")
    for name in ("up", "down", "status"):
        c = sub.add_parser(name)
        c.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.cmd == "serve":
        serve(a.state_dir, a.host, a.port, Settings(
            payload_limit=a.payload_limit, concurrent_invocations=a.concurrent_invocations,
            invocations_per_minute=a.invocations_per_minute, idle_s=a.idle_s,
            user_memory_mb=a.user_memory_mb, stem_cells=a.stem_cells, stem_memory_mb=a.stem_memory_mb,
            fork_stem_cells=a.fork_stem_cells,
            max_records=a.max_records,
            record_bytes=max(1, int(a.record_mb * 2 ** 20))))
        return 0
    if a.cmd == "up":
        info = fabric_up(a.state_dir)
        print(json.dumps({k: v for k, v in info.items() if k != "auth"}))
        return 0
    if a.cmd == "down":
        print("stopped" if fabric_down(a.state_dir) else "not running")
        return 0
    info = fabric_status(a.state_dir, capacity=True)
    print(json.dumps({k: v for k, v in info.items() if k != "auth"}) if info else "not running")
    return 0 if info else 1


if __name__ == "__main__":
    sys.exit(main())
