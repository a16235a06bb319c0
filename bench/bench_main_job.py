"""The main job (config-local.yaml: digits over 10 clients on a local
OpenWhisk and a local Cloud Functions cluster, embedded MongoDB), cold and
then warm, with the memory of everything it starts.

    .venv/bin/python bench/bench_main_job.py            # cold run, then warm run
    .venv/bin/python bench/bench_main_job.py --smoke    # 1 round each (tests)

Cold: a fresh state directory, no service or worker running. Warm: the same
command again in the same state directory, its services and warm workers
kept from the cold run (`--keep-services`). Both are whole `fedkeeper start`
commands (deploy check, init, rounds), so their ratio is what a user waits
for the first time against every later time. Memory is the peak of the
summed PSS (proportional set size: shared pages are split between the
processes sharing them, so the sum is what the job really holds) of every
process the command starts: the keeper, the fabric and its workers, the
Cloud Functions host and the embedded store, sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def _belongs(proc: psutil.Process, marker: str) -> bool:
    try:
        if any(marker in part for part in proc.cmdline()):
            return True
        return proc.cwd().startswith(marker)
    except (psutil.Error, OSError):
        return False


class PssSampler(threading.Thread):
    """Sums the PSS of the command's process tree and of every process whose
    command line or working directory lies in the state directory (services
    run detached from the command), with their children."""

    def __init__(self, root_pid: int, marker: str, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.root_pid, self.marker, self.period_s = root_pid, marker, period_s
        self.peak = 0
        self.peak_by_kind: dict[str, int] = {}
        self.count_by_kind: dict[str, int] = {}     # processes at the peak
        self.stop = threading.Event()

    def _processes(self) -> list[psutil.Process]:
        seen: dict[int, psutil.Process] = {}
        roots = []
        try:
            roots.append(psutil.Process(self.root_pid))
        except psutil.Error:
            pass
        roots += [p for p in psutil.process_iter() if p.pid != os.getpid() and _belongs(p, self.marker)]
        for p in roots:
            seen[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    seen[c.pid] = c
            except psutil.Error:
                pass
        return list(seen.values())

    @staticmethod
    def _kind(proc: psutil.Process) -> str:
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            return "gone"
        for key, name in (("worker", "fabric workers"), ("fabric", "fabric"), ("functions", "Cloud Functions host"),
                          ("functions_framework", "Cloud Functions host"), ("secantus", "store"),
                          ("mongo", "store"), ("fedkeeper", "keeper")):
            if key in line:
                return name
        return "other"

    def run(self) -> None:
        while not self.stop.is_set():
            total, kinds, counts = 0, {}, {}
            for p in self._processes():
                try:
                    pss = p.memory_full_info().pss
                except (psutil.Error, OSError):
                    continue
                total += pss
                kind = self._kind(p)
                kinds[kind] = kinds.get(kind, 0) + pss
                counts[kind] = counts.get(kind, 0) + 1
            if total > self.peak:
                self.peak, self.peak_by_kind, self.count_by_kind = total, kinds, counts
            self.stop.wait(self.period_s)


def run_start(exe: str, cfg: Path, env: dict[str, str], marker: str, timeout_s: float) -> tuple[float, PssSampler]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "start", "-c", str(cfg), "--keep-services"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = PssSampler(proc.pid, marker)
    sampler.start()
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"fedkeeper start exited {proc.returncode}: {err.strip()[-2000:]}")
    return time.perf_counter() - t0, sampler


def session_rounds(exe: str, cfg: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([exe, "status", "-c", str(cfg), "--json"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config-local.yaml"))
    ap.add_argument("--timeout-s", type=float, default=1200)
    ap.add_argument("--smoke", action="store_true", help="one round per run")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("fedkeeper"))
    with tempfile.TemporaryDirectory(prefix="fk-mainjob-") as tmp:
        cfg = Path(args.config)
        if args.smoke:
            import yaml
            doc = yaml.safe_load(cfg.read_text())
            for sc in doc["scenarios"].values():
                if "training" in sc:
                    sc["training"]["rounds"] = 1
            cfg = Path(tmp) / "smoke.yaml"
            cfg.write_text(yaml.safe_dump(doc))
        state = str(Path(tmp) / "state")
        env = dict(os.environ, FEDKEEPER_STATE_DIR=state, FEDKEEPER_LOG_DIR=str(Path(tmp) / "logs"))
        try:
            cold_s, cold_mem = run_start(exe, cfg, env, state, args.timeout_s)
            cold = session_rounds(exe, cfg, env)
            warm_s, warm_mem = run_start(exe, cfg, env, state, args.timeout_s)
            warm = session_rounds(exe, cfg, env)
        finally:
            # every local service of the state directory (kept by --keep-services)
            down = subprocess.run([exe, "fabric", "down"], env=env, capture_output=True, text=True, timeout=120)
            if down.returncode != 0:
                print(f"stopping the local services failed: {down.stderr.strip()[-500:]}", file=sys.stderr)
    print()
    print(f"{'run':<6} {'command s':>10} {'rounds':>7} {'final acc':>10} {'round 1 s':>10} {'peak PSS GiB':>13}")
    for name, secs, data, mem in (("cold", cold_s, cold, cold_mem), ("warm", warm_s, warm, warm_mem)):
        rounds = data["rounds"]
        acc = rounds[-1].get("accuracy") if rounds else None
        first = rounds[0].get("duration_s") if rounds else None
        print(f"{name:<6} {secs:>10.1f} {len(rounds):>7} {acc if acc is not None else float('nan'):>10.4f} "
              f"{first if first is not None else float('nan'):>10.1f} {mem.peak / GIB:>13.2f}")
    print(f"cold / warm: {cold_s / warm_s:.2f}x")
    for name, mem in (("cold", cold_mem), ("warm", warm_mem)):
        print(f"peak PSS by process kind ({name} run): " + ", ".join(
            f"{k} {v / GIB:.2f} GiB ({mem.count_by_kind.get(k, 0)})"
            for k, v in sorted(mem.peak_by_kind.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
