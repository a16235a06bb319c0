"""Configs written by mistake or by an adversary: every one is refused with
one ConfigError line (exit 2 from the CLI), never a traceback, a hang, a
blow-up in time or memory, or a secret printed back."""
from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from pymongo.uri_parser import parse_uri

from fedkeeper.cli import main as cli
from fedkeeper.config import (ClientsInfo, ConfigError, MongoConfig, TrainingConfig, load_config, parse_config,
                              render_config)
from fedkeeper.config.values import shown_url
from fedkeeper.logs import setup_run_log
from fedkeeper.sweep import SweepError, plan_sweep

SECRET = "S3cretKeyValue"

GOOD = textwrap.dedent("""\
    name: t
    providers:
      openwhisk:
        ow1:
          kind: local
    scenarios:
      federated_learning:
        clients_info:
          total_num_clients: 4
          num_clients_per_round: 2
          ow_clients_count: 4
""")


def with_cluster(cluster: str) -> str:
    """GOOD with a second OpenWhisk cluster, ow2, whose keys are the YAML lines `cluster`."""
    return GOOD.replace("      kind: local\n", "      kind: local\n    ow2:\n" + textwrap.indent(cluster, " " * 6))


def refusal(text: str, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, **kw)
    message = str(exc.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- 1. no secret in an error

@pytest.mark.parametrize("text, problem", [
    (with_cluster(f"base_url: https://23bc46b1:{SECRET}@ow.example.com:99999\n"),
     "'https://***@ow.example.com:99999' has port '99999'"),
    (with_cluster(f"base_url: ftp://23bc46b1:{SECRET}@ow.example.com/\n"), "has scheme 'ftp'"),
    (with_cluster(f"base_url: 'https://23bc46b1:{SECRET}@/'\n"), "'https://***@/' has no valid host name"),
    (with_cluster(f"base_url: https://ow.example.com:0/?token={SECRET}\n"),
     "'https://ow.example.com:0/?...' has port '0'"),
    (with_cluster(f"base_url: 'https://u:{SECRET} @ow.example.com/'\n"), "contains white space"),
    (GOOD + f"    mongo_config: {{url: 'redis://fk:{SECRET}@db.example.org:6379'}}\n",
     "'redis://***@db.example.org:6379' has scheme 'redis'"),
    (GOOD + f"    mongo_config: {{url: 'fk:{SECRET}@db.example.org:27017:1'}}\n", "is not embedded"),
    (GOOD + f"    training_test_data: {{dataset: npz, path: 'https://u:{SECRET}@data.example.org/mnist.zip'}}\n",
     "'https://***@data.example.org/mnist.zip' is not an .npz file"),
    (GOOD + f"    training_test_data: {{dataset: npz, path: 'https://data.example.org/m.zip?sig={SECRET}'}}\n",
     "'https://data.example.org/m.zip?...' is not an .npz file"),
])
def test_url_errors_name_the_problem_without_the_credentials(text, problem):
    message = refusal(text)
    assert SECRET not in message
    assert problem in message


@pytest.mark.parametrize("url", [
    f"https://u:{SECRET}@h:99999999999999999999", f"https://u:{SECRET}@[::1", f"https://u:S3c/{SECRET}@h/",
    f"https://u:S3c?{SECRET}@h:port", f"u:{SECRET}@h", f"https://h/p#{SECRET}",
])
def test_shown_url_hides_malformed_credentials_without_raising(url):
    assert SECRET not in shown_url(url)


def test_a_password_with_an_unescaped_question_mark_does_not_leak_through_the_port():
    # urlsplit ends the host part at the '?': host 'u', port 'Pw1'
    message = refusal(with_cluster(f"base_url: 'https://u:Pw1?{SECRET}@ow.example.com/'\n"))
    assert "Pw1" not in message and SECRET not in message
    assert "'https://***@ow.example.com/' has a port that is not a number" in message


# --------------------------------------------------------------------------- 2. mongo password escaped

@pytest.mark.parametrize("password", ["S3cr@t/pw", "a:b@c/d?e#f%25+ g"])
def test_mongo_password_is_escaped_so_the_host_stays_the_host(password):
    cfg = MongoConfig(url="mongodb://fk:PASSWORD@db.example.org:27017/", password=password)
    parsed = parse_uri(cfg.resolved_url())
    assert parsed["nodelist"] == [("db.example.org", 27017)]
    assert (parsed["username"], parsed["password"]) == ("fk", password)


# --------------------------------------------------------------------------- 3. YAML bombs and depth

def alias_bomb(levels: int = 6, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ",".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_an_alias_bomb_is_refused_at_once():
    text = alias_bomb(levels=9)    # 9**9 (387 million) values once expanded: only an early refusal ends in time
    assert len(text) < 500
    message = refusal(text)
    assert "more than 100,000 values" in message and "aliases" in message


@pytest.mark.parametrize("text", ["x: &a [*a]\n", "x: &a {y: [1, *a]}\n", "x: &a {<<: *a}\n",
                                  "name: t\nscenarios: &s {f: {g: *s}}\n"])
def test_an_anchor_that_contains_itself_is_refused(text):
    message = refusal(text)
    assert "&" in message and "alias of itself" in message


@pytest.mark.parametrize("text", [
    "version: " + "[" * 5000 + "]" * 5000 + "\n",
    "version:\n" + "".join(" " * i + "-\n" for i in range(1, 3000)),
    # shallow as written, deep once expanded: each anchor wraps the one before
    "".join(f"a{i}: &a{i} [{f'*a{i - 1}' if i else 0}]\n" for i in range(2000)),
])
def test_deep_nesting_is_refused(text):
    assert "nested deeper than 100 levels" in refusal(text)


def test_anchors_aliases_and_merge_keys_still_work():
    text = GOOD + textwrap.indent(textwrap.dedent("""\
        functions:
          fl_client:
            openwhisk: &ow {memory: "2048", timeout: "300000"}
          fl_server_init:
            openwhisk: *ow
          fl_server_aggregator:
            openwhisk: {<<: *ow, memory: "4096"}
        """), "    ")
    functions = parse_config(text).scenarios["federated_learning"].functions
    memory_timeout = {fn: (per["openwhisk"].memory, per["openwhisk"].timeout) for fn, per in functions.items()}
    assert memory_timeout == {"fl_client": (2048, 300.0), "fl_server_init": (2048, 300.0),
                              "fl_server_aggregator": (4096, 300.0)}


@pytest.mark.parametrize("value, reason", [("1" * 5000, "4300 digits"), ("2024-13-45", "month must be in 1..12")])
def test_a_value_yaml_cannot_convert_is_refused_with_its_line(value, reason):
    message = refusal(f"name: t\nversion: {value}\n")
    assert message.startswith("<config>:2: ") and reason in message


# --------------------------------------------------------------------------- 4. encodings, JSON depth

def test_a_config_file_that_is_not_utf8_is_refused_via_the_cli(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(GOOD.replace("name: t", "name: t # caf\xe9").encode("latin-1"))
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(p)])
    assert res.exit_code == 2, res.output
    assert f"{p}: the config file is not UTF-8 text (byte 0xe9" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_a_secret_file_that_is_not_text_is_refused_naming_it(tmp_path):
    secret = tmp_path / "ow_auth"
    secret.write_bytes(b"\x7fELF\x02\x01\x01\x00\xd0\xff\x00")  # as ow_auth_file: /bin/true reads
    message = refusal(with_cluster(f"base_url: https://ow.example.org/\nauth: {{ow_auth_file: {secret}}}\n"))
    assert f"secret file {secret} is not UTF-8 text (byte 0xd0 at offset 8)" in message


def test_an_auth_file_of_json_nested_too_deeply_is_refused_naming_it(tmp_path):
    secret = tmp_path / "key.json"
    secret.write_text('{"type": "service_account", "x": ' + "[" * 30000 + "]" * 30000 + "}")
    message = refusal(with_cluster(f"base_url: https://ow.example.org/\nauth_file: {secret}\n"))
    assert f"secret file {secret} is not JSON" in message and "nested too deeply" in message


# --------------------------------------------------------------------------- 5. bounded reads

def load_in_thread(path: Path, fifo: Path, seconds: float = 10.0) -> BaseException | None:
    """load_config(path) in a thread; fails the test if it is still
    reading after `seconds` (then a writer opens `fifo`, to let it end)."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            load_config(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the blocked reader
        thread.join(seconds)
        pytest.fail(f"load_config still waited on the FIFO {fifo} after {seconds}s")
    return outcome[0]


@pytest.mark.timeout(60)
def test_a_fifo_nobody_writes_as_the_config_is_refused_within_the_pipe_time_limit(tmp_path, monkeypatch):
    from fedkeeper.config import loading
    monkeypatch.setattr(loading, "PIPE_TIMEOUT_S", 0.3)
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    exc = load_in_thread(fifo, fifo)
    assert isinstance(exc, ConfigError) and "writer did not finish within 0.3 s" in str(exc)


@pytest.mark.timeout(60)
def test_a_fifo_nobody_writes_as_a_secret_file_is_refused_within_the_pipe_time_limit(tmp_path, monkeypatch):
    from fedkeeper.config import loading
    monkeypatch.setattr(loading, "PIPE_TIMEOUT_S", 0.3)
    fifo = tmp_path / "ow_auth"
    os.mkfifo(fifo)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(with_cluster(f"base_url: https://ow.example.org/\nauth: {{ow_auth_file: {fifo}}}\n"))
    exc = load_in_thread(cfg, fifo)
    assert isinstance(exc, ConfigError) and f"secret file {fifo} is a pipe whose writer did not finish" in str(exc)


@pytest.mark.timeout(60)
def test_a_config_from_a_pipe_loads_and_a_writer_that_never_finishes_is_refused(tmp_path, monkeypatch):
    """`-c <(sops -d cfg.yaml)`: a pipe written to its end is a config; one
    whose writer stalls is refused after the pipe's time limit."""
    from fedkeeper.config import loading
    r, w = os.pipe()
    os.write(w, GOOD.encode())
    os.close(w)
    try:
        assert load_config(f"/dev/fd/{r}").scenarios
    finally:
        os.close(r)
    # its relative secret files are the working directory's (a pipe has no directory of its own)
    (tmp_path / "ow.key").write_text("user:key\n")
    monkeypatch.chdir(tmp_path)
    r, w = os.pipe()
    os.write(w, with_cluster("base_url: https://ow.example.org/\nauth: {ow_auth_file: ow.key}\n").encode())
    os.close(w)
    try:
        load_config(f"/dev/fd/{r}")
    finally:
        os.close(r)
    monkeypatch.setattr(loading, "PIPE_TIMEOUT_S", 0.3)
    r, w = os.pipe()
    os.write(w, b"name: t\n")
    try:
        with pytest.raises(ConfigError, match="writer did not finish within 0.3 s"):
            load_config(f"/dev/fd/{r}")
    finally:
        os.close(r)
        os.close(w)


def test_a_config_over_1_mib_is_refused(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(GOOD + "#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(p)


def test_a_secret_file_over_64_kib_is_refused(tmp_path):
    secret = tmp_path / "ow_auth"
    secret.write_text("a" * (64 << 10) + "b")
    message = refusal(with_cluster(f"base_url: https://ow.example.org/\nauth: {{ow_auth_file: {secret}}}\n"))
    assert f"secret file {secret} is larger than 64 KiB" in message


# --------------------------------------------------------------------------- 6. client counts

@pytest.mark.parametrize("counts", [
    {"total_num_clients": 10**9, "ow_clients_count": 10**9},
    {"total_num_clients": 3_000_000, "ow_clients_count": 3_000_000},
    {"total_num_clients": 10, "ow_clients_count": 2_000_000},
    {"total_num_clients": 10, "clusters": {"ow1": 2_000_000}},
])
def test_more_than_a_million_clients_are_refused(counts):
    with pytest.raises(ValueError, match="1000000|1,000,000"):
        ClientsInfo(num_clients_per_round=1, **counts)


def test_a_million_clients_are_accepted():
    ClientsInfo(total_num_clients=1_000_000, num_clients_per_round=10, ow_clients_count=1_000_000)


def test_a_million_and_one_clients_are_refused_by_config_validate(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(GOOD.replace("total_num_clients: 4", "total_num_clients: 1000001")
                 .replace("ow_clients_count: 4", "ow_clients_count: 1000001"))
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(p)])
    assert res.exit_code == 2 and "clients_info.total_num_clients" in res.output
    assert "1000000" in res.output


# --------------------------------------------------------------------------- 7. seeds

def test_seeds_are_32_bit():
    TrainingConfig(seed=2**32 - 1)
    with pytest.raises(ValueError, match="4294967295"):
        TrainingConfig(seed=2**32)


def test_a_sweep_whose_repeats_pass_the_largest_seed_is_refused_at_planning():
    cfg = parse_config(GOOD + f"    training: {{seed: {2**32 - 3}}}\n")
    assert [r.seed for r in plan_sweep(cfg, None, [], 3).runs] == [2**32 - 3, 2**32 - 2, 2**32 - 1]
    with pytest.raises(SweepError, match=r"--repeats 4 .* would reach seed 4294967296; seeds go up to 4294967295"):
        plan_sweep(cfg, None, [], 4)


# --------------------------------------------------------------------------- 8. token-only URLs

def test_a_token_written_as_the_user_name_is_a_secret(monkeypatch):
    token = "glpat-S3cretTokenUser"
    prometheus = "kind: local\nprometheus_config: {url: 'https://%s@prom.example.com/'}\n"
    cfg = parse_config(with_cluster(prometheus % token))
    shown = render_config(cfg)
    assert token not in shown and "https://***@prom.example.com/" in shown
    assert token in cfg.secret_values()
    # written as a reference, `config show` prints the reference
    monkeypatch.setenv("FK_T_PROM_TOKEN", token)
    cfg = parse_config(with_cluster(prometheus % "${FK_T_PROM_TOKEN}"))
    assert "https://${FK_T_PROM_TOKEN}@prom.example.com/" in render_config(cfg)
    # a short user name is a login, not a token
    cfg = parse_config(with_cluster(prometheus % "git"))
    assert "https://git@prom.example.com/" not in cfg.secret_values() and "git" not in cfg.secret_values()


# --------------------------------------------------------------------------- 9. --resume

@pytest.mark.parametrize("resume", ["no/such", "../escaped", "..", "/tmp/abs", ""])
def test_resume_refuses_what_is_not_a_session_id_before_writing_a_log(resume, tmp_path, monkeypatch):
    import fedkeeper.cli.start as start

    def no_runtime(*args, **kwargs):
        raise AssertionError("start went on to open the runtime")

    monkeypatch.setattr(start, "open_runtime", no_runtime)
    logs = tmp_path / "logs"
    monkeypatch.setenv("FEDKEEPER_LOG_DIR", str(logs))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(GOOD)
    res = CliRunner().invoke(cli, ["start", "-c", str(cfg), "--no-deploy", "--resume", resume])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "is not a session id" in res.output and "Traceback" not in res.output
    assert not list(tmp_path.glob("*.log")) and not list(logs.glob("**/*.log"))


def test_a_run_log_name_cannot_be_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKEEPER_LOG_DIR", str(tmp_path / "logs"))
    for name in ("../escaped", "a/b", "..", ""):
        with pytest.raises(ValueError, match="is not a file name"):
            setup_run_log(name, [])
    assert not (tmp_path / "escaped.log").exists()


@pytest.mark.parametrize("value", ["http://[::1", "http://u:S3cretKeyValue@h:99999"])
def test_a_malformed_url_where_any_value_goes_loads_and_shows(value):
    cfg = parse_config(GOOD + f"    server_config: {{note: '{value}'}}\n")
    assert SECRET not in render_config(cfg)
    cfg.secret_values()
