"""What a local platform loads into a function's process before the
function needs it, so that a cold start is only the function's own code
load: per runtime, the heavy modules its functions start with. Used by the
fabric's stem cells and by the Cloud Functions host's instances; and
`start_ahead`, which has a training command's local services load them
while the command still starts its store and packages its functions."""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

from ..runtimes import Pin, RuntimeDeclarationError, declared_runtime, load, runtime_names

log = logging.getLogger("fedkeeper.local")

#: runtime -> modules imported ahead of need, in order. A runtime not named
#: here preloads nothing (its processes still start ahead of need). An entry
#: `!name` keeps module `name` out while the others load (preloading.py,
#: which both local platforms' processes run): the tensorflow runtime keeps
#: scikit-learn, SciPy and h5py out of TensorFlow and Keras, as the
#: functions' own first import of Keras does (KEPT_OUT_OF_KERAS in
#: functions/flcommon/architectures.py). Not gridfs, though every function
#: that reads a blob imports it: preloaded, it added about 70 MB to the PSS
#: of the zygote and its cells (the main job's peak went from 1.11-1.12 to
#: 1.18-1.19 GiB), for 3 ms of import.
PRELOAD: dict[str, tuple[str, ...]] = {
    "tensorflow": ("!sklearn", "!scipy", "!h5py", "numpy", "pymongo", "tensorflow", "keras"),
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


def runtimes_by_cluster(rt: Any, server_functions: Iterable[str]) -> dict[str, list[str]]:
    """cluster -> the runtimes of the main functions a training session
    deploys there (rt: a fedkeeper.runtime.Runtime, read only: no store,
    no secret, nothing written)."""
    ci = rt.scenario.clients_info
    where: list[tuple[str, str]] = [(rt.server_cluster(), fn) for fn in server_functions]
    where += [(cluster, fn) for cluster in dict.fromkeys(rt.client_clusters().values())
              for fn in (ci.client_functions if ci else ["fl_client"])]
    out: dict[str, dict[str, None]] = {}
    for cluster, fn in where:
        try:
            out.setdefault(cluster, {})[declared_runtime(fn)] = None
        except RuntimeDeclarationError:
            continue   # the deploy reports it
    return {c: list(r) for c, r in out.items()}


def start_ahead(cfg: Any, scenario: str | None, keep_services: bool) -> threading.Thread:
    """In the background, have every cluster whose provider can start its
    local services ahead of the deploy (a `prewarm` classmethod: the local
    OpenWhisk fabric) start them and load the runtimes of the functions it
    is about to get. Best effort: the deploy starts whatever is missing."""
    def run() -> None:
        # imported here: the fabric's server imports this module for
        # PRELOAD and needs none of the keeper
        from ..providers import ProviderContext, provider_class
        from ..runtime import SERVER_FUNCTIONS, Runtime, state_dir
        try:
            name, scen = cfg.scenario(scenario)
            rt = Runtime(cfg=cfg, scenario_name=name, scenario=scen, state=state_dir())
            clusters = cfg.providers.clusters()
            for cluster, runtimes in runtimes_by_cluster(rt, SERVER_FUNCTIONS).items():
                section, ccfg = clusters[cluster]
                hook = getattr(provider_class(section, getattr(ccfg, "kind", "remote")), "prewarm", None)
                if hook is not None:
                    hook(cluster, ccfg, ProviderContext(state_dir=rt.state, keep_local_services=keep_services,
                                                        clusters=clusters), runtimes)
        except Exception as exc:  # noqa: BLE001 - an optimisation only
            log.debug("starting local services ahead of the deploy: %s", exc)
    # not a daemon: a command that ends at once still waits for a fabric it
    # is starting, so that its lease is given back (and the fabric stopped)
    t = threading.Thread(target=run, name="prewarm")
    t.start()
    return t
