"""The FL functions through their real entries against a real store
(SecantusDB): tokens on both entries, the error rule, payload sizes of every
function, an init -> client -> aggregate round trip, and fl_invoker."""
from __future__ import annotations

import http.server
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from flcommon import store as fs
from flcommon.auth import signed
from flcommon.data_url import BOUND_KEY
from flcommon.entry import BadRequest, Crash, http_main, openwhisk_main

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"
SECRET = "s3cret-for-tests"
LIMIT = 16 * 1024


def load(name: str, module: str | None = None):
    """A function's logic module, loaded from its folder as the platforms do."""
    path = FUNCTIONS / name / f"{module or name}.py"
    spec = importlib.util.spec_from_file_location(f"_fn_{name}_{module or name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bound_for(db, **extra) -> dict[str, str]:
    """What a deploy binds to a function (FK_FUNCTION, its name, when given)."""
    return {"FK_STORE_URL": _url_of(db), "FK_STORE_DB": db.name, "FK_TOKEN_SECRET": SECRET, **extra}


def _url_of(db) -> str:
    host, port = db.client.address
    return f"mongodb://{host}:{port}/"


def call(name: str, db, bound_extra: dict | None = None, **payload) -> dict:
    """Through the OpenWhisk entry, as a real action gets it (bound keys and
    __OW_* keys merged into args); both directions must stay under 16 KB."""
    body = signed(SECRET, {"function": name, **payload})
    request = json.dumps(body)
    assert len(request) < LIMIT, f"{name} request is {len(request)} bytes"
    args = {**bound_for(db, FK_FUNCTION=name, **(bound_extra or {})), "__OW_ACTIVATION_ID": "a1", **body}
    out = openwhisk_main(load(name).handle, args)
    size = len(json.dumps(out))
    assert size < LIMIT, f"{name} response is {size} bytes"
    return out


def make_session(db, clients: int = 3, model: str = "small", **spec) -> str:
    sid = f"s-{db.name}"
    db[fs.SESSIONS].insert_one({"_id": sid, "spec": {
        "model": model, "data": {"dataset": "digits"}, "partition": {"method": "iid"},
        "clients": [f"client_{i}" for i in range(clients)], "seed": 1, "optim": "adam", "lr": 0.01,
        "momentum": 0.0, "local_epochs": 2, "batch_size": 16, "strategy": "fedavg", **spec}})
    return sid


def wsgi_request(body=None, data: bytes | None = None) -> Request:
    if data is not None:
        return Request(EnvironBuilder(method="POST", data=data, content_type="application/json").get_environ())
    return Request(EnvironBuilder(method="POST", json=body).get_environ())


# ---------------------------------------------------------------- entries

def test_openwhisk_entry_verifies_tokens(fn_db):
    handle = load("nodeinfo").handle
    bound = bound_for(fn_db)
    good = signed(SECRET, {"function": "nodeinfo", "session": "s", "round": 0})
    out = openwhisk_main(handle, {**bound, "__OW_API_KEY": "k:v", **good})
    assert "hostname" in out and not any(SECRET in str(v) for v in out.values())
    forged = dict(good, round=1)  # an id changed after signing
    assert openwhisk_main(handle, {**bound, **forged})["error"].startswith("unauthorized")
    assert "no token" in openwhisk_main(handle, {**bound, "session": "s", "round": 0})["error"]
    other = signed("another-secret", {"function": "nodeinfo", "session": "s", "round": 0})
    assert "unauthorized" in openwhisk_main(handle, {**bound, **other})["error"]
    # No secret bound at all: everything is refused.
    assert "unauthorized" in openwhisk_main(handle, {**good})["error"]


def test_a_token_is_good_only_for_the_function_it_was_issued_for(fn_db):
    """A payload signed for nodeinfo, replayed to fl_server_init, is refused."""
    for_probe = signed(SECRET, {"function": "nodeinfo", "session": "s", "round": 0})
    out = openwhisk_main(load("fl_server_init").handle, {**bound_for(fn_db, FK_FUNCTION="fl_server_init"),
                                                         **for_probe})
    assert out["error"] == "unauthorized: the token was issued for another function than fl_server_init"
    out = openwhisk_main(load("nodeinfo").handle, {**bound_for(fn_db, FK_FUNCTION="nodeinfo"), **for_probe})
    assert "hostname" in out


@pytest.mark.parametrize("token", ["\u00e9" * 64, "A" * 64, "0" * 63, 7])
def test_a_token_that_is_not_one_is_refused_not_a_crash(fn_db, token):
    """compare_digest raises on non-ASCII text: such a token was a crash (a
    500 tagged crash on HTTP, an action developer error on OpenWhisk)."""
    handle = load("nodeinfo").handle
    payload = {**bound_for(fn_db), "function": "nodeinfo", "session": "s", "round": 0, "token": token}
    assert openwhisk_main(handle, payload)["error"].startswith("unauthorized")
    body, status, _ = http_main(handle, wsgi_request({k: v for k, v in payload.items() if not k.startswith("FK_")}))
    assert status == 401, body


def test_a_payload_too_deep_to_sign_is_refused_not_a_crash(fn_db):
    deep: object = 1
    for _ in range(2000):
        deep = [deep]
    payload = {**bound_for(fn_db), "session": "s", "round": 0, "x": deep, "token": "0" * 64}
    assert openwhisk_main(load("nodeinfo").handle, payload)["error"].startswith("unauthorized")


def test_error_rule_bad_input_is_an_error_result_a_crash_propagates(fn_db):
    bound = bound_for(fn_db)
    body = signed(SECRET, {"session": "s", "round": 0})

    def bad(payload, bound):
        raise BadRequest(f"no such thing (store {bound['FK_STORE_URL']})")

    def crash(payload, bound):
        raise ZeroDivisionError("bug")

    out = openwhisk_main(bad, {**bound, **body})
    assert out["error"].startswith("bad request: no such thing")
    assert bound["FK_STORE_URL"] not in out["error"]  # bound values are never echoed
    with pytest.raises(ZeroDivisionError):  # OpenWhisk: "action developer error"
        openwhisk_main(crash, {**bound, **body})

    def leaky_crash(payload, bound):
        raise OSError(f"cannot reach {bound['FK_STORE_URL']}")

    def chained_crash(payload, bound):
        try:
            raise OSError(f"cannot reach {bound['FK_STORE_URL']}")
        except OSError:
            raise RuntimeError("giving up")   # chained: the traceback quotes the OSError

    def credential_crash(payload, bound):
        raise ValueError("download as bob with password hunter2pw failed")

    # A crash that quotes a bound value still propagates, without the value:
    # in its own text, in an exception it was raised from, or as a piece of
    # the bound data credentials.
    with_creds = {**bound, BOUND_KEY: json.dumps({"https://h": "bob:hunter2pw"})}
    for fn, words in ((leaky_crash, "OSError: cannot reach ***"), (chained_crash, "RuntimeError: giving up"),
                      (credential_crash, "ValueError: download as bob with password *** failed")):
        with pytest.raises(Crash) as err:
            openwhisk_main(fn, {**with_creds, **body})
        assert str(err.value) == words if fn is not leaky_crash else str(err.value).startswith(words)
        assert bound["FK_STORE_URL"] not in str(err.value) and "hunter2pw" not in str(err.value)


def test_non_finite_numbers_in_a_result_become_null_on_both_entries(fn_db, monkeypatch):
    """A diverged loss is NaN: the result must stay strict JSON, which
    OpenWhisk requires, and say nothing it does not know."""
    bound = bound_for(fn_db)
    for k, v in bound.items():
        monkeypatch.setenv(k, v)
    body = signed(SECRET, {"session": "s", "round": 0})

    def diverged(payload, bound):
        return {"num_examples": 10, "metrics": {"loss": float("nan"), "accuracy": 0.5,
                                                "history": [float("inf"), 1.0, float("-inf")]}}
    expected = {"num_examples": 10, "metrics": {"loss": None, "accuracy": 0.5, "history": [None, 1.0, None]}}
    assert openwhisk_main(diverged, {**bound, **body}) == expected
    text, status, _ = http_main(diverged, wsgi_request(body))
    assert status == 200 and json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}")) == expected


