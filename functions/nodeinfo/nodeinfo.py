"""nodeinfo: where does this function run? Host, platform, CPUs, memory,
runtime and uptime, and whether this was a warm start."""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import Any

_STARTED = time.time()
_calls = 0


def _meminfo() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def _boot_uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    global _calls
    _calls += 1
    mem = _meminfo()
    return {
        "hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "memory_total_mb": round(mem.get("MemTotal", 0.0), 1),
        "memory_available_mb": round(mem.get("MemAvailable", 0.0), 1),
        "python": platform.python_version(), "runtime": sys.implementation.name,
        "process_uptime_s": round(time.time() - _STARTED, 3), "host_uptime_s": _boot_uptime(),
        "pid": os.getpid(), "warm": _calls > 1, "invocations": _calls,
    }
