"""HttpInvoker (Cloud Functions, Knative): POSTs over kept-alive
`http.client` connections, a proxy from the environment honoured through
`requests`, and every way a call can end classified; on a scripted server
on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import time

import pytest

from fedkeeper.providers import http_invoke
from fedkeeper.providers.base import ErrorClass, Invocation
from fedkeeper.providers.http_invoke import HttpInvoker
from scripted_http import IO_TIMEOUT_S, json_answer, server_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_in_environment(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def outcome_of(invoker: HttpInvoker, inv):
    deadline = time.monotonic() + IO_TIMEOUT_S
    while time.monotonic() < deadline:
        out = invoker.done([inv])
        if out:
            return out[0]
        time.sleep(0.005)
    raise AssertionError("no outcome")


def test_invocations_share_one_kept_alive_connection(server_factory):
    srv = server_factory(lambda conn, req: json_answer(200, json.dumps({"n": req}).encode()))
    invoker = HttpInvoker(max_workers=2, execution_id_header="Function-Execution-Id")
    try:
        results = []
        for i in range(4):
            inv = invoker.submit("fn", f"{srv.url}/fn?x=1", {"i": i}, timeout_s=5,
                                 headers={"Function-Execution-Id": f"e{i}"}, platform_id=f"e{i}")
            o = outcome_of(invoker, inv)
            assert o.ok and o.platform_id == f"e{i}"
            results.append(o.result["n"])
    finally:
        invoker.close()
    assert results == [0, 1, 2, 3]
    assert {c for c, _ in srv.requests} == {0}
    assert srv.requests[0][1] == "POST /fn?x=1 HTTP/1.1"
    head = srv.heads[0].lower()
    assert "function-execution-id: e0" in head and "content-type: application/json" in head


def test_a_proxy_named_by_the_environment_is_used_unless_no_proxy_says_otherwise(server_factory, monkeypatch):
    target = server_factory(lambda conn, req: json_answer(200, b'{"via": "direct"}'))
    proxy = server_factory(lambda conn, req: json_answer(200, b'{"via": "proxy"}'))
    monkeypatch.setenv("http_proxy", proxy.url)
    invoker = HttpInvoker(max_workers=1)
    try:
        o = outcome_of(invoker, invoker.submit("fn", f"{target.url}/fn", {}, timeout_s=5))
        assert o.ok and o.result == {"via": "proxy"}
        assert proxy.requests[0][1] == f"POST {target.url}/fn HTTP/1.1"
    finally:
        invoker.close()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    invoker = HttpInvoker(max_workers=1)
    try:
        o = outcome_of(invoker, invoker.submit("fn", f"{target.url}/fn", {}, timeout_s=5))
        assert o.ok and o.result == {"via": "direct"}
    finally:
        invoker.close()


def test_a_result_over_the_bound_is_an_application_error(server_factory, monkeypatch):
    monkeypatch.setattr(http_invoke, "MAX_RESULT_BYTES", 1000)
    srv = server_factory(lambda conn, req: json_answer(200, json.dumps({"x": "y" * 5000}).encode()))
    invoker = HttpInvoker(max_workers=1)
    try:
        o = outcome_of(invoker, invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=5))
    finally:
        invoker.close()
    assert not o.ok and o.error_class == ErrorClass.APPLICATION_ERROR and "larger than 1000" in o.error


def test_no_answer_in_time_is_a_timeout_and_a_closed_port_is_unreachable(server_factory):
    srv = server_factory(lambda conn, req: "hang")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    invoker = HttpInvoker(max_workers=2)
    try:
        slow = invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=0.3)
        gone = invoker.submit("fn", f"http://127.0.0.1:{closed_port}/fn", {}, timeout_s=5)
        o_slow, o_gone = outcome_of(invoker, slow), outcome_of(invoker, gone)
    finally:
        invoker.close()
    assert o_slow.error_class == ErrorClass.TIMEOUT and "no answer within" in o_slow.error
    assert o_gone.error_class == ErrorClass.UNREACHABLE and "refused" in o_gone.error


def test_status_hooks_read_headers_case_insensitively_and_429_carries_retry_after(server_factory):
    answers = [json_answer(500, b'{"e": 1}', "X-Crash: crash\r\n"),
               json_answer(429, b"{}", "Retry-After: 7\r\n")]
    srv = server_factory(lambda conn, req: answers[req])

    def hook(status, headers, body):
        if headers.get("x-crash") == "crash":
            return ErrorClass.PLATFORM_ERROR, "the function crashed"
        return None
    invoker = HttpInvoker(max_workers=1, status_hook=hook)
    try:
        crashed = outcome_of(invoker, invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=5))
        throttled = outcome_of(invoker, invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=5))
    finally:
        invoker.close()
    assert crashed.error_class == ErrorClass.PLATFORM_ERROR and crashed.error == "the function crashed"
    assert throttled.error_class == ErrorClass.THROTTLED
    assert getattr(throttled, "retry_after", None) == 7.0 or "retry after 7.0s" in throttled.error


def test_each_answer_is_collected_once_and_unknown_ids_are_lost(server_factory):
    srv = server_factory(lambda conn, req: json_answer(200, b'{"ok": true}'))
    invoker = HttpInvoker(max_workers=3)
    try:
        invs = [invoker.submit("fn", f"{srv.url}/fn", {"i": i}, timeout_s=5) for i in range(3)]
        stranger = Invocation("fn", "not-made-here", time.time())
        got: dict[str, object] = {}
        deadline = time.monotonic() + IO_TIMEOUT_S
        while len(got) < 4 and time.monotonic() < deadline:
            pending = [i for i in invs + [stranger] if i.platform_id not in got]
            for o in invoker.done(pending):
                assert o.platform_id not in got
                got[o.platform_id] = o
            time.sleep(0.005)
        assert all(got[i.platform_id].ok for i in invs)
        assert not got["not-made-here"].ok and "not tracked" in got["not-made-here"].error
        # collected: asked again, an id is no longer known to this invoker
        again = invoker.done(invs[:1])
        assert len(again) == 1 and not again[0].ok
        assert invoker.in_flight() == 0
    finally:
        invoker.close()


def test_answers_nobody_collects_are_dropped_after_a_while(server_factory, monkeypatch):
    # an attempt the keeper gave up is never asked for again: its answer
    # must not be held for the invoker's life
    monkeypatch.setattr(http_invoke, "UNCOLLECTED_CHECK_AT", 2)
    srv = server_factory(lambda conn, req: json_answer(200, b'{"ok": true}'))
    invoker = HttpInvoker(max_workers=2)
    try:
        given_up = [invoker.submit("fn", f"{srv.url}/fn", {"i": i}, timeout_s=5) for i in range(3)]
        deadline = time.monotonic() + IO_TIMEOUT_S
        while len(invoker._finished) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(invoker._finished) == 3
        monkeypatch.setattr(http_invoke, "UNCOLLECTED_S", 0.0)
        kept = invoker.submit("fn", f"{srv.url}/fn", {"i": 9}, timeout_s=5)
        assert outcome_of(invoker, kept).ok
        assert not any(i.platform_id in invoker._futures for i in given_up)
        assert "not tracked" in invoker.done(given_up[:1])[0].error
    finally:
        invoker.close()


def test_waiting_for_one_answer_returns_when_it_comes_and_not_before(server_factory):
    """A helper call (Provider.wait) waits on its own request's answer."""
    def slow(conn, req):
        time.sleep(0.4)
        return json_answer(200, b'{"ok": 1}')
    srv = server_factory(slow)
    invoker = HttpInvoker(max_workers=2)
    try:
        inv = invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=5, platform_id="w1")
        assert invoker.wait_for(inv, 0.05) is False and invoker.done([inv]) == []
        t0 = time.monotonic()
        assert invoker.wait_for(inv, 120) is True
        assert time.monotonic() - t0 < 60        # the answer ended the wait, not the wait's own limit
        out = invoker.done([inv])       # there at once: no poll needed
        assert len(out) == 1 and out[0].ok and out[0].result == {"ok": 1}
        # An id this invoker never sent is not waited for; done() says it is lost.
        lost = Invocation("fn", "never-sent", time.time())
        assert invoker.wait_for(lost, 5) is True and invoker.done([lost])[0].error_class == ErrorClass.PLATFORM_ERROR
    finally:
        invoker.close()


