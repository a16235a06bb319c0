"""`config show` reads back: what it prints, loaded again, is the same config
(units explicit, secrets as the ${ENV} or <key>_file they came from)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, SecretStr

from fedkeeper.cli import main as cli
from fedkeeper.config import (Config, format_duration_s, format_memory_mb, load_config, parse_duration_s,
                              parse_memory_mb, render_config)

ROOT = Path(__file__).resolve().parent.parent


def plain(o: Any) -> Any:
    """A config's values with secrets revealed, to compare two loads."""
    if isinstance(o, BaseModel):
        o = o.model_dump(mode="python", by_alias=True)
    if isinstance(o, SecretStr):
        return ("secret", o.get_secret_value())
    if isinstance(o, dict):
        return {k: plain(v) for k, v in o.items()}
    if isinstance(o, list):
        return [plain(v) for v in o]
    return o


def resolved(cfg) -> dict:
    """plain(cfg), with each user module's path resolved against the file
    (show writes it absolute, so that it names the same module anywhere)."""
    from fedkeeper.user_module import module_path
    out = plain(cfg)
    for name, scen in cfg.scenarios.items():
        if scen.user_module is not None:
            out["scenarios"][name]["user_module"]["path"] = str(module_path(cfg, scen))
    return out


def differences(a: Any, b: Any, path: tuple = ()) -> list[tuple]:
    """Every key path where two plain() configs differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {**a, **b} for d in differences(a.get(k), b.get(k), path + (k,))]
    return [] if a == b else [(path, a, b)]


@pytest.fixture
def sample_secrets(tmp_path, monkeypatch):
    """config-sample.yaml's three secrets, with dummy values."""
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"type": "service_account", "project_id": "my-project",
                              "private_key": "KEYDATA-123", "client_email": "fk@my-project.iam"}))
    monkeypatch.setenv("OW_AUTH", "uuid-1:secretkey-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(sa))
    monkeypatch.delenv("OW_APIGW_ACCESS_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".fedkeeper").mkdir()
    (tmp_path / ".fedkeeper/mongo_password").write_text("mongopw-77\n")
    return ["secretkey-1", "KEYDATA-123", "mongopw-77"]


def show(path: Path, *extra: str) -> str:
    res = CliRunner().invoke(cli, ["config", "show", "-c", str(path), *extra])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("as_json", [False, True], ids=["yaml", "json"])
@pytest.mark.parametrize("name", ["config-sample.yaml", "config-local.yaml",
                                  "tests/data/fedkeeper_original_sample.yaml",
                                  *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.yaml"))])
def test_every_sample_reads_back_the_same(name, as_json, sample_secrets, tmp_path):
    source = ROOT / name
    if "original" in name:  # its placeholders filled in, its data converted (see test_config)
        from tests.test_config import ORIGINAL_FILLED_IN
        text = source.read_text()
        for before, after in ORIGINAL_FILLED_IN:
            text = text.replace(before, after)
        source = tmp_path / "original.yaml"
        source.write_text(text)
    first = load_config(source)
    out = show(source, *(["--json"] if as_json else []))
    for secret in sample_secrets:
        assert secret not in out
    # Read back from another directory: nothing may depend on where it lies.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = elsewhere / "shown.yaml"
    shown.write_text(out)
    again = load_config(shown)
    assert differences(resolved(first), resolved(again)) == []
    # and showing it again changes nothing
    assert show(shown, *(["--json"] if as_json else [])) == out


def test_local_timeouts_and_memory_keep_their_units(tmp_path):
    """The issue's repro: OpenWhisk's 120000 ms printed as `timeout: 120.0`
    read back as 0.12 s."""
    out = show(ROOT / "config-local.yaml")
    fc = yaml.safe_load(out)["scenarios"]["federated_learning"]["functions"]["fl_client"]
    assert fc["openwhisk"]["timeout"] == "120s" and fc["openwhisk"]["memory"] == "1024MB"
    assert fc["google"]["timeout"] == "120s" and fc["google"]["memory"] == "1024MB"
    p = tmp_path / "s.yaml"
    p.write_text(out)
    ow = load_config(p).scenarios["federated_learning"].functions["fl_client"]["openwhisk"]
    assert (ow.timeout, ow.memory) == (120.0, 1024)


@pytest.mark.parametrize("seconds", [120.0, 0.12, 1.5, 300.0, 0.001, 1 / 3, 3600.25, 1e-5])
def test_durations_are_written_with_a_unit_and_read_back_exactly(seconds):
    text = format_duration_s(seconds)
    assert text.endswith(("s", "ms"))
    assert parse_duration_s(text, "ms") == seconds  # the bare unit does not matter any more


@pytest.mark.parametrize("mb", [1, 256, 2048, 1536])
def test_memory_is_written_with_a_unit_and_read_back_exactly(mb):
    assert format_memory_mb(mb) == f"{mb}MB" and parse_memory_mb(format_memory_mb(mb)) == mb


def test_secrets_are_shown_as_their_source_never_their_value(tmp_path, monkeypatch):
    (tmp_path / "owkey").write_text("uuid-9:verysecret-9\n")
    monkeypatch.setenv("MONGO_PW", "hunter22")
    monkeypatch.setenv("KN_TOKEN", "tok-123456")
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""\
        providers:
          openwhisk:
            c1:
              base_url: https://ow.example.org/api/v1/namespaces/guest/actions/
              auth:
                ow_auth_file: owkey
                ow_apigw_access_token: ${KN_TOKEN}
        scenarios:
          s:
            mongo_config:
              url: mongodb://u:${MONGO_PW}@db.example.org:27017
    """))
    data = yaml.safe_load(show(p))
    auth = data["providers"]["openwhisk"]["c1"]["auth"]
    assert auth == {"ow_auth_file": str(tmp_path / "owkey"), "ow_apigw_access_token": "${KN_TOKEN}"}
    assert data["scenarios"]["s"]["mongo_config"]["url"] == "mongodb://u:${MONGO_PW}@db.example.org:27017"
    assert plain(load_config(p)) == plain(Config.model_validate(load_config(p).model_dump()))


def test_an_inline_secret_is_redacted_and_its_redaction_is_refused_on_read_back(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""\
        providers:
          openwhisk:
            c1:
              base_url: https://ow.example.org/
              auth: {ow_auth: "uuid-3:inline-secret-3"}
        scenarios:
          s:
            mongo_config: {url: "mongodb://u:inlinepw@db.example.org:27017"}
    """))
    cfg = load_config(p)
    out = render_config(cfg)
    assert "inline-secret-3" not in out and "inlinepw" not in out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(shown)])
    assert res.exit_code == 2
    assert "providers.openwhisk.c1.auth.ow_auth: holds '***'" in res.output
    assert "${ENV_VAR}" in res.output


