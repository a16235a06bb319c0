"""The installed distribution carries every package of the source tree: the
editable install used here would find an unlisted package anyway, a wheel
would not."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    roots = {"fedkeeper": ROOT / "fedkeeper", "flcommon": ROOT / "functions" / "flcommon"}
    present = set()
    for name, base in roots.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            present.add(".".join((name, *rel)))
    assert present - listed == set(), f"packages missing from setup.cfg: {sorted(present - listed)}"
    assert listed - present == set(), f"setup.cfg lists packages that do not exist: {sorted(listed - present)}"
