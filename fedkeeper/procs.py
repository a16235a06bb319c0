"""Local service processes (embedded MongoDB, the fabric)."""
from __future__ import annotations

import psutil


def pid_alive(pid: int) -> bool:
    """Is the process running? A zombie (exited, not yet reaped) is not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
