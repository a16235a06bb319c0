"""Validation over every field: each bad value is refused by `config
validate` with exit 2, the file, the line of the key, the key path and the
reason (with a hint where a value is one of a fixed set).

The table mutates one key of a config that uses every section and checks
the refusal; the line is found with PyYAML's own node marks."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.config import load_config

SHA = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
OW = ("providers", "openwhisk", "ow_remote")
OWL = ("providers", "openwhisk", "ow_local")
GCF = ("providers", "google", "gcf_remote")
KN = ("providers", "knative", "kn")
S = ("scenarios", "federated_learning")
T = S + ("training",)
FN = S + ("functions", "fl_client")

BASE: dict[str, Any] = {
    "version": 0.1,
    "name": "every_section",
    "providers": {
        "openwhisk": {
            "ow_remote": {
                "base_url": "https://ow.example.org:31001/api/v1/namespaces/guest/actions/",
                "auth": {"ow_auth": "${FK_T_OW_AUTH}", "ow_api_host": "ow.example.org:31001"},
                "namespace": "guest",
                "image_registry": "ghcr.io/acme",
                "prometheus_config": {"host": "prom.example.org", "port_openwhisk_metrics": "30325",
                                      "port_node_metrics": 30471, "url": "http://prom.example.org:9090"},
                "configurations": {"num_hosts": 1, "each_host_cores": "32", "each_host_ram": "128gb",
                                   "cuda_cores": "", "concurrency": "100"},
                "pricing": {"per_gb_second": 0.0000166, "currency": "USD"},
            },
            "ow_local": {"kind": "local", "faults": {"crash": 0.1, "slow_ms": 5, "seed": 1}},
        },
        "google": {
            "gcf_remote": {"base_url": "https://us-central1-my-project.cloudfunctions.net/",
                           "auth": {"type": "service_account", "project_id": "my-project",
                                    "private_key": "${FK_T_KEY}"},
                           "api_endpoint": "127.0.0.1:9999"},
            "gcf_local": {"kind": "local"},
        },
        "knative": {
            "kn": {"namespace": "fl", "image": "registry.example/fk:1", "image_registry": "localhost:5000",
                   "api_server": "http://127.0.0.1:8001",
                   "ingress": "127.0.0.1:8080", "ready_timeout_s": 120},
        },
    },
    "scenarios": {
        "federated_learning": {
            "server_config": {"server_cluster_name": "ow_local",
                              "server_manager_functions": ["fl_server_init", "fl_server_aggregator"]},
            "clients_info": {"total_num_clients": 4, "num_clients_per_round": 2, "edge_clients_count": 0,
                             "ow_clients_count": 2, "gcf_clients_count": 2, "client_functions": ["fl_client"]},
            "data_sampling": {"input_shape_x": 28, "input_shape_y": 28, "output_size": 10, "batch_size": 10,
                              "model": "cnn", "partition": "dirichlet", "dirichlet_alpha": 0.5,
                              "shards_per_client": 2},
            "mongo_config": {"url": "embedded", "db": "fedkeeper", "collection": "weights"},
            "training_test_data": {"dataset": "npz", "sha256": SHA,
                                   "path": "https://storage.googleapis.com/tf-keras-datasets/mnist.npz"},
            "model_params": {"lr": "1e-3", "optim": "adam", "momentum": 0.5, "local_epochs": "2"},
            "training": {"rounds": 5, "target_accuracy": 0.9, "seed": 1,
                         "strategy": {"name": "fedavgm", "server_momentum": 0.9},
                         "retries": {"max_attempts": 3, "backoff_s": 1, "backoff_max_s": 10, "jitter": 0.5},
                         "quorum": 0.8, "round_deadline_s": 300, "attempt_grace_s": 5, "mode": "async",
                         "buffer_size": 2, "staleness_tolerance": 2, "staleness_exponent": 0.5,
                         "selection": "reliability", "exploration": 0.2},
            "insights": {"cache_mb": 64, "cluster": "ow_local"},
            "functions": {"fl_client": {
                "openwhisk": {"memory": "2048", "timeout": "300000", "concurrency": "1"},
                "google": {"memory": "2048MB", "timeout": "300s", "region": "us-central1",
                           "entry-point": "fl_client"}}},
        },
    },
}

DELETE = object()

# (key path, new value, reported key path or None for the same, reason fragments)
CASES: list[tuple[tuple, Any, Any, list[str]]] = [
    # top level
    (("scenarios",), {}, None, ["no scenario"]),
    (("providers", "openwisk"), {"x": {"kind": "local"}}, None,
     ["unknown provider section 'openwisk'", "did you mean openwhisk?"]),
    (("nme",), "x", None, ["unknown key", "did you mean name?"]),
    (("name",), "my run/1", None, ["cannot name sessions"]),
    (("sceanrios",), {}, None, ["unknown key", "did you mean scenarios?"]),
    (S + ("data_sampling", "batchsize"), 16, None, ["unknown key", "did you mean batch_size?"]),
    (S + ("server_config", "server_cluster"), "ow_local", None, ["did you mean server_cluster_name?"]),
    (S + ("training_test_data", "sha265"), SHA, None, ["did you mean sha256?"]),
    (FN + ("google", "entry-pont"), "fl_client", None, ["did you mean entry-point?"]),
    (FN + ("openwhisk", "memroy"), "256", None, ["did you mean memory?"]),
    (OW + ("prometheus_config", "ulr"), "http://p:9090", None, ["did you mean url?"]),
    (OW + ("configurations", "num_host"), 2, None, ["did you mean num_hosts?"]),
    (OW + ("auth", "ow_auht"), "a:b", None, ["did you mean ow_auth?"]),
    (T + ("rouns",), 3, None, ["did you mean rounds?"]),
    (T + ("strategy", "server_lrr"), 0.1, None, ["did you mean server_lr?"]),
    (KN + ("imagee",), "x", None, ["did you mean image?"]),
    # URL-typed fields
    (OW + ("base_url",), "ow.example.org/api/v1", None, ["is not a URL"]),
    (OW + ("base_url",), "ftp://ow.example.org/", None, ["scheme 'ftp'", "http:// or https://"]),
    (OW + ("base_url",), "https://", None, ["no valid host"]),
    (OW + ("base_url",), "https://ow.example.org:99999/", None, ["port '99999'"]),
    (OW + ("base_url",), "https://<ADD_IP_HERE>:31001/", None, ["placeholder '<ADD_IP_HERE>'"]),
    (OW + ("auth", "ow_api_host"), "ow.example.org:port", None, ["port 'port'"]),
    (OW + ("prometheus_config", "url"), "prom.example.org:9090", None, ["is not a URL"]),
    (OW + ("prometheus_config", "host"), "prom example", None, ["not a host name"]),
    (OW + ("prometheus_config", "port_openwhisk_metrics"), "70000", None, ["port number from 1 to 65535"]),
    (GCF + ("base_url",), "us-central1-my-project.cloudfunctions.net", None, ["is not a URL"]),
    (GCF + ("api_endpoint",), "http://:99", None, ["no valid host"]),
    (KN + ("api_server",), "localhost:8001", None, ["is not a URL"]),
    (KN + ("ingress",), "http://127.0.0.1:99999", None, ["port '99999'"]),
    (S + ("training_test_data", "path"), "s3://bucket/mnist.npz", None, ["scheme 's3'"]),
    (S + ("training_test_data", "path"), "file:///data/mnist.npz", None, ["scheme 'file'"]),
    (S + ("training_test_data", "train_images_url"), "example.org/x.idx", None, ["is not a URL"]),
    # training data the functions would refuse at run time
    (S + ("training_test_data", "path"), "data/mnist.csv", None, ["not an .npz file"]),
    (S + ("training_test_data", "path"), "https://example.org/mnist.npy", None, ["not an .npz file"]),
    (S + ("training_test_data", "path"), DELETE, S + ("training_test_data", "dataset"), ["npz needs path"]),
    (S + ("training_test_data", "dataset"), "fedkeeper_obj", None, ["pickle", "numpy.savez"]),
    (S + ("training_test_data", "train_images_url"), "https://example.org/train_img.obj", None, ["pickle"]),
    (S + ("training_test_data", "sha256"), "abc123", None, ["not a sha256"]),
    # enumerated values, with the hint
    (S + ("mongo_config", "url"), "embeded", None, ["did you mean embedded?"]),
    (S + ("mongo_config", "url"), "postgres://db.example.org:5432", None, ["scheme 'postgres'"]),
    (S + ("mongo_config", "url"), "mongodb://", None, ["names no host"]),
    (S + ("mongo_config", "url"), "db.example.org:mongo", None, ["not embedded, a mongodb:// URL or host:port"]),
    (OWL + ("kind",), "locl", None, ["'remote' or 'local'", "did you mean local?"]),
    (KN + ("kind",), "local", None, ["'remote'"]),
    (OW + ("invocation",), "via-invoker", None, ["did you mean via_invoker?"]),
    (GCF + ("invocation",), "via_invoker", None, ["tracked by id", "use invocation: direct"]),
    (KN + ("invocation",), "via_invoker", None, ["tracked by id"]),
    (T + ("mode",), "semi-async", None, ["did you mean semi_async?"]),
    (T + ("selection",), "reliabilty", None, ["did you mean reliability?"]),
    (T + ("strategy", "name"), "fedavgg", None, ["did you mean fedavg?"]),
    (T + ("strategy",), "krumm", T + ("strategy", "name"), ["did you mean krum?"]),
    (S + ("data_sampling", "partition"), "dirichelt", None, ["did you mean dirichlet?"]),
    (S + ("data_sampling", "model"), "cnnn", None, ["did you mean cnn?"]),
    (S + ("model_params", "optim"), "adamw", None, ["'adam'", "did you mean adam?"]),
    (S + ("training_test_data", "dataset"), "npy", None, ["did you mean npz?"]),
    (FN + ("gogle",), {"memory": "256MB"}, None, ["unknown provider section 'gogle'", "did you mean google?"]),
    (OW + ("pricing", "currency"), "dollars", None, ["currency code"]),
    (GCF + ("auth", "type"), "authorized_user", GCF + ("auth",), ["service-account"]),
    # names and formats
    (OW + ("auth", "ow_auth"), "no-colon-here", None, ["'uuid:key'"]),
    (OW + ("auth", "ow_auth"), "***", None, ["what `config show` prints in place of a secret"]),
    (OW + ("namespace",), "bad/namespace", None, ["not a valid OpenWhisk namespace"]),
    (OW + ("image_registry",), "https://ghcr.io/acme", None, ["not a registry prefix"]),
    (KN + ("image_registry",), "ghcr.io/acme:latest", None, ["not a registry prefix"]),
    (KN + ("image",), "registry.example/fk image", None, ["not a container image reference"]),
    (FN + ("openwhisk", "docker_image"), "docker://fedkeeper/runtime", None, ["not a container image reference"]),
    (GCF + ("project",), "P", None, ["not a Google Cloud project id"]),
    (GCF + ("region",), "us central", None, ["not a Google Cloud region"]),
    (KN + ("namespace",), "FL_Space", None, ["not a valid name"]),
    (S + ("mongo_config", "db"), "my.db", None, ["not a valid MongoDB name"]),
    (S + ("mongo_config",), {"url": "db.example.org:27017", "password": "${FK_T_KEY}"}, S + ("mongo_config", "password"),
     ["no PASSWORD for it to replace"]),
    (S + ("mongo_config",), {"url": "mongodb://fk:PASSWORD@db.example.org:27017"}, S + ("mongo_config", "url"),
     ["no password (or password_file)"]),
    (FN + ("google", "region"), "central", None, ["not a region"]),
    (FN + ("google", "entry-point"), "fl-client", None, ["not a function name"]),
    # numbers with units
    (FN + ("openwhisk", "memory"), "0", None, ["at least 1MB"]),
    (FN + ("openwhisk", "memory"), "2TB", None, ["memory size"]),
    (FN + ("openwhisk", "timeout"), "0", None, ["duration must be positive"]),
    (FN + ("openwhisk", "timeout"), 120.0, None, ["is in ms, so 120.0 is 120ms", "write 120.0s"]),
    (FN + ("google", "timeout"), "5 minutes", None, ["a duration such as 300s"]),
    (FN + ("google", "timeout"), "-1s", None, ["a duration such as 300s"]),
    (FN + ("openwhisk", "concurrency"), "0", None, ["at least 1"]),
    (FN + ("openwhisk", "concurrency"), "1.5", None, ["whole number"]),
    (FN + ("google", "memory"), "64Gi", None, ["65536MB exceeds the platform's limit of 32768MB"]),
    (FN + ("google", "timeout"), "2h", None, ["7200s exceeds the platform's limit of 3600s"]),
    (OW + ("configurations", "each_host_ram"), "lots", None, ["memory size"]),
    (OW + ("configurations", "each_host_cores"), "-4", None, ["at least 1"]),
    # counts and bounds
    (S + ("clients_info", "total_num_clients"), 0, None, ["greater than 0"]),
    (S + ("clients_info", "num_clients_per_round"), -1, None, ["greater than 0"]),
    (S + ("clients_info", "ow_clients_count"), -1, None, ["greater than or equal to 0"]),
    (S + ("clients_info", "client_functions"), [], None, ["at least 1"]),
    (S + ("data_sampling", "batch_size"), 0, None, ["greater than 0"]),
    (S + ("data_sampling", "input_shape_x"), -28, None, ["greater than 0"]),
    (S + ("data_sampling", "dirichlet_alpha"), 0, None, ["greater than 0"]),
    (S + ("model_params", "lr"), 0, None, ["greater than 0"]),
    (S + ("model_params", "local_epochs"), "-1", None, ["greater than or equal to 0"]),
    (T + ("rounds",), 0, None, ["greater than 0"]),
    (T + ("rounds",), 1_000_001, None, ["at most 1000000 rounds"]),
    (T + ("seed",), -1, None, ["greater than or equal to 0"]),
    (T + ("target_accuracy",), 1.5, None, ["less than or equal to 1"]),
    (T + ("quorum",), 0, None, ["greater than 0"]),
    (T + ("round_deadline_s",), -5, None, ["greater than 0"]),
    (T + ("round_deadline_s",), float("inf"), None, ["finite number"]),
    (T + ("quorum",), float("nan"), None, ["finite number"]),
    (S + ("insights", "cache_mb"), float("inf"), None, ["finite number"]),
    (T + ("retries", "max_attempts"), 0, None, ["greater than or equal to 1"]),
    (T + ("retries", "backoff_max_s"), 0.5, None, ["below backoff_s"]),
    (T + ("retries", "jitter"), 2, None, ["less than or equal to 1"]),
    (T + ("exploration",), 1.5, None, ["less than or equal to 1"]),
    (T + ("buffer_size",), 0, None, ["greater than 0"]),
    (T + ("staleness_tolerance",), -1, None, ["greater than or equal to 0"]),
    (T + ("strategy", "server_momentum"), 1.0, None, ["less than 1"]),
    (T + ("strategy", "trim_ratio"), 0.5, None, ["less than 0.5"]),
    (T + ("strategy", "byzantine"), -1, None, ["greater than or equal to 0"]),
    (T + ("strategy", "tau"), 0, None, ["greater than 0"]),
    (S + ("insights", "cache_mb"), -1, None, ["greater than or equal to 0"]),
    (OWL + ("faults", "crash"), 1.5, None, []),     # the reason is the local fault model's
    (OWL + ("faults", "slow_ms"), -1, None, []),
    (OWL + ("faults",), {"crash": 0.7, "throttle": 0.6}, OWL + ("faults", "crash"), ["more than 1"]),
    (OWL + ("faults", "crashh"), 0.1, None, ["unknown key"]),
    (OWL + ("faults", "functions"), ["fl_client", "fl_clent"], OWL + ("faults", "functions", 1),
     ["no function named 'fl_clent'", "did you mean fl_client?"]),
    (KN + ("ready_timeout_s",), 0, None, ["greater than 0"]),
    (OW + ("configurations", "num_hosts"), 0, None, ["greater than 0"]),
    (OW + ("pricing", "per_gb_second"), -1, None, ["greater than or equal to 0"]),
    # cross-references
    (S + ("functions", "fl_clinet"), {"openwhisk": {"memory": "256"}}, None,
     ["no function named 'fl_clinet'", "did you mean fl_client?"]),
    (S + ("clients_info", "client_functions"), ["fl_client", "fl_cliet"], S + ("clients_info", "client_functions", 1),
     ["did you mean fl_client?"]),
    (S + ("server_config", "server_manager_functions"), ["fl_server_init", "fl_server_aggregatr"],
     S + ("server_config", "server_manager_functions", 1), ["did you mean fl_server_aggregator?"]),
    (S + ("server_config", "server_cluster_name"), "ow_locl", None, ["'ow_locl'", "did you mean ow_local?"]),
    (S + ("insights", "cluster"), "nowhere", None, ["'nowhere'", "not under providers"]),
    (S + ("clients_info", "clusters"), {"nowhere": 4}, S + ("clients_info", "clusters", "nowhere"),
     ["no cluster named 'nowhere'"]),
    (S + ("clients_info", "clusters"), {"ow_local": 3}, None, ["places 3 clients but total_num_clients is 4"]),
    (S + ("clients_info", "clusters"), {"ow_local": [0, 1], "gcf_local": [1, 2]},
     S + ("clients_info", "clusters", "gcf_local"), ["client index 1 is placed twice"]),
    (S + ("clients_info", "clusters"), {"ow_local": [0, 9], "gcf_local": [1, 2]}, S + ("clients_info", "clusters"),
     ["client index 9"]),
    (("providers", "google", "ow_local"), {"kind": "local"}, None, ["also used under providers.openwhisk"]),
    (("providers", "google", "gcf/other"), {"kind": "local"}, None, ["cluster name 'gcf/other'"]),
    (T + ("buffer_size",), 3, None, ["exceeds num_clients_per_round 2"]),
    (("providers", "google"), {}, S + ("clients_info", "gcf_clients_count"), ["no cluster of the platform"]),
    (OW + ("faults",), {"crash": 0.1}, None, ["only be injected on clusters of kind: local"]),
    # privacy blocks (their rules are fedkeeper.privacy.settings'; the config reports where)
    (T + ("privacy",), {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}, None,
     ["privacy needs mode: sync"]),
    (T + ("secure_aggregation",), True, None, ["secure_aggregation needs mode: sync"]),
    (T + ("privacy",), {"mode": "centrl", "noise_multiplier": 1.0, "clip_norm": 1.0}, T + ("privacy", "mode"),
     ["did you mean central?"]),
]


def mutate(path: tuple, value: Any) -> dict:
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def key_line(text: str, path: tuple) -> int:
    """1-based line of the key at `path` (or of its deepest part the file
    has: `strategy: krumm` is reported as strategy.name), from PyYAML's marks."""
    node = yaml.compose(text)
    line = 1
    for key in path:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            node = node.value[key]
            line = node.start_mark.line + 1
            continue
        found = [(k, v) for k, v in node.value if k.value == key] if isinstance(node, yaml.MappingNode) else []
        if not found:
            break
        line, node = found[0][0].start_mark.line + 1, found[0][1]
    return line


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    monkeypatch.setenv("FK_T_OW_AUTH", "uuid-1:key-1")
    monkeypatch.setenv("FK_T_KEY", "private-key-1")


def test_the_base_config_is_valid(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(BASE, sort_keys=False))
    cfg = load_config(p)
    assert set(cfg.providers.clusters()) == {"ow_remote", "ow_local", "gcf_remote", "gcf_local", "kn"}
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(p)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("path,value,reported,fragments", CASES,
                         ids=[f"{'.'.join(map(str, c[0][-2:]))}={c[1]!r}"[:60] for c in CASES])
def test_a_bad_value_is_refused_with_file_line_key_and_reason(tmp_path: Path, path, value, reported, fragments):
    reported = reported or path
    text = yaml.safe_dump(mutate(path, value), sort_keys=False)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    res = CliRunner().invoke(cli, ["config", "validate", "-c", str(p)])
    out = " ".join(res.output.split())  # the console may wrap a long message
    assert res.exit_code == 2, res.output
    assert "Traceback" not in out
    assert f"{p}:{key_line(text, reported)}: {'.'.join(map(str, reported))}:" in out, out
    for fragment in fragments:
        assert fragment in out, out


def test_via_invoker_is_accepted_where_the_platform_tracks_by_id(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(mutate(OWL + ("invocation",), "via_invoker"), sort_keys=False))
    assert load_config(p).providers.openwhisk["ow_local"].invocation == "via_invoker"
