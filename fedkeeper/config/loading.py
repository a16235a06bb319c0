"""Reading a config file: YAML, `${ENV}` and `<key>_file` secrets, each
platform's unit conventions, validation, and the checks across sections.
Every refusal is a ConfigError naming the file, the line and the key."""
from __future__ import annotations

import errno
import json
import os
import re
import selectors
import stat
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from .clusters import cluster_model, provider_sections
from .errors import ConfigError, YamlBoundError, compose, construct, did_you_mean, dotted, line_for, node_index
from .model import SECRET_KEYS, Config
from .references import check_references
from .scenario import IGNORED_FUNCTION_SECTIONS
from .units import format_duration_s, is_bare_number, parse_duration_s
from .values import ENV_RE, REDACTED, only_references, url_userinfo


# Reads are bounded: a config or secret path naming a FIFO would block for
# ever, and /dev/zero or a huge file would fill the memory.
CONFIG_MAX_BYTES = 1 << 20   # real configs are a few kilobytes
SECRET_MAX_BYTES = 64 << 10  # a service account key is about 2 KiB


class _Located(ValueError):
    """A refusal at a key path, turned into a ConfigError by parse_config."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- secrets and env

def _interpolate(o: Any, path: tuple, base_dir: Path, sources: dict[tuple, tuple[str, str]]) -> Any:
    """Resolve `${VAR}` / `${VAR:-default}` and `<secret>_file` keys. `sources`
    records where each resolved string came from (path -> (key, written
    value)), so `config show` can print the reference instead of the secret."""
    if isinstance(o, str):
        def sub(m):
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise _Located(path, f"environment variable {var} is not set")
        value = ENV_RE.sub(sub, o)
        if value != o or ENV_RE.search(o):
            sources[path] = (str(path[-1]) if path else "", o)
        _refuse_redacted(path, value)
        return value
    if isinstance(o, list):
        return [_interpolate(v, path + (i,), base_dir, sources) for i, v in enumerate(o)]
    if isinstance(o, dict):
        out: dict[str, Any] = {}
        for k, v in o.items():
            k = str(k)
            v = _interpolate(v, path + (k,), base_dir, sources)
            if k.endswith("_file") and k[:-5] in SECRET_KEYS | {"url"}:
                target = k[:-5]
                if target in o:
                    raise _Located(path + (k,), f"give either {target} or {k}, not both")
                out[target] = _read_secret_file(str(v), path + (k,), base_dir, target)
                written = sources.pop(path + (k,), (k, ""))[1]
                if not only_references(written):  # a literal path: absolute, to read back anywhere
                    written = str(_secret_path(str(v), base_dir))
                sources[path + (target,)] = (k, written)
            else:
                out[k] = v
        return out
    return o


def _refuse_redacted(path: tuple, value: str) -> None:
    key = str(path[-1]) if path else ""
    if (key in SECRET_KEYS and value.strip() == REDACTED) or url_userinfo(value) == REDACTED:
        raise _Located(path, f"holds {REDACTED!r}, what `config show` prints in place of a secret: "
                             "give the secret as ${ENV_VAR} or through a <key>_file sibling")


def _secret_path(raw: str, base_dir: Path) -> Path:
    fp = Path(raw).expanduser()
    return fp if fp.is_absolute() else base_dir / fp


def _read_secret_file(raw: str, path: tuple, base_dir: Path, target: str) -> Any:
    fp = _secret_path(raw, base_dir)
    try:
        content = read_text_bounded(fp, SECRET_MAX_BYTES).strip()
    except OSError as exc:
        raise _Located(path, f"cannot read secret file {fp}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _Located(path, f"secret file {fp} {exc}") from None
    if target == "auth" and content.startswith("{"):
        try:
            return json.loads(content)
        except json.JSONDecodeError as exc:
            raise _Located(path, f"secret file {fp} is not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError):  # an integer too long to convert, or nesting too deep
            raise _Located(path, f"secret file {fp} is not JSON a service account key can be "
                                 "(nested too deeply or a number too long)") from None
    return content


# How long a pipe may take to be written to its end.
PIPE_TIMEOUT_S = 10.0


def _read_pipe(fd: int, limit: int) -> bytes:
    """Up to limit + 1 bytes of a non-blocking pipe, until its writer closes
    it; ValueError if that takes past PIPE_TIMEOUT_S."""
    deadline = time.monotonic() + PIPE_TIMEOUT_S
    parts, size = [], 0
    with selectors.DefaultSelector() as waiting:   # any descriptor number (select() stops at 1024)
        waiting.register(fd, selectors.EVENT_READ)
        while size <= limit:
            left = deadline - time.monotonic()
            if left <= 0 or not waiting.select(left):
                raise ValueError(f"is a pipe whose writer did not finish within {PIPE_TIMEOUT_S:g} s")
            try:
                part = os.read(fd, min(1 << 16, limit + 1 - size))
            except BlockingIOError:
                continue
            if not part:
                break
            parts.append(part)
            size += len(part)
    return b"".join(parts)


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n >> 10} KiB"


def read_text_bounded(fp: Path, limit: int) -> str:
    """The UTF-8 text of the regular file or pipe `fp` (`-c <(sops -d ...)`),
    if it holds at most `limit` bytes; a pipe must be written to its end
    within PIPE_TIMEOUT_S. Raises OSError, or ValueError with the reason as
    the end of a sentence naming the file."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (one without any
    # reads as empty at once).
    fd = os.open(fp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stat.S_ISFIFO(mode):
            data = _read_pipe(fd, limit)
        elif stat.S_ISREG(mode):
            data = f.read(limit + 1)
        else:
            raise ValueError("is not a regular file or a pipe (a socket or device would block or never end)")
    if len(data) > limit:
        raise ValueError(f"is larger than {_size_text(limit)}, the most it may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


# --------------------------------------------------------------------------- sections

def _normalise_functions(data: dict) -> None:
    """Check each functions.<fn>.<section> names a provider section, and give
    bare timeouts the unit of that section's convention (the original schema
    writes OpenWhisk's in ms, "300000", and Google's in s, "300s")."""
    for sname, scen in (data.get("scenarios") or {}).items():
        if not isinstance(scen, dict):
            continue
        for fname, per in (scen.get("functions") or {}).items():
            if not isinstance(per, dict):
                continue
            for section, fc in per.items():
                path = ("scenarios", sname, "functions", fname, section)
                if section in IGNORED_FUNCTION_SECTIONS:
                    continue
                try:
                    model = cluster_model(section)
                except ValueError as exc:
                    raise _Located(path, str(exc)) from None
                if isinstance(fc, dict) and is_bare_number(fc.get("timeout")):
                    bare, unit = str(fc["timeout"]).strip(), model.function_timeout_unit
                    fc["timeout"] = f"{bare}{unit}"
                    _refuse_sub_second(path + ("timeout",), section, bare, unit)


def _refuse_sub_second(path: tuple, section: str, bare: str, unit: str) -> None:
    """The trap of `timeout: 120.0` read as 120 ms where bare timeouts are in
    ms: no function finishes that fast, so it was meant in seconds."""
    try:
        seconds = parse_duration_s(bare, unit)
    except ValueError:
        return  # the model says what is wrong with it
    if unit != "s" and seconds < 1:
        raise _Located(path, f"a bare timeout under {section} is in {unit}, so {bare} is "
                             f"{format_duration_s(seconds)}; write {bare}s if you meant seconds")


def _validate_providers(data: dict) -> None:
    """Validate each cluster with its platform's model, so that an error
    points at the cluster's own keys; the validated models replace the raw
    mappings."""
    providers = data.get("providers")
    if providers is None:
        return
    if not isinstance(providers, dict):
        raise _Located(("providers",), "expected a mapping of provider sections "
                                       f"({', '.join(provider_sections())})")
    for section, clusters in providers.items():
        try:
            model = cluster_model(section)
        except ValueError as exc:
            raise _Located(("providers", section), str(exc)) from None
        if clusters is None:
            providers[section] = clusters = {}
        if not isinstance(clusters, dict):
            raise _Located(("providers", section), "expected a mapping of cluster names to their settings")
        for name, c in clusters.items():
            try:
                clusters[name] = model.model_validate(c or {})
            except ValidationError as exc:
                raise _validation_error(exc, ("providers", section, str(name))) from None


# --------------------------------------------------------------------------- errors

def error_reason(err: dict) -> str:
    """One pydantic error as the reason a config line is refused, with a
    did-you-mean hint for a misspelt choice."""
    t, msg = err.get("type", ""), err.get("msg", "")
    if t == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if t == "missing":
        return "required key is missing"
    if t == "literal_error":
        expected = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return msg + did_you_mean(err.get("input"), expected)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _validation_error(exc: ValidationError, prefix: tuple = ()) -> _Located:
    errs = exc.errors()
    first = errs[0]
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return _Located(prefix + tuple(first["loc"]), error_reason(first) + more)


def _key_named_first(path: tuple, message: str, index: dict) -> tuple:
    """A check over a whole block (e.g. faults, retries) whose message starts
    with one of the block's keys points at that key's line."""
    first = re.match(r"[A-Za-z_][A-Za-z0-9_-]*", message)
    if first and tuple(str(p) for p in path) + (first.group(0),) in index:
        return path + (first.group(0),)
    return path


# --------------------------------------------------------------------------- entry points

def parse_config(text: str, file: str = "<config>", base_dir: Optional[Path] = None) -> Config:
    base_dir = base_dir or Path.cwd()
    try:
        root = compose(text)
        # Walked before construct(), which merges `<<` keys into the tree.
        index, duplicates = node_index(root)
        data = None if root is None else construct(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML: {problem}", file=file,
                          line=(mark.line + 1) if mark else None) from None
    except YamlBoundError as exc:
        raise ConfigError(str(exc), file=file, line=exc.line) from None
    if data is None:
        raise ConfigError("the file is empty", file=file)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}",
                          file=file, line=1)
    for path, first, again in duplicates[:1]:
        raise ConfigError(f"given twice (first at line {first}); YAML would keep only this one",
                          file=file, line=again, path=dotted(path))
    sources: dict[tuple, tuple[str, str]] = {}
    try:
        data = _interpolate(data, (), base_dir, sources)
        _normalise_functions(data)
        _validate_providers(data)
        try:
            cfg = Config.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if not cfg.scenarios:
            raise _Located(("scenarios",), "the config has no scenario: add scenarios.<name> "
                                           "(see config-local.yaml)")
    except _Located as exc:
        path = _key_named_first(exc.path, str(exc), index)
        raise ConfigError(str(exc), file=file, line=line_for(index, path), path=dotted(path)) from None
    cfg.source = file
    cfg._sources = sources
    check_references(cfg, index)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    p = Path(path)
    try:
        text = read_text_bounded(p, CONFIG_MAX_BYTES)
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", file=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", file=str(p)) from None
    except ValueError as exc:
        raise ConfigError(f"the config file {exc}", file=str(p)) from None
    # Relative *_file paths are relative to the config's directory; a pipe
    # (/dev/fd/N) has none of its own, so they are relative to the
    # working directory, where the command that made the pipe runs.
    base_dir = Path.cwd() if stat.S_ISFIFO(os.stat(p).st_mode) else p.resolve().parent
    return parse_config(text, file=str(p), base_dir=base_dir)

