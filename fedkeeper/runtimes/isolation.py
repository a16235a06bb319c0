"""Local function processes run with exactly their runtime's packages.

A cloud installs what a function's runtime declares and nothing else; the
local platforms must not hide an undeclared import by running functions in
the keeper's own virtualenv, where everything is installed. What runs here:

  site      one directory per pinned list (cached by the list's hash) of
            symlinks to exactly the declared distributions and their
            dependency closure (from importlib.metadata) as installed in
            the keeper's environment. A top-level name shared with
            distributions outside the closure (a namespace package such as
            `google`) becomes a real directory with only the closure's
            entries linked inside.
  process   `python -I -S bootstrap.py SITE ...`: isolated mode, no site
            module, so neither the keeper's site-packages nor PYTHONPATH nor
            user site is on sys.path; the bootstrap puts SITE after the
            standard library and runs the worker script or module.

The keeper's installed versions must equal the pins (else the site would
not be what a cloud installs); when they differ, a real virtualenv is built
from the list under the same cache, or the error says why it could not be.
Building the site costs about a second once per list; starting a process
costs what it did before.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from packaging.requirements import InvalidRequirement, Requirement

from . import HTTP_ENTRY_LIST, Pin, RuntimeDeclarationError, load, load_list, parse_pins
from .images import runtime_of_image

BOOTSTRAP = str(Path(__file__).resolve().parent / "bootstrap.py")
CACHE_ENV = "FEDKEEPER_RUNTIME_CACHE"
#: bumped when the layout of a cached site changes
LAYOUT = "1"


class IsolationError(OSError):
    """The runtime's environment cannot be made as declared. An OSError, so
    that a local platform treats it like any other failure to start a
    function's process (and reports its message)."""


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class IsolatedEnv:
    python: str               # the interpreter to start
    site: Path | None         # the directory of linked distributions (None: a real venv)
    pins_hash: str

    def command(self, *args: str) -> list[str]:
        """argv running `args` (a script path and its arguments, or `-m
        module ...`) with only the standard library and this runtime's
        packages importable."""
        # -I ignores PYTHON* variables, so what the platforms set there
        # (unbuffered output, no bytecode files) is given as flags
        if self.site is None:  # a virtualenv built from the list: its own site-packages only
            return [self.python, "-I", "-u", "-B", *args]
        return [self.python, "-I", "-S", "-u", "-B", BOOTSTRAP, str(self.site), *args]


def pins_hash(pins: Sequence[Pin], closure_versions: Sequence[str] = ()) -> str:
    """The cache key of a site: the pins, and the versions of the closure
    it links (a changed keeper environment gets a new site)."""
    text = "\n".join(sorted(f"{p.key}=={p.version}" for p in pins))
    text += "\n--\n" + "\n".join(sorted(closure_versions))
    return hashlib.sha256(f"{LAYOUT}\n{sys.prefix}\n{sys.version_info[:2]}\n{text}\n".encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where sites are kept: $FEDKEEPER_RUNTIME_CACHE, else beside the
    keeper's environment (they link into it), shared by every state
    directory so that a fresh one does not build them again."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    beside = Path(sys.prefix) / "var" / "fedkeeper-runtimes"
    try:
        beside.mkdir(parents=True, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    # a read-only environment (a system Python): the user's cache instead
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkeeper" / "runtimes"


def version_mismatches(pins: Sequence[Pin]) -> list[str]:
    """Pins the keeper's environment does not satisfy exactly."""
    out = []
    for p in pins:
        try:
            have = md.version(p.name)
        except md.PackageNotFoundError:
            out.append(f"{p.name}=={p.version} is not installed")
            continue
        if have != p.version:
            out.append(f"{p.name} is {have}, the runtime pins {p.version}")
    return out


def closure(pins: Sequence[Pin]) -> dict[str, md.Distribution]:
    """The pinned distributions and everything they require (markers
    evaluated for this interpreter, extras followed), by normalised name."""
    found: dict[str, md.Distribution] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(p.name, frozenset(), "the runtime") for p in pins]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras, wanted_by = todo.pop()
        key = _key(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = found.get(key) or md.distribution(name)
        except md.PackageNotFoundError:
            raise IsolationError(f"{name} (required by {wanted_by}) is not installed in the keeper's "
                                 "environment") from None
        found[key] = dist
        for text in dist.requires or ():
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            envs = [{"extra": e} for e in (extras or {""})]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras), dist.metadata["Name"]))
    return found


