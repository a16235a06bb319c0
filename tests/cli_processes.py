"""Running the CLI as a real process and stopping it at a chosen moment,
with SIGKILL (how the resume tests leave a keeper's work half done) or
with SIGINT (a user's Ctrl-C)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import pytest


def _cli_when(args: list[str], ready: Callable[[], Any], what: str, timeout_s: float
              ) -> tuple[subprocess.Popen, Any]:
    """Start `python -m fedkeeper.cli *args` and poll `ready()` (bounded)
    until it returns something truthy; returns the process and that value.
    Fails the test if the process exits first or `ready` never holds; the
    process is killed then."""
    # SIGINT as a terminal's Ctrl-C finds it: a suite started in the
    # background of a shell without job control (`./scripts/test &`, nohup)
    # ignores SIGINT, the CLI would inherit that, and Python leaves it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "fedkeeper.cli", *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return proc, found
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        pytest.fail(f"{what} never happened")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def kill_cli_when(args: list[str], ready: Callable[[], Any], what: str, timeout_s: float = 180) -> Any:
    """Start the CLI, wait until `ready()` holds (see `_cli_when`), then
    kill -9 the process; returns what `ready` returned."""
    proc, found = _cli_when(args, ready, what, timeout_s)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return found
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def interrupt_cli_when(args: list[str], ready: Callable[[], Any], what: str,
                       timeout_s: float = 180) -> tuple[Any, int, str]:
    """Start the CLI, wait until `ready()` holds (see `_cli_when`), then
    press Ctrl-C (SIGINT) and wait for the process to end. Returns (what
    ready returned, exit status, stdout and stderr)."""
    proc, found = _cli_when(args, ready, what, timeout_s)
    try:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        return found, proc.returncode, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
