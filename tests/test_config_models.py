"""Where the config's models come from: each platform's cluster model from
its provider package (through the registry, imported only when its section
is used), the strategy settings' defaults from flcommon.strategies."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import flcommon.strategies as strategies
import pytest

import fedkeeper.config as config
from fedkeeper.config import StrategyConfig, cluster_model, provider_sections
from fedkeeper.providers import _REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def test_strategy_defaults_and_names_are_the_strategies_own():
    fields = StrategyConfig.model_fields
    assert set(fields) - {"name"} == set(strategies.DEFAULTS)
    for key, default in strategies.DEFAULTS.items():
        assert fields[key].default == default, key
    assert set(config.STRATEGIES) == set(strategies.STRATEGIES)
    # every strategy accepts the config's defaults
    for name in config.STRATEGIES:
        strategies.get_strategy(StrategyConfig(name=name).model_dump())


@pytest.mark.parametrize("section", provider_sections())
def test_each_section_is_validated_by_its_provider_packages_model(section):
    model = cluster_model(section)
    # the same package as the section's provider class
    provider_module = _REGISTRY[(section, "remote")].partition(":")[0]
    assert model.__module__ == f"{provider_module}.cluster"
    assert getattr(config, model.__name__) is model  # still importable from fedkeeper.config


def test_the_config_package_names_no_platform():
    sections = "|".join(provider_sections())
    for path in (ROOT / "fedkeeper/config").glob("*.py"):
        code = re.sub(r'"""[\s\S]*?"""|#[^\n]*', "", path.read_text())  # docstrings and comments aside
        assert not re.search(rf"[\"'](?:{sections})[\"']", code), path.name


def test_a_section_is_imported_only_when_the_config_uses_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""\
        providers:
          openwhisk:
            ow: {kind: local}
        scenarios:
          s: {}
    """))
    code = ("import sys; from fedkeeper.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('fedkeeper.providers.')))")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "fedkeeper.providers.openwhisk.cluster" in out
    assert "fedkeeper.providers.gcf" not in out and "fedkeeper.providers.knative" not in out


def test_fabric_capacity_is_a_local_openwhisk_setting():
    model = cluster_model("openwhisk")
    local = model.model_validate({"kind": "local", "user_memory_mb": 4096, "stem_cells": {"tensorflow": 2}})
    assert local.user_memory_mb == 4096 and local.stem_cells == {"tensorflow": 2}
    with pytest.raises(ValueError, match="kind: local only"):
        model.model_validate({"base_url": "https://ow.example", "auth": {"ow_auth": "u:k"}, "user_memory_mb": 4096})
    with pytest.raises(ValueError, match="unknown runtimes"):
        model.model_validate({"kind": "local", "stem_cells": {"gpu": 1}})
    with pytest.raises(ValueError):
        model.model_validate({"kind": "local", "user_memory_mb": 0})
