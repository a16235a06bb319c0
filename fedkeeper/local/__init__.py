"""Local stand-ins for the platforms, for one machine without a cloud account:
the embedded OpenWhisk fabric (`fabric`, `openwhisk`) and the local Cloud
Functions hosts. Nothing here is imported unless a local cluster is used."""
from __future__ import annotations

from pathlib import Path


def shutdown_local_services(state_dir: str | Path) -> bool:
    """Stop the fabric and every functions-framework host of a state
    directory; True when anything was running."""
    from .fabric import fabric_down
    from .functions_framework import FrameworkHost
    sdir = Path(state_dir)
    stopped = fabric_down(sdir / "fabric")
    gcf = sdir / "gcf"
    if gcf.is_dir():
        for cluster_dir in sorted(p for p in gcf.iterdir() if p.is_dir()):
            host = FrameworkHost(cluster_dir)
            stopped = bool(host.names()) or stopped
            host.stop_all()
    return stopped
