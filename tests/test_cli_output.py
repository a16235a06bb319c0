"""Failures a command meets after its input was read end in one `Error:`
line, never a traceback: an output file that cannot be written (refused
before the work when its directory is missing), a provider that cannot be
made or deployed, a store that stops answering."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from fedkeeper.check import ClusterCheck
from fedkeeper.cli import main as cli
from fedkeeper.providers import ErrorClass, ProviderError
from fedkeeper.store import StoreUnavailable
from test_cost import SESSION, config_text
from test_sweep import write_config


def one_error_line(res, code: int, *fragments: str) -> None:
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


class FakeSweep:
    """Stands in for the runner; `during` runs while the sweep would train."""

    ran = 0
    during = staticmethod(lambda: None)

    def __init__(self, plan, **_):
        self.plan = plan

    def run(self) -> dict:
        FakeSweep.ran += 1
        FakeSweep.during()
        return {"state": "finished", "runs": {run.key: {
            "index": run.index, "labels": run.labels, "repeat": run.repeat, "seed": run.seed,
            "session": run.session, "state": "finished", "result": {"rounds": 2, "invocations": 4}}
            for run in self.plan.runs}}


@pytest.fixture
def fake_sweep(monkeypatch):
    monkeypatch.setattr("fedkeeper.cli.sweep.Sweep", FakeSweep)
    monkeypatch.setattr(FakeSweep, "ran", 0)
    return FakeSweep


def sweep(tmp_path, *args):
    cfg = write_config(tmp_path / "cfg.yaml", "mongodb://127.0.0.1:9", "unused")
    return CliRunner().invoke(cli, ["sweep", "-c", str(cfg), "--grid", "local_epochs=1", *args])


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_sweep_output_into_a_missing_directory_is_refused_before_any_run(fmt, fake_sweep, tmp_path,
                                                                        isolated_dirs):
    res = sweep(tmp_path, "--format", fmt, "-o", str(tmp_path / "missing" / "results.txt"))
    one_error_line(res, 2, "-o/--output", "missing")
    assert fake_sweep.ran == 0


def test_sweep_output_that_cannot_be_written_after_the_runs_is_one_line(fake_sweep, tmp_path, isolated_dirs,
                                                                        monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.setattr(FakeSweep, "during", staticmethod(lambda: shutil.rmtree(folder)))
    res = sweep(tmp_path, "--format", "csv", "-o", str(folder / "results.csv"))
    one_error_line(res, 1, "cannot write", "results.csv")
    assert fake_sweep.ran == 1
    assert "local_epochs" in res.stdout  # the results were printed before


def test_check_junit_xml_into_a_missing_directory_is_refused_before_any_check(tmp_path, isolated_dirs,
                                                                             monkeypatch):
    checked = []
    monkeypatch.setattr("fedkeeper.check.run_checks",
                        lambda rt, clusters, keep: checked.append(clusters) or [ClusterCheck("local_ow", ok=True)])
    cfg = write_config(tmp_path / "cfg.yaml", "mongodb://127.0.0.1:9", "unused")
    res = CliRunner().invoke(cli, ["check", "-c", str(cfg), "--junit-xml", str(tmp_path / "ci" / "check.xml")])
    one_error_line(res, 2, "--junit-xml", "ci")
    assert checked == []


def test_check_junit_xml_that_cannot_be_written_is_one_line(tmp_path, isolated_dirs, monkeypatch):
    folder = tmp_path / "ci"
    folder.mkdir()

    def checks(rt, clusters, keep):
        shutil.rmtree(folder)  # gone while the clusters were checked
        return [ClusterCheck("local_ow", "openwhisk", ok=True)]

    monkeypatch.setattr("fedkeeper.check.run_checks", checks)
    cfg = write_config(tmp_path / "cfg.yaml", "mongodb://127.0.0.1:9", "unused")
    res = CliRunner().invoke(cli, ["check", "-c", str(cfg), "--junit-xml", str(folder / "check.xml")])
    one_error_line(res, 1, "cannot write", "check.xml")


def no_provider(*_args, **_kwargs):
    raise ProviderError(ErrorClass.UNREACHABLE, "cannot reach the controller at https://ow.example:443")


def store_gone(*_args, **_kwargs):
    raise StoreUnavailable("127.0.0.1:27017", 30, ConnectionError("connection refused"))


@pytest.mark.parametrize("where,patch,fragment", [
    ("fedkeeper.runtime.Runtime.provider", no_provider, "cannot reach the controller"),  # made while deploying
    ("fedkeeper.insights.client.InsightsClient.deploy", no_provider, "cannot reach the controller"),
    ("fedkeeper.store.Store.rounds", store_gone, "the store at 127.0.0.1:27017 is unreachable"),
])
def test_insights_provider_and_store_failures_are_one_line(where, patch, fragment, store, mongo_url, tmp_path,
                                                           isolated_dirs, monkeypatch):
    store.create_session({"_id": SESSION, "name": "costtest", "scenario": "federated_learning"})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(config_text(mongo_url, store.db.name, "{}"))
    monkeypatch.setattr(where, patch)
    res = CliRunner().invoke(cli, ["insights", SESSION, "reliability", "-c", str(cfg_path)],
                             catch_exceptions=False)
    one_error_line(res, 1, fragment)


def test_long_work_is_said_on_a_terminal_and_nowhere_else(monkeypatch):
    """A command that starts a store or deploys says so while the user
    waits (status was silent for 5 s); scripts and CI logs get nothing."""
    import io
    import re

    from rich.console import Console

    from fedkeeper.cli import common
    for terminal in (True, False):
        out = io.StringIO()
        monkeypatch.setattr(common, "errconsole", Console(file=out, force_terminal=terminal, no_color=True))
        common.phase("starting the embedded MongoDB")
        said = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).strip()   # its dim style
        assert (said == "starting the embedded MongoDB...") is terminal, said


def test_the_runtime_says_when_it_starts_the_embedded_store_and_not_when_it_reuses_it():
    from pathlib import Path

    from fedkeeper.config import load_config
    from fedkeeper.runtime import Runtime
    cfg = load_config(Path(__file__).resolve().parent.parent / "config-local.yaml")
    said: list[str] = []
    first = Runtime.open(cfg, phase=said.append)
    try:
        assert said == ["starting the embedded MongoDB"]
        Runtime.open(cfg, phase=said.append).close()
        assert said == ["starting the embedded MongoDB"]     # the running one reused, in silence
    finally:
        first.close()
