"""`fedkeeper config`: validate or show a config."""
from __future__ import annotations

import json

import click
import yaml

from ..config import to_yaml_dict
from .common import UsageFailure, config_option, console, load


@click.group("config")
def config_group() -> None:
    """Validate or show a config."""


@config_group.command("validate")
@config_option
def config_validate(config_path: str) -> None:
    """Check a config; exit 2 with the file, line and key when it is wrong."""
    cfg = load(config_path)
    clusters = cfg.providers.clusters()
    from ..privacy.settings import scenario_lines as privacy_lines
    from ..user_module import UserModuleError, check, describe
    for name, scen in cfg.scenarios.items():
        try:
            found = check(cfg, name, scen)
        except UserModuleError as exc:
            raise UsageFailure(str(exc)) from None
        if found is not None:
            console.print(describe(name, scen, found), markup=False, soft_wrap=True)
        for line in privacy_lines(scen):  # the epsilon the configured rounds would spend
            console.print(f"scenario {name}: {line}", markup=False, soft_wrap=True)
    console.print(f"{cfg.source}: valid ({len(clusters)} cluster(s), "
                  f"{len(cfg.scenarios)} scenario(s))")


@config_group.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def config_show(config_path: str, as_json: bool) -> None:
    """Print the resolved config with defaults filled in, units explicit and
    secrets as the ${ENV} or <key>_file they came from: it reads back the same."""
    cfg = load(config_path)
    data = to_yaml_dict(cfg)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