def test_http_entry_statuses(fn_db, monkeypatch):
    for k, v in bound_for(fn_db).items():
        monkeypatch.setenv(k, v)
    handle = load("nodeinfo").handle
    good = signed(SECRET, {"function": "nodeinfo", "session": "s", "round": 0})
    body, status, headers = http_main(handle, wsgi_request(good))
    assert status == 200 and "hostname" in json.loads(body) and headers["Content-Type"] == "application/json"
    body, status, _ = http_main(handle, wsgi_request(dict(good, session="t")))
    assert status == 401 and json.loads(body)["error"].startswith("unauthorized")
    _, status, _ = http_main(handle, wsgi_request({"function": "nodeinfo"}))
    assert status == 401
    body, status, _ = http_main(handle, wsgi_request(data=b"[1, 2]"))
    assert status == 400 and "JSON object" in json.loads(body)["error"]
    _, status, _ = http_main(handle, wsgi_request(data=b"{not json"))
    assert status == 400
    deep = b'{"session": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    body, status, _ = http_main(handle, wsgi_request(data=deep))
    assert status == 400 and "JSON object" in json.loads(body)["error"]

    def bad(payload, bound):
        raise BadRequest("wrong")

    def crash(payload, bound):
        raise RuntimeError(f"lost {bound['FK_TOKEN_SECRET']}")

    body, status, _ = http_main(bad, wsgi_request(good))
    assert status == 400 and json.loads(body)["error"] == "bad request: wrong"
    body, status, headers = http_main(crash, wsgi_request(good))
    # A crash answers like functions-framework's own crash handler, with JSON.
    assert status == 500 and headers["X-Google-Status"] == "crash"
    assert json.loads(body)["error"].startswith("crash: RuntimeError") and SECRET not in body


