"""Parameter sweeps: every combination of a grid, repeated with one seed per
repeat, each run its own training session (docs/sweeps.md).

A sweep is planned in full before anything runs: every combination becomes
a Config that passed the same validation as a config file, so a bad key or
value stops the sweep before the first session. Its document in the store
(collection `sweeps`) lists every run with its parameters, repeat, seed and
deterministic session id; the sweep id is a hash of the config, grid and
repeats. Running the same command again therefore finds the same document
and the same sessions: finished sessions are skipped, unfinished ones are
resumed where the keeper left them.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Union, get_args, get_origin

import click
from pydantic import BaseModel, ValidationError

from .config import Config, ConfigError, Scenario, check_references
from .cost import format_money, session_cost

log = logging.getLogger("fedkeeper.sweep")

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
        return " ".join(f"{k}={v}" for k, v in self.labels.items())


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
    from .runtime import Runtime
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


# --------------------------------------------------------------------------- results

RESULT_COLUMNS = ("repeat", "seed", "session", "state", "rounds", "rounds_to_target", "time_to_target_s",
                  "final_accuracy", "invocations", "retries", "cost", "currency")


def session_result(store, session: str, cfg: Config | None, target: float | None) -> dict[str, Any]:
    """One run's row, from the store alone. Time to target is the training
    time of the rounds up to and including the first at or above target."""
    doc = store.session(session)
    if doc is None:
        return {"state": "pending", "rounds": 0, "rounds_to_target": None, "time_to_target_s": None,
                "final_accuracy": None, "invocations": 0, "retries": 0, "cost": 0.0, "currency": None}
    done = [r for r in store.rounds(session) if r.get("state") == "done"]
    rounds_to_target = time_to_target = None
    elapsed = 0.0
    for r in done:
        elapsed += r.get("duration_s") or 0.0
        acc = r.get("accuracy")
        if target is not None and acc is not None and acc >= target:
            rounds_to_target, time_to_target = r["round"] + 1, elapsed
            break
    cost = session_cost(store, session, cfg)
    attempts = store.attempts(session)
    return {
        "state": doc.get("state"),
        "rounds": len(done),
        "rounds_to_target": rounds_to_target,
        "time_to_target_s": time_to_target,
        "final_accuracy": done[-1].get("accuracy") if done else None,
        "invocations": cost["invocations"],
        "retries": sum(1 for a in attempts if a.get("attempt", 1) > 1),
        "cost": cost["total"],
        "currency": cost["currency"],
        "error": doc.get("error"),
    }


def result_rows(sweep_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a sweep document, in run order: params, then RESULT_COLUMNS."""
    rows = []
    for key in sorted(sweep_doc.get("runs", {})):
        run = sweep_doc["runs"][key]
        res = run.get("result") or {}
        rows.append({"params": run["labels"], "repeat": run["repeat"], "seed": run["seed"],
                     "session": run["session"], "state": run.get("state"),
                     **{c: res.get(c) for c in RESULT_COLUMNS if c not in ("repeat", "seed", "session", "state")}})
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


DISPLAY_COLUMNS = ("params", "repeat", "session", "state", "rounds", "rounds to target", "time to target (s)",
                   "final accuracy", "invocations", "retries", "cost")


def _display_cells(row: dict[str, Any]) -> list[str]:
    return [" ".join(f"{k}={v}" for k, v in row["params"].items()), str(row["repeat"]), row["session"],
            str(row["state"]), _fmt(row["rounds"]), _fmt(row["rounds_to_target"]),
            _fmt(row["time_to_target_s"], 1), _fmt(row["final_accuracy"]), _fmt(row["invocations"]),
            _fmt(row["retries"]), format_money(row["cost"], row.get("currency") or "USD")]


