"""Hostile input against the local platforms' HTTP servers: the fabric's
OpenWhisk API and the local Cloud Functions host, each a real process on
127.0.0.1. Every case is a raw request (framing wrong on purpose where that
is the point), answered with a 4xx and a clear message, never a 5xx, never a
desynchronised connection; after every case the server still answers a
well-formed request. Cases are bounded in count, size and time."""
from __future__ import annotations

import base64
import json

import pytest

from fedkeeper.config import GoogleCluster
from fedkeeper.local import fabric
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider
from fedkeeper.providers.base import FunctionSpec, ProviderContext
from fixtures_fabric import FabricClient, make_zip
from hostile_http import (Target, assert_alive, assert_refused, chunked, connect, head, hold_idle_sockets,
                          post, raw, read_response, well_formed)
from test_gcf_local import ECHO_MAIN
from test_gcf_local import make_artifact as gcf_artifact

pytestmark = pytest.mark.timeout(90)

FABRIC_ECHO = '''
def main(args):
    return {"n": args.get("n"), "keys": sorted(args)}
'''


@pytest.fixture(scope="module")
def fabric_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-fabric")
    info = fabric.fabric_up(d)
    c = FabricClient(info)
    assert c.put_action("echo", source=FABRIC_ECHO).status_code == 200
    auth = "Basic " + base64.b64encode(info["auth"].encode()).decode()
    yield Target("fabric", "127.0.0.1", int(info["port"]),
                 "/api/v1/namespaces/_/actions/echo?blocking=true&result=true",
                 headers={"Authorization": auth}, body_limit=1024 * 1024,
                 echo_key=lambda r: r["n"]), c
    c.s.close()
    fabric.fabric_down(d)


@pytest.fixture(scope="module")
def gcf_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-gcf")
    p = LocalCloudFunctionsProvider("hostile", GoogleCluster(kind="local"), ProviderContext(state_dir=d))
    res = p.deploy(FunctionSpec(name="echo", source="echo", timeout_s=20, bound={"FK_FUNCTION": "echo"}),
                   gcf_artifact(ECHO_MAIN))
    port = int(res.url.rstrip("/").rsplit(":", 1)[1])
    yield Target("gcf", "127.0.0.1", port, "/", body_limit=32 * 1024 * 1024,
                 echo_key=lambda r: r["echo"])
    p.close()


@pytest.fixture(params=["fabric", "gcf"])
def target(request) -> Target:
    if request.param == "fabric":
        return request.getfixturevalue("fabric_target")[0]
    return request.getfixturevalue("gcf_target")


# --------------------------------------------------------------------------- cases for both servers

def test_chunked_body_is_decoded(target):
    r = raw(target, head(target, extra={"Transfer-Encoding": "chunked"}) + b"\r\n"
            + chunked(json.dumps({"n": 7}).encode()))
    assert r.status == 200, r.body[:300]
    assert target.echo_key(json.loads(r.body)) == 7
    assert_alive(target)


def test_chunked_body_over_the_limit_is_413(target):
    block = b"x" * (1 << 20)
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    with connect(target) as s:
        s.sendall(head(target, extra={"Transfer-Encoding": "chunked"}) + b"\r\n")
        try:
            for _ in range(target.body_limit // len(block) + 2):
                s.sendall(frame)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was sent
        r = read_response(s)
    assert_refused(r, 413)
    assert_alive(target)


@pytest.mark.parametrize("size", [b"zz", b"-1", b"+2", b"0_2", b"0x2", b" "])
def test_malformed_chunked_body_is_400(target, size):
    # "-1" once made the fabric read the socket to its end, before any login
    r = raw(target, head(target, extra={"Transfer-Encoding": "chunked"}) + b"\r\n" + size
            + b"\r\n{}\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n")
    assert_refused(r, 400)
    assert_alive(target)


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "12 34", "\u00b2"])
def test_content_length_that_is_not_a_length_is_400(target, value):
    r = raw(target, head(target, extra={"Content-Length": value}) + b"\r\n{}")
    assert_refused(r, 400)
    assert_alive(target)


def test_conflicting_content_lengths_are_400(target):
    r = raw(target, head(target, extra={"Content-Length": "2"}) + b"Content-Length: 900\r\n\r\n{}")
    assert_refused(r, 400)
    assert_alive(target)


def test_declared_body_over_the_limit_is_413_without_reading_it(target):
    r = raw(target, head(target, extra={"Content-Length": str(target.body_limit + 1)}) + b"\r\n{")
    assert_refused(r, 413)
    assert_alive(target)


