"""What every command shares: the consoles, the error exits, the config and
scenario options, loading a config and opening a runtime.

Command modules import these from here, and nothing else in fedkeeper
imports the cli package: the dependency points one way.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, NoReturn

import click
from rich.console import Console

from ..config import Config, ConfigError, load_config

console = Console(stderr=False, highlight=False)
errconsole = Console(stderr=True, highlight=False)
log = logging.getLogger("fedkeeper.cli")

DEFAULT_CONFIG = os.environ.get("FEDKEEPER_CONFIG", "config.yaml")


class UsageFailure(click.ClickException):
    """Bad input: exit status 2, message only."""

    exit_code = 2


def load(path: str) -> Config:
    """The config at `path`; bad input exits 2 with the file, line and key."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def fail(message: str, code: int = 1) -> NoReturn:
    """A run failed: one line on stderr, exit `code`."""
    errconsole.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code)


config_option = click.option("-c", "--config", "--configfile", "config_path", default=DEFAULT_CONFIG,
                             show_default=True, type=click.Path(dir_okay=False),
                             help="YAML config (FedKeeper's config-sample.yaml schema).")
scenario_option = click.option("-s", "--scenario", "scenario", default=None,
                               help="Scenario under `scenarios:` (default: federated_learning).")


def split_list(values: Iterable[str]) -> list[str]:
    """Values of a repeatable option, each of which may be comma-separated."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def select_clusters(cfg: Config, names: Iterable[str] = (), *, all_clusters: bool = False,
                    sections: dict[str, list[str]] | None = None) -> list[str]:
    """Clusters named on the command line; all of them when none are named."""
    known = cfg.providers.clusters()
    chosen: list[str] = []
    for section, wanted in (sections or {}).items():
        for n in wanted:
            if n not in known or known[n][0] != section:
                options = sorted(k for k, (s, _) in known.items() if s == section)
                raise UsageFailure(f"no {section} cluster named {n!r} in {cfg.source} "
                                   f"(known: {options or 'none'})")
            chosen.append(n)
    for n in names:
        if n not in known:
            raise UsageFailure(f"no cluster named {n!r} in {cfg.source} (known: {sorted(known) or 'none'})")
        chosen.append(n)
    if all_clusters or not chosen:
        chosen = list(known)
    if not chosen:
        raise UsageFailure(f"{cfg.source} configures no clusters under providers")
    return list(dict.fromkeys(chosen))


def open_runtime(cfg: Config, scenario: str | None, need_store: bool, keep_local_services: bool = False):
    """A Runtime for `scenario`; a bad scenario exits 2, an unreachable store 1."""
    from ..runtime import Runtime
    from ..store.embedded import EmbeddedMongoError
    try:
        return Runtime.open(cfg, scenario, need_store=need_store, keep_local_services=keep_local_services)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    except EmbeddedMongoError as exc:
        fail(f"embedded MongoDB: {exc}")
    except Exception as exc:  # pymongo errors and the like: say what, not where
        fail(f"cannot open the store: {exc}")
