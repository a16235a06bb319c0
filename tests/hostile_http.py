"""A small kit for hostile-input tests of local HTTP servers: raw requests on
127.0.0.1 sockets (so that framing can be wrong on purpose), bounded in
size and time, and the cases every server must survive.

A `Target` says where a request reaches the code behind the server (an
action, a function), which headers it needs, and what the server answers
where servers may rightly differ. Every case ends by checking that the
server still answers a well-formed request."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

# Every socket operation of a case is bounded by this.
IO_TIMEOUT_S = 10.0


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool          # the server closed the connection after answering


@dataclass
class Target:
    name: str
    host: str
    port: int
    path: str                                     # a POST here runs the code behind the server
    headers: dict[str, str] = field(default_factory=dict)
    body_limit: int = 1024 * 1024                 # bytes of a request body it accepts
    echo_key: Callable[[dict], object] = lambda result: result   # where the code's echo of "n" is


def read_response(sock: socket.socket) -> Response:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf[:200]!r}")
        buf += chunk
        if len(buf) > 1 << 20:
            raise AssertionError("response headers over 1 MB")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = rest
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(body) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        body = body[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    closed = headers.get("connection", "").lower() == "close"
    if not closed:
        sock.settimeout(0.3)
        try:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except (socket.timeout, BlockingIOError):
            closed = False
        except OSError:
            closed = True
        finally:
            sock.settimeout(IO_TIMEOUT_S)
    return Response(status, headers, body, closed)


def connect(t: Target) -> socket.socket:
    s = socket.create_connection((t.host, t.port), timeout=IO_TIMEOUT_S)
    s.settimeout(IO_TIMEOUT_S)
    return s


def raw(t: Target, data: bytes) -> Response:
    """Send bytes as they are on a fresh connection; the response."""
    with connect(t) as s:
        s.sendall(data)
        return read_response(s)


def head(t: Target, method: str = "POST", path: str | None = None, extra: dict[str, str] | None = None,
         omit: tuple[str, ...] = ()) -> bytes:
    hdrs = {"Host": f"{t.host}:{t.port}", "Content-Type": "application/json", **t.headers, **(extra or {})}
    lines = [f"{method} {path or t.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in hdrs.items() if k not in omit]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def post(t: Target, body: bytes, extra: dict[str, str] | None = None, path: str | None = None) -> Response:
    hdrs = {"Content-Length": str(len(body)), **(extra or {})}
    return raw(t, head(t, path=path, extra=hdrs) + b"\r\n" + body)


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def well_formed(t: Target, n: int = 1) -> Response:
    return post(t, json.dumps({"n": n}).encode())


def assert_alive(t: Target) -> None:
    r = well_formed(t, 42)
    assert r.status == 200, (r.status, r.body[:300])
    assert t.echo_key(json.loads(r.body)) == 42, r.body[:300]


def assert_refused(r: Response, *statuses: int) -> None:
    assert r.status in statuses, (r.status, r.body[:300])


def hold_idle_sockets(t: Target, n: int, partial: bool) -> list[socket.socket]:
    """n connections that send nothing (or the start of a request line) and stay open."""
    socks = []
    for _ in range(n):
        s = connect(t)
        if partial:
            s.sendall(b"POST " + t.path.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def timed(fn: Callable[[], Response]) -> tuple[Response, float]:
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0
