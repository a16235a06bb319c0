"""Prometheus metrics end to end: a real Prometheus server (Debian's
`prometheus`) on 127.0.0.1 scrapes the local fabric's /metrics and a
KeeperMetrics endpoint while invocations (with injected crashes, timeouts
and throttles) run through the OpenWhisk provider. What Prometheus answers
must equal what the `invocations` documents in a real MongoDB-wire server
say about the same attempts."""
from __future__ import annotations

import bisect
import math
import shutil
import socket
import subprocess
import textwrap
import time
import uuid
from types import SimpleNamespace

import pytest
import requests

from fedkeeper.config import FaultConfig, OpenWhiskCluster, PrometheusConfig, Providers
from fedkeeper.keeper import RoundReport
from fedkeeper.metrics import KeeperMetrics, fan_out, metrics_for_config
from fedkeeper.providers.openwhisk.metrics import cluster_report, selector
from fedkeeper.providers import make_provider
from fedkeeper.providers.base import ErrorClass, FunctionSpec, ProviderContext, ProviderError
from fedkeeper.local import fabric
from fedkeeper.local.fabric import UserEvents
from fixtures_fabric import ECHO, make_artifact
from scripted_http import json_answer, server_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(90)

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the `prometheus` server binary is not installed "
                               "(scripts/test installs it: apt-get install -y prometheus)")

# What OpenWhisk's events call each outcome of an attempt.
STATUS_OF = {None: "success", "application_error": "application_error",
             "developer_error": "action_developer_error", "timeout": "action_developer_error",
             "platform_error": "whisk_internal_error"}
BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)


# --------------------------------------------------------------------------- no server needed

def test_user_events_exposition_has_openwhisk_names_labels_and_buckets():
    ev = UserEvents()
    ev.activation("ns", "ns", "act", "python:3", 256, 0, 12, 3, 150, 40, None)
    ev.activation("ns", "ns", "act", "python:3", 256, 1, 2000, 0, None, 40, None)
    ev.activation("ns", "ns", "act", "python:3", 256, 2, 5, 0, None, 40, 503)
    ev.limit("ns", concurrent=True)
    text = ev.exposition().decode()
    lbl = 'action="act",initiator="ns",namespace="ns"'
    for line in (
        "# TYPE openwhisk_action_activations_total counter",
        f'openwhisk_action_activations_total{{action="act",initiator="ns",kind="python:3",memory="256",'
        f'namespace="ns"}} 3.0',
        "# TYPE openwhisk_action_coldStarts_total counter",
        f"openwhisk_action_coldStarts_total{{{lbl}}} 1.0",
        # the bare counter names OpenWhisk's Java client writes
        "# TYPE openwhisk_action_status counter",
        f'openwhisk_action_status{{{lbl},status="success"}} 1.0',
        f'openwhisk_action_status{{{lbl},status="application_error"}} 1.0',
        f'openwhisk_action_status{{{lbl},status="action_developer_error"}} 1.0',
        f'openwhisk_action_status{{{lbl},status="whisk_internal_error"}} 0.0',
        "# TYPE openwhisk_action_status_code counter",
        f'openwhisk_action_status_code{{{lbl},status_code="503"}} 1.0',
        "# TYPE openwhisk_action_duration_seconds histogram",
        *(f'openwhisk_action_duration_seconds_bucket{{action="act",initiator="ns",le="{le}",'
          f'namespace="ns"}} {n}'
          for le, n in (("0.005", "1.0"), ("0.025", "2.0"), ("2.5", "3.0"), ("+Inf", "3.0"))),
        f"openwhisk_action_duration_seconds_count{{{lbl}}} 3.0",
        f"openwhisk_action_duration_seconds_sum{{{lbl}}} 2.017",
        f"openwhisk_action_initTime_seconds_count{{{lbl}}} 1.0",
        f"openwhisk_action_waitTime_seconds_count{{{lbl}}} 3.0",
        f'openwhisk_action_response_size_bytes_bucket{{action="act",initiator="ns",le="1048576.0",'
        f'namespace="ns"}} 3.0',
        f"openwhisk_action_memory{{{lbl}}} 256.0",
        'openwhisk_action_limit_concurrent_total{namespace="ns"} 1.0',
        'openwhisk_action_limit_timed_total{namespace="ns"} 0.0',
    ):
        assert line + "\n" in text, line
    # the Python client's OpenMetrics-only series would be new series to an operator
    assert "_created" not in text and "openwhisk_action_status_total" not in text


