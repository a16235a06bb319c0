"""The two keep-alive connection pools an OpenWhisk provider talks
through (provider.py says why two): a `requests` Session for the control
plane and, for the hot path, a pool of the standard library's
`http.client` connections, both with the namespace key in a header only and
the same TLS trust.

Why `http.client` itself on the hot path: urllib3 (what `requests` is built
on) wraps every call of it in its own URL parsing, header dictionaries,
retry and response objects, and sends the headers and the body of a request
in two writes. On a 2-core machine that came to about 0.6 ms of client CPU
per invoke, against about 0.25 ms for the same request through
`http.client`; at hundreds of invocations a second that difference was most
of the keeper's CPU per invocation."""
from __future__ import annotations

import base64
import http.client
import os
import ssl
import threading
from typing import NamedTuple
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.util.wait import wait_for_read


class ConnectFailed(OSError):
    """A connection to the controller could not be opened (other than a
    timeout or a TLS failure, which keep their own types)."""


class HotResponse(NamedTuple):
    status: int
    headers: http.client.HTTPMessage   # case-insensitive .get()
    data: bytes


class KeepAlivePool:
    """Keep-alive connections to one controller, reused across threads.

    A request takes an idle connection (one the server has closed meanwhile
    is dropped, as urllib3 does) or opens a new one; at most `maxsize` idle
    connections are kept, more may be open at once (never blocks). A GET
    that fails on a reused connection is sent once more on a new one; a POST
    is not (it may have created an activation)."""

    def __init__(self, api_host: str, headers: dict[str, str], *, connect_timeout: float,
                 read_timeout: float, ssl_context: ssl.SSLContext | None = None, maxsize: int = 32):
        u = urlsplit(api_host)
        self.https = u.scheme == "https"
        self.host = u.hostname or ""
        self.port = u.port or (443 if self.https else 80)
        self.base_path = u.path.rstrip("/")
        self.headers = dict(headers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.maxsize = maxsize
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, body: bytes | None = None) -> HotResponse:
        """`path` is below the controller's base URL, query string included."""
        conn, reused = self._take()
        try:
            return self._exchange(conn, method, path, body)
        except (http.client.HTTPException, ConnectionError):
            # A kept-alive connection the server had closed: a GET is safe to
            # repeat; a POST is not (it may have created an activation).
            if not (reused and method == "GET"):
                raise
        return self._exchange(self._open(), method, path, body)

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  body: bytes | None) -> HotResponse:
        try:
            conn.request(method, self.base_path + path, body=body, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        if conn.sock is None:            # the server said Connection: close
            conn.close()
        else:
            self._give_back(conn)
        return HotResponse(resp.status, resp.headers, data)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectFailed("the provider's connection pool is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._open(), False
            # readable while idle: closed by the server (or garbage on the wire)
            if conn.sock is not None and not wait_for_read(conn.sock, timeout=0.0):
                return conn, True
            conn.close()

    def _open(self) -> http.client.HTTPConnection:
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except (TimeoutError, ssl.SSLError):
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            raise ConnectFailed(str(exc)) from exc
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _ssl_context(verify: bool) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # the CA bundle `requests` uses for the control plane, so that a
    # cluster's own CA (REQUESTS_CA_BUNDLE) is trusted on both
    ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
          or requests.certs.where())
    return ssl.create_default_context(cafile=ca)


def connections(api_host: str, auth: tuple[str, str], verify: bool, *, connect_timeout: float,
                read_timeout: float) -> tuple[dict[str, str], requests.Session, KeepAlivePool]:
    """(headers, control-plane session, hot-path pool) for a controller."""
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
               "Accept": "application/json", "User-Agent": "fedkeeper"}
    if not verify:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    session = requests.Session()
    session.headers.update(headers)
    session.verify = verify
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    ctx = _ssl_context(verify) if urlsplit(api_host).scheme == "https" else None
    pool = KeepAlivePool(api_host, headers, connect_timeout=connect_timeout, read_timeout=read_timeout,
                         ssl_context=ctx)
    return headers, session, pool
