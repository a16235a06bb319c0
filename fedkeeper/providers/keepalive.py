"""Keep-alive HTTP/1.1 connections to one origin over the standard
library's `http.client`, for the hot paths of the providers (an OpenWhisk
invoke or activation listing, a Cloud Functions or Knative POST).

Why `http.client` itself: `requests` and urllib3 wrap every call in their
own URL parsing, header dictionaries, environment lookups (proxies, netrc,
CA bundle, per request) and response objects. On a 2-core machine an invoke
through urllib3 cost about 0.6 ms of client CPU and one through a `requests`
Session about 1.8 ms, against about 0.25 ms for the same request through
`http.client`; at hundreds of invocations a second that difference was most
of the keeper's CPU per invocation. Control-plane calls, rare, stay on
`requests`.
"""
from __future__ import annotations

import http.client
import os
import ssl
import threading
from typing import Iterable, Mapping, NamedTuple
from urllib.parse import urlsplit

import requests
from urllib3.util.wait import wait_for_read


class ConnectFailed(OSError):
    """A connection could not be opened (other than a timeout or a TLS
    failure, which keep their own types), or the pool is closed."""


class AnswerLost(ConnectionError):
    """The request was sent, then the connection failed before a whole
    answer came: the server may have started on it (its process died
    under it, say), so it is no unreachable server."""


class ConnectTimeout(TimeoutError):
    """No connection (TCP and TLS handshake) within the connect timeout."""


class BodyTooLarge(Exception):
    """An answer larger than the caller's bound; the connection is dropped."""


def read_bounded(chunks: Iterable[bytes], max_bytes: int, *, cut: bool = False) -> bytes:
    """An answer's body from its chunks, at most `max_bytes` of it held:
    past that BodyTooLarge, or with `cut` its first `max_bytes`."""
    parts, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            if not cut:
                raise BodyTooLarge(f"result larger than {max_bytes} bytes")
            parts.append(chunk[:len(chunk) - (total - max_bytes)])
            break
        parts.append(chunk)
    return b"".join(parts)


class HotResponse(NamedTuple):
    status: int
    headers: http.client.HTTPMessage   # case-insensitive .get()
    data: bytes


def tls_context(verify: bool) -> ssl.SSLContext:
    """Verification as `requests` does it: the CA bundle it would use
    (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's), host names
    checked; none at all when `verify` is off."""
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
          or requests.certs.where())
    return ssl.create_default_context(cafile=ca)


class KeepAlivePool:
    """Keep-alive connections to one origin, reused across threads.

    A request takes an idle connection (one the server has closed meanwhile
    is dropped, as urllib3 does) or opens a new one; at most `maxsize` idle
    connections are kept, more may be open at once (never blocks). A GET
    that fails on a reused connection is sent once more on a new one; a POST
    is not (it may have started something)."""

    def __init__(self, origin: str, headers: Mapping[str, str] | None = None, *,
                 connect_timeout: float, read_timeout: float, ssl_context: ssl.SSLContext | None = None,
                 maxsize: int = 32):
        u = urlsplit(origin)
        self.https = u.scheme == "https"
        self.host = u.hostname or ""
        self.port = u.port or (443 if self.https else 80)
        self.base_path = u.path.rstrip("/")
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context if ssl_context is not None or not self.https else tls_context(True)
        self.maxsize = maxsize
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, body: bytes | None = None, *,
                headers: Mapping[str, str] | None = None, read_timeout: float | None = None,
                connect_timeout: float | None = None, max_bytes: int | None = None) -> HotResponse:
        """`path` is below the origin's base path, query string included;
        `headers` replace the pool's own for this request."""
        hdrs = self.headers if headers is None else headers
        conn, reused = self._take(connect_timeout)
        try:
            return self._exchange(conn, method, path, body, hdrs, read_timeout, max_bytes)
        except (http.client.HTTPException, ConnectionError) as exc:
            # A kept-alive connection the server had closed: a GET is safe to
            # repeat; a POST is not (it may have started something).
            if not (reused and method == "GET"):
                raise AnswerLost(f"{type(exc).__name__}: {exc}") from exc
        return self._exchange(self._open(connect_timeout), method, path, body, hdrs, read_timeout, max_bytes)

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
                  headers: Mapping[str, str], read_timeout: float | None,
                  max_bytes: int | None) -> HotResponse:
        try:
            if read_timeout is not None:
                conn.sock.settimeout(read_timeout)
            try:
                conn.request(method, self.base_path + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # A server may answer before it has read the whole body (413
                # from the Content-Length alone) and close: its answer is
                # still there to read (urllib3 does the same). A connection
                # that was dead already fails to answer below.
                pass
            resp = conn.getresponse()
            data = resp.read() if max_bytes is None else read_bounded(iter(lambda: resp.read(65536), b""),
                                                                      max_bytes)
        except BaseException:
            conn.close()
            raise
        if conn.sock is None:            # the server said Connection: close
            conn.close()
        else:
            if read_timeout is not None:
                conn.sock.settimeout(self.read_timeout)
            self._give_back(conn)
        return HotResponse(resp.status, resp.headers, data)

    def _take(self, connect_timeout: float | None) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectFailed("the connection pool is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._open(connect_timeout), False
            # readable while idle: closed by the server (or garbage on the wire)
            if conn.sock is not None and not wait_for_read(conn.sock, timeout=0.0):
                return conn, True
            conn.close()

    def _open(self, connect_timeout: float | None = None) -> http.client.HTTPConnection:
        timeout = self.connect_timeout if connect_timeout is None else connect_timeout
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise ConnectTimeout(f"no connection to {self.host}:{self.port} within {timeout:g}s") from exc
        except ssl.SSLError:
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
