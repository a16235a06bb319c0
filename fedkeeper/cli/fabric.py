"""`fedkeeper fabric`: the embedded local OpenWhisk fabric."""
from __future__ import annotations

import json
import sys

import click

from .common import console, fail


@click.group("fabric")
def fabric_group() -> None:
    """The embedded local OpenWhisk fabric."""


def _fabric():
    from ..local import fabric
    from ..runtime import state_dir
    return fabric, state_dir() / "fabric"


@fabric_group.command("up")
def fabric_up_cmd() -> None:
    """Start the local fabric (or report the running one)."""
    fabric, sdir = _fabric()
    try:
        info = fabric.fabric_up(sdir)
    except fabric.FabricError as exc:
        fail(f"the local fabric did not start: {exc}")
    console.print(f"fabric {'started' if info.get('started') else 'running'} at {info['url']} (pid {info['pid']})")


@fabric_group.command("down")
def fabric_down_cmd() -> None:
    """Stop everything local: the fabric and its workers, the Cloud Functions hosts, the embedded store."""
    from ..local import shutdown_local_services
    from ..runtime import state_dir
    console.print("local services stopped" if shutdown_local_services(state_dir())
                  else "no local services were running")


@fabric_group.command("status")
def fabric_status_cmd() -> None:
    """Is the local fabric running, and where."""
    fabric, sdir = _fabric()
    st = fabric.fabric_status(sdir, capacity=True)
    if not st:
        console.print("fabric is not running")
        sys.exit(1)
    console.print(json.dumps({k: v for k, v in st.items() if k != "auth"}, indent=2, default=str))