# Fields out of their bounds, each refused by every function as bad input.
OUT_OF_BOUNDS = [
    {"round": 10**20}, {"round": -1}, {"round": True}, {"round": 1.0}, {"round": float("inf")}, {"round": "3"},
    {"attempt": 10**20}, {"attempt": 0}, {"client": "x" * 300}, {"client": "a\nb"}, {"session": ""},
    {"session": {"$ne": None}}, {"clients": ["client_0", 7]}, {"clients": "client_0"},
    {"stale": [{"client": "client_0", "round": 10**20}]}, {"stale": [{"client": "client_0"}]},
    {"rounds": [0, 10**20]}, {"rounds": [3, 1]}, {"k": 10**20}, {"k": 0},
    {"calls": [{"client": "client_0", "attempt": 10**20, "token": "t"}]},
]
VALID_PAYLOADS = {
    "fl_client": {"session": "s", "round": 0, "client": "client_0", "attempt": 1},
    "fl_server_init": {"session": "s", "round": 0},
    "fl_server_aggregator": {"session": "s", "round": 1, "clients": ["client_0"]},
    "fl_insights": {"session": "s", "what": "contributions"},
    "fl_invoker": {"session": "s", "round": 0, "target": "fl_client",
                   "calls": [{"client": "client_0", "attempt": 1, "token": "t"}]},
    "nodeinfo": {"session": "s", "round": 0},
}


@pytest.mark.parametrize("name", sorted(VALID_PAYLOADS))
def test_every_function_refuses_out_of_bounds_fields_before_touching_the_store(name, monkeypatch):
    """No store is bound: a function that reached its store would crash
    (RuntimeError: FK_STORE_URL is not bound) instead of answering."""
    handle = load(name).handle
    bound = {"FK_TOKEN_SECRET": SECRET}
    for bad in OUT_OF_BOUNDS:
        body = signed(SECRET, {"function": name, **VALID_PAYLOADS[name], **bad})
        out = openwhisk_main(handle, {**bound, **body})
        field = next(iter(bad))
        assert out["error"].startswith(f"bad request: payload field '{field}"), (bad, out)
    # Over HTTP: a 400, not a crash (which the keeper would retry).
    monkeypatch.setenv("FK_TOKEN_SECRET", SECRET)
    body = signed(SECRET, {"function": name, **VALID_PAYLOADS[name], "round": 10**20})
    answer, status, headers = http_main(handle, wsgi_request(body))
    assert status == 400 and "X-Google-Status" not in headers
    assert "'round' must be a whole number from 0 to 1000000" in json.loads(answer)["error"]


def test_functions_framework_serves_the_http_entry(fn_db, monkeypatch):
    """main.py through Google's functions-framework itself (its Flask app)."""
    import functions_framework
    for k, v in bound_for(fn_db).items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(FUNCTIONS / "nodeinfo"))
    app = functions_framework.create_app("nodeinfo", str(FUNCTIONS / "nodeinfo" / "main.py"))
    client = app.test_client()
    good = signed(SECRET, {"function": "nodeinfo", "session": "s", "round": 0})
    first = client.post("/", json=good)
    assert first.status_code == 200, first.data
    second = client.post("/", json=good).get_json()
    assert second["warm"] is True and second["invocations"] >= 2
    assert client.post("/", json=dict(good, token="00")).status_code == 401