def render_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """One column per grid key, then the result columns; numbers unformatted."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*keys, *RESULT_COLUMNS])
    for r in rows:
        w.writerow([*[r["params"].get(k) for k in keys],
                    *["" if r.get(c) is None else r.get(c) for c in RESULT_COLUMNS]])
    return out.getvalue()


def render_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(DISPLAY_COLUMNS) + " |", "|" + "---|" * len(DISPLAY_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _display_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def render_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table
    t = Table(title=title)
    for c in DISPLAY_COLUMNS:
        t.add_column(c, justify="left" if c in ("params", "session", "state") else "right")
    for r in rows:
        t.add_row(*_display_cells(r))
    return t


# --------------------------------------------------------------------------- running

Report = Callable[[str], None]


class Sweep:
    """Runs a plan: deploys once, then up to `parallel` sessions at a time,
    each with its own Runtime (own providers and store client) over the
    shared services, recording every run on the sweep document."""

    def __init__(self, plan: SweepPlan, *, parallel: int = 1, keep_services: bool = False,
                 target: float | None = None, report: Report = print):
        self.plan = plan
        self.parallel = max(1, parallel)
        self.keep_services = keep_services
        self.target = target
        self.report = report
        self.rt = None
        self.store = None

    # -- the sweep document
    def _doc_runs(self) -> dict[str, Any]:
        return {run.key: {"index": run.index, "params": run.params, "labels": run.labels,
                          "repeat": run.repeat, "seed": run.seed, "session": run.session,
                          "state": "pending"} for run in self.plan.runs}

    def _open_doc(self) -> dict[str, Any]:
        p = self.plan
        doc = {"_id": p.sweep_id, "content_hash": p.content_hash, "name": p.runs[0].cfg.name,
               "scenario": p.scenario, "repeats": p.repeats, "base_seed": p.base_seed,
               "grid": [{"key": a.key, "path": ".".join(a.path), "values": a.labels} for a in p.axes],
               "parallel": self.parallel, "state": "running", "runs": self._doc_runs()}
        if not self.store.create_sweep(doc):
            existing = self.store.sweep(p.sweep_id)
            if existing.get("content_hash") != p.content_hash:
                raise SweepError(f"sweep {p.sweep_id} exists with a different config, grid or repeats; "
                                 "choose another --sweep-id")
            self.store.update_sweep(p.sweep_id, state="running", parallel=self.parallel)
        return self.store.sweep(p.sweep_id)

    def _target_for(self, run: Run) -> float | None:
        if self.target is not None:
            return self.target
        return run.cfg.scenarios[self.plan.scenario].training.target_accuracy

    def _record(self, run: Run, **fields: Any) -> None:
        self.store.update_sweep(self.plan.sweep_id, **{f"runs.{run.key}.{k}": v for k, v in fields.items()})

    # -- one run, in a worker thread
    def _execute(self, run: Run) -> dict[str, Any]:
        from .keeper import Keeper
        from .runtime import Runtime
        t0 = time.time()
        existing = self.store.session(run.session)
        self._record(run, state="running", started=t0)
        rt = Runtime.open(run.cfg, self.plan.scenario, keep_local_services=True)
        try:
            keeper = Keeper(rt)
            summary = keeper.start(resume=run.session if existing else None, deploy=False,
                                   session_id=run.session)
            rt.store.update_session(run.session, sweep=self.plan.sweep_id, sweep_run=run.key)
            return {"state": summary.state, "message": summary.message, "seconds": time.time() - t0,
                    "resumed": existing is not None}
        finally:
            rt.close(stop_store=False)

    def _worker(self, jobs: "queue.Queue[Run | None]", done: "queue.Queue[tuple[Run, dict]]") -> None:
        while True:
            run = jobs.get()
            if run is None:
                return
            t0 = time.time()
            try:
                outcome = self._execute(run)
            except Exception as exc:  # one broken run must not end the sweep
                log.exception("sweep run %s (%s) failed", run.key, run.session)
                outcome = {"state": "failed", "message": f"{type(exc).__name__}: {exc}",
                           "seconds": time.time() - t0, "resumed": False}
            done.put((run, outcome))

    def _finish_run(self, run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
        result = session_result(self.store, run.session, run.cfg, self._target_for(run))
        state = "finished" if result["state"] == "finished" else "failed"
        if outcome.get("message") and not result.get("error"):
            result["error"] = outcome["message"]
        result["seconds"] = outcome.get("seconds")
        self._record(run, state=state, ended=time.time(), result=result)
        return {**result, "state": state}

    def _line(self, n: int, total: int, run: Run, result: dict[str, Any], note: str) -> None:
        acc = _fmt(result.get("final_accuracy"))
        cost = format_money(result.get("cost"), result.get("currency") or "USD")
        text = (f"[{n}/{total}] {run.label} repeat {run.repeat} ({run.session}): {note} - "
                f"{result.get('rounds', 0)} rounds, accuracy {acc}, {result.get('invocations', 0)} invocations, "
                f"{result.get('retries', 0)} retries, cost {cost}")
        if result.get("state") != "finished" and result.get("error"):
            text += f"; error: {result['error']}"
        self.report(text)

    def run(self) -> dict[str, Any]:
        from .runtime import Runtime
        plan = self.plan
        self.rt = Runtime.open(plan.runs[0].cfg, plan.scenario, keep_local_services=self.keep_services)
        self.store = self.rt.store
        interrupted = opened = False
        try:
            self._open_doc()
            opened = True
            todo: list[Run] = []
            total, n = len(plan.runs), 0
            for run in plan.runs:
                doc = self.store.session(run.session)
                if doc is not None and doc.get("state") == "finished":
                    n += 1
                    result = self._finish_run(run, {})
                    self._line(n, total, run, result, "finished earlier, skipped")
                else:
                    todo.append(run)
            if todo:
                self._deploy()
                jobs: queue.Queue = queue.Queue()
                done: queue.Queue = queue.Queue()
                for run in todo:
                    jobs.put(run)
                workers = min(self.parallel, len(todo))
                for _ in range(workers):
                    jobs.put(None)
                # Daemon threads: an interrupted sweep exits at once, leaving its
                # sessions as a killed keeper leaves them, to be resumed.
                for i in range(workers):
                    threading.Thread(target=self._worker, args=(jobs, done), daemon=True,
                                     name=f"sweep-{i}").start()
                for _ in todo:
                    while True:
                        try:
                            run, outcome = done.get(timeout=0.5)
                            break
                        except queue.Empty:
                            continue
                    n += 1
                    result = self._finish_run(run, outcome)
                    note = ("resumed and " if outcome.get("resumed") else "") + \
                        f"{result['state']} in {_fmt(outcome.get('seconds'), 1)}s"
                    self._line(n, total, run, result, note)
        except KeyboardInterrupt:
            # Services stay up and nothing is closed: stopping the fabric under
            # the runs still in flight would fail their rounds, while left
            # alone they are resumed like the sessions of a killed keeper.
            interrupted = True
            self.store.update_sweep(plan.sweep_id, state="interrupted")
            self.report(f"sweep {plan.sweep_id} interrupted; run the same command again to resume it "
                        "(local services are left running; `fedkeeper fabric down` stops them)")
            raise
        finally:
            doc = None
            if not interrupted:
                if opened:
                    doc = self.store.sweep(plan.sweep_id)
                    states = [r.get("state") for r in doc["runs"].values()]
                    self.store.update_sweep(plan.sweep_id, state="finished" if all(
                        s == "finished" for s in states) else "failed")
                    doc = self.store.sweep(plan.sweep_id)
                self.rt.close(stop_store=not self.keep_services)
        return doc

    def _deploy(self) -> None:
        """Once for every run (they share one deployment), with the keeper's
        own rules: a failed optional function only warns."""
        from .keeper import Keeper
        Keeper(self.rt, progress=self._warn).deploy()

    def _warn(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "warning":
            self.report(f"warning: {data['message']}")


# --------------------------------------------------------------------------- command

@click.command("sweep")
@click.option("-c", "--config", "--configfile", "config_path",
              default=os.environ.get("FEDKEEPER_CONFIG", "config.yaml"), show_default=True,
              type=click.Path(dir_okay=False), help="YAML config (FedKeeper's config-sample.yaml schema).")
@click.option("-s", "--scenario", "scenario", default=None,
              help="Scenario under `scenarios:` (default: federated_learning).")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="A setting and its values (repeatable): optim, lr, momentum, local_epochs, batch_size, "
                   "strategy, mode, clients_per_round, rounds, or a dotted path in the scenario.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs per combination (seed = base + repeat).")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Sessions running at once.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]), default="table",
              show_default=True)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Also write the results to this file, in --format.")
@click.option("--sweep-id", "sweep_id", default=None, help="Name the sweep instead of hashing its content.")
@click.option("--target", "target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy for 'rounds/time to target' (default: training.target_accuracy).")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running afterwards.")
def sweep_cmd(config_path: str, scenario: str | None, grid: tuple[str, ...], repeats: int, parallel: int,
              fmt: str, output: str | None, sweep_id: str | None, target: float | None,
              keep_services: bool) -> None:
    """Train every combination of a grid of settings, each repeat with its
    own seed; re-running the same command resumes an interrupted sweep."""
    # Imported here: the cli module registers this command at its end.
    from rich.console import Console

    from .cli import UsageFailure, _fail, _load
    from .logs import setup_run_log
    from .store.embedded import EmbeddedMongoError
    cfg = _load(config_path)
    try:
        plan = plan_sweep(cfg, scenario, parse_grid(grid), repeats, sweep_id)
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: no 80-column truncation
        console = Console(highlight=False, width=200)
    log_path = setup_run_log(plan.sweep_id, cfg.secret_values())
    console.print(f"sweep {plan.sweep_id}: {len(plan.runs)} runs "
                  f"({len(plan.runs) // plan.repeats} combinations x {plan.repeats} repeats), "
                  f"{parallel} at a time; log {log_path}", markup=False)
    sweep = Sweep(plan, parallel=parallel, keep_services=keep_services, target=target,
                  report=lambda text: console.print(text, markup=False, soft_wrap=True))
    try:
        doc = sweep.run()
    except SweepError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        # At once: runs still in flight belong to daemon threads, and an
        # orderly exit would wait for their HTTP pools.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except EmbeddedMongoError as exc:
        _fail(f"embedded MongoDB: {exc}")
    except Exception as exc:  # deployment or store failures: say what, not where
        _fail(str(exc))
    rows = result_rows(doc)
    keys = [a.key for a in plan.axes]
    title = f"sweep {plan.sweep_id} ({plan.scenario}): {doc.get('state')}"
    if fmt == "csv":
        text = render_csv(rows, keys)
        click.echo(text, nl=False)
    elif fmt == "markdown":
        text = render_markdown(rows)
        click.echo(text, nl=False)
    else:
        table = render_table(rows, title)
        console.print(table)
        buf = Console(file=io.StringIO(), width=200, color_system=None)
        buf.print(table)
        text = buf.file.getvalue()
    if output:
        Path(output).write_text(text)
    unfinished = [r for r in rows if r["state"] != "finished"]
    if unfinished:
        Console(stderr=True, highlight=False).print(
            f"{len(unfinished)} of {len(rows)} runs did not finish; run the same command again to "
            "resume them", markup=False)
        sys.exit(1)
