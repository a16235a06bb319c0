"""Planning a sweep: the grid parsed, every (combination, repeat) turned
into a Config that passed the same validation as a config file."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin

from flcommon.urls import masked
from pydantic import BaseModel, ValidationError

from ..config import Config, ConfigError, Scenario, check_references

# Short grid keys -> their place in the scenario. Any other key is a dotted
# path inside the scenario, e.g. training.strategy.mu.
GRID_ALIASES: dict[str, str] = {
    "optim": "model_params.optim",
    "lr": "model_params.lr",
    "momentum": "model_params.momentum",
    "local_epochs": "model_params.local_epochs",
    "batch_size": "data_sampling.batch_size",
    "strategy": "training.strategy.name",
    "mode": "training.mode",
    "clients_per_round": "clients_info.num_clients_per_round",
    "rounds": "training.rounds",
}
# Paths a sweep owns or shares between its runs, and why they cannot vary.
FIXED_PATHS: dict[str, str] = {
    "mongo_config": "every run of a sweep uses the same store",
    "training.seed": "the seed is set per repeat (base seed + repeat)",
}


class SweepError(ValueError):
    """A sweep that cannot be planned: bad grid key or value, or a
    combination the config validation rejects."""


# --------------------------------------------------------------------------- grid

@dataclass
class GridAxis:
    key: str                 # as given on the command line
    path: tuple[str, ...]    # inside the scenario
    labels: list[str]        # the values as typed
    values: list[Any]        # the values parsed


@dataclass
class Run:
    index: int
    params: dict[str, Any]   # grid key -> value
    labels: dict[str, str]   # grid key -> value as typed
    repeat: int
    seed: int
    session: str
    cfg: Config

    @property
    def key(self) -> str:
        return f"run{self.index:03d}"

    @property
    def label(self) -> str:
        """As progress lines show the run: any URL's user info masked."""
        return masked(" ".join(f"{k}={v}" for k, v in self.labels.items()))


def parse_value(text: str) -> Any:
    """A grid value as typed: int, float, true/false, null, else the string."""
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    return t


