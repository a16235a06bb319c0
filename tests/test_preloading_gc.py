"""The cyclic garbage collector while a runtime's heavy modules load: off
during the imports (its passes over TensorFlow's objects while they are
created cost 15-20% of the import), and what the imports left frozen
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


def test_modules_load_with_the_collector_off_and_are_frozen_afterwards(probe_module):
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    preloading.import_all([probe_module])
    assert sys.modules[probe_module].COLLECTING is False
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + 2000   # the module's own objects among them


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
    with frozen_for_the_session():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0   # what the session left can be collected


def test_a_process_that_froze_objects_of_its_own_keeps_them_frozen():
    from fedkeeper.cli.start import frozen_for_the_session
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_for_the_session():
            pass
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
