"""`fedkeeper report`: plots and an HTML page for sessions (fedkeeper.report)."""
from __future__ import annotations

from pathlib import Path

import click

from ..report import ReportError, write_report
from .common import UsageFailure, config_option, fail, load, open_runtime, print_json, scenario_option


@click.command("report")
@click.argument("sessions", nargs=-1, required=True)
@config_option
@scenario_option
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: reports/<first session id>/).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the paths.")
@click.option("--mlflow", "mlflow_uri", is_flag=False, flag_value="mlruns", default=None, metavar="[URI]",
              help="Also log each session as an MLflow run: its parameters, per-round metrics and final model "
                   "(default URI: ./mlruns, a local file store; docs/models.md).")
def report_cmd(sessions: tuple[str, ...], config_path: str | None, scenario: str | None, out_dir: str | None,
               as_json: bool, mlflow_uri: str | None) -> None:
    """Plots (accuracy, loss, durations, cold starts, retries, participation)
    and a self-contained HTML page for one or more sessions; several sessions
    are overlaid in the accuracy and loss plots."""
    cfg = load(config_path)
    rt = open_runtime(cfg, scenario, need_store=True)
    try:
        # An unknown session is bad input, as for `status` and `model`; said
        # before anything is written.
        missing = list(dict.fromkeys(sid for sid in sessions if rt.store.session(sid) is None))
        if missing:
            raise UsageFailure(f"no session {missing[0]!r} in the store" if len(missing) == 1 else
                               f"no sessions {', '.join(map(repr, missing))} in the store")
        try:
            report = write_report(rt.store, list(sessions), Path(out_dir) if out_dir else None, cfg)
        except ReportError as exc:
            fail(str(exc))
        if mlflow_uri is not None:
            from ..model_trail.tracking import TrackingError, log_sessions
            from ..user_module import module_path
            try:
                report["mlflow"] = log_sessions(rt.store, list(sessions), mlflow_uri, module_path(cfg, rt.scenario))
            except TrackingError as exc:
                fail(str(exc))
    finally:
        rt.close()
    if as_json:
        print_json(report)
        return
    files = report["files"]
    click.echo(f"wrote {files['html']}")
    click.echo(f"wrote {files['json']}")
    for p in files["png"].values():
        click.echo(f"wrote {p}")
    for run in report.get("mlflow", []):
        click.echo(f"logged {run['session']} as MLflow run {run['run_id']} ({run['uri']})")
