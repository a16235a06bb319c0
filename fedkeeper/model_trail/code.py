"""The model code of a stored session on the keeper's side: the built-ins
its spec names, or its user module, read from the config's path and
checked against the content hash the session recorded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flcommon.entry import BadRequest
from flcommon.user_code import BuiltinCode, code_for

from .catalog import ModelTrailError


def session_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec")
    if not isinstance(spec, dict) or "model" not in spec:
        raise ModelTrailError(f"session {doc['_id']} records no model spec, so its architecture is unknown; "
                              "export its weights as .npz instead")
    return spec


def session_code(doc: dict[str, Any], module_path: Path | None):
    """flcommon.user_code's interface for the session in `doc`.

    `module_path`: the user module the current config names (None when it
    names none). A session trained with a user module needs the same code:
    its content hash must match the one the session recorded."""
    spec = session_spec(doc)
    um = spec.get("user_module")
    if not um:
        return BuiltinCode(spec)
    if module_path is None:
        raise ModelTrailError(f"session {doc['_id']} was trained with user module {um.get('name')} "
                              f"({str(um.get('sha256'))[:12]}); pass the config that names it (-c, -s)")
    from ..user_module import module_hash
    path = Path(module_path)
    try:
        have = module_hash(path)
    except BadRequest as exc:   # UserCodeError: over its size limit, not a module, gone
        raise ModelTrailError(str(exc)) from None
    if path.name != um.get("name") or have != um.get("sha256"):
        raise ModelTrailError(f"session {doc['_id']} was trained with user module {um.get('name')} "
                              f"{str(um.get('sha256'))[:12]}, but the config names {path.name} {have[:12]}: "
                              "the module changed since")
    try:
        return code_for(spec, root=path.parent)
    except BadRequest as exc:
        raise ModelTrailError(str(exc)) from None
