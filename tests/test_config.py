"""Config: FedKeeper compatibility, defaults, secrets, and clear errors."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.config import ConfigError, load_config, parse_config
from fedkeeper.logs import RedactingFilter

ROOT = Path(__file__).resolve().parent.parent

GOOD = textwrap.dedent("""\
    name: t
    providers:
      openwhisk:
        ow1:
          kind: local
      google:
        g1:
          kind: local
    scenarios:
      federated_learning:
        clients_info:
          total_num_clients: 4
          num_clients_per_round: 2
          ow_clients_count: 2
          gcf_clients_count: 2
        model_params:
          lr: "1e-3"
          optim: adam
          local_epochs: "5"
        functions:
          fl_client:
            openwhisk: {memory: "2048", timeout: "300000", concurrency: "10"}
            google: {memory: 2Gi, timeout: 300s}
""")


def run_validate(tmp_path: Path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(p)])
    return p, res


# What the original sample leaves for the operator to fill in, filled in;
# and its pickled .obj data converted to an npz, as the functions require.
ORIGINAL_FILLED_IN = [
    ("https://<ADD OW_AUTH here>@<ADD_IP_HERE>:31001/", "https://ow.example.org:31001/"),
    ("ow_auth: <ADD OW_AUTH here>", "ow_auth: ${OW_AUTH}"),
    ("ow_apigw_access_token: APIGW_ACCESS_TOKEN", "ow_apigw_access_token: ${OW_APIGW_ACCESS_TOKEN:-}"),
    ("ow_api_host: <ADD API HOST of OW>", "ow_api_host: ow.example.org:31001"),
    ("us-central1-<ADD_PROJECT_ID_HERE>.", "us-central1-my-project."),
    ("url: <ADD_MONGO_IP_HERE>:27017", "url: mongo.example.org:27017"),
    ('train_images_url: "https://example.org/mnist_fl/mnist_train_img.obj"', "dataset: npz"),
    ('train_labels_url: "https://example.org/mnist_fl/mnist_train_labels.obj"', "path: mnist.npz"),
    ('      test_images_url: "https://example.org/mnist_fl/mnist_test_img.obj"\n', ""),
    ('      test_labels_url: "https://example.org/mnist_fl/mnist_test_labels.obj"\n', ""),
    # the original's invoker function is FedKeeper's fl_invoker
    ("- fl_invoker_weights_update", "- fl_invoker"),
    ("fl_invoker_weights_update:", "fl_invoker:"),
]


def test_the_original_fedkeeper_sample_is_refused_where_it_must_be_filled_in(tmp_path, monkeypatch):
    """Unchanged, the original sample names placeholders and pickled data the
    functions refuse: validation says where, instead of failing at run time."""
    monkeypatch.setenv("OW_AUTH", "uuid-1:key-1")
    original = (ROOT / "tests/data/fedkeeper_original_sample.yaml").read_text()
    p, res = run_validate(tmp_path, original)
    assert res.exit_code == 2
    assert f"{p}:8: providers.openwhisk.invasic_cluster.base_url: still holds the placeholder" in res.output
    filled = original
    for before, after in ORIGINAL_FILLED_IN[:6]:
        filled = filled.replace(before, after)
    p, res = run_validate(tmp_path, filled)
    assert res.exit_code == 2
    assert f"{p}:70: scenarios.federated_learning.training_test_data.train_images_url" in res.output
    assert "pickle" in res.output and "numpy.savez" in res.output


def test_the_original_fedkeeper_sample_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("OW_AUTH", "uuid-1:key-1")
    text = (ROOT / "tests/data/fedkeeper_original_sample.yaml").read_text()
    for before, after in ORIGINAL_FILLED_IN:
        assert before in text
        text = text.replace(before, after)
    (tmp_path / "original.yaml").write_text(text)
    cfg = load_config(tmp_path / "original.yaml")
    scen = cfg.scenarios["federated_learning"]
    assert scen.model_params.lr == pytest.approx(1e-3)
    assert scen.model_params.local_epochs == 5
    assert scen.clients_info.ow_clients_count == 1 and scen.clients_info.gcf_clients_count == 1
    fc = scen.functions["fl_client"]["openwhisk"]
    assert fc.memory == 2048 and fc.timeout == pytest.approx(300.0)  # "300000" ms
    g = scen.functions["fl_client"]["google"]
    assert g.memory == 2048 and g.timeout == pytest.approx(300.0)    # "2048MB", "300s"
    assert g.entry_point == "main"
    assert cfg.providers.openwhisk["invasic_cluster"].resolved_namespace() == "guest"
    assert "test" in cfg.scenarios and "nodeinfo" in cfg.scenarios["test"].functions
    # Defaults for what FedKeeper lacked are explicit.
    t = scen.training
    assert (t.rounds, t.quorum, t.retries.max_attempts, t.strategy.name, t.mode) == (20, 0.8, 3, "fedavg", "sync")


def test_our_samples_validate(monkeypatch, tmp_path):
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"type": "service_account", "project_id": "p", "private_key": "KEYDATA-123"}))
    monkeypatch.setenv("OW_AUTH", "uuid-1:secretkey-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(sa))
    monkeypatch.setenv("HOME", str(tmp_path))   # the sample's password file, whatever the real home holds
    (tmp_path / ".fedkeeper").mkdir()
    (tmp_path / ".fedkeeper/mongo_password").write_text("mongopw\n")
    for name in ("config-sample.yaml", "config-local.yaml"):
        res = CliRunner().invoke(cli, ["config", "validate", "-c", str(ROOT / name)])
        assert res.exit_code == 0, res.output
    cfg = load_config(ROOT / "config-sample.yaml")
    g = cfg.providers.google["gcf_cluster"]
    assert (g.project, g.region) == ("my-project", "us-central1")
    assert g.service_account_info()["private_key"] == "KEYDATA-123"
    assert cfg.providers.openwhisk["invasic_cluster"].auth_pair() == ("uuid-1", "secretkey-1")


def test_secrets_from_env_and_files_are_redacted(tmp_path, monkeypatch):
    (tmp_path / "owkey").write_text("uuid-9:verysecret-9\n")
    monkeypatch.setenv("MONGO_PW", "hunter22")
    text = textwrap.dedent("""\
        providers:
          openwhisk:
            c1:
              base_url: https://ow.example.org/api/v1/namespaces/guest/actions/
              auth:
                ow_auth_file: owkey
        scenarios:
          s:
            mongo_config:
              url: mongodb://u:${MONGO_PW}@db.example.org:27017
    """)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.providers.openwhisk["c1"].auth_pair() == ("uuid-9", "verysecret-9")
    assert cfg.scenarios["s"].mongo_config.resolved_url() == "mongodb://u:hunter22@db.example.org:27017"
    res = CliRunner().invoke(cli, ["config", "show", "-c", str(p)])
    assert res.exit_code == 0
    for secret in ("verysecret-9", "hunter22", "uuid-9"):
        assert secret not in res.output
    # shown as where they come from, which reads back (test_config_show)
    assert f"ow_auth_file: {tmp_path / 'owkey'}" in res.output
    assert "mongodb://u:${MONGO_PW}@db.example.org:27017" in res.output
    # Run logs mask the same values.
    f = RedactingFilter(cfg.secret_values())
    rec = logging.LogRecord("fedkeeper", logging.INFO, __file__, 1, "auth=%s url=%s",
                            ("uuid-9:verysecret-9", "mongodb://u:hunter22@x"), None)
    f.filter(rec)
    assert "verysecret-9" not in rec.getMessage() and "hunter22" not in rec.getMessage()


BAD = [
    # (config text, expected line, expected fragments)
    ("providers: [1, 2\n", 2, ["not valid YAML"]),
    ("", None, ["empty"]),
    ("- a\n- b\n", 1, ["mapping at the top level"]),
    ("name: t\nprovidrs: {}\n", 2, ["providrs", "unknown key"]),
    (GOOD.replace("total_num_clients: 4", "total_num_clients: -1"), 12,
     ["clients_info.total_num_clients", "greater than 0"]),
    (GOOD.replace("num_clients_per_round: 2", "num_clients_per_round: 9"), 13,
     ["num_clients_per_round (9) exceeds total_num_clients (4)"]),
    (GOOD.replace("gcf_clients_count: 2", "gcf_clients_count: 3"), 11, ["but total_num_clients is 4"]),
    (GOOD.replace('lr: "1e-3"', 'lr: "fast"'), 17, ["model_params.lr", "expected a number"]),
    (GOOD.replace("optim: adam", "optim: adagrad2"), 18, ["model_params.optim", "adam"]),
    (GOOD.replace('memory: "2048"', 'memory: "lots"'), 22, ["functions.fl_client.openwhisk.memory",
                                                          "memory size"]),
    (GOOD.replace("timeout: 300s", "timeout: soon"), 23, ["functions.fl_client.google.timeout", "duration"]),
    (GOOD.replace("ow1:\n      kind: local", "ow1:\n      kind: cloud"), 5,
     ["providers.openwhisk.ow1.kind", "'remote' or 'local'"]),
    (GOOD.replace("ow1:\n      kind: local", "ow1:\n      kind: remote"), 4,
     ["providers.openwhisk.ow1", "needs base_url"]),
    (GOOD + "    training:\n      quorum: 1.5\n", 25, ["training.quorum", "less than or equal to 1"]),
    (GOOD + "    training:\n      retries: {max_attempts: 0}\n", 25, ["retries.max_attempts"]),
    (GOOD + "    server_config:\n      server_cluster_name: nowhere\n", 25,
     ["server_cluster_name", "'nowhere'", "not under providers"]),
    (GOOD.replace("ow1:\n      kind: local", "ow1:\n      kind: local\n      faults: {crash: 0.7, timeout: 0.6}"),
     6, ["faults", "more than 1"]),
    (GOOD.replace("ow1:\n      kind: local", "ow1:\n      kind: remote\n      base_url: https://x/\n      auth: {ow_auth: k:v}\n      faults: {crash: 0.1}"),
     8, ["only be injected on clusters of kind: local"]),
    ("providers:\n  openwhisk:\n    c:\n      base_url: https://x\n      auth:\n        ow_auth: ${FK_TEST_UNSET_VAR}\n",
     6, ["FK_TEST_UNSET_VAR is not set"]),
    ("providers:\n  openwhisk:\n    c:\n      base_url: https://x\n      auth:\n        ow_auth_file: /nonexistent/key\n",
     6, ["cannot read secret file", "/nonexistent/key"]),
    (GOOD.replace("data_sampling", "x") + "    data_sampling:\n      model: resnet\n", 25,
     ["data_sampling.model", "'cnn'"]),
    (GOOD + "    training_test_data:\n      dataset: npz\n", 25, ["needs path"]),
    (GOOD + "    model_params:\n      lr: 0.5\n", 24, ["scenarios.federated_learning.model_params",
                                                    "given twice (first at line 16)"]),
    (GOOD.replace("optim: adam", "optim: adam\n      optim: sgd"), 19, ["model_params.optim", "given twice"]),
]


@pytest.mark.parametrize("text,line,fragments", BAD, ids=[f"bad{i:02d}" for i in range(len(BAD))])
def test_bad_configs_name_file_line_key_and_exit_2(tmp_path, text, line, fragments, monkeypatch):
    monkeypatch.delenv("FK_TEST_UNSET_VAR", raising=False)
    p, res = run_validate(tmp_path, text)
    assert res.exit_code == 2, res.output
    out = res.output
    assert "Traceback" not in out
    assert str(p) in out
    if line is not None:
        assert f"{p}:{line}:" in out, out
    for frag in fragments:
        assert frag in out, out


def test_bad_config_via_subprocess_has_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nscenarios:\n  s:\n    model_params: {optim: rmsprop}\n")
    proc = subprocess.run([sys.executable, "-m", "fedkeeper.cli", "config", "validate", "-c", str(p)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{p}:4: scenarios.s.model_params.optim" in proc.stderr


def test_missing_config_file_exits_2(tmp_path):
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "config file not found" in res.output


def test_unknown_scenario_is_a_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    cfg = load_config(p)
    with pytest.raises(ConfigError, match="no scenario named 'nope'"):
        cfg.scenario("nope")
    assert cfg.scenario()[0] == "federated_learning"


def test_unit_parsing():
    cfg = parse_config(GOOD)
    fc = cfg.scenarios["federated_learning"].functions["fl_client"]
    assert (fc["openwhisk"].memory, fc["openwhisk"].timeout, fc["openwhisk"].concurrency) == (2048, 300.0, 10)
    assert (fc["google"].memory, fc["google"].timeout) == (2048, 300.0)