def test_keeper_metrics_listener_without_a_server():
    km = KeeperMetrics()
    progress = fan_out(lambda k, d: 1 / 0, km)   # a failing listener does not stop the others
    progress("session", {"session": "s1", "resumed": False})
    progress("session", {"session": "s2", "resumed": True})
    progress("tick", {"round": 3, "delivered": 2, "failed": 1, "running": 4, "waiting": 0, "retrying": 1})
    progress("round", {"report": RoundReport(3, 7, 6, 1, 2, 12.5, accuracy=0.8, loss=0.4), "rounds": 10})
    progress("round", {"report": None, "rounds": 10})   # malformed data is ignored, never raised
    km.record_attempt("a", "openwhisk", "failed", ErrorClass.TIMEOUT, 1.5, True, function="fl_client")
    v = km.registry.get_sample_value
    assert v("fedkeeper_session_info", {"session": "s2", "resumed": "true"}) == 1
    assert v("fedkeeper_session_info", {"session": "s1", "resumed": "false"}) is None
    assert v("fedkeeper_round") == 3 and v("fedkeeper_rounds_planned") == 10
    assert v("fedkeeper_round_clients", {"state": "running"}) == 4
    assert v("fedkeeper_rounds_completed_total") == 1 and v("fedkeeper_retries_total") == 2
    assert v("fedkeeper_model_accuracy") == 0.8 and v("fedkeeper_model_loss") == 0.4
    assert v("fedkeeper_round_duration_seconds_sum") == 12.5
    assert v("fedkeeper_invocations_total", {"cluster": "a", "platform": "openwhisk", "function": "fl_client",
                                             "state": "failed", "error_class": "timeout"}) == 1
    assert v("fedkeeper_cold_starts_total",
             {"cluster": "a", "platform": "openwhisk", "function": "fl_client"}) == 1


def test_selector_escapes_label_values():
    assert selector("a\"b", ["x.y", "z"]) == '{namespace="a\\"b",action=~"x\\\\.y|z"}'
    assert selector() == "{}"
    with pytest.raises(ValueError):
        cluster_report("http://127.0.0.1:1", window="1 hour")


# --------------------------------------------------------------------------- with Prometheus

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except requests.RequestException as exc:
            last = exc
        if last is True or (last and not isinstance(last, Exception)):
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout_s}s (last: {last!r})")


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    d = tmp_path_factory.mktemp("promstate")
    yield d
    fabric.fabric_down(d / "fabric")


