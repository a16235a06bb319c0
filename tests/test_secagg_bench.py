"""bench/bench_secagg.py runs at its smoke size and prints its table (no
figure is checked: the bench prints them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_secagg_runs_at_its_smoke_size(tmp_path):
    env = dict(os.environ, FEDKEEPER_STATE_DIR=str(tmp_path / "state"), FEDKEEPER_LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_secagg.py"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith("2000")]
    # two dropout shares, each with the full graph and SecAgg+'s 2 neighbours
    assert len(rows) == 4 and "invocations" in out.stdout, out.stdout
    assert sum(1 for row in rows if row.split()[3] == "2") == 2
