"""Cluster introspection (fedkeeper.providers.kube) against emulated Nodes and Pods,
and the write-config round trip."""
from __future__ import annotations

import pytest
import yaml

from fedkeeper.config import KnativeCluster, load_config
from fedkeeper.providers.kube import (ConfigEditError, cluster_info, compare_configurations, format_info,
                            format_ram, parse_ram, write_configurations)
from fedkeeper.providers.base import ErrorClass, ProviderError
from kube_emulator import EmulatedCluster

CP_TAINT = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]


@pytest.fixture
def cluster():
    c = EmulatedCluster()
    yield c
    c.stop()


def seed(c: EmulatedCluster) -> None:
    c.add_node("cp-0", cpu="2", memory="4Gi", labels={"node-role.kubernetes.io/control-plane": ""},
               taints=CP_TAINT)
    for i in range(3):
        c.add_node(f"worker-{i}", cpu="8", memory="32Gi", allocatable_cpu="7800m",
                   allocatable_memory="30Gi", gpus=1 if i == 0 else 0,
                   labels={"nvidia.com/gpu.product": "Tesla-T4"} if i == 0 else {})
    c.add_node("worker-down", cpu="8", memory="32Gi", ready=False)
    c.add_node("worker-cordoned", cpu="8", memory="32Gi", unschedulable=True)
    for i in range(3):
        c.add_pod("openwhisk", f"owdev-invoker-{i}", labels={"name": "owdev-invoker"},
                  ready=i < 2, node=f"worker-{i}")
    c.add_pod("openwhisk", "owdev-controller-0", labels={"name": "owdev-controller"})
    c.add_pod("knative-serving", "activator-abc", labels={"app": "activator"})
    c.add_pod("knative-serving", "autoscaler-abc", labels={"app": "autoscaler"})
    # same label elsewhere: not Knative's activator
    c.add_pod("default", "activator-lookalike", labels={"app": "activator"})


def test_figures_from_nodes_and_pods(cluster):
    seed(cluster)
    info = cluster_info(KnativeCluster(api_server=cluster.url))
    assert info["configurations"] == {"num_hosts": 3, "each_host_cores": 8,
                                      "each_host_ram": "32gb", "gpu_enabled": True}
    assert info["hosts"]["names"] == ["worker-0", "worker-1", "worker-2"]
    by_name = {n["name"]: n for n in info["nodes"]}
    w0 = by_name["worker-0"]
    assert w0["gpus"] == 1 and w0["gpu_labels"] == {"nvidia.com/gpu.product": "Tesla-T4"}
    assert w0["cpu_allocatable"] == 7.8 and w0["memory_allocatable"] == 30 * 2 ** 30
    assert by_name["cp-0"]["control_plane"] and not by_name["worker-down"]["ready"]
    assert not by_name["worker-cordoned"]["schedulable"]
    assert info["openwhisk"]["invokers"] == 3 and info["openwhisk"]["invokers_ready"] == 2
    assert info["knative"]["activators"] == 1 and info["knative"]["activators_ready"] == 1
    assert any("2 of 3 OpenWhisk invoker" in w for w in info["warnings"])
    text = format_info(info)
    assert "worker-0: 8 cores (7.8 allocatable), 32gb (30gb allocatable), 1 GPU" in text
    assert "num_hosts: 3" in text


def test_openwhisk_invoker_nodes_define_the_hosts(cluster):
    for i in range(3):
        cluster.add_node(f"n{i}", cpu="16", memory="64Gi",
                         labels={"openwhisk-role": "invoker"} if i < 2 else {})
    info = cluster_info(KnativeCluster(api_server=cluster.url))
    assert info["configurations"]["num_hosts"] == 2
    assert "openwhisk-role=invoker" in info["hosts"]["basis"]
    assert info["configurations"]["gpu_enabled"] is False


def test_mixed_hosts_report_the_smallest_and_warn(cluster):
    cluster.add_node("big", cpu="32", memory="128Gi")
    cluster.add_node("small", cpu="4", memory="15Gi")
    info = cluster_info(KnativeCluster(api_server=cluster.url))
    assert info["configurations"]["each_host_cores"] == 4
    assert info["configurations"]["each_host_ram"] == "15gb"
    assert any("differ" in w for w in info["warnings"])


def test_mismatch_with_the_config_warns(cluster):
    seed(cluster)
    conf = {"num_hosts": 1, "each_host_cores": "32", "each_host_ram": "128gb",
            "gpu_enabled": False}
    info = cluster_info(KnativeCluster(api_server=cluster.url, configurations=conf))
    warnings = "\n".join(info["warnings"])
    assert "num_hosts is 1 in the config, the cluster has 3" in warnings
    assert "each_host_cores is 32" in warnings
    assert "each_host_ram is 128gb" in warnings
    assert "gpu_enabled is false" in warnings
    # matching figures (memory within reservations) give no warning
    assert compare_configurations({"num_hosts": 3, "each_host_cores": "8", "each_host_ram": "31gb",
                                   "gpu_enabled": True}, info["configurations"]) == []


