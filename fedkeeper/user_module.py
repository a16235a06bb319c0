"""User modules on the keeper's side: the `scenarios.<s>.user_module` key,
where the module is, its content hash, what artifacts carry of it, and its
check at `config validate` (docs/models.md).

The key is a path (a .py file or a package directory, relative to the
config file), or a mapping with that path and the keyword arguments of the
module's functions:

    user_module: examples/digits_cnn.py
    user_module: {path: my_fl/, model_params: {filters: 16}, data_params: {fraction: 0.5}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flcommon.user_code import USER_DIR, content_hash, module_files


class UserModuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    model_params: dict[str, Any] = Field(default_factory=dict)   # build_model(..., **model_params)
    data_params: dict[str, Any] = Field(default_factory=dict)    # load_data(**data_params)

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, v):
        return {"path": v} if isinstance(v, str) else v


def module_path(cfg, scenario) -> Optional[Path]:
    """The user module a scenario names, resolved against the config file's
    folder; None when it names none."""
    um = getattr(scenario, "user_module", None)
    if um is None:
        return None
    base = Path(cfg.source).resolve().parent if getattr(cfg, "source", None) else Path.cwd()
    return (base / um.path).resolve()


def module_hash(path: Path) -> str:
    return content_hash(module_files(path))


def spec_entry(cfg, scenario) -> Optional[dict[str, Any]]:
    """What the session's spec records of the user module (the functions
    load it from their artifact and check the hash): None without one."""
    path = module_path(cfg, scenario)
    if path is None:
        return None
    um = scenario.user_module
    return {"name": path.name, "sha256": module_hash(path), "model_params": dict(um.model_params),
            "data_params": dict(um.data_params)}


def bundle_members(cfg, scenario) -> tuple[tuple[str, bytes], ...]:
    """(arcname, bytes) of the user module inside a function artifact, next
    to flcommon/ (so its content hash enters the artifact's)."""
    path = module_path(cfg, scenario)
    if path is None:
        return ()
    return tuple((f"{USER_DIR}/{rel}", data) for rel, data in module_files(path))
