"""The model trail: what produced each global model, recorded on its
`models` document as `trail` by the function that wrote it.

  parent        the model round it was computed from (None for model 0)
  parent_blob   that model's blob id
  function      the function that wrote it (fl_server_init, fl_server_aggregator)
  code_hash     sha256 over the code that ran: the function's own module
                files, flcommon and the bundled user module (not the
                platform entry files, so the same code hashes the same on
                every platform)
  config_hash   sha256 of the session's spec (model, data, partition,
                clients, seed, optimizer, strategy, round mode) as stored
  strategy      the strategy and its settings, as the spec gives them
  user_module   {name, sha256} of the user module, or None
  clients, updates, examples, stale   what was aggregated (the full list is
                the document's `contributions`)
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from .user_code import USER_DIR, bundled_root

ENTRY_FILES = ("__main__.py", "main.py")


def _code_files(function_dir: Path) -> Iterable[tuple[str, Path]]:
    for p in sorted(function_dir.glob("*.py")):
        if p.name not in ENTRY_FILES:
            yield p.name, p
    lib = Path(__file__).resolve().parent
    for p in sorted(lib.rglob("*.py")):
        if "__pycache__" not in p.parts:
            yield "flcommon/" + p.relative_to(lib).as_posix(), p
    user = bundled_root()
    if user.is_dir():
        for p in sorted(user.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                yield f"{USER_DIR}/" + p.relative_to(user).as_posix(), p


@lru_cache(maxsize=8)
def code_hash(function_dir: str) -> str:
    """sha256 over (path, bytes) of the code a function runs; computed once
    per worker (deployed code never changes under a running worker)."""
    h = hashlib.sha256()
    for rel, p in _code_files(Path(function_dir)):
        data = p.read_bytes()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def model_trail(spec: dict[str, Any], function_file: str, *, parent: dict[str, Any] | None = None,
                contributions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The trail of a model computed by the function in `function_file`
    from the model document `parent` and the update `contributions`."""
    contributions = contributions or []
    um = spec.get("user_module")
    return {
        "parent": None if parent is None else parent.get("round"),
        "parent_blob": None if parent is None else parent.get("blob_id"),
        "function": Path(function_file).stem,
        "code_hash": code_hash(str(Path(function_file).resolve().parent)),
        "config_hash": spec_hash(spec),
        "strategy": spec.get("strategy"),
        "mode": spec.get("mode", "sync"),
        "user_module": {"name": um.get("name"), "sha256": um.get("sha256")} if isinstance(um, dict) else None,
        "clients": len({c["client"] for c in contributions}),
        "updates": len(contributions),
        "examples": sum(int(c.get("num_examples") or 0) for c in contributions),
        "stale": sum(1 for c in contributions if c.get("staleness", 0) > 0),
    }