@pytest.fixture(scope="module")
def keeper_metrics():
    km = KeeperMetrics()
    km.start(0)
    yield km
    km.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, state, keeper_metrics):
    if PROMETHEUS is None:
        pytest.skip("the `prometheus` server binary is not installed "
                    "(scripts/test installs it: apt-get install -y prometheus)")
    info = fabric.fabric_up(state / "fabric")
    d = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    # Scrapes only loopback targets; no alertmanager, remote write or rules:
    # nothing leaves the machine.
    (d / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: fabric
    static_configs: [{{targets: ["127.0.0.1:{info['port']}"]}}]
  - job_name: keeper
    static_configs: [{{targets: ["127.0.0.1:{keeper_metrics.port}"]}}]
""")
    log = open(d / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: proc.poll() is None and requests.get(f"{url}/-/ready", timeout=1).status_code == 200,
              20, "Prometheus ready")
        yield url
    finally:
        # Its database is thrown away: no need for a clean shutdown.
        proc.kill()
        proc.wait()
        log.close()


def _query(url: str, q: str) -> list[dict]:
    r = requests.get(f"{url}/api/v1/query", params={"query": q}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(url: str, q: str) -> float | None:
    res = _query(url, q)
    return float(res[0]["value"][1]) if res else None


def _by(url: str, q: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in _query(url, q)}


def _histogram_quantile(q: float, values: list[float]) -> float:
    """Prometheus's histogram_quantile over OpenWhisk's buckets for these
    observations: linear interpolation inside the bucket the rank falls in."""
    counts = [0] * len(BUCKETS)
    for v in values:
        counts[bisect.bisect_left(BUCKETS, v)] += 1
    cum, acc = [], 0
    for c in counts:
        acc += c
        cum.append(acc)
    rank = q * cum[-1]
    b = bisect.bisect_left(cum, rank)
    if b == len(BUCKETS) - 1:
        return BUCKETS[-2]
    start = 0.0 if b == 0 else BUCKETS[b - 1]
    below = 0 if b == 0 else cum[b - 1]
    return start + (BUCKETS[b] - start) * ((rank - below) / (cum[b] - below))


def _run(provider, cluster: str, session: str, first: int, n: int, args_for) -> list[dict]:
    """n invocations of echo, tracked to the end; one `invocations` document each."""
    docs, invs = [], {}
    for i in range(n):
        doc = {"session": session, "round": 1, "client": f"client_{first + i}", "attempt": 1,
               "cluster": cluster, "platform": provider.platform, "function": "echo", "platform_id": None}
        try:
            inv = provider.invoke("echo", {"i": i, **args_for(i)})
        except ProviderError as exc:
            # Answered before an activation existed (429): no record, no event.
            assert exc.error_class == ErrorClass.THROTTLED, exc
            doc.update(state="failed", error_class=exc.error_class.value)
        else:
            doc["platform_id"] = inv.platform_id
            invs[inv.platform_id] = (inv, doc)
        docs.append(doc)
    deadline = time.monotonic() + 30
    while invs and time.monotonic() < deadline:
        for out in provider.track([v[0] for v in invs.values()]):
            _, doc = invs.pop(out.platform_id)
            doc.update(state="succeeded" if out.ok else ("timed_out" if out.error_class == ErrorClass.TIMEOUT
                                                         else "failed"),
                       error_class=out.error_class.value if out.error_class else None,
                       start=out.start, end=out.end, duration_ms=out.duration_ms, wait_ms=out.wait_ms,
                       init_ms=out.init_ms, cold_start=out.cold_start)
        time.sleep(0.01)
    assert not invs, f"{len(invs)} activations never finished"
    return docs


@needs_prometheus
def test_prometheus_sees_what_the_invocation_records_say(prometheus, state, keeper_metrics, store):
    ctx = ProviderContext(state_dir=state)
    # Two clusters on the one fabric (two namespaces); faults on the first.
    faults = FaultConfig(crash=0.15, timeout_instant=0.1, throttle=0.1, seed=11)
    clusters = {"ow-a": OpenWhiskCluster(kind="local", faults=faults),
                "ow-b": OpenWhiskCluster(kind="local")}
    providers = {name: make_provider(name, "openwhisk", c, ctx) for name, c in clusters.items()}
    session = uuid.uuid4().hex[:12]
    km = keeper_metrics
    km("session", {"session": session, "resumed": False})
    try:
        spec = FunctionSpec(name="echo", source="echo", timeout_s=10, concurrency=4)
        for name, p in providers.items():
            res = p.deploy(spec, make_artifact(ECHO))
            km("deployed", {"cluster": name, "function": "echo", "skipped": res.skipped, "error": None})
        t0 = time.monotonic()
        docs = _run(providers["ow-a"], "ow-a", session, 0, 30,
                    lambda i: {"fail": "no"} if i % 7 == 3 else {"sleep": 0.002 * (i % 5)})
        docs += _run(providers["ow-b"], "ow-b", session, 30, 16,
                     lambda i: {"sleep": 0.03 if i % 4 == 0 else 0} if i % 5 else {"fail": "no"})
        store.insert_attempts(docs)
        for d in docs:
            km.record_attempt(d["cluster"], d["platform"], d["state"], d.get("error_class"),
                              d["duration_ms"] / 1000 if d.get("duration_ms") is not None else None,
                              d.get("cold_start"), function=d["function"])
        km("tick", {"round": 1, "delivered": 40, "failed": 6, "running": 0, "waiting": 0, "retrying": 0})
        km("round", {"report": RoundReport(1, 46, 40, 6, 3, time.monotonic() - t0, accuracy=0.5, loss=1.25),
                     "rounds": 1})
        _check(prometheus, store, session, providers["ow-b"])
    finally:
        for p in providers.values():
            p.close()


def _check(url: str, store, session: str, ow_b) -> None:
    # What the records say, from the store.
    recs = list(store.db["invocations"].find({"session": session}))
    assert len(recs) == 46
    expect: dict[str, dict] = {}
    for c in ("ow-a", "ow-b"):
        mine = [r for r in recs if r["cluster"] == c]
        ran = [r for r in mine if r.get("platform_id")]
        status: dict[str, int] = {}
        for r in ran:
            s = STATUS_OF[r.get("error_class")]
            status[s] = status.get(s, 0) + 1
        expect[c] = {"activations": len(ran), "throttled": len(mine) - len(ran),
                     "cold": sum(1 for r in ran if r["cold_start"]), "status": status,
                     "durations": [r["duration_ms"] / 1000 for r in ran],
                     "wait_s": sum(r["wait_ms"] for r in ran) / 1000,
                     "init_s": sum(r["init_ms"] for r in ran if r["cold_start"]) / 1000}
    a, b = expect["ow-a"], expect["ow-b"]
    # The faults and failures really happened, so the comparison means something.
    assert a["throttled"] >= 1 and a["status"].get("action_developer_error", 0) >= 2
    assert a["status"].get("application_error", 0) >= 1 and b["status"].get("application_error", 0) >= 1
    assert a["cold"] >= 2 and b["cold"] >= 1

    total = a["activations"] + b["activations"]
    # Bounded wait for the first scrapes that carry the final counts.
    _wait(lambda: _scalar(url, 'sum(openwhisk_action_activations_total{namespace=~"ow-a|ow-b"})') == total,
          20, "fabric scrape with the final activation count")
    _wait(lambda: _scalar(url, "sum(fedkeeper_invocations_total)") == len(recs)
          and _scalar(url, "fedkeeper_rounds_completed_total") == 1, 20,
          "keeper scrape with the final counts")

    for ns, e in expect.items():
        sel = f'{{namespace="{ns}",initiator="{ns}",action="echo"}}'
        act = _query(url, f"openwhisk_action_activations_total{sel}")
        assert len(act) == 1
        assert act[0]["metric"]["kind"] == "python:3" and act[0]["metric"]["memory"] == "256"
        assert float(act[0]["value"][1]) == e["activations"]
        assert _scalar(url, f"sum(openwhisk_action_coldStarts_total{sel})") == e["cold"]
        got = {k: v for k, v in _by(url, f"openwhisk_action_status{sel}", "status").items() if v}
        assert got == e["status"], ns
        assert _scalar(url, f"openwhisk_action_duration_seconds_count{sel}") == e["activations"]
        # Sums of the records' own millisecond timings.
        for metric, want in (("duration", sum(e["durations"])), ("waitTime", e["wait_s"]),
                             ("initTime", e["init_s"])):
            got = _scalar(url, f"openwhisk_action_{metric}_seconds_sum{sel}")
            assert got == pytest.approx(want, abs=1e-6), metric
        assert _scalar(url, f"openwhisk_action_initTime_seconds_count{sel}") == e["cold"]
        limited = _scalar(url, f'openwhisk_action_limit_timed_total{{namespace="{ns}"}}')
        assert (limited or 0) == e["throttled"]

        # The report a `fedkeeper metrics` command prints, over all time ...
        rep = cluster_report(url, ns, ["echo"], window=None, cluster=ns)
        errors = e["activations"] - e["status"].get("success", 0)
        assert rep.error is None
        assert (rep.activations, rep.cold_starts, rep.errors) == (e["activations"], e["cold"], errors)
        assert rep.error_rate == pytest.approx(errors / e["activations"])
        assert rep.duration_mean_s == pytest.approx(sum(e["durations"]) / e["activations"], abs=1e-9)
        assert rep.duration_p50_s == pytest.approx(_histogram_quantile(0.5, e["durations"]), abs=1e-9)
        assert rep.duration_p95_s == pytest.approx(_histogram_quantile(0.95, e["durations"]), abs=1e-9)

    # The keeper's own endpoint agrees with the same records.
    for c in ("ow-a", "ow-b"):
        mine = [r for r in recs if r["cluster"] == c]
        by_state = _by(url, f'sum by (state) (fedkeeper_invocations_total{{cluster="{c}"}})', "state")
        want: dict[str, float] = {}
        for r in mine:
            want[r["state"]] = want.get(r["state"], 0) + 1
        assert by_state == want
        assert (_scalar(url, f'sum(fedkeeper_cold_starts_total{{cluster="{c}"}})') or 0) == expect[c]["cold"]
        assert _scalar(url, f'sum(fedkeeper_invocation_duration_seconds_sum{{cluster="{c}"}})') == \
            pytest.approx(sum(expect[c]["durations"]), abs=1e-6)
    assert _scalar(url, "fedkeeper_model_accuracy") == 0.5 and _scalar(url, "fedkeeper_retries_total") == 3
    assert _query(url, "fedkeeper_session_info")[0]["metric"]["session"] == session

    # The same figures for every cluster of a config, in config order.
    cfg = SimpleNamespace(providers=Providers(openwhisk={
        "ow-a": OpenWhiskCluster(kind="local", prometheus_config=PrometheusConfig(url=url)),
        "ow-b": OpenWhiskCluster(kind="local", prometheus_config=PrometheusConfig(
            host="127.0.0.1", port_openwhisk_metrics=int(url.rsplit(":", 1)[1]))),
        "ow-none": OpenWhiskCluster(kind="local")}))
    rows = metrics_for_config(cfg, window=None, actions=["echo"])
    assert [r.cluster for r in rows] == ["ow-a", "ow-b", "ow-none"]
    assert [r.activations for r in rows[:2]] == [a["activations"], b["activations"]]
    assert rows[2].activations is None and rows[2].error is None and "no prometheus" in rows[2].note.lower()
    assert rows[0].row()["cold_starts"] == a["cold"]

    # Over a window, counts are increase(): of a second batch run once
    # Prometheus has the first, all 8 are counted, none of the first 16, plus
    # increase()'s extrapolation: at most half a scrape interval before the
    # first sample and one after the last, over the >= 1 s between them.
    more = _run(ow_b, "ow-b", session, 100, 8, lambda i: {})
    _wait(lambda: _scalar(url, 'sum(openwhisk_action_activations_total{namespace="ow-b"})')
          == b["activations"] + 8, 20, "scrape with the second batch")
    win = cluster_report(url, "ow-b", ["echo"], window="1m", cluster="ow-b")
    assert win.error is None and 8 <= win.activations <= 8 * 2.5, win
    assert win.errors == 0 and win.error_rate == 0 and win.duration_p95_s is not None
    assert all(d["state"] == "succeeded" for d in more)


@needs_prometheus
def test_metrics_endpoint_needs_no_auth_and_reports_unreachable_prometheus(prometheus, state):
    info = fabric.fabric_status(state / "fabric")
    r = requests.get(f"{info['url']}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE openwhisk_action_activations_total counter" in r.text
    # the rest of the API still wants the key
    assert requests.get(f"{info['url']}/api/v1/namespaces/_/actions", timeout=5).status_code == 401
    rep = cluster_report(f"http://127.0.0.1:{_free_port()}", "x", window="1h", timeout_s=2)
    assert rep.activations is None and "cannot reach Prometheus" in rep.error


@needs_prometheus
def test_session_summary_reports_each_clusters_prometheus(prometheus, state, capsys, monkeypatch):
    """After a session, `fedkeeper start` prints what each configured
    Prometheus saw of FedKeeper's functions; clusters without one are left
    out. (The fabric here ran `echo`, which stands for them.)"""
    import fedkeeper.metrics
    from fedkeeper.cli import _session_metrics
    monkeypatch.setattr(fedkeeper.metrics, "fedkeeper_functions", lambda: ["echo"])
    from fedkeeper.config import Config, Scenario
    url = prometheus["url"] if isinstance(prometheus, dict) else prometheus
    port = int(str(url).rsplit(":", 1)[1].rstrip("/"))
    cfg = Config(providers=Providers(openwhisk={
        "ow-b": OpenWhiskCluster(kind="local", prometheus_config=PrometheusConfig(
            host="127.0.0.1", port_openwhisk_metrics=port)),
        "ow-none": OpenWhiskCluster(kind="local")}))
    _session_metrics(cfg, Scenario(functions={"echo": {}}), elapsed_s=3600)
    out = capsys.readouterr().out
    assert "clusters' Prometheus during the session" in out
    assert "ow-b" in out and "ow-none" not in out
    row = next(line for line in out.splitlines() if "ow-b" in line)
    activations = int(float(row.split("│")[2].strip()))
    assert activations > 0


class _PromStub:
    """A Prometheus HTTP API that records each PromQL query and answers a
    fixed scalar per metric name found in it."""

    def __init__(self, answers: dict[str, float]):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit
        self.queries: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, query: str):
                stub.queries.append(query)
                value = next((v for k, v in answers.items() if k in query), None)
                result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self):
                self._answer(parse_qs(urlsplit(self.path).query).get("query", [""])[0])

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self._answer(parse_qs(self.rfile.read(n).decode()).get("query", [""])[0])

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_knative_adapter_reads_queue_proxy_and_activator_metrics():
    from fedkeeper.config import KnativeCluster
    from fedkeeper.providers.knative import KnativeProvider
    stub = _PromStub({'response_code_class="5xx"': 2, "revision_app_request_count": 40,
                      "activator_request_count": 3, "revision_app_request_latencies_sum": 8.0,
                      "revision_app_request_latencies_count": 40, "0.5,": 0.15, "0.95,": 0.5})
    try:
        c = KnativeCluster(namespace="fl", prometheus_config={"url": stub.url})
        row = KnativeProvider.cluster_metrics("kn", c, "1h", ["fl_client"])
    finally:
        stub.close()
    assert row.error is None and row.note is None
    assert (row.activations, row.cold_starts, row.errors) == (40, 3, 2)
    assert row.error_rate == pytest.approx(0.05) and row.duration_mean_s == pytest.approx(0.2)
    assert row.duration_p50_s == pytest.approx(0.15) and row.duration_p95_s == pytest.approx(0.5)
    assert all('namespace_name="fl"' in q and 'service_name=~"fl\\\\-client"' in q for q in stub.queries), stub.queries
    # latencies are exported in ms: sums and quantiles are turned into seconds by the query
    assert all(q.endswith("/ 1000") for q in stub.queries if "latencies_sum" in q or "latencies_bucket" in q)


def test_each_cluster_asks_its_own_platform_and_cloud_functions_is_a_note():
    from fedkeeper.config import parse_config
    from fedkeeper.metrics import metrics_exit_status
    cfg = parse_config("""
providers:
  google:
    gcf: {project: my-project, region: us-central1}
  knative:
    kn: {namespace: fl}
scenarios:
  s: {}
""")
    rows = {r.cluster: r for r in metrics_for_config(cfg, "1h")}
    assert rows["gcf"].error is None and "Cloud Functions has no Prometheus source" in rows["gcf"].note
    assert rows["kn"].error and "no Prometheus configured" in rows["kn"].error
    assert metrics_exit_status(rows.values()) == 1
    assert metrics_exit_status([rows["gcf"]]) == 0


def test_a_local_cluster_without_a_prometheus_is_a_note_on_how_to_get_its_figures():
    """The README's own local config names no Prometheus: `metrics` on it
    said so as an error and exited 1."""
    from fedkeeper.config import parse_config
    from fedkeeper.metrics import metrics_exit_status
    cfg = parse_config(textwrap.dedent("""\
        providers:
          openwhisk:
            ow: {kind: local}
            remote_ow: {base_url: "https://ow.example.org/", auth: {ow_auth: "u:k"}}
        scenarios:
          s: {}
        """))
    rows = {r.cluster: r for r in metrics_for_config(cfg, "1h")}
    assert rows["ow"].error is None and "the local fabric serves OpenWhisk's user-event metrics" in rows["ow"].note
    assert metrics_exit_status([rows["ow"]]) == 0
    assert rows["remote_ow"].error and "no Prometheus configured" in rows["remote_ow"].error


def test_metrics_are_about_every_function_fedkeeper_deploys_not_the_configured_overrides(tmp_path, monkeypatch):
    """The config's `functions` section lists only the functions it
    configures: overriding fl_server_init alone must not leave fl_client out."""
    from click.testing import CliRunner

    import fedkeeper.metrics as metrics
    from fedkeeper.cli import main as cli
    asked = {}

    def fake_metrics(cfg, window, actions=None, clusters=None, timeout_s=10.0):
        asked["actions"] = actions
        return []
    monkeypatch.setattr(metrics, "metrics_for_config", fake_metrics)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: t\nproviders:\n  openwhisk:\n    c1: {kind: local}\nscenarios:\n  federated_learning:\n"
                   "    clients_info: {total_num_clients: 2, num_clients_per_round: 2, ow_clients_count: 2}\n"
                   "    functions: {fl_server_init: {openwhisk: {memory: '512'}}}\n")
    result = CliRunner().invoke(cli, ["metrics", "-c", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    assert {"fl_client", "fl_server_aggregator", "fl_server_init", "nodeinfo", "fl_secagg_client",
            "fl_model_validate", "fl_invoker", "fl_combiner", "fl_insights"} == set(asked["actions"])


def test_a_prometheus_urls_credentials_and_long_answers_stay_out_of_rows_and_errors(server_factory):
    from fedkeeper.providers.prometheus import ClusterMetrics, run_queries
    body = b'{"status": "error", "errorType": "bad_data", "error": "' + b"x" * 5000 + b'"}'
    srv = server_factory(lambda conn, req: json_answer(400, body))
    url = srv.url.replace("http://", "http://admin:S3cretPromPw@")
    values, error = run_queries(url, {"activations": "sum(up)"}, timeout_s=5)
    assert error and "S3cretPromPw" not in error and len(error) < 600, error
    row = ClusterMetrics(cluster="c", prometheus=url, namespace=None, window=None).row()
    assert "S3cretPromPw" not in row["prometheus"] and row["prometheus"].startswith("http://***@")


def test_no_series_at_all_is_a_note_not_a_silent_idle_cluster():
    from fedkeeper.config import KnativeCluster
    from fedkeeper.providers.knative import KnativeProvider
    stub = _PromStub({})   # a Prometheus that scrapes nothing of the platform
    try:
        row = KnativeProvider.cluster_metrics("kn", KnativeCluster(namespace="fl", prometheus_config={"url": stub.url}),
                                              "1h", ["fl_client"])
    finally:
        stub.close()
    assert row.error is None and row.activations == 0 and "no activation series" in row.note


def test_an_answer_that_is_not_json_is_said_so(server_factory):
    from fedkeeper.providers.prometheus import run_queries
    page = b"<html><body>Sign in to the proxy</body></html>"
    srv = server_factory(lambda conn, req: (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                                           + str(len(page)).encode() + b"\r\n\r\n" + page))
    _, error = run_queries(srv.url, {"activations": "sum(up)"}, timeout_s=5)
    assert error == f"Prometheus at {srv.url} answered with something that is not JSON"
