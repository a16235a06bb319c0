"""Benches that cannot rot: each script under bench/ runs at its tiny smoke
size, so a bench that no longer runs fails here. No figure is checked (the
benches print them); only that the script runs to the end and prints its
table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedkeeper.local import shutdown_local_services

ROOT = Path(__file__).resolve().parent.parent

# (script under bench/, its smoke arguments, a text its output must contain)
BENCHES = [
    ("bench_aggregation.py", ["--smoke"], "agg MB/s"),
    ("bench_invocations.py", ["--smoke"], "invocations/s"),
    ("bench_invocations.py", ["--smoke", "--platform", "gcf"], "invocations/s"),
    ("bench_insights.py", ["--smoke"], "warm median"),
    ("bench_secagg.py", ["--smoke"], "max |diff|"),
    ("bench_round_overhead.py", ["--smoke"], "overhead/client ms"),
    ("bench_selection.py", ["--smoke"], "on crashing cluster"),
    ("bench_learning.py", ["--smoke"], "Keras FedAvg reference"),
    ("bench_main_job.py", ["--smoke"], "cold / warm"),
    ("bench_hierarchical.py", ["--smoke"], "ratio hierarchical / flat"),
    ("bench_stragglers.py", ["--smoke"], "faulted / fault-free, hedging on"),
    ("bench_store_writes.py", ["--smoke"], "store CPU ms per document"),
    ("bench_waiting_updates.py", ["--smoke"], "range-first / current"),
]


@pytest.mark.timeout(960)     # past the bench's own limit: that one ends it and its services
@pytest.mark.parametrize("script,args,expect", BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_runs_at_its_smoke_size(script, args, expect, tmp_path):
    env = dict(os.environ, FEDKEEPER_STATE_DIR=str(tmp_path / "state"), FEDKEEPER_LOG_DIR=str(tmp_path / "logs"))
    try:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    finally:
        shutdown_local_services(tmp_path / "state")   # whatever a bench that failed or hung left running
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-3000:]