def _container(annotation: Any) -> Any:
    """The model or dict type a path can continue into, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is dict:
        return annotation
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            found = _container(member)
            if found is not None:
                return found
    return None


def resolve_path(key: str) -> tuple[str, ...]:
    """The scenario path of a grid key; checked against the config schema,
    so that a misspelt key is an error and not an ignored extra."""
    dotted = GRID_ALIASES.get(key, key)
    parts = tuple(p for p in dotted.split("."))
    if not all(parts):
        raise SweepError(f"grid key {key!r} is not a key or a dotted path")
    for fixed, why in FIXED_PATHS.items():
        if dotted == fixed or dotted.startswith(fixed + "."):
            raise SweepError(f"grid key {key!r} cannot vary: {why}")
    here: Any = Scenario
    for i, part in enumerate(parts):
        node = _container(here)
        if node is None:
            raise SweepError(f"grid key {key!r}: {'.'.join(parts[:i])} is a value; it has no {part!r}")
        if get_origin(node) is dict:  # a mapping: the part is one of its keys
            here = get_args(node)[1]
            continue
        fields = node.model_fields
        name = part if part in fields else next((n for n, f in fields.items() if f.alias == part), None)
        if name is None:
            where = ".".join(parts[:i]) or "the scenario"
            short = f" (or one of {sorted(GRID_ALIASES)})" if i == 0 else ""
            raise SweepError(f"unknown grid key {key!r}: {where} has no {part!r}; known there: "
                             f"{sorted(fields)}{short}")
        here = fields[name].annotation
    section = _container(here)
    if section is not None:
        # A section takes a mapping, which a comma-separated value cannot express.
        hint = f", e.g. {dotted}.{next(iter(section.model_fields))}" if isinstance(section, type) else ""
        raise SweepError(f"grid key {key!r} names a section, not a setting; name one of its keys{hint}")
    return parts


def parse_grid(specs: Iterable[str]) -> list[GridAxis]:
    """`key=v1,v2` strings -> axes, in the order given."""
    axes: list[GridAxis] = []
    seen: set[tuple[str, ...]] = set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid {spec!r}: expected key=value1,value2,...")
        labels = [v.strip() for v in raw.split(",") if v.strip()]
        if not labels:
            raise SweepError(f"--grid {spec!r}: no values")
        if len(set(labels)) != len(labels):
            raise SweepError(f"--grid {spec!r}: a value is repeated")
        path = resolve_path(key)
        if path in seen:
            raise SweepError(f"--grid {key}: the same setting is given twice")
        seen.add(path)
        axes.append(GridAxis(key, path, labels, [parse_value(v) for v in labels]))
    if not axes:
        raise SweepError("give at least one --grid key=value1,value2,...")
    return axes


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        nxt = data.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            data[part] = nxt
        data = nxt
    data[path[-1]] = value


def _validation_message(exc: ValidationError, scenario: str) -> str:
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"]]
    if loc[:2] == ["scenarios", scenario]:
        loc = loc[2:]
    msg = err.get("msg", "")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{'.'.join(loc) or 'scenario'}: {msg}"


# --------------------------------------------------------------------------- planning

@dataclass
class SweepPlan:
    sweep_id: str
    content_hash: str
    scenario: str
    axes: list[GridAxis]
    repeats: int
    base_seed: int
    runs: list[Run] = field(default_factory=list)


def content_hash(cfg: Config, scenario: str, axes: list[GridAxis], repeats: int) -> str:
    """What makes two sweeps the same sweep: config content, grid, repeats."""
    body = json.dumps({"config": cfg.redacted(), "scenario": scenario,
                       "grid": [[".".join(a.path), a.labels] for a in axes], "repeats": repeats},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _placements_signature(cfg: Config, scenario: str) -> list[tuple[str, str, Any]]:
    from ..runtime import Runtime
    rt = Runtime(cfg=cfg, scenario_name=scenario, scenario=cfg.scenarios[scenario], state=Path("."))
    try:
        return [(p.cluster, p.section, p.spec) for p in rt.training_placements()]
    except ValueError as exc:
        raise SweepError(str(exc)) from None


def plan_sweep(cfg: Config, scenario: str | None, axes: list[GridAxis], repeats: int,
               sweep_id: str | None = None) -> SweepPlan:
    """Every (combination, repeat) as a validated Config; raises SweepError
    before anything runs when one of them is not a valid config."""
    if repeats < 1:
        raise SweepError("--repeats must be at least 1")
    try:
        name, scen = cfg.scenario(scenario)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if scen.clients_info is None:
        raise SweepError(f"scenario {name!r} has no clients_info; it cannot be trained")
    from ..config.training import MAX_SEED
    last_seed = scen.training.seed + repeats - 1  # repeat r trains with seed + r
    if last_seed > MAX_SEED:
        raise SweepError(f"--repeats {repeats} from training.seed {scen.training.seed} would reach seed "
                         f"{last_seed}; seeds go up to {MAX_SEED} (2**32 - 1): lower the seed or the repeats")
    digest = content_hash(cfg, name, axes, repeats)
    if sweep_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}", sweep_id):
        raise SweepError(f"--sweep-id {sweep_id!r}: use letters, digits, '_', '.', '-' (at most 81)")
    plan = SweepPlan(sweep_id or f"sweep-{digest[:12]}", digest, name, axes, repeats, scen.training.seed)
    base = cfg.model_dump(mode="python", by_alias=True, exclude_none=True)
    reference = None
    for combo in itertools.product(*[range(len(a.values)) for a in axes]):
        params = {a.key: a.values[i] for a, i in zip(axes, combo)}
        labels = {a.key: a.labels[i] for a, i in zip(axes, combo)}
        for repeat in range(repeats):
            index = len(plan.runs)
            data = copy.deepcopy(base)
            scen_data = data["scenarios"][name]
            for a, i in zip(axes, combo):
                _set_path(scen_data, a.path, a.values[i])
            _set_path(scen_data, ("training", "seed"), plan.base_seed + repeat)
            where = " ".join(f"{k}={v}" for k, v in labels.items())
            try:
                run_cfg = Config.model_validate(data)
                run_cfg.source = cfg.source
                check_references(run_cfg, {})
            except ValidationError as exc:
                raise SweepError(f"grid combination {where}: {_validation_message(exc, name)}") from None
            except ConfigError as exc:
                raise SweepError(f"grid combination {where}: {exc.path}: {exc.message}") from None
            # One deployment serves every run (runs go in parallel on the same
            # functions), so the grid must not change what is deployed where.
            signature = _placements_signature(run_cfg, name)
            if reference is None:
                reference = signature
            elif signature != reference:
                raise SweepError(f"grid combination {where} changes which functions are deployed where "
                                 "or how; every run of a sweep shares one deployment (run such "
                                 "settings as separate sweeps)")
            plan.runs.append(Run(index, params, labels, repeat, plan.base_seed + repeat,
                                 f"{plan.sweep_id}-{index:03d}", run_cfg))
    return plan


