"""A short training session with clients on a local OpenWhisk cluster and on
a Knative cluster (kmock's API server, a stand-in controller that serves each
Service's mounted source with functions-framework): the keeper is unchanged."""
from __future__ import annotations

import textwrap

import pymongo

from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.local import shutdown_local_services
from flcommon import store as fs
from kube_emulator import EmulatedCluster, FakeKnativeController, FrameworkKubelet


def test_training_across_openwhisk_and_knative(tmp_path, mongo_url, monkeypatch):
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FEDKEEPER_LOG_DIR", str(tmp_path / "logs"))
    cluster = EmulatedCluster()
    kubelet = FrameworkKubelet(cluster, "fl", tmp_path / "kubelet")
    try:
        cfg_path = tmp_path / "cfg.yaml"
        cfg_path.write_text(textwrap.dedent(f"""\
            name: kn_mix
            providers:
              openwhisk:
                local_ow: {{kind: local}}
              knative:
                kn:
                  api_server: {cluster.url}
                  namespace: fl
                  image: example.org/fedkeeper/runtime:py311
                  ready_timeout_s: 60
            scenarios:
              federated_learning:
                server_config: {{server_cluster_name: local_ow}}
                clients_info:
                  total_num_clients: 4
                  num_clients_per_round: 4
                  clusters: {{local_ow: 2, kn: 2}}
                data_sampling: {{model: small, batch_size: 16}}
                mongo_config: {{url: "{mongo_url}", db: kn_mix}}
                model_params: {{lr: "1e-2", local_epochs: "1"}}
                training: {{rounds: 2, seed: 2}}
                functions:
                  fl_client:
                    knative: {{memory: 1024MB, timeout: 120s, concurrency: 2}}
            """))
        with FakeKnativeController(cluster, "fl", kubelet) as ctl:
            assert run_start(load_config(cfg_path), None) == 0
            assert not ctl.errors
        db = pymongo.MongoClient(mongo_url)["kn_mix"]
        sess = db[fs.SESSIONS].find_one(sort=[("created", -1)])
        assert sess["state"] == "finished"
        attempts = list(db[fs.INVOCATIONS].find({"session": sess["_id"], "function": "fl_client",
                                                 "state": "succeeded"}))
        by_platform = {(a["cluster"], a["platform"]) for a in attempts}
        assert by_platform == {("local_ow", "openwhisk"), ("kn", "knative")}
        assert all(a["platform_id"] and a["duration_ms"] for a in attempts)
        assert db[fs.MODELS].find_one({"session": sess["_id"], "round": 2}) is not None
    finally:
        kubelet.stop()
        cluster.stop()
        shutdown_local_services(tmp_path / "state")