def _site_packages_files(dist: md.Distribution) -> dict[tuple[str, ...], object]:
    """The dist's installed files (path parts relative to site-packages ->
    the RECORD's hash entry); scripts and data outside it are left out."""
    out: dict[tuple[str, ...], object] = {}
    for f in dist.files or ():
        parts = Path(f).parts
        if parts and parts[0] != ".." and not Path(f).is_absolute():
            out[parts] = f.hash
    return out


def _is_recorded_content(path: Path, recorded) -> bool:
    """Whether the file on disk is the one the dist's RECORD names (another
    distribution may have overwritten it in a shared directory)."""
    if recorded is None or getattr(recorded, "mode", None) != "sha256":
        return False
    try:
        digest = hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return False
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == recorded.value


def _link_tree(dest: Path, root: Path, wanted: set[tuple[str, ...]], others: set[tuple[str, ...]],
               depth: int = 0) -> None:
    """Link into `dest` the entries of `root` that only wanted files use;
    an entry shared with other distributions' files is made a directory
    and linked into one level deeper."""
    by_head: dict[str, set[tuple[str, ...]]] = {}
    for parts in wanted:
        by_head.setdefault(parts[depth], set()).add(parts)
    other_heads: dict[str, set[tuple[str, ...]]] = {}
    for parts in others:
        if len(parts) > depth:
            other_heads.setdefault(parts[depth], set()).add(parts)
    for head, files in by_head.items():
        target = root.joinpath(*next(iter(files))[:depth + 1])
        link = dest / head
        if head not in other_heads or not target.is_dir():
            if not link.exists() and (target.exists() or target.is_symlink()):
                link.symlink_to(target)
            continue
        link.mkdir(exist_ok=True)
        _link_tree(link, root, {p for p in files if len(p) > depth + 1}, other_heads[head], depth + 1)


