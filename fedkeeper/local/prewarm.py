"""What a local platform loads into a function's process before the
function needs it, so that a cold start is only the function's own code
load: per runtime, the heavy modules its functions start with. Used by the
fabric's stem cells and by the Cloud Functions host's instances."""
from __future__ import annotations

from typing import Iterable

from ..runtimes import Pin, RuntimeDeclarationError, load, runtime_names

#: runtime -> modules imported ahead of need. A runtime not named here
#: preloads nothing (its processes still start ahead of need).
PRELOAD: dict[str, tuple[str, ...]] = {
    "tensorflow": ("numpy", "pymongo", "tensorflow", "keras"),
    "light": ("numpy", "pymongo"),
}


def preload_for(runtime: str | None) -> tuple[str, ...]:
    return PRELOAD.get(runtime or "", ())


def runtime_of_pins(pins: Iterable[Pin]) -> str | None:
    """The runtime whose every pin a requirements list carries (the one
    with the most pins when several do): what a source zip was packaged
    from. None when it carries no runtime's whole list."""
    have = {(p.key, p.version) for p in pins}
    best: tuple[int, str] | None = None
    for name in runtime_names():
        try:
            want = {(p.key, p.version) for p in load(name).pins}
        except RuntimeDeclarationError:
            continue
        if want <= have and (best is None or len(want) > best[0]):
            best = (len(want), name)
    return best[1] if best else None
