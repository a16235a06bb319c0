"""Invocation throughput of the local OpenWhisk fabric through the provider layer.

N no-op invocations are dispatched (a thread pool, as the keeper submits)
and tracked to completion with `provider.track()` (batched listing), while
the fabric runs as its own process. Reported:
  invocations/s            N / (first invoke .. last outcome)
  keeper CPU ms / inv      process CPU time of this process only (the fabric
                           and its workers are other processes)
  detection latency        from the activation's recorded `end` to the moment
                           track() returned it (same host, same clock)
Goals on a 2-core machine: >= 300 inv/s, <= 0.5 ms CPU/inv, median < 50 ms.

`--platform gcf` runs the same through the local Cloud Functions host
(functions-framework, its own process) and the HTTP platforms' invoker:
invoke hands the POST to a worker thread, track collects the answers; the
detection latency is then from the answer's arrival to track().

With `--against DIR` (another checkout of the project, e.g. a
`git worktree` of an older commit) the bench runs `--runs` times in each
tree, alternating, each run its own process with its own fabric, and prints
the figures side by side with their medians: on a shared machine only
figures taken this way compare.

    python bench/bench_invocations.py [-n 1000] [--threads 8] [--platform gcf] [--json]
    python bench/bench_invocations.py --against /tmp/before [--runs 3]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedkeeper.config import GoogleCluster, OpenWhiskCluster  # noqa: E402
from fedkeeper.providers.base import Artifact, FunctionSpec, ProviderContext  # noqa: E402
from fedkeeper.local.openwhisk import LocalOpenWhiskProvider  # noqa: E402

NOOP = "def main(args):\n    return {'ok': True}\n"
NOOP_HTTP = ("import functions_framework\n\n\n@functions_framework.http\n"
             "def noop(request):\n    return {'ok': True}\n")


def noop_artifact(entry: str = "openwhisk") -> Artifact:
    name, source = ("__main__.py", NOOP) if entry == "openwhisk" else ("main.py", NOOP_HTTP)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), source)
    data = buf.getvalue()
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry=entry)


def make_provider(platform: str, state: Path):
    """The platform's local provider and the artifact of a no-op for it."""
    ctx = ProviderContext(state_dir=state)
    if platform == "gcf":
        from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider
        return LocalCloudFunctionsProvider("bench", GoogleCluster(kind="local"), ctx), noop_artifact("http")
    return LocalOpenWhiskProvider("bench", OpenWhiskCluster(kind="local"), ctx), noop_artifact()


def run_until_done(provider, invs: list, poll_s: float = 0.002) -> None:
    pending = {i.platform_id: i for i in invs}
    while pending:
        for o in provider.track(list(pending.values())):
            pending.pop(o.platform_id, None)
        time.sleep(poll_s)


def bench(n: int, threads: int, memory_mb: int, concurrency: int, state: Path,
          platform: str = "openwhisk") -> dict:
    provider, artifact = make_provider(platform, state)
    try:
        spec = FunctionSpec(name="noop", source="noop", memory_mb=memory_mb, timeout_s=30,
                            concurrency=concurrency, extra={"entry_point": "noop"})
        provider.deploy(spec, artifact)
        # Warm-up: the cold starts of the worker pool are not what is measured.
        with ThreadPoolExecutor(threads) as ex:
            run_until_done(provider, list(ex.map(lambda i: provider.invoke("noop", {"i": i}),
                                                 range(4 * threads))))

        lock = threading.Lock()
        pending: dict[str, object] = {}
        dispatched = threading.Event()
        errors: list[BaseException] = []

        def submit(i: int) -> None:
            inv = provider.invoke("noop", {"i": i})
            with lock:
                pending[inv.platform_id] = inv

        def dispatch() -> None:
            try:
                with ThreadPoolExecutor(threads) as ex:
                    for f in [ex.submit(submit, i) for i in range(n)]:
                        f.result()
            except BaseException as exc:  # reported below, not swallowed
                errors.append(exc)
            finally:
                dispatched.set()

        latencies: list[float] = []
        failed = 0
        cpu0, t0 = time.process_time(), time.time()
        threading.Thread(target=dispatch, daemon=True).start()
        done = 0
        while done < n and not errors:
            with lock:
                snapshot = list(pending.values())
            if snapshot:
                outs = provider.track(snapshot)
                now = time.time()
                with lock:
                    for o in outs:
                        pending.pop(o.platform_id, None)
                for o in outs:
                    done += 1
                    failed += 0 if o.ok else 1
                    if o.end is not None:
                        latencies.append(max(0.0, now - o.end))
            time.sleep(0.002)
        t1, cpu1 = time.time(), time.process_time()
        if errors:
            raise errors[0]
        latencies.sort()
        return {"invocations": n, "failed": failed, "seconds": round(t1 - t0, 3),
                "invocations_per_s": round(n / (t1 - t0), 1),
                "keeper_cpu_ms_per_invocation": round((cpu1 - cpu0) * 1000 / n, 3),
                "detection_median_ms": round(statistics.median(latencies) * 1000, 1),
                "detection_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
                "threads": threads, "memory_mb": memory_mb, "concurrency": concurrency,
                "platform": platform}
    finally:
        provider.close()


