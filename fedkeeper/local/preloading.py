"""How the local platforms' function processes import their runtime's
modules ahead of need (the lists are prewarm.PRELOAD). Standard library
only: the fabric's workers and the Cloud Functions instances load it by
path, in their runtime's isolated site, where FedKeeper is not importable.

An entry `!name` keeps module `name` out of sys.modules while the others
load: importing it fails, so an optional import of it is skipped (Keras'
of scikit-learn). It imports as usual afterwards. A module already
imported is not kept out.

The cyclic garbage collector is off while the modules load, and what they
leave is frozen (`gc.freeze`) afterwards. Importing TensorFlow creates some
460,000 objects that live as long as the process; the collector's passes
over them while they were created cost 0.5-0.8 s of the import's 3.9-4.4 s
of CPU, and every full collection afterwards walked them again (0.26 s
each). Frozen, they are never walked, and a stem cell's collections no
longer write to the pages it shares with its zygote, which is how the
`gc` documentation advises preparing a process that forks."""
from __future__ import annotations

import gc
import importlib
import sys
import traceback


def import_all(modules: list[str]) -> None:
    """Import `modules` in order, `!name` entries kept out meanwhile. A
    module that fails to import is reported on stderr and skipped: the
    function meets (and reports) the same failure."""
    kept_out = [m[1:] for m in modules if m.startswith("!") and m[1:] not in sys.modules]
    sys.modules.update(dict.fromkeys(kept_out))   # None: `import name` raises ImportError
    collecting = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            if name.startswith("!"):
                continue
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported, and met again by the function
                traceback.print_exc()
    finally:
        for name in kept_out:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        gc.freeze()
        if collecting:
            gc.enable()
