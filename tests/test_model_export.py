"""`fedkeeper model list` and `model export` after a real short session on
the local clusters (local OpenWhisk and local Cloud Functions, the real FL
functions, the embedded store); the exported model is loaded and evaluated
in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.store import connect
from flcommon import store as fs

from basic_auth_server import BasicAuthFile, digits_npz, serve
from session_config import FUNCTIONS, fragment, write_session_config

DB = "model_export"


def write_config(path: Path, mongo_url: str, db: str, *, rounds: int = 2, extra: str = "", mode: str = "sync",
                 training_extra: str = "") -> Path:
    return write_session_config(
        path, name="models", mongo={"url": mongo_url, "db": db}, google={"local_gcf": {"kind": "local"}},
        clients_info={"total_num_clients": 4, "num_clients_per_round": 4, "ow_clients_count": 2,
                      "gcf_clients_count": 2},
        scenario=fragment(extra), functions={"fl_client": FUNCTIONS["fl_client"]},
        training={"rounds": rounds, "mode": mode, "seed": 5, "quorum": 0.5, "round_deadline_s": 240,
                  "attempt_grace_s": 5, "retries": {"max_attempts": 2, "backoff_s": 0.1, "backoff_max_s": 1},
                  **fragment(training_extra)})


@pytest.fixture(scope="module")
def trained(fabric_state, mongo_url, tmp_path_factory):
    """One finished two-round session shared by the tests of this module."""
    cfg_path = write_config(tmp_path_factory.mktemp("cfg") / "cfg.yaml", mongo_url, DB)
    assert run_start(load_config(cfg_path), None, keep_services=True) == 0
    store = connect(mongo_url, DB)
    session = store.latest_session()
    assert session["state"] == "finished"
    yield cfg_path, store, session["_id"]
    store.close()


def invoke(*args: str):
    return CliRunner().invoke(cli, ["model", *args])


def test_list_shows_every_stored_model(trained):
    cfg, store, session = trained
    res = invoke("list", session, "-c", str(cfg), "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["models"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] is None and rows[0]["strategy"] == "initial"
    for r in rows[1:]:
        stored = store.model(session, r["round"])
        assert r["accuracy"] == stored["metrics"]["accuracy"]
        assert r["loss"] == stored["metrics"]["loss"]
        assert r["strategy"] == "fedavg" and r["clients"] == stored["accepted"]
        assert r["examples"] == sum(c["num_examples"] for c in stored["contributions"])
        assert r["bytes"] > 1000 and r["stored"]
    # The round numbers are those of `status` (model R came out of round R).
    rounds = {d["round"] + 1: d["accuracy"] for d in store.rounds(session)}
    assert {r["round"]: r["accuracy"] for r in rows[1:]} == rounds
    table = invoke("list", session, "-c", str(cfg))
    assert table.exit_code == 0 and "fedavg" in table.output


def test_exported_keras_model_reproduces_the_stored_accuracy_in_a_fresh_process(trained, tmp_path):
    cfg, store, session = trained
    out = tmp_path / "final.keras"
    res = invoke("export", session, "-c", str(cfg), "--final", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert out.is_file() and not list(tmp_path.glob(".*part*"))
    stored = store.model(session, 2)["metrics"]
    part = store.db[fs.PARTITIONS].find_one({"session": session, "client": "_test"})
    x, y = store.get_arrays(part["blob_id"])
    np.savez(tmp_path / "test.npz", x=x, y=y)
    script = textwrap.dedent("""\
        import json, sys
        import numpy as np
        import keras
        model = keras.models.load_model(sys.argv[1])
        d = np.load(sys.argv[2], allow_pickle=False)
        x, y = d["x"], d["y"]
        ev = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
        top = float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))
        print(json.dumps({"evaluate": ev, "argmax": top}))
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "test.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(got["evaluate"]["accuracy"] - stored["accuracy"]) <= 1e-6
    assert abs(got["argmax"] - stored["accuracy"]) <= 1e-6
    assert abs(got["evaluate"]["loss"] - stored["loss"]) <= 1e-4