def test_quantities_and_ram_strings():
    assert format_ram(128 * 2 ** 30) == "128gb" and format_ram(512 * 2 ** 20) == "512mb"
    assert parse_ram("128gb") == parse_ram("128Gi") == parse_ram("128GB") == 128 * 2 ** 30
    assert parse_ram("512mb") == 512 * 2 ** 20 and parse_ram("lots") is None


CONFIG = """\
# FedKeeper clusters (comment kept)
providers:
  openwhisk:
    ow:
      base_url: "https://ow.example.org/api/v1/namespaces/_"
      auth:
        ow_auth: ${OW_AUTH:-a:b}   # from the environment
      configurations:
        num_hosts: 1    # set by hand
        each_host_cores: "32"
        platform: amd64
  knative:
    kn:
      namespace: fl
      image: registry.example/fk:1

scenarios:
  test: {}
"""


def test_write_config_round_trip(cluster, tmp_path):
    seed(cluster)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    info = cluster_info(KnativeCluster(api_server=cluster.url))
    written = write_configurations(path, "ow", info)
    assert written == info["configurations"]
    write_configurations(path, "kn", info)
    text = path.read_text()
    assert "# FedKeeper clusters (comment kept)" in text
    assert "ow_auth: ${OW_AUTH:-a:b}   # from the environment" in text
    assert "num_hosts: 3    # set by hand" in text
    assert 'each_host_cores: "8"' in text  # the operator's quoting is kept
    assert (path.stat().st_mode & 0o777) == 0o640
    cfg = load_config(path)
    for name, section in (("ow", "openwhisk"), ("kn", "knative")):
        conf = getattr(cfg.providers, section)[name].configurations
        assert int(conf.num_hosts) == 3 and int(conf.each_host_cores) == 8
        assert conf.each_host_ram == "32gb" and conf.gpu_enabled is True
    assert cfg.providers.openwhisk["ow"].configurations.platform == "amd64"
    # nothing but the two configurations blocks changed
    before, after = yaml.safe_load(CONFIG), yaml.safe_load(text)
    for doc in (before, after):
        doc["providers"]["openwhisk"]["ow"].pop("configurations")
        doc["providers"]["knative"]["kn"].pop("configurations", None)
    assert before == after
    # writing the same figures again changes nothing
    write_configurations(path, "kn", info)
    assert path.read_text() == text


def test_write_config_refuses_unknown_cluster(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigEditError) as e:
        write_configurations(path, "nope", {"configurations": {"num_hosts": 2}})
    assert "nope" in str(e.value)
    assert path.read_text() == CONFIG


def test_write_config_handles_flow_and_empty_blocks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("providers:\n  knative:\n    a:\n      configurations: {num_hosts: 1, platform: arm64}\n"
                    "    b:\n      configurations:\n    c:\n      namespace: x\n")
    figures = {"num_hosts": 2, "each_host_cores": 4, "each_host_ram": "16gb", "gpu_enabled": False}
    for name in ("a", "b", "c"):
        write_configurations(path, name, {"configurations": figures})
    data = yaml.safe_load(path.read_text())["providers"]["knative"]
    assert data["a"]["configurations"] == {**figures, "platform": "arm64"}
    assert data["b"]["configurations"] == figures
    assert data["c"] == {"namespace": "x", "configurations": figures}


def test_kubeconfig_and_context_reach_the_api_server(cluster, tmp_path):
    cluster.add_node("only", cpu="2", memory="8Gi")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "emu", "cluster": {"server": cluster.url}},
                     {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "tok-not-for-logs"}}],
        "contexts": [{"name": "emu-ctx", "context": {"cluster": "emu", "user": "u"}},
                     {"name": "other", "context": {"cluster": "dead", "user": "u"}}]}))
    info = cluster_info(KnativeCluster(kubeconfig=str(kubeconfig), context="emu-ctx"))
    assert info["configurations"]["num_hosts"] == 1
    # the token went along as a bearer token
    auth = [r.headers.get("Authorization") for r in cluster.emulator._requests]
    assert "Bearer tok-not-for-logs" in auth
    with pytest.raises(ProviderError) as e:
        cluster_info(KnativeCluster(kubeconfig=str(kubeconfig), context="missing-ctx"))
    assert e.value.error_class is ErrorClass.AUTH and "tok-not-for-logs" not in str(e.value)


def test_kube_clusters_picks_clusters_with_kubernetes_access(tmp_path):
    from fedkeeper.providers.kube import kube_clusters
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("      configurations:\n",
                                   "      context: ow-ctx\n      configurations:\n", 1))
    cfg = load_config(path)
    assert sorted(kube_clusters(cfg)) == ["kn", "ow"]
    path.write_text(CONFIG)
    assert sorted(kube_clusters(load_config(path))) == ["kn"]
