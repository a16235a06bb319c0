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

Time and memory come from separate pairs of runs: reading a TensorFlow
process's PSS costs the kernel about 17 ms (it walks every mapping), and
the sampler reads every process five times a second, on a machine whose
cold run is CPU-bound. Side by side the sampled runs were not slower
beyond the noise (cold 11.0-12.3 s against 11.0-12.6 s, 3 runs each), but
a timing should not carry its own load. The timed runs only read each
process's CPU time, once a second.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
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
# This tree's fedkeeper, here and in the commands it starts (TREE_ENV): the
# `fedkeeper` script alone would import the checkout the .venv was installed
# from, so a bench run from another worktree would time that checkout's keeper.
sys.path.insert(0, str(ROOT))
TREE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

from fedkeeper.local.cloud_functions.function_host import PRELOAD_LOG_PREFIX  # noqa: E402
GIB = 1024 ** 3


def _belongs(proc: psutil.Process, marker: str) -> bool:
    try:
        if any(marker in part for part in proc.cmdline()):
            return True
        return proc.cwd().startswith(marker)
    except (psutil.Error, OSError):
        return False


class ProcessSampler(threading.Thread):
    """Samples the command's process tree and every process whose command
    line or working directory lies in the state directory (services run
    detached from the command), with their children."""

    def __init__(self, root_pid: int, marker: str, period_s: float):
        super().__init__(daemon=True)
        self.root_pid, self.marker, self.period_s = root_pid, marker, period_s
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

    def sample(self) -> None:
        raise NotImplementedError   # each sampler reads what it measures

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.period_s)


class PssSampler(ProcessSampler):
    """The peak of the summed PSS, with its split by process kind."""

    def __init__(self, root_pid: int, marker: str, period_s: float = 0.2):
        super().__init__(root_pid, marker, period_s)
        self.peak = 0
        self.peak_by_kind: dict[str, int] = {}
        self.count_by_kind: dict[str, int] = {}     # processes at the peak

    def sample(self) -> None:
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


class CpuSampler(ProcessSampler):
    """CPU seconds (user and system) by process kind spent during the run:
    each process's last reading, less its first one when it is older than
    the run (a warm run's services and workers); a process that ends between
    two samples loses at most one period's worth."""

    def __init__(self, root_pid: int, marker: str, period_s: float = 1.0):
        super().__init__(root_pid, marker, period_s)
        self.started = time.time() - 0.5   # the command was started just before
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}

    def sample(self) -> None:
        for p in self._processes():
            try:
                t = p.cpu_times()
                secs = t.user + t.system
                if p.pid not in self.first:
                    self.first[p.pid] = secs if p.create_time() < self.started else 0.0
                self.last[p.pid] = (self._kind(p), secs)
            except (psutil.Error, OSError):
                continue

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (kind, secs) in self.last.items():
            out[kind] = out.get(kind, 0.0) + secs - self.first[pid]
        return out


def run_start(exe: str, cfg: Path, env: dict[str, str], marker: str, timeout_s: float,
              sampler_class: type[ProcessSampler]) -> tuple[float, ProcessSampler]:
    global last_start_wall
    last_start_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "start", "-c", str(cfg), "--keep-services"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = sampler_class(proc.pid, marker)
    sampler.start()
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"fedkeeper start exited {proc.returncode}: {err.strip()[-2000:]}")
    return time.perf_counter() - t0, sampler


last_start_wall = 0.0   # when the last run_start began (wall clock, for the timeline)