def test_npz_export_holds_the_stored_weights(trained, tmp_path):
    cfg, store, session = trained
    best = max((store.model(session, r) for r in (1, 2)), key=lambda d: (d["metrics"]["accuracy"], -d["round"]))
    for flag, doc in ((["--round", "1"], store.model(session, 1)), (["--best"], best),
                      (["--round", "0"], store.model(session, 0))):
        out = tmp_path / f"m{doc['round']}.npz"
        res = invoke("export", session, "-c", str(cfg), *flag, "-o", str(out), "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["round"] == doc["round"]
        with np.load(out, allow_pickle=False) as z:
            got = [z[k] for k in sorted(z.files)]
        want = store.get_arrays(doc["blob_id"])
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_bad_requests_exit_2_with_one_line(trained, tmp_path):
    cfg, store, session = trained
    cases = [
        (["export", session, "-c", str(cfg), "-o", str(tmp_path / "m.h5")], ".keras"),
        (["export", session, "-c", str(cfg), "--best", "--final", "-o", str(tmp_path / "m.npz")], "one of"),
        (["export", session, "-c", str(cfg), "--round", "9", "-o", str(tmp_path / "m.npz")], "no model 9"),
        (["export", "nope", "-c", str(cfg), "-o", str(tmp_path / "m.npz")], "no session 'nope'"),
        (["list", "nope", "-c", str(cfg)], "no session 'nope'"),
    ]
    for args, words in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())


def test_a_file_that_cannot_be_written_exits_2_with_one_line(trained, tmp_path):
    cfg, store, session = trained
    (tmp_path / "a_file").write_text("not a folder")
    for out, words in ((tmp_path / "a_file" / "m.npz", "a_file is not a directory"),
                       (tmp_path / "a_file" / "m.keras", "a_file is not a directory"),
                       (tmp_path / ("m" * 300 + ".npz"), "cannot write")):  # a name the file system refuses
        res = invoke("export", session, "-c", str(cfg), "-o", str(out))
        assert res.exit_code == 2, (out, res.output)
        assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, (out, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], (out, res.output)
    # Nothing left behind, not even the temporary file.
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_validate_runs_in_the_function_and_stores_the_result_next_to_the_model(trained, tmp_path):
    cfg, store, session = trained
    stored = store.model(session, 1)["metrics"]
    res = invoke("validate", session, "-c", str(cfg), "--round", "1", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)    # stderr says the local services are left running
    assert out["round"] == 1 and out["cluster"] == "local_ow" and out["num_examples"] > 100
    # The same model on the same test split, evaluated by the same code: the same figures.
    assert abs(out["metrics"]["accuracy"] - stored["accuracy"]) <= 1e-6
    assert len(out["per_class_accuracy"]) == 10
    # The built-in digits test split is the session's test split.
    digits = json.loads(invoke("validate", session, "-c", str(cfg), "--round", "1", "--data", "digits",
                               "--json").stdout)
    assert abs(digits["metrics"]["accuracy"] - stored["accuracy"]) <= 1e-6
    train = json.loads(invoke("validate", session, "-c", str(cfg), "--round", "1", "--data", "train",
                              "--json").stdout)
    parts = store.db[fs.PARTITIONS].find({"session": session, "client": {"$ne": "_test"}})
    assert train["num_examples"] == sum(p["num_examples"] for p in parts)
    # Stored next to the model, one entry per (model, data); shown by `model list`.
    doc = store.model(session, 1)
    assert {v["data"] for v in doc["validations"].values()} == {"session test split", "digits",
                                                               "session train split"}
    rows = json.loads(invoke("list", session, "-c", str(cfg), "--json").output)["models"]
    assert len(rows[1]["validations"]) == 3 and rows[2]["validations"] == []
    again = json.loads(invoke("validate", session, "-c", str(cfg), "--round", "1", "--json").stdout)
    assert again["key"] == out["key"] and len(store.model(session, 1)["validations"]) == 3
    table = invoke("list", session, "-c", str(cfg))
    assert "digits" in table.output


def test_validate_refusals(trained, tmp_path):
    cfg, store, session = trained
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((4, 5, 5), np.uint8), y_test=np.zeros(4, np.int64))
    res = invoke("validate", session, "-c", str(cfg), "--data", f"npz:{wrong}")
    assert res.exit_code == 1 and "shape" in res.output and "Traceback" not in res.output
    for args, words in ((["--data", "module"], "not trained with a user module"),
                        (["--data", "nonsense"], "expected test"),
                        (["--round", "7"], "no model 7")):
        res = invoke("validate", session, "-c", str(cfg), *args)
        assert res.exit_code == 2 and words in res.output, (args, res.output)


def test_validate_on_a_data_url_with_credentials_stores_and_shows_none(trained):
    """`--data npz:URL` with user info: the download is authorised, and the
    stored validation and the output hold the URL without it."""
    cfg, store, session = trained

    class Data(BasicAuthFile):
        body, user, password, seen = digits_npz(), "bob", "V4lid8/Secret", []
    srv = serve(Data)
    try:
        url = f"http://bob:V4lid8%2FSecret@127.0.0.1:{srv.server_port}/data.npz"
        res = invoke("validate", session, "-c", str(cfg), "--round", "1", "--data", f"npz:{url}", "--json")
        assert res.exit_code == 0, res.output
        assert Data.seen and "V4lid8" not in res.output
        found = [v for v in store.model(session, 1)["validations"].values() if v["request"].get("path")]
        assert [v["request"]["path"] for v in found] == [url.replace("bob:V4lid8%2FSecret@", "")]
        assert "V4lid8" not in json.dumps(found)
    finally:
        srv.shutdown()
        srv.server_close()