def test_bad_json_is_400(target):
    assert_refused(post(target, b"{nope"), 400)
    assert_refused(post(target, b"\xff\xfe{}"), 400)
    assert_alive(target)


def test_fabric_refuses_a_number_no_float_holds(fabric_target):
    t, _ = fabric_target
    assert_refused(post(t, b'{"n": 1e400}'), 400)   # not handed to the action as infinity
    assert_alive(t)


def test_header_flood_is_431(target):
    extra = {f"X-Flood-{i}": "y" * 10 for i in range(300)}
    r = raw(target, head(target, extra={**extra, "Content-Length": "2"}) + b"\r\n{}")
    assert_refused(r, 431)
    assert_alive(target)


def test_request_line_too_long_is_414(target):
    r = raw(target, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_refused(r, 414)
    assert_alive(target)


def test_idle_and_half_sent_connections_do_not_block_it(target):
    silent = hold_idle_sockets(target, 8, partial=False)
    half = hold_idle_sockets(target, 8, partial=True)
    try:
        for n in range(3):
            r = well_formed(target, n)
            assert r.status == 200 and target.echo_key(json.loads(r.body)) == n
    finally:
        for s in silent + half:
            s.close()


def test_keep_alive_stays_in_step_after_a_refused_body(target):
    """A refused request on a keep-alive connection either closes it or
    leaves it ready for the next request, never reads a body as a request."""
    with connect(target) as s:
        s.sendall(head(target, extra={"Content-Length": "6"}) + b"\r\n{nope}")
        first = read_response(s)
        assert first.status == 400
        if not first.closed:
            good = json.dumps({"n": 5}).encode()
            s.sendall(head(target, extra={"Content-Length": str(len(good))}) + b"\r\n" + good)
            second = read_response(s)
            assert second.status == 200 and target.echo_key(json.loads(second.body)) == 5


# --------------------------------------------------------------------------- the fabric's own API

def _put(c: FabricClient, name: str, body: bytes, ns: str = "_"):
    return c.s.put(f"{c.url}/api/v1/namespaces/{ns}/actions/{name}?overwrite=true", data=body,
                   headers={"Content-Type": "application/json"})


def _action_body(limits_json: str) -> bytes:
    code = base64.b64encode(make_zip(FABRIC_ECHO)).decode()
    return ('{"exec":{"kind":"python:3","binary":true,"code":"' + code + '"},"limits":' + limits_json
            + '}').encode()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "1.5", "\"60\"", "-1"])
def test_fabric_refuses_limits_that_are_not_numbers_in_range(fabric_target, value):
    t, c = fabric_target
    r = _put(c, "lim", _action_body('{"timeout":' + value + "}"))
    assert r.status_code == 400, r.text
    assert "limits.timeout" in r.json()["error"] or "JSON" in r.json()["error"]
    r = c.s.put(f"{c.url}/_fabric/limits", data=('{"concurrentInvocations":' + value + "}").encode())
    assert r.status_code == 400, r.text
    assert_alive(t)


@pytest.mark.parametrize("key,value", [("blockingWaitSeconds", 1e13), ("blockingWaitSeconds", 3601),
                                       ("idleSeconds", 10 ** 9)])
def test_fabric_refuses_durations_past_what_a_clock_holds(fabric_target, key, value):
    t, c = fabric_target
    r = c.s.put(f"{c.url}/_fabric/limits", json={key: value})
    assert r.status_code == 400 and "at most" in r.json()["error"], r.text
    assert c.s.put(f"{c.url}/_fabric/limits", json={key: 60}).status_code == 200
    assert_alive(t)


def test_fault_settings_that_are_not_finite_are_refused():
    from fedkeeper.local.faults import FaultPlan
    for bad in ({"slow_ms": float("inf")}, {"crash": float("nan")}):
        with pytest.raises(ValueError):
            FaultPlan.parse(bad)


def test_fabric_refuses_deep_json_with_400(fabric_target):
    t, c = fabric_target
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_refused(post(t, b'{"a":' + deep + b"}"), 400)
    r = _put(c, "deep", b'{"exec":' + deep + b"}")
    assert r.status_code == 400 and "nested" in r.json()["error"]
    assert_alive(t)


