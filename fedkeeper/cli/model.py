"""`fedkeeper model`: the stored global models of a session: list them,
export one to a file, validate one on a data set (fedkeeper.model_trail;
docs/models.md). Model R is the model after round R; 0 is the initial one."""
from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..formatting import fixed_decimals
from ..model_trail.validate import DATA_HELP, ValidationClient, parse_data
from ..model_trail import ModelTrailError, export_model, model_doc, model_rows, pick_model, session_code, \
    session_doc, session_spec
from .common import UsageFailure, config_option, console, errconsole, fail, load, open_runtime, print_json, \
    scenario_option, show_table


def _size(n) -> str:
    if n is None:
        return "missing"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _validations_cell(row) -> str:
    return "; ".join(f"{v.get('data')}: {fixed_decimals((v.get('metrics') or {}).get('accuracy'))}"
                     for v in row["validations"]) or "-"


COLUMNS = ("round", "accuracy", "loss", "examples", "clients", "strategy", "size", "validations", "trail")


def _trail_cell(trail) -> str:
    if trail is None:
        return "-"
    origin = "initial" if trail.get("parent") is None else f"from {trail['parent']}"
    return f"{origin}, code {str(trail.get('code_hash'))[:8]}, config {str(trail.get('config_hash'))[:8]}"


def model_cells(rows) -> list[list[str]]:
    out = []
    for r in rows:
        trail = r["trail"]
        # cells are markup: a strategy or a validation's data path may hold brackets
        out.append([str(r["round"]), fixed_decimals(r["accuracy"]), fixed_decimals(r["loss"]),
                    fixed_decimals(r["examples"]), fixed_decimals(r["clients"]), escape(str(r["strategy"] or "-")),
                    _size(r["bytes"]), escape(_validations_cell(r)), escape(_trail_cell(trail))])
    return out


@click.group("model")
def model_group() -> None:
    """The stored global models of a session: list, export, validate."""


@model_group.command("list")
@click.argument("session")
@config_option
@scenario_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def model_list(session: str, config_path: str, scenario: str | None, as_json: bool) -> None:
    """Every stored global model of SESSION: round, accuracy, loss, examples,
    clients, strategy, size, validations and trail."""
    cfg = load(config_path)
    rt = open_runtime(cfg, scenario, need_store=True)
    try:
        try:
            rows = model_rows(rt.store, session)
        except ModelTrailError as exc:
            raise UsageFailure(str(exc)) from None
    finally:
        rt.close()
    if as_json:
        print_json({"session": session, "models": rows})
        return
    show_table(f"models of session {session} (model R came out of round R; 0 is the initial model)", COLUMNS,
               model_cells(rows), right=("round", "accuracy", "loss", "examples", "clients", "size"))
    if any(r["trail"] is None for r in rows):
        console.print("models without a trail were written before model trails were recorded", style="dim")


def _selection(round_: int | None, best: bool, final: bool) -> dict:
    if sum((round_ is not None, best, final)) > 1:
        raise UsageFailure("choose one of --round, --best and --final")
    return {"round_": round_, "best": best, "final": final}


@model_group.command("export")
@click.argument("session")
@config_option
@scenario_option
@click.option("--round", "round_", type=click.IntRange(min=0), default=None,
              help="The model after this round (0: the initial model).")
@click.option("--best", is_flag=True, help="The model with the highest test accuracy.")
@click.option("--final", is_flag=True, help="The last model (the default).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="File to write: .keras (a Keras model) or .npz (raw weights).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def model_export(session: str, config_path: str, scenario: str | None, round_: int | None, best: bool,
                 final: bool, output: str, as_json: bool) -> None:
    """Write one stored global model of SESSION to a .keras or .npz file."""
    choice = _selection(round_, best, final)
    out = Path(output)
    if out.suffix not in (".keras", ".npz"):
        raise UsageFailure(f"{output}: the file name must end in .keras (a Keras model) or .npz (raw weights)")
    cfg = load(config_path)
    rt = open_runtime(cfg, scenario, need_store=True)
    try:
        try:
            doc = session_doc(rt.store, session)
            row = pick_model(model_rows(rt.store, session), session, **choice)
            code = None
            if out.suffix == ".keras":
                from ..user_module import module_path
                code = session_code(doc, module_path(cfg, rt.scenario))
            spec = doc.get("spec") or {}
            if code is not None:
                spec = session_spec(doc)
            written = export_model(rt.store, session, spec, model_doc(rt.store, session, row["round"]), out, code)
        except ModelTrailError as exc:
            raise UsageFailure(str(exc)) from None
    finally:
        rt.close()
    if as_json:
        print_json(written)
        return
    acc = written["accuracy"]
    console.print(f"wrote {written['file']}: model {written['round']} of {session} "
                  f"({written['num_params']} parameters{'' if acc is None else f', test accuracy {acc:.4f}'})",
                  markup=False)


@model_group.command("validate")
@click.argument("session")
@config_option
@scenario_option
@click.option("--round", "round_", type=click.IntRange(min=0), default=None,
              help="The model after this round (0: the initial model; default: the last).")
@click.option("--data", "data", default="test", show_default=True, metavar="DATA",
              help="What to evaluate on: " + DATA_HELP + ".")
@click.option("--json", "as_json", is_flag=True, help="Print the stored result as JSON.")
def model_validate(session: str, config_path: str, scenario: str | None, round_: int | None, data: str,
                   as_json: bool) -> None:
    """Evaluate a stored model of SESSION on a data set, in the
    fl_model_validate function on the server's cluster; the result is stored
    next to the model (shown by `model list` and `report`)."""
    try:
        request = parse_data(data)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    cfg = load(config_path)
    # Local services stay up: a warm validator answers the next request at once.
    rt = open_runtime(cfg, scenario, need_store=True, keep_local_services=True)
    try:
        try:
            doc = session_doc(rt.store, session)
            row = pick_model(model_rows(rt.store, session), session, round_=round_)
            spec = doc.get("spec") or {}
            if request["source"] == "module" and not spec.get("user_module"):
                raise UsageFailure(f"session {session} was not trained with a user module; --data module "
                                   "needs one")
        except ModelTrailError as exc:
            raise UsageFailure(str(exc)) from None
        try:
            result = ValidationClient(rt).validate(session, row["round"], request)
        except ModelTrailError as exc:
            fail(str(exc))
        server = cfg.providers.clusters()[rt.server_cluster()][1]
    finally:
        rt.close()
    if getattr(server, "kind", "remote") == "local":   # the validator's cluster: what this command started
        # said, since every other command stops what it started
        errconsole.print("local services are left running for the next validation; "
                         "`fedkeeper fabric down` stops them", markup=False)
    if as_json:
        print_json(result)
        return
    m = result.get("metrics") or {}
    console.print(f"model {result['round']} of {session} on {result['data']}: "
                  f"accuracy {fixed_decimals(m.get('accuracy'))}, "
                  f"loss {fixed_decimals(m.get('loss'))} over {result['num_examples']} examples "
                  f"({result['cluster']}, {result['seconds']:.2f} s); stored with the model", markup=False)