def test_every_model_records_its_trail(trained):
    from flcommon import trail as model_trail
    cfg, store, session = trained
    spec = store.session(session)["spec"]
    models = list(store.db[fs.MODELS].find({"session": session}).sort("round", 1))
    functions = Path(__file__).resolve().parent.parent / "functions"
    first = models[0]["trail"]
    assert first["parent"] is None and first["function"] == "fl_server_init" and first["updates"] == 0
    assert first["code_hash"] == model_trail.code_hash(str(functions / "fl_server_init"))
    for prev, m in zip(models, models[1:]):
        t = m["trail"]
        assert t["parent"] == prev["round"] and t["parent_blob"] == prev["blob_id"]
        assert t["function"] == "fl_server_aggregator" and t["strategy"] == spec["strategy"]
        # The code that ran is this checkout's (no user module): the same hash, computed here.
        assert t["code_hash"] == model_trail.code_hash(str(functions / "fl_server_aggregator"))
        assert t["config_hash"] == model_trail.spec_hash(spec) and t["user_module"] is None
        assert (t["updates"], t["examples"]) == (m["accepted"], m["num_examples"])
    rows = json.loads(invoke("list", session, "-c", str(cfg), "--json").output)["models"]
    assert rows[2]["trail"]["parent"] == 1 and rows[2]["trail"]["code_hash"] == models[2]["trail"]["code_hash"]


def test_report_shows_validations(trained, tmp_path):
    cfg, store, session = trained
    res = invoke("validate", session, "-c", str(cfg), "--round", "2", "--data", "digits", "--json")
    assert res.exit_code == 0, res.output
    acc = json.loads(res.stdout)["metrics"]["accuracy"]
    assert "local services are left running" in res.stderr and "fedkeeper fabric down" in res.stderr
    out = CliRunner().invoke(cli, ["report", session, "-c", str(cfg), "-o", str(tmp_path / "r"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = report["sessions"][0]["validations"]
    assert {"model": 2, "data": "digits", "accuracy": acc} == {k: rows[-1][k] for k in ("model", "data", "accuracy")}
    assert all(r["model"] in (1, 2) for r in rows)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "validations (fedkeeper model validate)" in html and "digits" in html


def test_report_logs_sessions_as_mlflow_runs(trained, tmp_path):
    from mlflow.tracking import MlflowClient
    cfg, store, session = trained
    uri = (tmp_path / "mlruns").as_uri()
    for _ in range(2):  # logging again replaces the session's run
        res = CliRunner().invoke(cli, ["report", session, "-c", str(cfg), "-o", str(tmp_path / "r"), "--mlflow", uri])
        assert res.exit_code == 0, res.output
        assert f"logged {session} as MLflow run" in res.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("models")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`fedkeeper.session` = '{session}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == session
    params = run.data.params
    assert params["model"] == "small" and params["strategy.name"] == "fedavg" and params["clients"] == "4"
    assert params["training.rounds"] == "2" and params["mode"] == "sync"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    stored = {r: store.model(session, r)["metrics"]["accuracy"] for r in (1, 2)}
    assert {m.step: m.value for m in history} == stored
    names = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert names == {"model/final.npz", "model/final.keras", "model/final_trail.json"}


def test_a_report_that_fails_midway_keeps_the_sessions_earlier_mlflow_run(trained, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    cfg, store, session = trained
    uri = (tmp_path / "mlruns").as_uri()
    args = ["report", session, "-c", str(cfg), "-o", str(tmp_path / "r"), "--mlflow", uri]
    assert CliRunner().invoke(cli, args).exit_code == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("models")
    query = f"tags.`fedkeeper.session` = '{session}'"
    (first,) = client.search_runs([exp.experiment_id], filter_string=query)

    def unavailable(self, *a, **kw):
        raise MlflowException("artifact store unavailable")
    monkeypatch.setattr(MlflowClient, "log_artifact", unavailable)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "artifact store unavailable" in res.output and "Traceback" not in res.output
    runs = client.search_runs([exp.experiment_id], filter_string=query)
    assert [r.info.run_id for r in runs] == [first.info.run_id] and runs[0].info.status == "FINISHED"
