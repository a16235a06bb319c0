"""The command line's conventions (docs/cli.md): where the config comes
from, rounds counted from 1, interrupted sessions, Ctrl-C, one error
prefix, help and --json everywhere, one meaning per short flag."""
from __future__ import annotations

import json
import shlex
import textwrap
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.cli.common import remember_config
from fedkeeper.config import load_config


def write_cfg(path: Path, mongo_url: str, db: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: conventions
        providers:
          openwhisk:
            ow1: {{kind: local}}
        scenarios:
          federated_learning:
            clients_info: {{total_num_clients: 2, num_clients_per_round: 2, ow_clients_count: 2}}
            mongo_config: {{url: "{mongo_url}", db: {db}}}
        """))
    return path


def plant(store, sid: str, rounds: int, **session) -> None:
    store.create_session({"_id": sid, "name": "conventions", "state": "running", "created": time.time(), **session})
    for r in range(rounds):
        store.upsert_round(sid, r, state="done", selected=["client_0", "client_1"], duration_s=1.0, accuracy=0.5)


# --------------------------------------------------------------------------- config defaults

@pytest.fixture
def no_config_env(monkeypatch, tmp_path, isolated_dirs):
    monkeypatch.delenv("FEDKEEPER_CONFIG", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_without_a_config_the_error_suggests_c(no_config_env):
    res = CliRunner().invoke(cli, ["config", "validate"])
    assert res.exit_code == 2
    assert res.output.startswith("Error: no config: give one with -c FILE or $FEDKEEPER_CONFIG")
    assert "Traceback" not in res.output


def test_config_from_env_then_config_yaml_then_the_latest_session(no_config_env, tmp_path, monkeypatch, mongo_url):
    elsewhere = write_cfg(tmp_path / "elsewhere.yaml", mongo_url, "unused")
    # The latest session's config, recorded in the state directory.
    remember_config(load_config(elsewhere), "session sess-latest")
    res = CliRunner().invoke(cli, ["config", "validate"])
    assert res.exit_code == 0, res.output
    assert f"using config {elsewhere.resolve()} (the config of session sess-latest" in res.output
    # ./config.yaml comes before it.
    write_cfg(no_config_env / "config.yaml", mongo_url, "unused")
    res = CliRunner().invoke(cli, ["config", "validate"])
    assert res.exit_code == 0 and "using config config.yaml (./config.yaml)" in res.output
    # $FEDKEEPER_CONFIG before both.
    monkeypatch.setenv("FEDKEEPER_CONFIG", str(elsewhere))
    res = CliRunner().invoke(cli, ["config", "validate"])
    assert res.exit_code == 0 and f"using config {elsewhere} ($FEDKEEPER_CONFIG)" in res.output
    # -c says nothing about where the config came from.
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(elsewhere)])
    assert res.exit_code == 0 and "using config" not in res.output
    # A missing FEDKEEPER_CONFIG file: exit 2, with the hint.
    monkeypatch.setenv("FEDKEEPER_CONFIG", str(tmp_path / "gone.yaml"))
    res = CliRunner().invoke(cli, ["config", "validate"])
    assert res.exit_code == 2 and "-c FILE" in res.output


# --------------------------------------------------------------------------- status and rounds

def test_a_session_without_its_keeper_is_interrupted_and_watch_ends(store, mongo_url, tmp_path, isolated_dirs):
    cfg = write_cfg(tmp_path / "cfg.yaml", mongo_url, store.db.name)
    plant(store, "sess-gone", 2, heartbeat=time.time() - 3600)
    res = CliRunner().invoke(cli, ["status", "sess-gone", "-c", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["state"] == "interrupted"
    assert [r["round"] for r in data["rounds"]] == [1, 2]  # counted from 1
    # --watch into a pipe: lines, and it ends on the interrupted state.
    watched = CliRunner().invoke(cli, ["status", "sess-gone", "-c", str(cfg), "--watch", "--interval", "0.05"])
    assert watched.exit_code == 0, watched.output
    lines = watched.stdout.splitlines()
    assert lines[0] == "session sess-gone: interrupted"
    assert lines[1] == "round 1: state done, done 0/2, failed 0, in flight 0, retrying 0, retries 0, seconds 1.0, " \
                       "accuracy 0.5000"
    assert lines[2].startswith("round 2: state done")
    # A keeper that still beats: running.
    plant(store, "sess-alive", 1, heartbeat=time.time())
    res = CliRunner().invoke(cli, ["status", "sess-alive", "-c", str(cfg), "--json"])
    assert json.loads(res.stdout)["state"] == "running"


@pytest.mark.parametrize("args,message", [
    (["--round", "3"], "has no round 3: its rounds are 1 to 2"),
    (["--rounds", "2:5"], "has no rounds 2-5: its rounds are 1 to 2"),
    (["--round", "0"], "rounds are counted from 1"),
])
def test_insights_for_a_round_that_does_not_exist_is_bad_input(args, message, store, mongo_url, tmp_path,
                                                               isolated_dirs):
    cfg = write_cfg(tmp_path / "cfg.yaml", mongo_url, store.db.name)
    plant(store, "sess-2", 2)
    res = CliRunner().invoke(cli, ["insights", "sess-2", "reliability", "-c", str(cfg), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.startswith("Error: ")


@pytest.mark.parametrize("command", [["status", "no-such"], ["model", "list", "no-such"],
                                     ["insights", "no-such", "reliability"], ["report", "no-such"]],
                         ids=lambda c: c[0])
def test_an_unknown_session_is_bad_input_for_every_command(command, store, mongo_url, tmp_path, isolated_dirs):
    cfg = write_cfg(tmp_path / "cfg.yaml", mongo_url, store.db.name)
    plant(store, "sess-1", 1)
    res = CliRunner().invoke(cli, [*command, "-c", str(cfg)])
    assert res.exit_code == 2, res.output
    assert res.output == "Error: no session 'no-such' in the store\n"


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_start_says_what_was_kept_and_how_to_resume(store, mongo_url, tmp_path, isolated_dirs,
                                                             monkeypatch):
    import fedkeeper.keeper as keeper

    cfg = write_cfg(tmp_path / "cfg.yaml", mongo_url, store.db.name)
    seen = {}

    def interrupted_start(self, resume=None, deploy=True, session_id=None):
        plant(store, session_id, 2)  # two rounds done when the user pressed Ctrl-C
        self.progress("session", {"session": session_id, "resumed": False})
        seen["session"] = session_id
        raise KeyboardInterrupt

    monkeypatch.setattr(keeper.Keeper, "start", interrupted_start)
    res = CliRunner().invoke(cli, ["start", "-c", str(cfg)])
    sid = seen["session"]
    assert res.exit_code == 130, res.output
    assert f"session {sid} interrupted; the store keeps its 2 finished round(s)" in res.output
    assert f"resume it with: {shlex.join(['fedkeeper', 'start', '-c', str(cfg), '--resume', sid])}" in res.output
    doc = store.session(sid)
    assert doc["state"] == "interrupted"
    assert doc["config_path"] == str(cfg.resolve())  # where resume and the defaults find it

    def keeper_interrupted(self, resume=None, deploy=True, session_id=None):
        plant(store, session_id, 1)
        raise keeper.SessionInterrupted(session_id, 1)

    monkeypatch.setattr(keeper.Keeper, "start", keeper_interrupted)
    res = CliRunner().invoke(cli, ["start", "-c", str(cfg), "-s", "federated_learning"])
    assert res.exit_code == 130 and "keeps its 1 finished round(s)" in res.output
    assert "-s federated_learning --resume" in res.output


# --------------------------------------------------------------------------- style

def _commands(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


def test_every_option_has_help_and_short_flags_mean_one_thing():
    meaning: dict[str, set[str]] = {}
    for name, cmd in _commands(cli):
        assert cmd.help, name
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.help, f"{name} {p.opts}"
                for opt in p.opts:
                    if len(opt) == 2:
                        meaning.setdefault(opt, set()).add(p.name)
    assert meaning["-c"] == {"config_path"}
    assert meaning["-s"] == {"scenario"}
    assert meaning["-o"] <= {"out_dir", "output"}  # an output path (a report's directory, a sweep's file)
    assert meaning["-f"] == {"functions"}


@pytest.mark.parametrize("command", ["status", "metrics", "check", "deploy", "remove", "start", "sweep", "insights",
                                     "cluster info", "config show", "report"])
def test_every_command_that_prints_a_table_has_json(command):
    cmds = dict(_commands(cli))
    assert any("--json" in p.opts for p in cmds[command].params), command


def test_insights_rounds_from_1_in_and_out(store, mongo_url, tmp_path, isolated_dirs, monkeypatch):
    """--round N asks fl_insights for the store's round N-1; the answer's
    rounds come back counted from 1 (JSON and table)."""
    import fedkeeper.cli.insights as insights_cli

    cfg = write_cfg(tmp_path / "cfg.yaml", mongo_url, store.db.name)
    plant(store, "sess-3", 3)
    asked = []

    class FakeClient:
        def __init__(self, rt):
            pass

        def query(self, session, what, rounds, k, cache=True):
            asked.append(rounds)
            return {"what": "contributions", "session": session, "cluster": "ow1", "platform": "openwhisk",
                    "data": {"rounds": list(rounds), "rows": [
                        {"round": rounds[0], "trained_from": rounds[0], "client": "client_0", "status": "accepted",
                         "num_examples": 10, "share": 0.5, "loss": 0.1, "norm": 1.0, "z": 0.0, "cosine": 0.9}]}}

    monkeypatch.setattr(insights_cli, "InsightsClient", FakeClient)
    res = CliRunner().invoke(cli, ["insights", "sess-3", "contributions", "-c", str(cfg), "--round", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert asked == [(2, 2)]
    data = json.loads(res.stdout)["data"]
    assert data["rounds"] == [3, 3] and data["rows"][0]["round"] == 3 and data["rows"][0]["trained_from"] == 3
    res = CliRunner().invoke(cli, ["insights", "sess-3", "contributions", "-c", str(cfg), "--rounds", "2:"])
    assert res.exit_code == 0, res.output
    assert asked[-1] == (1, 2) and "contributions of sess-3 rounds 2-3" in res.output