def _build_site(pins: Sequence[Pin], site: Path) -> None:
    dists = closure(pins)
    wanted_keys = set(dists)
    wanted: dict[Path, dict[tuple[str, ...], object]] = {}
    others: dict[Path, set[tuple[str, ...]]] = {}
    for dist in md.distributions():
        root = Path(dist.locate_file("")).resolve()
        files = _site_packages_files(dist)
        if _key(dist.metadata["Name"] or "") in wanted_keys:
            wanted.setdefault(root, {}).update(files)
        else:
            others.setdefault(root, set()).update(files)
    left_out: list[str] = []
    for root, files in wanted.items():
        # a file two distributions install is linked only if it is still
        # the closure's own version; otherwise it is left out, as a cloud
        # installing just the closure would not have the other's content
        for parts in [p for p in files if p in others.get(root, ())]:
            if not _is_recorded_content(root.joinpath(*parts), files[parts]):
                del files[parts]
                left_out.append("/".join(parts))
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=site.parent))
    try:
        for root, files in wanted.items():
            _link_tree(tmp, root, set(files), others.get(root, set()))
        (tmp / "fedkeeper-runtime.json").write_text(json.dumps(
            {"pins": [str(p) for p in pins],
             "closure": sorted(f"{d.metadata['Name']}=={d.version}" for d in dists.values()),
             "left_out_overwritten_by_other_distributions": sorted(left_out)}, indent=1))
        os.replace(tmp, site)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_venv(pins: Sequence[Pin], venv: Path) -> str:
    """A real virtualenv with exactly the pins installed (pip resolves the
    rest); its interpreter. Each process builds in a directory of its own
    and moves it into place; one that finds the virtualenv there already
    (another process won the race) uses that one."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.partial-", dir=venv.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        reqs = tmp / "requirements.txt"
        reqs.write_text("".join(f"{p}\n" for p in pins))
        r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--no-input", "-r", str(reqs)],
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise IsolationError("installing the runtime's packages failed: " + " | ".join(tail))
        try:
            os.replace(tmp, venv)
        except OSError:
            if not (venv / "bin" / "python").exists():
                raise
    except (OSError, subprocess.SubprocessError) as exc:
        raise IsolationError(f"cannot build a virtualenv for the runtime: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(venv / "bin" / "python")


def isolated_env(pins: Sequence[Pin], cache_dir: Path | None = None) -> IsolatedEnv:
    """The environment running exactly `pins`, made once per list (and
    closure) under `cache_dir` (default_cache_dir()); safe to call from
    several processes at once."""
    return _isolated_env(tuple(pins), Path(cache_dir) if cache_dir else default_cache_dir())


@functools.lru_cache(maxsize=32)
def _isolated_env(pins: tuple[Pin, ...], cache_dir: Path) -> IsolatedEnv:
    if version_mismatches(pins):
        h = pins_hash(pins)
        venv = cache_dir / h / "venv"
        if venv.is_dir():
            return IsolatedEnv(str(venv / "bin" / "python"), None, h)
        (cache_dir / h).mkdir(parents=True, exist_ok=True)
        return IsolatedEnv(_build_venv(pins, venv), None, h)
    dists = closure(pins)
    h = pins_hash(pins, [f"{k}=={d.version}" for k, d in dists.items()])
    site = cache_dir / h / "site"
    if site.is_dir():
        return IsolatedEnv(sys.executable, site, h)
    site.parent.mkdir(parents=True, exist_ok=True)
    try:
        _build_site(pins, site)
    except OSError as exc:
        if not site.is_dir():  # else another process made it first
            raise IsolationError(f"cannot link the runtime's packages under {site}: {exc}") from None
    return IsolatedEnv(sys.executable, site, h)


def env_for_requirements(text: str, cache_dir: Path | None = None, origin: str = "requirements.txt") -> IsolatedEnv:
    """The environment of a `requirements.txt` (as a source zip carries it)."""
    try:
        pins = parse_pins("requirements", text, origin)
    except RuntimeDeclarationError as exc:
        raise IsolationError(str(exc)) from None
    return isolated_env(pins, cache_dir)


def stock_env(cache_dir: Path | None = None) -> IsolatedEnv:
    """No packages at all: the standard library only (a stock runtime)."""
    site = (Path(cache_dir) if cache_dir else default_cache_dir()) / "stdlib-only"
    site.mkdir(parents=True, exist_ok=True)
    return IsolatedEnv(sys.executable, site, "stdlib-only")


# ------------------------------------------------------------------ the local platforms

def action_runtime(exec_: Mapping[str, Any]) -> str | None:
    """The runtime a local OpenWhisk action runs on: the one its Docker image
    was built from; None for a stock kind (and an image FedKeeper did not
    build: its packages are unknown here)."""
    image = exec_.get("image") if exec_.get("kind") == "blackbox" else None
    return runtime_of_image(str(image)) if image else None


def runtime_command(runtime: str | None, *args: str, cache_dir: Path | None = None) -> list[str]:
    """argv running `args` with exactly the packages of `runtime` (None: the
    standard library only). A process started so before it knows its action
    (a prewarmed worker) gets the same sys.path as one started for it."""
    if runtime is None:
        return stock_env(cache_dir).command(*args)
    return isolated_env(load(runtime).pins, cache_dir).command(*args)


def action_command(exec_: Mapping[str, Any], *args: str, cache_dir: Path | None = None) -> list[str]:
    """argv for a local OpenWhisk action's process: a Docker action on a
    runtime image gets exactly that runtime's packages; a stock kind (and an
    image FedKeeper did not build: its packages are unknown here) the
    standard library only, as OpenWhisk's stock runtime has none of the
    function's."""
    return runtime_command(action_runtime(exec_), *args, cache_dir=cache_dir)


def source_command(source_dir: Path, *args: str, cache_dir: Path | None = None) -> list[str]:
    """argv for a local Cloud Functions instance serving an unpacked source:
    what its `requirements.txt` pins, plus functions-framework (the
    buildpack installs it when the source does not name it); without a
    requirements.txt, functions-framework alone."""
    reqs = Path(source_dir) / "requirements.txt"
    pins: list[Pin] = []
    if reqs.is_file():
        try:
            pins = list(parse_pins("requirements", reqs.read_text(), "requirements.txt of the source"))
        except RuntimeDeclarationError as exc:
            raise IsolationError(str(exc)) from None
    have = {p.key for p in pins}
    pins += [p for p in load_list(HTTP_ENTRY_LIST) if p.key not in have]
    return isolated_env(pins, cache_dir).command(*args)