FIGURES = [("invocations/s", "invocations_per_s", "{:.0f}"),
           ("keeper CPU ms/invocation", "keeper_cpu_ms_per_invocation", "{:.3f}"),
           ("detection median ms", "detection_median_ms", "{:.1f}"),
           ("detection p95 ms", "detection_p95_ms", "{:.1f}")]


def run_in(tree: Path, a: argparse.Namespace) -> dict:
    """One run of the bench script of `tree`, in its own process."""
    cmd = [sys.executable, str(tree / "bench" / "bench_invocations.py"), "--json", "-n", str(a.n),
           "--threads", str(a.threads), "--memory-mb", str(a.memory_mb), "--concurrency", str(a.concurrency)]
    if a.platform != "openwhisk":   # older trees know only OpenWhisk
        cmd += ["--platform", a.platform]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"the bench of {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(a: argparse.Namespace) -> int:
    here = Path(__file__).resolve().parents[1]
    other = Path(a.against).resolve()
    if not (other / "bench" / "bench_invocations.py").is_file():
        print(f"--against: {other} has no bench/bench_invocations.py", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"this tree": [], "against": []}
    for _ in range(a.runs):
        runs["this tree"].append(run_in(here, a))
        runs["against"].append(run_in(other, a))
    if a.json:
        print(json.dumps({"this_tree": runs["this tree"], "against": runs["against"], "against_dir": str(other)}))
        return 0
    print(f"{a.runs} alternating runs of {a.n} no-op invocations each ({a.platform}); "
          f"this tree {here}, against {other}")
    print(f"  {'':26s}{'this tree':>32s}   {'against':>32s}")
    for label, key, fmt in FIGURES:
        cells = []
        for who in ("this tree", "against"):
            vals = [r[key] for r in runs[who]]
            cells.append(" ".join(fmt.format(v) for v in vals) + f" (med {fmt.format(statistics.median(vals))})")
        print(f"  {label:26s}{cells[0]:>32s}   {cells[1]:>32s}")
    failed = sum(r["failed"] for rs in runs.values() for r in rs)
    if failed:
        print(f"  {failed} invocations failed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=8, help="dispatching threads")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=1, help="the action's limits.concurrency")
    p.add_argument("--platform", choices=("openwhisk", "gcf"), default="openwhisk",
                   help="the local fabric (OpenWhisk) or the local Cloud Functions host")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="50 invocations (tests)")
    p.add_argument("--against", metavar="DIR", help="another checkout to run side by side with this one")
    p.add_argument("--runs", type=int, default=3, help="runs per tree with --against")
    a = p.parse_args()
    if a.smoke:
        a.n = 50
    if a.n < 1 or a.threads < 1 or a.runs < 1:
        print("-n, --threads and --runs must be at least 1", file=sys.stderr)
        return 2
    if a.against:
        return side_by_side(a)
    with tempfile.TemporaryDirectory(prefix="fk-bench-") as tmp:
        r = bench(a.n, a.threads, a.memory_mb, a.concurrency, Path(tmp), a.platform)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['invocations']} no-op invocations on {a.platform} ({r['failed']} failed) in {r['seconds']} s")
        print(f"  invocations/s            {r['invocations_per_s']:8.1f}   (goal >= 300)")
        print(f"  keeper CPU ms/invocation {r['keeper_cpu_ms_per_invocation']:8.3f}   (goal <= 0.5)")
        print(f"  detection median ms      {r['detection_median_ms']:8.1f}   (goal < 50)")
        print(f"  detection p95 ms         {r['detection_p95_ms']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