def test_every_entry_module_has_both_thin_entries():
    for name in ("fl_server_init", "fl_client", "fl_server_aggregator", "fl_invoker", "nodeinfo"):
        ow = (FUNCTIONS / name / "__main__.py").read_text()
        http = (FUNCTIONS / name / "main.py").read_text()
        assert "def main(args)" in ow and "openwhisk_main(handle, args)" in ow
        assert "@functions_framework.http" in http and f"def {name}(request)" in http


# ---------------------------------------------------------------- nodeinfo

def test_nodeinfo_reports_the_host(fn_db):
    out = call("nodeinfo", fn_db, session="s", round=0)
    for key in ("hostname", "platform", "machine", "cpu_count", "memory_total_mb", "memory_available_mb",
                "python", "process_uptime_s", "pid", "warm"):
        assert key in out
    assert out["cpu_count"] >= 1 and out["memory_total_mb"] > 0


# ---------------------------------------------------------------- training round trip

@pytest.mark.parametrize("kept", ["inline", "blob"])
def test_init_client_aggregate_round_trip(fn_db, monkeypatch, kept):
    """Small updates are kept in their documents; with the inline limit at
    0, every update is a GridFS blob: both aggregate alike."""
    from flcommon import update_data
    if kept == "blob":
        monkeypatch.setattr(update_data, "INLINE_MAX_BYTES", 0)
    db = fn_db
    sid = make_session(db)
    init = call("fl_server_init", db, session=sid, round=0, client=None, attempt=1)
    assert init["num_clients"] == 3 and init["num_params"] > 0 and init["model_bytes"] == 4 * init["num_params"]
    assert init["partition_sizes"]["min"] >= 1
    assert call("fl_server_init", db, session=sid, round=0, attempt=2)["reused"]  # idempotent
    assert db[fs.PARTITIONS].count_documents({"session": sid}) == 4  # 3 clients + "_test"
    accs = []
    for rnd in range(2):
        for c in range(3):
            out = call("fl_client", db, session=sid, round=rnd, client=f"client_{c}", attempt=1)
            assert out["num_examples"] > 0 and not out["duplicate"]
            assert set(out["metrics"]) == {"loss", "accuracy"}
            assert set(out["timings"]) == {"load_ms", "train_ms", "store_ms"}
        # A second attempt of a client in the same round is never counted twice.
        again = call("fl_client", db, session=sid, round=rnd, client="client_0", attempt=2)
        assert again["duplicate"] is True and again["timings"]["train_ms"] == 0.0   # found, not trained
        assert again["stored_by"] == 1          # the attempt whose update it found
        # A first attempt delivered twice trains again (it does not look
        # first), and its second update is refused and its blob deleted.
        twice = call("fl_client", db, session=sid, round=rnd, client="client_1", attempt=1)
        assert twice["duplicate"] is True and twice["timings"]["train_ms"] > 0
        assert twice["stored_by"] == 1          # refused at the insert, it still says whose update won
        assert db[fs.UPDATES].count_documents({"session": sid, "round": rnd}) == 3
        blobs = db["blobs.files"].count_documents({"metadata.kind": "update", "metadata.round": rnd})
        docs = list(db[fs.UPDATES].find({"session": sid, "round": rnd}))
        if kept == "blob":   # the refused duplicate's blob was deleted
            assert blobs == 3 and all(d.get("blob_id") and "data" not in d for d in docs)
        else:                # one document each, no blob
            assert blobs == 0 and all(d.get("blob_id") is None and len(d["data"]) == d["length"] for d in docs)
        agg = call("fl_server_aggregator", db, session=sid, round=rnd, clients=[f"client_{c}" for c in range(3)])
        assert agg["accepted"] == 3 and agg["rejected"] == [] and agg["model_round"] == rnd + 1
        # Idempotent: a retried aggregation returns the stored result.
        assert call("fl_server_aggregator", db, session=sid, round=rnd,
                    clients=[f"client_{c}" for c in range(3)]) == agg
        accs.append(agg["accuracy"])
    assert accs[-1] > 0.5  # 10 classes: far above chance
    assert [d["round"] for d in db[fs.MODELS].find({"session": sid}).sort("round")] == [0, 1, 2]
    updates = list(db[fs.UPDATES].find({"session": sid}))
    assert all(u["status"] == "received" and u["metrics"]["loss"] > 0 for u in updates)
    counted = sorted((c["client"], c["round"]) for m in db[fs.MODELS].find({"session": sid, "round": {"$gt": 0}})
                     for c in m["contributions"])
    assert counted == sorted((u["client"], u["round"]) for u in updates) and len(counted) == 6
    # Bad input is refused with a reason, not a crash.
    assert "not a client" in call("fl_client", db, session=sid, round=0, client="client_9", attempt=1)["error"]
    assert "no global model" in call("fl_client", db, session=sid, round=7, client="client_1", attempt=1)["error"]
    assert "no session" in call("fl_client", db, session="nope", round=0, client="client_1", attempt=1)["error"]
    assert "'attempt'" in call("fl_client", db, session=sid, round=0, client="client_1")["error"]


