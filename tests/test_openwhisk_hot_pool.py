"""The OpenWhisk provider's hot-path connection pool (providers/keepalive.py):
keep-alive reuse, connections the server closed, what is repeated and what
is not, timeouts and closing; on a scripted server on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from urllib3.util.wait import wait_for_read

from fedkeeper.config import OpenWhiskCluster
from fedkeeper.providers.base import ErrorClass, ProviderContext, ProviderError
from fedkeeper.providers.openwhisk import OpenWhiskProvider
from fedkeeper.providers.http_answers import ERROR_TEXT_CHARS
from fedkeeper.providers.openwhisk.errors import status_error, transport_error
from fedkeeper.providers.openwhisk.http import ConnectFailed, KeepAlivePool
from scripted_http import IO_TIMEOUT_S, self_signed_tls, server_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


def pool_for(url: str, **kw) -> KeepAlivePool:
    return KeepAlivePool(url, {"Authorization": "Basic eDp5"}, connect_timeout=2.0,
                         read_timeout=kw.pop("read_timeout", IO_TIMEOUT_S), **kw)


def wait_until(cond, timeout_s: float = IO_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_requests_reuse_one_kept_alive_connection(server_factory):
    srv = server_factory(lambda conn, req: "answer")
    pool = pool_for(srv.url + "/base/")
    try:
        for i in range(5):
            r = pool.request("POST", f"/actions/a?n={i}", b"{}")
            assert r.status == 202 and r.data.startswith(b'{"activationId"')
            assert r.headers.get("X-OpenWhisk-Activation-Id") == "0123456789abcdef"
    finally:
        pool.close()
    assert [c for c, _ in srv.requests] == [0] * 5
    # origin-form targets below the base URL's path
    assert srv.requests[0][1] == "POST /base/actions/a?n=0 HTTP/1.1"


def test_a_connection_the_server_closed_while_idle_is_not_used(server_factory):
    srv = server_factory(lambda conn, req: "answer-then-close")
    pool = pool_for(srv.url)
    try:
        assert pool.request("POST", "/a", b"{}").status == 202
        # the server's close has reached this side (under load the FIN can
        # trail the server's close() on loopback)
        wait_until(lambda: wait_for_read(pool._idle[0].sock, timeout=0.0))
        # a POST is never repeated, so it must not be sent on the dead connection
        assert pool.request("POST", "/a", b"{}").status == 202
    finally:
        pool.close()
    assert [c for c, _ in srv.requests] == [0, 1]


def test_a_get_dropped_on_a_reused_connection_is_sent_again_a_post_is_not(server_factory):
    # every connection answers its first request and drops its second
    srv = server_factory(lambda conn, req: "answer" if req == 0 else "drop")
    pool = pool_for(srv.url)
    try:
        assert pool.request("GET", "/activations").status == 202
        r = pool.request("GET", "/activations")
        assert r.status == 202
        assert [c for c, _ in srv.requests] == [0, 0, 1]
        # connection 1 is idle again; its next request is dropped
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            pool.request("POST", "/actions/a", b"{}")
        assert [line.split()[0] for _, line in srv.requests] == ["GET", "GET", "GET", "POST"]
    finally:
        pool.close()


def test_a_read_timeout_and_a_closed_pool_are_unreachable(server_factory):
    srv = server_factory(lambda conn, req: "hang")
    pool = pool_for(srv.url, read_timeout=0.2)
    with pytest.raises(TimeoutError) as e:
        pool.request("GET", "/activations")
    err = transport_error("cluster c", e.value)
    assert err.error_class == ErrorClass.UNREACHABLE and "did not answer in time" in str(err)
    pool.close()
    with pytest.raises(ConnectFailed):
        pool.request("GET", "/activations")


def test_idle_connections_are_bounded(server_factory):
    srv = server_factory(lambda conn, req: "answer")
    pool = pool_for(srv.url, maxsize=2)
    try:
        conns = [pool._open() for _ in range(4)]
        for c in conns:
            pool._give_back(c)
        assert len(pool._idle) == 2
        assert sum(c.sock is None for c in conns) == 2
    finally:
        pool.close()
    assert all(c.sock is None for c in conns)


@pytest.mark.parametrize("exc, reason", [
    (ConnectFailed("[Errno 113] No route to host"), "cannot connect"),
    (http.client.RemoteDisconnected("Remote end closed connection without response"), "connection closed"),
    (ConnectionResetError(104, "Connection reset by peer"), "connection closed"),
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (socket.gaierror(-2, "Name or service not known"), "host name not found"),
])
def test_standard_library_transport_errors_are_classified(exc, reason):
    err = transport_error("OpenWhisk cluster c at http://h", exc)
    assert err.error_class == ErrorClass.UNREACHABLE and f"({reason})" in str(err)


@pytest.mark.parametrize("body", [
    json.dumps({"error": "quota\nexceeded " + "x" * 100_000}).encode(),   # the controller's JSON error
    b"<html>\n" + b"y" * 100_000,                                          # a proxy's page
])
def test_a_controllers_error_text_is_cut_to_one_bounded_line(body):
    err = status_error("OpenWhisk cluster c at http://h", 503, body, "invoke")
    detail = str(err).split("answered 503: ", 1)[1]
    assert err.error_class == ErrorClass.PLATFORM_ERROR
    assert "\n" not in detail and len(detail) == ERROR_TEXT_CHARS


def test_provider_invoke_through_the_pool_and_dropped_post_is_unreachable(server_factory, tmp_path):
    srv = server_factory(lambda conn, req: "answer" if req == 0 else "drop")
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"}, namespace="ns one")
    p = OpenWhiskProvider("ow-scripted", cfg, ProviderContext(state_dir=tmp_path))
    try:
        inv = p.invoke("pkg/act", {"x": 1})
        assert inv.platform_id == "0123456789abcdef" and inv.payload_bytes == len(b'{"x":1}')
        with pytest.raises(ProviderError) as e:
            p.invoke("pkg/act", {"x": 2})
        assert e.value.error_class == ErrorClass.UNREACHABLE and "secretkey" not in str(e.value)
    finally:
        p.close()
    assert srv.requests[0][1] == "POST /api/v1/namespaces/ns%20one/actions/pkg/act?blocking=false HTTP/1.1"
    assert len(srv.requests) == 2


def test_tls_hot_path_verifies_the_certificate_unless_insecure(server_factory, tmp_path):
    srv = server_factory(lambda conn, req: "answer", tls=self_signed_tls(tmp_path))
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    try:
        with pytest.raises(ProviderError) as e:
            p.invoke("act", {})
        assert e.value.error_class == ErrorClass.UNREACHABLE and "TLS with" in str(e.value)
    finally:
        p.close()
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"}, insecure=True)
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    try:
        assert p.invoke("act", {}).platform_id == "0123456789abcdef"
        assert p.invoke("act", {}).platform_id == "0123456789abcdef"
    finally:
        p.close()
    # the refused handshake, then one kept-alive connection for both invokes
    assert [c for c, _ in srv.requests] == [1, 1]


def test_an_answer_sent_before_the_body_was_read_is_still_read(server_factory):
    # the server answers 413 from the head and closes on a body it never
    # reads: sending the rest fails, its answer must not be lost
    srv = server_factory(lambda conn, req: "reject-early")
    pool = pool_for(srv.url)
    try:
        for _ in range(3):
            r = pool.request("POST", "/actions/a", b"x" * (8 * 1024 * 1024))
            assert r.status == 413 and b"entity too big" in r.data
    finally:
        pool.close()
    assert len(srv.requests) == 3


def test_an_activation_listing_past_its_bound_is_refused_not_held(server_factory, tmp_path, monkeypatch):
    from scripted_http import json_answer
    from fedkeeper.providers.openwhisk import provider as ow_provider
    monkeypatch.setattr(ow_provider, "LIST_PAGE_MAX_BYTES", 4096)
    page = b"[" + b",".join(b'{"activationId":"a%d","pad":"%s"}' % (i, b"x" * 200) for i in range(40)) + b"]"
    # the invocation's answer, then every listing (on any connection) the same long page
    srv = server_factory(lambda conn, req: "answer" if (conn, req) == (0, 0) else json_answer(200, page))
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-scripted", cfg, ProviderContext(state_dir=tmp_path))
    try:
        inv = p.invoke("act", {})
        assert p.track([inv]) == []   # nothing readable yet; the per-id read reports it later
    finally:
        p.close()
    # Each page past the bound was refused unread and asked again smaller,
    # down to one record, then past it: a bounded number of requests.
    limits = [int(line.split("limit=")[1].split("&")[0].split()[0]) for _, line in srv.requests[1:]]
    assert limits[:5] == [200, 50, 12, 3, 1] and set(limits[5:]) <= {1} and len(limits) <= 2 * ow_provider.MAX_PAGES


@pytest.mark.parametrize("answer", [
    b"not json",
    b"[" * 100000,                                    # nested past the parser's depth
    b'[{"activationId": ["x"]}, {"activationId": "a1", "response": "no"}, 7]',
])
def test_a_bad_activation_listing_is_a_platform_error_or_skipped_never_a_traceback(server_factory, tmp_path,
                                                                                    answer):
    from scripted_http import json_answer
    srv = server_factory(lambda conn, req: "answer" if req == 0 else json_answer(200, answer))
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-scripted", cfg, ProviderContext(state_dir=tmp_path))
    try:
        inv = p.invoke("act", {})
        try:
            out = p.track([inv])
        except ProviderError as exc:
            assert exc.error_class == ErrorClass.PLATFORM_ERROR and "no valid JSON" in str(exc)
        else:
            assert answer.startswith(b"[{") and out == []
    finally:
        p.close()


def test_an_activation_record_of_the_wrong_shape_is_a_failed_outcome():
    from fedkeeper.providers.openwhisk.errors import activation_outcome
    out = activation_outcome({"activationId": "a1", "response": "no"})
    assert not out.ok and out.error_class == ErrorClass.PLATFORM_ERROR
    out = activation_outcome({"activationId": "a2", "duration": "long", "annotations": [["k"], {"key": 1}],
                              "response": {"status": "action developer error", "statusCode": [1],
                                           "result": {"error": "x" * 10000}, "size": "big"}})
    assert out.duration_ms is None and out.error_class == ErrorClass.DEVELOPER_ERROR and len(out.error) == 2000


class ChattyController:
    """An OpenWhisk controller's invoke and activation endpoints whose
    records carry `log_bytes` of logs each (what an action that prints a
    lot leaves, up to its limits.logs), on a real HTTP server."""

    def __init__(self, log_bytes: dict[str, int]):
        import http.server
        import threading
        self.records = {aid: {"activationId": aid, "name": "act", "start": 1000, "end": 2000, "duration": 1000,
                              "annotations": [], "logs": ["x" * n],
                              "response": {"status": "success", "statusCode": 0, "result": {"aid": aid}}}
                        for aid, n in log_bytes.items()}
        self.pages: list[int] = []
        controller = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(202, {"activationId": next(iter(controller.records))})

            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit
                u = urlsplit(self.path)
                if u.path.endswith("/activations"):
                    q = {k: v[0] for k, v in parse_qs(u.query).items()}
                    skip, limit = int(q.get("skip", 0)), int(q.get("limit", 200))
                    controller.pages.append(limit)
                    newest_first = list(reversed(controller.records.values()))   # as OpenWhisk lists
                    return self._send(200, newest_first[skip:skip + limit])
                rec = controller.records.get(u.path.rsplit("/", 1)[-1])
                self._send(200 if rec else 404, rec or {"error": "not found"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_long_activation_logs_shrink_the_listing_pages_and_never_block_tracking(tmp_path, monkeypatch):
    """Records with long logs: a listing page past its bound is asked again
    in smaller pages, and one record past the bound of a single record is
    that invocation's failure, not every other one's lost outcome."""
    from fedkeeper.providers.base import Invocation
    from fedkeeper.providers.openwhisk import provider as owp
    monkeypatch.setattr(owp, "LIST_PAGE_MAX_BYTES", 20_000)
    monkeypatch.setattr(owp, "RECORD_MAX_BYTES", 12_000)
    monkeypatch.setattr(owp, "FALLBACK_AFTER_S", 0.0)
    ctl = ChattyController({**{f"a{i}": 4_000 for i in range(12)}, "huge": 30_000})
    p = OpenWhiskProvider("ow-chatty", OpenWhiskCluster(base_url=ctl.url, auth={"ow_auth": "u:k"}),
                          ProviderContext(state_dir=tmp_path))
    try:
        pending = [Invocation("act", aid, time.time() - 1) for aid in ctl.records]
        seen = {}
        for _ in range(50):
            for o in p.track([i for i in pending if i.platform_id not in seen]):
                seen[o.platform_id] = o
            if len(seen) == len(pending):
                break
            p._next_poll = 0.0   # no wait between passes
        assert len(seen) == len(pending), sorted(seen)
        assert all(seen[f"a{i}"].ok and seen[f"a{i}"].result == {"aid": f"a{i}"} for i in range(12))
        assert not seen["huge"].ok and seen["huge"].error_class is ErrorClass.PLATFORM_ERROR
        assert "more than 12000 bytes" in seen["huge"].error
        assert ctl.pages[0] == 200 and min(ctl.pages) < 200
    finally:
        p.close()
        ctl.close()


def test_the_hot_path_goes_through_the_proxy_the_environment_names(server_factory, tmp_path, monkeypatch):
    """Behind a proxy (HTTPS_PROXY and the like), invocations and tracking
    take it as the control plane does; NO_PROXY still sends them direct."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    proxy = server_factory(lambda conn, req: "answer")
    target = server_factory(lambda conn, req: "answer")
    monkeypatch.setenv("http_proxy", proxy.url)
    cfg = OpenWhiskCluster(base_url=target.url, auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-proxied", cfg, ProviderContext(state_dir=tmp_path))
    try:
        assert p.invoke("act", {"x": 1}).platform_id == "0123456789abcdef"
    finally:
        p.close()
    assert proxy.requests[0][1] == f"POST {target.url}/api/v1/namespaces/_/actions/act?blocking=false HTTP/1.1"
    assert target.requests == []
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    p = OpenWhiskProvider("ow-direct", cfg, ProviderContext(state_dir=tmp_path))
    try:
        assert p.invoke("act", {"x": 2}).platform_id == "0123456789abcdef"
    finally:
        p.close()
    assert len(proxy.requests) == 1 and target.requests[0][1].startswith("POST /api/v1/namespaces/_/actions/act")


def test_control_plane_answers_are_bounded_and_a_bad_one_is_a_platform_error(server_factory, tmp_path, monkeypatch):
    """An action looked up (without its code) or the namespace's limits:
    an answer past the bound is refused unread, one that is no JSON
    object is a platform error, never a traceback."""
    from scripted_http import json_answer
    from fedkeeper.providers.base import Artifact, FunctionSpec
    from fedkeeper.providers.openwhisk import provider as ow_provider
    monkeypatch.setattr(ow_provider, "CONTROL_MAX_BYTES", 1000)
    answers = [json_answer(200, b'{"annotations": "' + b"x" * 5000 + b'"}'), json_answer(200, b"[1, 2]"),
               json_answer(200, b"not json")]
    asked = []

    def answer(conn, req):   # in order, whichever connection asks
        asked.append(conn)
        return answers[min(len(asked), len(answers)) - 1]
    srv = server_factory(answer)
    p = OpenWhiskProvider("ow-ctl", OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:k"}),
                          ProviderContext(state_dir=tmp_path))
    art = Artifact(data=b"zip", sha256="0" * 64, entry="openwhisk")
    try:
        with pytest.raises(ProviderError, match="more than 1000 bytes"):
            p.deploy(FunctionSpec(name="act", source="act"), art)
        for words in ("non-object", "no valid JSON"):
            with pytest.raises(ProviderError, match=words) as e:
                p.limits()
            assert e.value.error_class is ErrorClass.PLATFORM_ERROR
    finally:
        p.close()


def test_pages_shrunk_by_a_few_long_records_grow_back_and_reach_the_older_ones(tmp_path, monkeypatch):
    """The newest records have long logs, many older ones short: after the
    pages shrank past the long ones they grow back, so one pass still lists
    as far back as full pages would, instead of crawling one record a page."""
    from fedkeeper.providers.base import Invocation
    from fedkeeper.providers.openwhisk import provider as owp
    monkeypatch.setattr(owp, "LIST_PAGE", 8)
    monkeypatch.setattr(owp, "MAX_PAGES", 10)
    monkeypatch.setattr(owp, "LIST_PAGE_MAX_BYTES", 12_000)
    ctl = ChattyController({**{f"a{i}": 500 for i in range(60)}, **{f"long{i}": 5_000 for i in range(3)}})
    p = OpenWhiskProvider("ow-chatty", OpenWhiskCluster(base_url=ctl.url, auth={"ow_auth": "u:k"}),
                          ProviderContext(state_dir=tmp_path))
    try:
        pending = [Invocation("act", aid, time.time()) for aid in ctl.records]
        found = p.track(pending)   # one pass, before any per-id read is due
        assert len(found) == len(pending) and all(o.ok for o in found), len(found)
        assert min(ctl.pages) < 8 and ctl.pages[-1] == 8
    finally:
        p.close()
        ctl.close()
