"""Function runtimes: named, pinned dependency sets.

A runtime is a requirements file next to this module (`tensorflow.txt`,
`light.txt`), each line one pinned distribution. A function declares the
runtime it needs in its own folder (`functions/<fn>/function.toml`,
`runtime = "<name>"`), never in a central table. Every platform's packaging
is derived from that declaration:

  Cloud Functions  the source zip carries `requirements.txt` (the runtime's
                   list plus what the HTTP entry needs), which the Python
                   buildpack installs;
  OpenWhisk        a Docker action (`exec.kind: blackbox`) on an image built
                   from the list on OpenWhisk's Python action base;
  Knative          the same list on a plain Python base with
                   functions-framework, the code mounted from a ConfigMap.

Images are tagged by a content hash of what they are built from, so a
changed list means a new tag (`images.py`).
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RUNTIMES_DIR = Path(__file__).resolve().parent
FUNCTIONS_DIR = RUNTIMES_DIR.parent.parent / "functions"
#: the declaration file in each function folder
DECLARATION = "function.toml"
#: what the HTTP entry (functions-framework's main.py) adds to any runtime
HTTP_ENTRY_LIST = "http_entry"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
# name==version, nothing looser: a runtime is pinned or it is not a runtime
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


class RuntimeDeclarationError(ValueError):
    """A runtime or a function's declaration of it is missing or malformed."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str

    @property
    def key(self) -> str:
        """The distribution name as PEP 503 normalises it."""
        return re.sub(r"[-_.]+", "-", self.name).lower()

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class FunctionRuntime:
    """One named runtime: its pinned distributions, in file order."""

    name: str
    pins: tuple[Pin, ...]

    @property
    def content_hash(self) -> str:
        """sha256 over the normalised pins: a changed list, a new hash."""
        text = "\n".join(sorted(f"{p.key}=={p.version}" for p in self.pins))
        return hashlib.sha256(f"{self.name}\n{text}\n".encode()).hexdigest()

    def requirements(self, *, http_entry: bool = False) -> list[Pin]:
        pins = list(self.pins)
        if http_entry:
            have = {p.key for p in pins}
            pins += [p for p in load_list(HTTP_ENTRY_LIST) if p.key not in have]
        return pins

    def requirements_txt(self, *, http_entry: bool = False) -> str:
        head = f"# FedKeeper runtime {self.name} ({self.content_hash[:12]}), pinned\n"
        return head + "".join(f"{p}\n" for p in self.requirements(http_entry=http_entry))


def parse_pins(name: str, text: str, origin: str) -> tuple[Pin, ...]:
    pins: list[Pin] = []
    seen: set[str] = set()
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN_RE.match(line)
        if not m:
            raise RuntimeDeclarationError(f"{origin}:{no}: {line!r} is not pinned as name==version")
        pin = Pin(m.group(1), m.group(2))
        if pin.key in seen:
            raise RuntimeDeclarationError(f"{origin}:{no}: {pin.name} is listed twice")
        seen.add(pin.key)
        pins.append(pin)
    if not pins:
        raise RuntimeDeclarationError(f"{origin}: runtime {name} lists no distributions")
    return tuple(pins)


@lru_cache(maxsize=16)
def load_list(name: str) -> tuple[Pin, ...]:
    if not _NAME_RE.match(name):
        raise RuntimeDeclarationError(f"{name!r} is not a runtime name (lower case letters, digits, - or _)")
    path = RUNTIMES_DIR / f"{name}.txt"
    if not path.is_file():
        raise RuntimeDeclarationError(f"no runtime named {name!r} (known: {', '.join(runtime_names())})")
    return parse_pins(name, path.read_text(), f"fedkeeper/runtimes/{name}.txt")


def runtime_names() -> list[str]:
    return sorted(p.stem for p in RUNTIMES_DIR.glob("*.txt") if p.stem != HTTP_ENTRY_LIST)


def load(name: str) -> FunctionRuntime:
    if name == HTTP_ENTRY_LIST:
        raise RuntimeDeclarationError(f"{name!r} is a part of every HTTP runtime, not a runtime")
    return FunctionRuntime(name, load_list(name))


def declared_runtime(source: str, functions_dir: Path | None = None) -> str:
    """The runtime name `functions/<source>/function.toml` declares."""
    path = (functions_dir or FUNCTIONS_DIR) / source / DECLARATION
    where = f"functions/{source}/{DECLARATION}"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeDeclarationError(f"{where} is missing: every function declares its runtime "
                                      f"(runtime = \"<name>\", one of {', '.join(runtime_names())})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuntimeDeclarationError(f"{where}: {exc}") from None
    name = data.get("runtime")
    if not isinstance(name, str):
        raise RuntimeDeclarationError(f"{where} names no runtime (runtime = \"<name>\")")
    load(name)  # must exist
    return name


def runtime_for(source: str) -> FunctionRuntime:
    return load(declared_runtime(source))


def functions_by_runtime(functions_dir: Path | None = None) -> dict[str, list[str]]:
    """runtime name -> the function folders declaring it."""
    root = functions_dir or FUNCTIONS_DIR
    out: dict[str, list[str]] = {}
    for decl in sorted(root.glob(f"*/{DECLARATION}")):
        out.setdefault(declared_runtime(decl.parent.name, root), []).append(decl.parent.name)
    return out