def test_an_aggregate_that_is_not_finite_fails_the_round_and_is_not_stored(fn_db):
    db = fn_db
    sid = make_session(db, strategy={"name": "fedavg", "server_lr": 1e300})
    call("fl_server_init", db, session=sid, round=0, attempt=1)
    for c in range(3):
        call("fl_client", db, session=sid, round=0, client=f"client_{c}", attempt=1)
    agg = call("fl_server_aggregator", db, session=sid, round=0, clients=[f"client_{c}" for c in range(3)])
    assert "the aggregate holds NaN or inf (fedavg); the model is not stored" in agg["error"]
    assert db[fs.MODELS].count_documents({"session": sid, "round": 1}) == 0
    assert db["blobs.files"].count_documents({"metadata.kind": "model", "metadata.round": 1}) == 0


def test_init_refuses_bad_specs(fn_db):
    sid = make_session(fn_db, model="resnet")
    assert "model must be one of" in call("fl_server_init", fn_db, session=sid, round=0)["error"]
    fn_db[fs.SESSIONS].insert_one({"_id": "obj", "spec": {"model": "nn", "clients": ["a"], "data": {
        "dataset": "fedkeeper_obj", "train_images_url": "https://example.org/mnist_train_img.obj"}}})
    assert "numpy.savez" in call("fl_server_init", fn_db, session="obj", round=0)["error"]


# ---------------------------------------------------------------- fl_invoker

class _Recorder(http.server.BaseHTTPRequestHandler):
    """Stands in for a client function's URL: records what arrives."""
    received: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.headers.get("Function-Execution-Id"), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class _RecorderServer(http.server.ThreadingHTTPServer):
    # The invoker opens up to 32 connections at once. With the default
    # backlog of 5, Linux drops handshakes it cannot queue: a client may
    # then send into a connection the server later forgets, as a real
    # function front end (whose backlog is large) would not.
    request_queue_size = 128


def test_invoker_fans_out_over_http_and_records_platform_ids(fn_db):
    db = fn_db
    _Recorder.received = []
    srv = _RecorderServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sid = "inv"
        calls = []
        for i in range(30):
            db[fs.INVOCATIONS].insert_one({"session": sid, "round": 3, "client": f"client_{i}", "attempt": 1,
                                           "state": "submitting"})
            calls.append(signed(SECRET, {"function": "fl_client", "session": sid, "round": 3,
                                         "client": f"client_{i}", "attempt": 1}))
        out = call("fl_invoker", db, {"FK_CLIENT_URL": f"http://127.0.0.1:{srv.server_port}/"},
                   session=sid, round=3, target="fl_client", calls=calls)
        assert out == {"invoked": 30, "failed": []}
        # Every request was sent before the invoker answered (it reads the
        # answers in the background), so every one arrives.
        deadline = time.monotonic() + 10
        while len(_Recorder.received) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_Recorder.received) == 30
        by_client = {b["client"]: (eid, b) for eid, b in _Recorder.received}
        for doc in db[fs.INVOCATIONS].find({"session": sid}):
            eid, body = by_client[doc["client"]]
            assert doc["state"] == "running" and doc["via"] == "invoker" and doc["platform_id"] == eid
            assert body == next(c for c in calls if c["client"] == doc["client"])  # forwarded untouched
    finally:
        srv.shutdown()
        srv.server_close()
    # A target nobody listens on: reported per client, not a crash.
    out = call("fl_invoker", db, {"FK_CLIENT_URL": f"http://127.0.0.1:{srv.server_port}/"},
               session="inv", round=4, target="fl_client", calls=calls[:2])
    assert out["invoked"] == 0 and len(out["failed"]) == 2 and "Connection" in out["failed"][0]["error"]
    # Without any way to invoke, the request is refused.
    assert "no way to invoke" in call("fl_invoker", db, session="inv", round=4, target="fl_client",
                                      calls=calls[:1])["error"]
    assert "signed client payloads" in call("fl_invoker", db, {"FK_CLIENT_URL": "http://127.0.0.1:9/"},
                                            session="inv", round=4, target="fl_client",
                                            calls=[{"client": "x"}])["error"]