@pytest.mark.parametrize("value,seconds", [
    ("7", 7.0), ("0", 0.0), ("-3", 0.0), ("inf", None), ("nan", None), ("1e9", 600.0), ("garbage", None),
    ("Fri, 31 Dec 9999 23:59:59 GMT", 600.0), ("Mon, 01 Jan 2001 00:00:00 GMT", 0.0), (None, None)])
def test_retry_after_is_bounded_and_a_value_that_is_no_time_is_ignored(value, seconds):
    """A proxy's `inf` or a date years ahead would hold a retry (or a helper
    call's sleep, which `inf` makes raise) for good."""
    from fedkeeper.providers.http_answers import retry_after_seconds
    assert retry_after_seconds(value) == seconds


@pytest.mark.parametrize("through", ["pool", "requests"])
def test_a_connection_lost_after_the_request_was_sent_is_an_attempt_that_ran(server_factory, through):
    """The function's process died under the request (the server read it,
    then closed without an answer): the attempt ran and failed, which is no
    unreachable cluster; a port nobody listens on still is."""
    import requests
    srv = server_factory(lambda conn, req: "drop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    invoker = HttpInvoker(max_workers=2, **({"session_factory": requests.Session} if through == "requests" else {}))
    try:
        lost = outcome_of(invoker, invoker.submit("fn", f"{srv.url}/fn", {}, timeout_s=5))
        gone = outcome_of(invoker, invoker.submit("fn", f"http://127.0.0.1:{closed_port}/fn", {}, timeout_s=5))
    finally:
        invoker.close()
    assert lost.error_class == ErrorClass.PLATFORM_ERROR and "lost after the request was sent" in lost.error
    assert gone.error_class == ErrorClass.UNREACHABLE
    assert [line.split()[0] for _, line in srv.requests] == ["POST"]


def test_an_answer_is_read_up_to_its_bound_then_refused_or_cut():
    from fedkeeper.providers.keepalive import BodyTooLarge, read_bounded
    chunks = [b"abcd", b"efgh", b"ij"]
    assert read_bounded(iter(chunks), 10) == b"abcdefghij"
    with pytest.raises(BodyTooLarge, match="larger than 9 bytes"):
        read_bounded(iter(chunks), 9)
    assert read_bounded(iter(chunks), 6, cut=True) == b"abcdef"
    assert read_bounded(iter(chunks), 8, cut=True) == b"abcdefgh"
    # a cut answer stops reading: the chunks after the bound are never asked for
    asked = []
    read_bounded((asked.append(c) or c for c in chunks), 3, cut=True)
    assert asked == [b"abcd"]
