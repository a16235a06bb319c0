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

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from flcommon.user_code import USER_DIR, content_hash, module_files


_INT64 = 1 << 63


def json_value(value: Any, where: str = "") -> Any:
    """`value` when it is a JSON value that the store holds as well (a
    whole number within 64 bits, a finite float); else ValueError naming
    where inside it the first offender is. The parameters travel as JSON to
    `config validate`'s check and as BSON in the session's spec, so a YAML
    date or set would otherwise fail there, far from the config line."""
    at = f" at {where}" if where else ""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"the whole number{at} is outside the 64-bit range the store holds")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value}{at} is not a JSON number; give a finite number")
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            json_value(item, f"{where}[{i}]")
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"the key {key!r}{at} is a {type(key).__name__}; keys must be strings "
                                 "(quote it)")
            json_value(item, f"{where}.{key}" if where else key)
        return value
    shown = str(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ValueError(f"{shown}{at} is a {type(value).__name__}, not a JSON value (a number, string, true/false, "
                     "null, list or mapping); quote it to pass it as a string")


#: a value of model_params / data_params, checked where the config is read
JsonParam = Annotated[Any, AfterValidator(json_value)]


class UserModuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    model_params: dict[str, JsonParam] = Field(default_factory=dict)   # build_model(..., **model_params)
    data_params: dict[str, JsonParam] = Field(default_factory=dict)    # load_data(**data_params)

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


# --------------------------------------------------------------------------- checks

class UserModuleError(ValueError):
    """A user module that cannot be used; the message says why."""


#: the runtime of the functions that run user code (fl_client, fl_server_init, ...)
USER_CODE_RUNTIME = "tensorflow"
PROBE_TIMEOUT_S = 300.0


def _imported_names(files: list[tuple[str, bytes]]) -> dict[str, str]:
    """Top-level module names the files import (absolute imports only) ->
    the first file importing each."""
    import ast
    out: dict[str, str] = {}
    for rel, data in files:
        if not rel.endswith(".py"):
            continue
        try:
            tree = ast.parse(data, filename=rel)
        except SyntaxError:
            continue  # the import check in the probe reports it with its line
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], rel)
    return out


def _normalise(dist: str) -> str:
    import re
    return re.sub(r"[-_.]+", "-", dist).lower()


def runtime_distributions(name: str = USER_CODE_RUNTIME) -> tuple[set[str], list[str]]:
    """(every distribution a runtime installs: its pins and, as far as this
    machine's metadata tells, what they require; the pinned names)."""
    import importlib.metadata as md
    import re
    from .runtimes import load
    pinned = [p.name for p in load(name).pins]
    seen: set[str] = set()
    todo = [_normalise(p) for p in pinned]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            # "name[extra] (>=1); marker": the name leads; optional extras are left out
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if m is None or re.search(r";.*\bextra\b", line):
                continue
            todo.append(_normalise(m.group(1)))
    return seen, pinned


def undeclared_imports(path: Path, files: list[tuple[str, bytes]]) -> list[str]:
    """Imports of the module that neither the standard library, the module
    itself, flcommon, nor the user-code runtime provide."""
    import importlib.metadata as md
    own = {Path(rel).parts[0].removesuffix(".py") for rel, _ in files}
    allowed, pinned = runtime_distributions()
    by_module = md.packages_distributions()
    problems = []
    for name, where in sorted(_imported_names(files).items()):
        if name in sys.stdlib_module_names or name in own or name in ("flcommon", "__future__"):
            continue
        dists = {_normalise(d) for d in by_module.get(name, [])}
        if dists & allowed:
            continue
        what = f"{name} ({', '.join(sorted(dists))})" if dists else name
        problems.append(f"{where} imports {what}, which the function runtime {USER_CODE_RUNTIME} does not "
                        f"provide (it pins {', '.join(pinned)} and what they require)")
    return problems


def check(cfg, scenario_name: str, scenario) -> Optional[dict[str, Any]]:
    """Check a scenario's user module without training: its files, that its
    imports belong to the runtime, then (in a child process) that it
    imports, has the interface's signatures and builds a model of the
    declared shapes with the right output size. Returns what the probe
    found; raises UserModuleError naming the scenario and what is wrong."""
    import json
    import subprocess
    path = module_path(cfg, scenario)
    if path is None:
        return None
    where = f"scenarios.{scenario_name}.user_module ({scenario.user_module.path})"
    from .artifacts import FUNCTIONS_DIR
    name = path.stem if path.is_file() else path.name
    if (FUNCTIONS_DIR / name / "function.toml").is_file():
        # every function's zip holds its own module of that name beside the user's
        raise UserModuleError(f"{where}: its name {name!r} is a FedKeeper function's; rename the user module")
    try:
        files = module_files(path)
    except ValueError as exc:
        raise UserModuleError(f"{where}: {exc}") from None
    problems = undeclared_imports(path, files)
    if problems:
        raise UserModuleError(f"{where}: " + "; ".join(problems))
    um = scenario.user_module
    ci = getattr(scenario, "clients_info", None)
    request = {"path": str(path), "model_params": um.model_params, "data_params": um.data_params,
               "clients": getattr(ci, "total_num_clients", None),
               "spec": {"model": scenario.data_sampling.model,
                        "data": scenario.training_test_data.model_dump(exclude_none=True),
                        "partition": {"method": scenario.data_sampling.partition}}}
    try:
        proc = subprocess.run([sys.executable, "-m", "fedkeeper.user_module_probe"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserModuleError(f"{where}: importing it and building its model took over "
                              f"{PROBE_TIMEOUT_S:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UserModuleError(f"{where}: checking it failed (exit {proc.returncode}): {tail[0]}")
    out = json.loads(lines[-1])
    if not out.get("ok"):
        raise UserModuleError(f"{where}: {out.get('message')}")
    return out


#: the functions that run user code, whose artifacts carry the module
USER_CODE_FUNCTIONS = ("fl_client", "fl_server_init", "fl_server_aggregator", "fl_model_validate")


def artifact_members(cfg, scenario, function: str) -> tuple[tuple[str, bytes], ...]:
    """What the artifact of `function` carries of the scenario's user module
    (nothing for functions that never run user code, so that changing the
    module redeploys only those that do)."""
    if function not in USER_CODE_FUNCTIONS:
        return ()
    return bundle_members(cfg, scenario)


def describe(scenario_name: str, scenario, found: dict[str, Any]) -> str:
    """One line for `config validate` about a checked user module."""
    return (f"scenarios.{scenario_name}.user_module {scenario.user_module.path}: defines "
            f"{', '.join(found['defines'])}; builds a model of {found['params']} parameters for input "
            f"{tuple(found['input_shape'])} ({found['shapes']}) with output (None, {found['num_classes']})")
