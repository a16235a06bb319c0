"""Action definitions: validation of a PUT body, the action's code unpacked
once per version under the state directory, and their persistence across
restarts of the fabric."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..archive import ArchiveError, compile_python, extract_zip
from .entities import Action, Settings, disk_name, kv_list, valid_name
from .status import ApiError

log = logging.getLogger("fedkeeper.fabric")

DEFAULT_LIMITS = {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}
# (key, lowest, highest); the highest memory is the fabric's user memory.
LIMIT_RANGES = (("timeout", 100, 3600000), ("concurrency", 1, 500), ("logs", 0, 10))


def check_limits(limits: dict, settings: Settings) -> None:
    ranges = LIMIT_RANGES + (("memory", 128, settings.user_memory_mb),)
    for key, lo, hi in ranges:
        v = limits.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ApiError(400, f"limits.{key} must be an integer.")
        if isinstance(v, float) and (not math.isfinite(v) or not v.is_integer()):
            raise ApiError(400, f"limits.{key} must be an integer.")
        if not lo <= v <= hi:
            raise ApiError(400, f"limits.{key} is outside the allowed range {lo} to {hi}.")
        limits[key] = int(v)


def check_exec(ex: Any) -> tuple[dict, bytes | None, str | None, str | None]:
    """(exec as stored, zip bytes, plain source, why it cannot run)."""
    if not isinstance(ex, dict) or not isinstance(ex.get("kind"), str):
        raise ApiError(400, "The request content was malformed: exec.kind undefined.")
    kind = ex["kind"]
    code = ex.get("code")
    binary = ex.get("binary")
    if binary is None:
        # As OpenWhisk does when `binary` is absent: base64 of a zip
        # archive starts with the encoding of "PK\x03\x04".
        binary = isinstance(code, str) and code.lstrip().startswith("UEsDB")
    binary = bool(binary)
    out = {"kind": kind, "binary": binary}
    if ex.get("main"):
        if not isinstance(ex["main"], str) or not ex["main"].isidentifier():
            raise ApiError(400, "The request content was malformed: exec.main must be a function name.")
        out["main"] = ex["main"]
    if kind == "blackbox":
        if not isinstance(ex.get("image"), str) or not ex["image"]:
            raise ApiError(400, "The request content was malformed: a blackbox action needs exec.image.")
        out["image"] = ex["image"]
    elif not (kind == "python" or kind.startswith("python:")):
        raise ApiError(400, f"The local fabric runs python actions ('python:3', 'python:3.11', ...) "
                            f"and blackbox actions carrying python code; kind '{kind[:64]}' is not supported.")
    if code is None:
        if kind != "blackbox":
            raise ApiError(400, "The request content was malformed: exec.code undefined.")
        return out, None, None, (f"The local fabric cannot run the docker image {out['image']!r}; "
                                 "deploy the action with its python zip as exec.code.")
    if not isinstance(code, str):
        raise ApiError(400, "The request content was malformed: exec.code must be a string.")
    out["code"] = code
    if binary:
        try:
            data = base64.b64decode(code, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "exec.code is not valid base64.") from None
        return out, data, None, None
    return out, None, code, None


def define(ns: str, name: str, body: Any, old: Action | None, settings: Settings
           ) -> tuple[Action, bytes | None, str | None]:
    """The new version of an action from a PUT body (not yet unpacked)."""
    if not valid_name(name):
        raise ApiError(400, "The name of the entity contains illegal characters.")
    if not isinstance(body, dict):
        raise ApiError(400, "The request content was malformed: expected a JSON object.")
    if old is None and "exec" not in body:
        raise ApiError(400, "The request content was malformed: exec undefined.")
    ex = body.get("exec", old.exec if old else None)
    limits = dict(old.limits) if old else dict(DEFAULT_LIMITS)
    if body.get("limits") is not None:
        if not isinstance(body["limits"], dict):
            raise ApiError(400, "limits must be an object.")
        limits.update({k: v for k, v in body["limits"].items() if v is not None})
    check_limits(limits, settings)
    exec_norm, code_bytes, source, run_error = check_exec(ex)
    action = Action(namespace=ns, name=name, version=(old.version + 1) if old else 1, exec=exec_norm,
                    parameters=kv_list(body.get("parameters", old.parameters if old else []), "parameters"),
                    annotations=kv_list(body.get("annotations", old.annotations if old else []),
                                        "annotations"),
                    limits=limits, publish=bool(body.get("publish", False)),
                    updated=int(time.time() * 1000), run_error=run_error)
    return action, code_bytes, source


class ActionFiles:
    """Where actions live on disk: <state>/actions/<namespace>/<name>/."""

    def __init__(self, actions_dir: Path):
        self.root = Path(actions_dir)

    def dir_of(self, ns: str, name: str) -> Path:
        return self.root / disk_name(ns) / disk_name(name)

    def unpack(self, action: Action, data: bytes | None, source: str | None) -> str:
        digest = hashlib.sha256(data if data is not None else source.encode()).hexdigest()[:16]
        dest = self.dir_of(action.namespace, action.name) / f"{action.version}-{digest}"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if source is not None:
            (dest / "__main__.py").write_text(source)
        else:
            self._extract(data, dest)
        compile_python(dest)
        return str(dest)

    @staticmethod
    def _extract(data: bytes, dest: Path) -> None:
        try:
            extract_zip(data, dest)
        except (ArchiveError, OSError) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, f"exec.code is refused: {exc}") from None
        if not (dest / "__main__.py").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, "The action's zip has no __main__.py at its top level.")

    def persist(self, action: Action) -> None:
        d = self.dir_of(action.namespace, action.name)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "action.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**action.to_json(code=True), "version": action.version,
                       "code_dir": action.code_dir, "run_error": action.run_error}, f)
        os.replace(tmp, d / "action.json")

    def prune(self, action: Action, in_use: set[str]) -> None:
        """Remove the code of the action's versions no worker uses any more."""
        for old in self.dir_of(action.namespace, action.name).iterdir():
            if old.is_dir() and str(old) not in in_use and str(old) != action.code_dir:
                shutil.rmtree(old, ignore_errors=True)

    def remove(self, ns: str, name: str) -> None:
        shutil.rmtree(self.dir_of(ns, name), ignore_errors=True)

    def load_all(self) -> list[Action]:
        out = []
        if not self.root.is_dir():
            return out
        for meta in self.root.glob("*/*/action.json"):
            try:
                j = json.loads(meta.read_text())
                a = Action(namespace=j["namespace"], name=j["name"], version=int(j["version"]),
                           exec=j["exec"], parameters=j["parameters"], annotations=j["annotations"],
                           limits=j["limits"], publish=j["publish"], updated=j["updated"],
                           code_dir=j.get("code_dir"), run_error=j.get("run_error"))
                if a.code_dir and not Path(a.code_dir).is_dir():
                    continue
                out.append(a)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping stored action %s: %s", meta.parent.name, exc)
        return out