@pytest.mark.parametrize("training", [
    "privacy: {mode: central, noise_multiplier: 0.3, clip_norm: adaptive}",
    "privacy: {mode: central, noise_multiplier: 0.3, clip_norm: {adaptive: {initial: 0.5}}}",
    "privacy: {mode: local, noise_multiplier: 1.0, clip_norm: 1.0, delta: 1e-6}\n      secure_aggregation: true",
    "secure_aggregation: {threshold: 0.6}",
    "strategy: {name: fedadam, server_lr: 0.05, beta1: 0.8}\n      mode: semi_async",
])
def test_training_blocks_read_back(training, tmp_path):
    text = (ROOT / "config-local.yaml").read_text().replace(
        "      round_deadline_s: 300\n", f"      round_deadline_s: 300\n      {training}\n")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    first = load_config(p)
    shown = tmp_path / "shown.yaml"
    shown.write_text(show(p))
    assert differences(plain(first), plain(load_config(shown))) == []


def test_a_secret_whose_variable_is_unset_keeps_its_reference(tmp_path, monkeypatch):
    """`${VAR:-}` with VAR unset resolves to nothing; shown as '' it would
    no longer take VAR once set, as the config it came from does."""
    monkeypatch.delenv("FK_TEST_UNSET_TOKEN", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""\
        providers:
          openwhisk:
            c1:
              base_url: https://ow.example.org/
              auth: {ow_auth: "${FK_TEST_UNSET_AUTH:-u:k}", ow_apigw_access_token: "${FK_TEST_UNSET_TOKEN:-}"}
        scenarios:
          s: {}
    """))
    auth = yaml.safe_load(show(p))["providers"]["openwhisk"]["c1"]["auth"]
    assert auth["ow_apigw_access_token"] == "${FK_TEST_UNSET_TOKEN:-}"