def _log_time(line: str) -> float | None:
    """The wall time of a log line stamped `2026-01-01 12:00:00,123 ...`."""
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def cold_timeline(exe: str, env: dict[str, str], t0: float) -> list[tuple[str, float | None, float | None]]:
    """Where a run's time went, in seconds from the command's start: (phase,
    start, end) from the run log, the fabric's log and status (its zygotes'
    module load) and round 1's attempts (round_001.csv). Read right after
    the run, with its services still up."""
    logs = Path(env["FEDKEEPER_LOG_DIR"])
    state = Path(env["FEDKEEPER_STATE_DIR"])
    run_log = max(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)
    marks: dict[str, float] = {}
    for path, needles in ((run_log, {"embedded MongoDB": "store up", " started": "deployed, session started"}),
                          (state / "fabric" / "fabric.log", {"fabric listening": "fabric up"})):
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                for needle, name in needles.items():
                    at = _log_time(line)
                    if needle in line and at is not None and at >= t0 - 1 and name not in marks:
                        marks[name] = at
    rows: list[tuple[str, float | None, float | None]] = [
        ("store up", None, marks.get("store up")), ("fabric up", None, marks.get("fabric up"))]
    out = subprocess.run([exe, "fabric", "status"], env=env, capture_output=True, text=True, timeout=60).stdout
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for z in json.loads(out)["capacity"]["zygotes"] or ():
            rows.append((f"{z['runtime']} zygote: module import", z["started"],
                         z["started"] + z["load_ms"] / 1000 if z.get("load_ms") is not None else None))
    for log in sorted(state.glob("gcf/*/*/function.log")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            line = next((ln for ln in log.read_text().splitlines() if ln.startswith(PRELOAD_LOG_PREFIX)), None)
            if line is None:   # an instance that preloads nothing
                continue
            fields = dict(part.split("=", 1) for part in line[len(PRELOAD_LOG_PREFIX):].split())
            started = float(fields["started"])
            rows.append((f"Cloud Functions {log.parent.name}: module import", started,
                         started + float(fields["load_ms"]) / 1000))
    rows.append(("deployed, session started", None, marks.get("deployed, session started")))
    csvs = sorted(logs.glob("*/round_001.csv"), key=lambda p: p.stat().st_mtime)
    if csvs:
        with open(csvs[-1], newline="") as f:
            attempts = list(csv.DictReader(f))
        for label, pick in (("init function", lambda r: r["client_id"] == "_fl_server_init"),
                            ("round 1 clients", lambda r: not r["client_id"].startswith("_")),
                            ("round 1 aggregation", lambda r: r["client_id"] == "_fl_server_aggregator")):
            got = [r for r in attempts if pick(r)]
            if got:
                rows.append((label, min(float(r["start"]) for r in got), max(float(r["end"]) for r in got)))
    return [(name, None if a is None else a - t0, None if b is None else b - t0) for name, a, b in rows]


def session_rounds(exe: str, cfg: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([exe, "status", "-c", str(cfg), "--json"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


def cold_then_warm(exe: str, cfg: Path, base: Path, sampler_class: type[ProcessSampler],
                   timeout_s: float) -> dict:
    """A cold run in a fresh state directory under `base`, then a warm one in
    the same directory; its local services are stopped afterwards."""
    state = str(base / "state")
    env = dict(os.environ, **TREE_ENV, FEDKEEPER_STATE_DIR=state, FEDKEEPER_LOG_DIR=str(base / "logs"))
    out: dict = {}
    try:
        out["cold_s"], out["cold_sampler"] = run_start(exe, cfg, env, state, timeout_s, sampler_class)
        out["cold"] = session_rounds(exe, cfg, env)
        out["timeline"] = cold_timeline(exe, env, last_start_wall)
        out["warm_s"], out["warm_sampler"] = run_start(exe, cfg, env, state, timeout_s, sampler_class)
        out["warm"] = session_rounds(exe, cfg, env)
    finally:
        # every local service of the state directory (kept by --keep-services)
        try:
            down = subprocess.run([exe, "fabric", "down"], env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            down = subprocess.CompletedProcess(exc.cmd, -1, "timed out after 120 s", "")
        if down.returncode != 0:
            print(f"stopping the local services failed: {(down.stderr or down.stdout).strip()[-500:]}",
                  file=sys.stderr)
        _stop_leftovers(state, down)
    return out


def _stop_leftovers(state: str, down: subprocess.CompletedProcess) -> None:
    """Kill any process of the state directory that `fabric down` left
    running (its directory is about to be deleted, so nothing else would
    ever stop it), and say which, with what `fabric down` answered."""
    left = [p for p in psutil.process_iter() if p.pid != os.getpid() and _belongs(p, state)]
    if not left:
        return
    names = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
    psutil.wait_procs(left, timeout=10)
    print(f"`fabric down` (exit {down.returncode}: {down.stdout.strip()[-200:]!r}) left {len(left)} process(es) "
          f"of {state} running; killed: " + "; ".join(names), file=sys.stderr)


def _rounds_row(name: str, secs: float, data: dict) -> str:
    rounds = data["rounds"]
    acc = rounds[-1].get("accuracy") if rounds else None
    first = rounds[0].get("duration_s") if rounds else None
    return (f"{name:<6} {secs:>10.1f} {len(rounds):>7} {acc if acc is not None else float('nan'):>10.4f} "
            f"{first if first is not None else float('nan'):>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config-local.yaml"))
    ap.add_argument("--timeout-s", type=float, default=1200)
    ap.add_argument("--smoke", action="store_true", help="one round per run")
    ap.add_argument("--no-memory", action="store_true", help="only the timed pair of runs")
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
        timed = cold_then_warm(exe, cfg, Path(tmp) / "timed", CpuSampler, args.timeout_s)
        memory = None if args.no_memory else cold_then_warm(exe, cfg, Path(tmp) / "memory", PssSampler,
                                                            args.timeout_s)
    print()
    print(f"{'run':<6} {'command s':>10} {'rounds':>7} {'final acc':>10} {'round 1 s':>10}")
    print(_rounds_row("cold", timed["cold_s"], timed["cold"]))
    print(_rounds_row("warm", timed["warm_s"], timed["warm"]))
    print(f"cold / warm: {timed['cold_s'] / timed['warm_s']:.2f}x")
    print("cold run, seconds from the command's start:")
    for name, start, end in timed["timeline"]:
        span = f"{start:6.1f} -> " if start is not None else " " * 10
        print(f"  {name:<36} {span}{end:6.1f}" if end is not None else f"  {name:<36} {span}  ?")
    for run in ("cold", "warm"):
        cpu = timed[f"{run}_sampler"].by_kind()
        print(f"CPU seconds by process kind ({run} run, {sum(cpu.values()):.1f} in all): " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    if memory is None:
        return
    print(f"memory, from a second pair of runs (cold {memory['cold_s']:.1f} s, warm {memory['warm_s']:.1f} s "
          f"while sampled):")
    for run in ("cold", "warm"):
        mem = memory[f"{run}_sampler"]
        print(f"  peak PSS ({run} run): {mem.peak / GIB:.2f} GiB: " + ", ".join(
            f"{k} {v / GIB:.2f} GiB ({mem.count_by_kind.get(k, 0)})"
            for k, v in sorted(mem.peak_by_kind.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
