"""The cyclic garbage collector while a runtime's heavy modules load: off
during the imports (its passes over TensorFlow's objects while they are
created cost 0.5-0.8 s of a 3.9-4.4 s import), and what the imports left frozen
afterwards (fedkeeper/local/preloading.py), so that later collections, in
the process and in the stem cells forked from it, never walk it. The
functions' own first import of Keras turns it off the same way
(flcommon.architectures.load_keras). And `fedkeeper start` runs its
session with what was alive at its start frozen."""
from __future__ import annotations

import gc
import sys

import pytest

from fedkeeper.local import preloading

PROBE = """\
import gc
COLLECTING = gc.isenabled()
KEPT = [[] for _ in range(2000)]
"""


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """fk_gc_probe: notes whether the collector ran while it was imported."""
    (tmp_path / "fk_gc_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fk_gc_probe"
    sys.modules.pop("fk_gc_probe", None)
    gc.unfreeze()   # give this test process its collectable objects back


def frozen(obj) -> bool:
    """Whether `obj` is in the permanent generation (gc.get_objects lists
    only the collected ones). Counts would not do: a frozen object that
    loses its last reference is still freed."""
    return not any(o is obj for o in gc.get_objects())


def test_modules_load_with_the_collector_off_and_are_frozen_afterwards(probe_module):
    assert gc.isenabled()
    preloading.import_all([probe_module])
    probe = sys.modules[probe_module]
    assert probe.COLLECTING is False
    assert gc.isenabled()
    assert frozen(probe.KEPT) and frozen(probe.KEPT[0])   # the module's own objects among them


def test_a_collector_that_was_off_stays_off(probe_module):
    gc.disable()
    try:
        preloading.import_all([probe_module])
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_module_that_fails_to_import_still_turns_the_collector_back_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "fk_gc_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        preloading.import_all(["fk_gc_broken"])
        assert gc.isenabled()
        assert "broken on purpose" in capsys.readouterr().err
    finally:
        gc.unfreeze()


def test_the_functions_import_keras_with_the_collector_off(tmp_path, monkeypatch):
    from flcommon import architectures
    (tmp_path / "keras.py").write_text("import gc\nCOLLECTING = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keras", raising=False)   # restored afterwards
    monkeypatch.setattr(architectures, "_keras", None)
    keras = architectures.load_keras()
    assert keras.__file__ == str(tmp_path / "keras.py")
    assert keras.COLLECTING is False and gc.isenabled()


def test_a_session_runs_with_what_was_alive_at_its_start_frozen_then_unfrozen():
    from fedkeeper.cli.start import frozen_for_the_session
    gc.unfreeze()   # whatever an earlier test in this process left frozen
    alive = []
    with frozen_for_the_session():
        assert frozen(alive)
    assert not frozen(alive)   # what the session left can be collected


def test_a_process_that_froze_objects_of_its_own_keeps_them_frozen():
    from fedkeeper.cli.start import frozen_for_the_session
    own = []
    gc.freeze()
    try:
        with frozen_for_the_session():
            pass
        assert frozen(own)
    finally:
        gc.unfreeze()