def test_fabric_names(fabric_target):
    t, c = fabric_target
    body = _action_body('{"timeout":5000}')
    longest = "n" * 256
    r = _put(c, longest, body)
    assert r.status_code == 200, r.text
    assert c.invoke(longest, {"x": 1}, blocking=True, result=True).json()["keys"] == ["x"]
    assert c.s.delete(f"{c.api()}/actions/{longest}").status_code == 200
    assert _put(c, "n" * 257, body).status_code == 400
    # A trailing newline is not part of a valid name (for actions and namespaces alike).
    r = _put(c, "ok%0A", body)
    assert r.status_code == 400 and "illegal characters" in r.json()["error"]
    assert _put(c, "ok", body, ns="ns%0A").status_code == 400
    assert "ok\n" not in [a["name"] for a in c.s.get(f"{c.api()}/actions").json()]
    assert c.s.get(f"{c.url}/api/v1/namespaces/ns%0A/actions").status_code == 400
    assert_alive(t)


def test_fabric_refuses_both_length_and_chunked(fabric_target):
    t, _ = fabric_target
    r = raw(t, head(t, extra={"Transfer-Encoding": "chunked", "Content-Length": "5"}) + b"\r\n"
            + chunked(b'{"n":1}'))
    assert_refused(r, 400)
    assert r.closed
    assert_alive(t)


def test_fabric_query_numbers_are_checked(fabric_target):
    t, c = fabric_target
    for q in ("limit=abc", "skip=-1", "limit=99999999999999999999999", "since=1e9"):
        r = c.s.get(f"{c.api()}/activations?{q}")
        assert r.status_code == 400, (q, r.status_code, r.text)
    assert_alive(t)


def test_fabric_unauthenticated_body_is_not_read_as_a_request(fabric_target):
    t, _ = fabric_target
    smuggled = b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n\r\n"
    r = raw(t, head(t, omit=("Authorization",), extra={"Content-Length": str(len(smuggled))}) + b"\r\n"
            + smuggled)
    assert r.status == 401
    assert_alive(t)


@pytest.mark.parametrize("method,path", [("GET", "/metrics"), ("GET", "/api/v1/namespaces/_/limits"),
                                         ("GET", "/api/v1/namespaces/_/actions/victim"),
                                         ("DELETE", "/api/v1/namespaces/_/actions/nothing-here")])
def test_a_body_no_route_reads_is_never_the_next_request(fabric_target, method, path):
    t, c = fabric_target
    assert c.put_action("victim", source=FABRIC_ECHO).status_code == 200
    smuggled = (f"DELETE /api/v1/namespaces/_/actions/victim HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {t.headers['Authorization']}\r\nContent-Length: 0\r\n\r\n").encode()
    with connect(t) as s:
        s.sendall(head(t, method=method, path=path, extra={"Content-Length": str(len(smuggled))}) + b"\r\n"
                  + smuggled)
        first = read_response(s)
        s.settimeout(2)
        try:
            extra = s.recv(1)
        except OSError:
            extra = b""
    assert first.status in (200, 404), first.body[:200]
    assert extra == b"", "a second response: the body was taken for a request"
    assert c.s.get(f"{c.api()}/actions/victim").status_code == 200
    assert_alive(t)


def test_a_slow_request_costs_only_its_own_connection(fabric_target):
    t, _ = fabric_target
    with connect(t) as s:
        s.sendall(head(t, extra={"Content-Length": "9"}) + b"\r\n{")
        # Answered while the other request is still being sent (its socket
        # operations are bounded by hostile_http.IO_TIMEOUT_S).
        r = well_formed(t, 3)
        assert r.status == 200 and json.loads(r.body)["n"] == 3


# --------------------------------------------------------------------------- archives (both platforms unpack with it)

def _zip(members: dict[str, bytes], link: str | None = None) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("members,link,what", [
    ({"__main__.py": b"x", "../escape.py": b"x"}, None, "unsafe member path"),
    ({"__main__.py": b"x", "/abs.py": b"x"}, None, "unsafe member path"),
    ({"__main__.py": b"x"}, "link.py", "symbolic link"),
    ({"__main__.py": b"\0" * 5000}, None, "unpacks to"),
    ({f"m{i}.py": b"" for i in range(30)}, None, "members"),
])
def test_archives_are_refused_before_anything_is_written(tmp_path, members, link, what):
    from fedkeeper.local.archive import ArchiveError, extract_zip
    with pytest.raises(ArchiveError) as e:
        extract_zip(_zip(members, link), tmp_path / "out", max_bytes=4096, max_members=20)
    assert what in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.py").exists()


def test_fabric_refuses_an_action_zip_that_escapes(fabric_target):
    t, c = fabric_target
    code = base64.b64encode(_zip({"__main__.py": FABRIC_ECHO.encode(), "../../escape.py": b"x"})).decode()
    r = _put(c, "escape", json.dumps({"exec": {"kind": "python:3", "binary": True, "code": code}}).encode())
    assert r.status_code == 400 and "unsafe member path" in r.json()["error"]
    assert_alive(t)
