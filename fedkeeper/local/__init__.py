"""Local stand-ins for the platforms, for one machine without a cloud account:
the embedded OpenWhisk fabric (`fabric`, `openwhisk`), the local Cloud
Functions hosts (`cloud_functions`) and the embedded store (`store`), all run as processes of the one supervisor
(`supervisor`), with the one fault model (`faults`). Nothing here is
imported unless a local cluster or the embedded store is used, and the real
platform adapters in `fedkeeper.providers` import nothing from here."""
from __future__ import annotations

from pathlib import Path


def shutdown_local_services(state_dir: str | Path) -> bool:
    """Stop everything local of a state directory, whoever holds it: the
    fabric and its workers, every functions-framework host, and the
    embedded store (also one kept by --keep-services). True when anything
    was running."""
    from .fabric import fabric_down
    from .cloud_functions.host import FrameworkHost
    from .store import shutdown_stores
    sdir = Path(state_dir)
    stopped = fabric_down(sdir / "fabric")
    gcf = sdir / "gcf"
    if gcf.is_dir():
        for cluster_dir in sorted(p for p in gcf.iterdir() if p.is_dir()):
            host = FrameworkHost(cluster_dir)
            stopped = bool(host.names()) or stopped
            host.stop_all()
    return shutdown_stores(sdir) or stopped
