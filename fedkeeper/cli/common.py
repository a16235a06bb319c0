"""What every command shares: the consoles, the error exits, the config and
scenario options, finding and loading a config, opening a runtime, and
tables that stay readable at any width.

Command modules import these from here, and nothing else in fedkeeper
imports the cli package: the dependency points one way.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..config import Config, ConfigError, load_config

console = Console(stderr=False, highlight=False)
errconsole = Console(stderr=True, highlight=False, soft_wrap=True)  # messages are never cut into lines
log = logging.getLogger("fedkeeper.cli")

CONFIG_ENV = "FEDKEEPER_CONFIG"
DEFAULT_CONFIG = "config.yaml"
# In the state directory: the config the latest `start` or `sweep` used.
LAST_CONFIG_FILE = "last-config.json"
INTERRUPTED_EXIT = 130  # as a shell reports a process ended by SIGINT
CONFIG_HINT = f"give one with -c FILE or ${CONFIG_ENV}"


class UsageFailure(click.ClickException):
    """Bad input: exit status 2, message only (click prints `Error: ...`)."""

    exit_code = 2


def fail(message: str, code: int = 1) -> NoReturn:
    """A run failed: one `Error:` line on stderr, exit `code`. The message
    is plain text: names and values in it (a session id, a path) may hold
    brackets, which must print as they are."""
    errconsole.print(Text.assemble(("Error:", "red"), " ", message), highlight=False, soft_wrap=True)
    sys.exit(code)


def note(message: str) -> None:
    """A line for the user that is not the command's output (stderr)."""
    errconsole.print(message, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- config

config_option = click.option(
    "-c", "--config", "--configfile", "config_path", default=None, type=click.Path(dir_okay=False),
    help=f"YAML config (config-sample.yaml schema). Default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}, "
         "else the config of the latest session started from this state directory.")
scenario_option = click.option("-s", "--scenario", "scenario", default=None,
                               help="Scenario under `scenarios:` (default: federated_learning).")


def _state_dir() -> Path:
    from ..runtime import state_dir
    return state_dir()


def remember_config(cfg: Config, started: str) -> None:
    """Record, in the state directory, that `started` ("session ID" or
    "sweep ID") was started with `cfg` (the last resort of find_config)."""
    try:
        path = _state_dir() / LAST_CONFIG_FILE
        path.write_text(json.dumps({"config": str(Path(cfg.source).resolve()), "started": started,
                                    "time": time.time()}))
    except OSError as exc:  # a convenience only: never fail a session for it
        log.warning("cannot record the config used: %s", exc)


def find_config(given: str | None) -> tuple[str, str | None]:
    """(path, where it came from): `-c`, else $FEDKEEPER_CONFIG, else
    ./config.yaml, else the config the latest session started from this
    state directory used. `where` is None when the path was given with -c."""
    if given:
        return given, None
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env, f"${CONFIG_ENV}"
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG, f"./{DEFAULT_CONFIG}"
    try:
        last = json.loads((_state_dir() / LAST_CONFIG_FILE).read_text())
        if isinstance(last, dict) and isinstance(last.get("config"), str) and Path(last["config"]).is_file():
            return last["config"], f"the config of {last.get('started')}, the latest started here"
    except (OSError, ValueError):
        pass
    raise UsageFailure(f"no config: {CONFIG_HINT} (there is no ./{DEFAULT_CONFIG} and no session "
                       "was started from this state directory)")


def load(path: str | None) -> Config:
    """The config at `path` (or found by find_config, saying which); bad
    input exits 2 with the file, line and key."""
    path, where = find_config(path)
    if where:
        note(f"using config {path} ({where})")
    try:
        return load_config(path)
    except ConfigError as exc:
        text = str(exc)
        if "not found" in text:
            text += f"; {CONFIG_HINT}"
        raise UsageFailure(text) from None


# --------------------------------------------------------------------------- options and clusters

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


def phase(text: str) -> None:
    """Say on a terminal's stderr what long work begins (a store to start, a
    function to deploy or to run cold), so a command is never silent for
    seconds; nothing when stderr is not a terminal (scripts, CI logs)."""
    if errconsole.is_terminal:
        errconsole.print(f"{text}...", style="dim", markup=False)


def open_runtime(cfg: Config, scenario: str | None, need_store: bool, keep_local_services: bool = False):
    """A Runtime for `scenario`; a bad scenario exits 2, an unreachable store 1."""
    from ..runtime import Runtime
    from ..local.store import EmbeddedMongoError
    try:
        return Runtime.open(cfg, scenario, need_store=need_store, keep_local_services=keep_local_services,
                            phase=phase)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    except EmbeddedMongoError as exc:
        fail(f"embedded MongoDB: {exc}")
    except Exception as exc:  # pymongo errors and the like: say what, not where
        fail(f"cannot open the store: {exc}")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------- output files

def check_output_path(path: str, option: str) -> None:
    """Refuse (exit 2) an output file whose directory is missing or not
    writable before the command does its work, not after."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise UsageFailure(f"{option} {path}: there is no directory {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageFailure(f"{option} {path}: the directory {folder} is not writable")


def write_output(path: str, data: str | bytes) -> None:
    """Write an output file; a failure (the disk filled up, the directory
    went away since check_output_path) is one error line, exit 1."""
    try:
        if isinstance(data, bytes):
            Path(path).write_bytes(data)
        else:
            Path(path).write_text(data)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")


# --------------------------------------------------------------------------- tables

def _cell_width(cell: str) -> int:
    return Text.from_markup(cell).cell_len


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def _grid(title: str, columns: Sequence[str], rows: list[list[str]], right: set[str], caption: str | None,
          compact: bool) -> Table:
    """A boxed table, or a compact one (no frame, headers wrapped at spaces,
    each column exactly as wide as its widest value)."""
    # Title, caption and headers are plain text; rich would read brackets in them as markup.
    title = escape(title)
    caption = None if caption is None else escape(caption)
    if compact:
        t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    else:
        t = Table(title=title, caption=caption)
    for i, c in enumerate(columns):
        widest = max([_cell_width(r[i]) for r in rows] + [_longest_word(c) if compact else Text(c).cell_len])
        t.add_column(escape(c), justify="right" if c in right else "left", overflow="fold",
                     width=widest if compact else None, min_width=widest)
    for r in rows:
        t.add_row(*r)
    return t


def _width_of(renderable: RenderableType) -> int:
    """Columns the renderable takes when nothing constrains it."""
    buf = Console(file=io.StringIO(), width=10_000, color_system=None, highlight=False)
    buf.print(renderable)
    return max((Text(line.rstrip()).cell_len for line in buf.file.getvalue().splitlines()), default=0)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, width: int,
          right: Iterable[str] = (), caption: str | None = None) -> RenderableType:
    """Rows as a boxed table when it fits in `width`, else as a compact one,
    else one block per row with `column: value` per line. Values are never
    cut; only headers wrap. Cells are console markup (escape values with
    rich.markup.escape); the title, columns and caption are plain text."""
    rows = [[str(c) for c in r] for r in rows]
    right = set(right)
    for compact in (False, True):
        t = _grid(title, columns, rows, right, None, compact)
        if _width_of(t) <= width:
            return _grid(title, columns, rows, right, caption, compact)
    parts: list[RenderableType] = [Text(title, style="italic")]
    label = max(len(c) for c in columns) if columns else 0
    for r in rows:
        block = Table.grid(padding=(0, 1))
        block.add_column(no_wrap=True)
        block.add_column(overflow="fold")
        for c, v in zip(columns, r):
            block.add_row(Text(f"{c + ':':<{label + 1}}"), v)
        parts += [Text(""), block]
    if caption:
        parts += [Text(""), Text(caption)]
    return Group(*parts)


def show_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
               right: Iterable[str] = (), caption: str | None = None, out: Console | None = None) -> None:
    out = out or console
    out.print(table(title, columns, rows, width=out.width, right=right, caption=caption))
