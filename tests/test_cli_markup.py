"""Text from the user or the store (session ids, grid values, cluster names,
error messages) prints as it is, brackets included: rich must not read it
as console markup, which would garble it or fail with a MarkupError."""
from __future__ import annotations

import io

import pytest
from click.testing import CliRunner
from rich.console import Console

from fedkeeper.check import ClusterCheck
from fedkeeper.cli import common, main as cli
from fedkeeper.cli.check import COLUMNS as CHECK_COLUMNS, check_rows
from fedkeeper.cli.common import fail, table
from fedkeeper.insights import tables as insights_tables
from test_sweep import write_config

BRACKETS = "x[/y] [bold]z[/bold]"


def render(renderable, width: int = 100) -> str:
    out = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    out.print(renderable)
    return out.file.getvalue()


def test_fail_prints_its_message_literally_after_a_red_prefix(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        fail(f"not in the store: session {BRACKETS!r}")
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"Error: not in the store: session {BRACKETS!r}\n"
    styled = Console(file=io.StringIO(), force_terminal=True, color_system="standard", highlight=False)
    monkeypatch.setattr(common, "errconsole", styled)
    with pytest.raises(SystemExit):
        fail("lr=[/a]")
    assert styled.file.getvalue() == "\x1b[31mError:\x1b[0m lr=[/a]\n"


@pytest.mark.parametrize("width", [200, 40, 12])  # a grid, a compact grid, one block per row
def test_table_title_columns_and_caption_are_plain_text(width):
    text = render(table(f"session {BRACKETS}", ["lr[/a]", "b"], [["1", "2"]], width=width,
                        caption="k [/k]"), width)
    flat = "".join(text.split())
    for plain in (f"session{BRACKETS.replace(' ', '')}", "lr[/a]", "k[/k]"):
        assert plain in flat, text


def test_check_rows_escape_cluster_names():
    rows = check_rows([ClusterCheck("lab[/x]", "openwhisk", ok=False, stage="deploy", error="HTTP 500 [/oops]")])
    text = render(table("cluster check (nodeinfo)", CHECK_COLUMNS, rows, width=200))
    assert "lab[/x]" in text and "HTTP 500 [/oops]" in text


def test_insights_title_holds_the_session_as_it_is():
    result = {"what": "reliability", "session": "s[/y]", "data": {"clients": {}, "clusters": {}}}
    spec = insights_tables(result)[0]
    text = render(table(spec.title, spec.columns, spec.rows, width=200, right=spec.right, caption=spec.caption))
    assert "reliability of s[/y]: per client" in text


class FakeSweep:
    """Stands in for the runner: every run finished, with bracketed grid values."""

    def __init__(self, plan, **_):
        self.plan = plan

    def run(self) -> dict:
        return {"state": "finished", "runs": {run.key: {
            "index": run.index, "labels": {"lr": "[/a]", "note": "[bold]b[/bold]"}, "repeat": run.repeat,
            "seed": run.seed, "session": run.session, "state": "finished",
            "result": {"rounds": 2, "final_accuracy": 0.5, "invocations": 4, "retries": 0, "cost": 0.0,
                       "currency": "USD"}} for run in self.plan.runs}}


def test_sweep_table_prints_grid_values_literally(tmp_path, isolated_dirs, monkeypatch):
    monkeypatch.setattr("fedkeeper.cli.sweep.Sweep", FakeSweep)
    cfg = write_config(tmp_path / "cfg.yaml", "mongodb://127.0.0.1:9", "unused")
    out = tmp_path / "results.txt"
    res = CliRunner().invoke(cli, ["sweep", "-c", str(cfg), "--grid", "local_epochs=1", "-o", str(out)],
                             catch_exceptions=False, terminal_width=200)
    assert res.exit_code == 0, res.output
    for text in (res.stdout, out.read_text()):
        assert "lr=[/a] note=[bold]b[/bold]" in text, text


def test_session_summary_metrics_and_model_cells_print_literally():
    from fedkeeper.cli.metrics import metrics_cells
    from fedkeeper.cli.model import COLUMNS as MODEL_COLUMNS, model_cells
    from fedkeeper.cli.start import SUMMARY_COLUMNS, summary_cells
    summary = summary_cells({"rounds": 1, "rounds_planned": 2, "final_accuracy": 0.5, "wall_time_s": 1.0,
                             "cost": None, "currency": "USD", "run_log": f"/logs/{BRACKETS}.log"})
    assert BRACKETS in render(table("s", SUMMARY_COLUMNS, [summary], width=300), 300)
    cols, cells = metrics_cells([{"cluster": BRACKETS, "activations": 3, "error": "bad [/x]"}])
    text = render(table("m", cols, cells, width=300), 300)
    assert BRACKETS in text and "bad [/x]" in text
    row = {"round": 1, "accuracy": 0.5, "loss": 1.0, "examples": 10, "clients": 2, "strategy": "fedavg",
           "bytes": 100, "validations": [{"data": f"/data/{BRACKETS}.npz", "metrics": {"accuracy": 0.9}}],
           "trail": None}
    assert f"/data/{BRACKETS}.npz" in render(table("models", MODEL_COLUMNS, model_cells([row]), width=300), 300)
