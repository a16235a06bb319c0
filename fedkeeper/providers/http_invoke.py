"""Non-blocking invocation of functions that are plain HTTPS endpoints.

Cloud Functions (2nd gen) and Knative both run a function as an HTTP server:
an invocation is one POST whose response *is* the outcome. There is nothing
to poll, so "submit" hands the request to a bounded pool of worker threads
and returns at once, and "track" only collects finished futures; it never
sends a request of its own.

This module knows nothing about any platform. Answers are read by
http_answers.py, with the platform's own rules (`status_hook`); a
platform adds its credentials through `auth_headers`.
"""
from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .base import ErrorClass, Invocation, Outcome, ProviderError
from .http_answers import ERROR_TEXT_CHARS, StatusHook, classify_response, retry_after_seconds
from .keepalive import AnswerLost, BodyTooLarge, ConnectFailed, ConnectTimeout, KeepAlivePool, read_bounded

#: url -> extra request headers (e.g. Authorization); runs on a worker thread
#: so that a token refresh never blocks the caller. May raise ProviderError.
AuthHeaders = Callable[[str], Mapping[str, str]]

#: results are small JSON dicts (references, metrics); anything bigger is a
#: broken function, not something to buffer in the keeper
MAX_RESULT_BYTES = 4 * 1024 * 1024
# An answer not collected this long after it came belongs to an attempt the
# keeper gave up (it collects within a tracking pass); looked for once more
# than this many answers wait.
UNCOLLECTED_S = 600.0
UNCOLLECTED_CHECK_AT = 256
#: connecting is separate from the function's own run time: a loopback or
#: regional endpoint that does not accept a connection within this is down
CONNECT_TIMEOUT_S = 10.0

# Outcome may gain a retry_after field; fill it only when it exists so that
# this module works with either shape of the dataclass.
_OUTCOME_HAS_RETRY_AFTER = any(f.name == "retry_after" for f in fields(Outcome))


@dataclass
class _Answer:
    """What a worker thread hands back; turned into an Outcome on collection."""

    ok: bool
    error_class: ErrorClass | None
    error: str | None
    result: dict[str, Any] | None
    start: float
    end: float
    result_bytes: int = 0
    retry_after: float | None = None
    platform_execution_id: str | None = None


def default_session_factory(pool_size: int) -> Callable[[], requests.Session]:
    def make() -> requests.Session:
        s = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        return s
    return make


class HttpInvoker:
    """A bounded pool of worker threads sending over keep-alive connections.

    `submit` returns immediately; at most `max_workers` requests are in
    flight, the rest wait in the queue (their wait shows up as `wait_ms`).
    Futures are kept by platform id, so `done` also works with Invocation
    objects the keeper rebuilt from its own records.

    Requests go through one `http.client` pool per origin (keepalive.py
    says why), except where the environment names a proxy for the URL
    (HTTPS_PROXY, NO_PROXY...): those, and every request when a
    `session_factory` is given, go through a `requests` Session per worker
    thread, which knows proxies.
    """

    def __init__(self, max_workers: int = 32, *,
                 session_factory: Callable[[], requests.Session] | None = None,
                 auth_headers: AuthHeaders | None = None,
                 status_hook: StatusHook | None = None,
                 execution_id_header: str | None = None,
                 name: str = "http-invoke"):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
        self._session_factory = session_factory or default_session_factory(max_workers)
        self._auth_headers = auth_headers
        self._hook = status_hook
        self._exec_header = execution_id_header
        self._sessions_only = session_factory is not None
        self._max_workers = max_workers
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        # the finished ones among them, not collected yet, with when they
        # finished: `done` looks up each pending id here instead of asking
        # every future (a lock each)
        self._finished: dict[str, tuple[Future, float]] = {}
        # url -> (pool of its origin, path) or None (through a proxy)
        self._routes: dict[str, tuple[KeepAlivePool, str] | None] = {}
        self._origins: dict[tuple[str, str, int | None], KeepAlivePool] = {}
        self._closed = False

    # ---------------------------------------------------------------- submit

    def submit(self, function: str, url: str, payload: Mapping[str, Any], *,
               timeout_s: float, headers: Mapping[str, str] | None = None,
               platform_id: str | None = None, max_bytes: int | None = None) -> Invocation:
        if self._closed:
            raise ProviderError(ErrorClass.UNREACHABLE, "the invoker is closed")
        body = json.dumps(payload, separators=(",", ":")).encode()
        if max_bytes is not None and len(body) > max_bytes:
            raise ProviderError(ErrorClass.PAYLOAD_TOO_LARGE,
                                f"payload of {len(body)} bytes exceeds the limit of {max_bytes}",
                                status=413)
        pid = platform_id or uuid.uuid4().hex
        submitted = time.time()
        fut = self._pool.submit(self._run, url, body, dict(headers or {}), timeout_s)
        with self._lock:
            self._futures[pid] = fut
            if len(self._finished) > UNCOLLECTED_CHECK_AT:
                self._drop_uncollected()
        fut.add_done_callback(lambda f, pid=pid: self._finish(pid, f))
        return Invocation(function=function, platform_id=pid, submitted_at=submitted,
                          payload_bytes=len(body))

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._session_factory()
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _route(self, url: str) -> tuple[KeepAlivePool, str] | None:
        """The pool of the URL's origin and the path to ask it for; None
        when a proxy applies (the environment is read once per URL)."""
        try:
            return self._routes[url]
        except KeyError:
            pass
        route = None
        u = urlsplit(url)
        # credentials in the URL (basic auth) are left to requests
        if not self._sessions_only and u.scheme in ("http", "https") and "@" not in u.netloc and \
                requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url)) is None:
            key = (u.scheme, u.hostname or "", u.port)
            with self._lock:
                pool = self._origins.get(key)
                if pool is None:
                    pool = self._origins[key] = KeepAlivePool(
                        f"{u.scheme}://{u.netloc}", connect_timeout=CONNECT_TIMEOUT_S,
                        read_timeout=60.0, maxsize=self._max_workers)
            route = (pool, (u.path or "/") + (f"?{u.query}" if u.query else ""))
        with self._lock:
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[url] = route
        return route

    def _post(self, url: str, body: bytes, headers: dict[str, str],
              timeout_s: float) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers, body) of one POST, the body bounded."""
        route = self._route(url)
        if route is not None:
            pool, path = route
            r = pool.request("POST", path, body, headers=headers, read_timeout=timeout_s,
                             connect_timeout=min(CONNECT_TIMEOUT_S, timeout_s), max_bytes=MAX_RESULT_BYTES)
            return r.status, r.headers, r.data
        resp = self._session().post(url, data=body, headers=headers,
                                    timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s),
                                    stream=True, allow_redirects=False)
        try:
            return resp.status_code, resp.headers, read_bounded(resp.iter_content(65536), MAX_RESULT_BYTES)
        finally:
            resp.close()

    def _run(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> _Answer:
        start = time.time()
        try:
            if self._auth_headers is not None:
                headers.update(self._auth_headers(url))
            headers.setdefault("Content-Type", "application/json")
            status, resp_headers, data = self._post(url, body, headers, timeout_s)
        except ProviderError as exc:
            return _Answer(False, exc.error_class, str(exc.args[0]), None, start, time.time(),
                           retry_after=exc.retry_after)
        except (requests.exceptions.ConnectTimeout, ConnectTimeout) as exc:
            return _Answer(False, ErrorClass.UNREACHABLE, f"connect timeout: {_reason(exc)}",
                           None, start, time.time())
        except (requests.exceptions.ReadTimeout, TimeoutError):
            return _Answer(False, ErrorClass.TIMEOUT, f"no answer within {timeout_s:.0f}s",
                           None, start, time.time())
        except (requests.exceptions.SSLError, ssl.SSLError) as exc:
            return _Answer(False, ErrorClass.UNREACHABLE, f"TLS: {_reason(exc)}",
                           None, start, time.time())
        except (requests.exceptions.ConnectionError, AnswerLost, ConnectFailed, ConnectionError,
                http.client.HTTPException) as exc:
            if _timed_out_reading(exc):
                return _Answer(False, ErrorClass.TIMEOUT, f"no answer within {timeout_s:.0f}s",
                               None, start, time.time())
            if _lost_after_sending(exc):
                # The function had the request: its process died under it,
                # say. An attempt that ran, not an unreachable cluster.
                return _Answer(False, ErrorClass.PLATFORM_ERROR, f"{ANSWER_LOST}: {_reason(exc)}",
                               None, start, time.time())
            # refused, DNS failure, no connection
            return _Answer(False, ErrorClass.UNREACHABLE, f"connection: {_reason(exc)}",
                           None, start, time.time())
        except BodyTooLarge as exc:
            return _Answer(False, ErrorClass.APPLICATION_ERROR, str(exc), None, start, time.time())
        except (requests.exceptions.RequestException, OSError) as exc:
            return _Answer(False, ErrorClass.PLATFORM_ERROR, f"{type(exc).__name__}: {_reason(exc)}",
                           None, start, time.time())
        end = time.time()
        ok, ec, err, result = classify_response(status, resp_headers, data, self._hook)
        return _Answer(ok, ec, err, result, start, end, result_bytes=len(data),
                       retry_after=retry_after_seconds(resp_headers.get("Retry-After"))
                       if ec is ErrorClass.THROTTLED else None,
                       platform_execution_id=resp_headers.get(self._exec_header)
                       if self._exec_header else None)

    # ----------------------------------------------------------------- track

    def _finish(self, pid: str, fut: Future) -> None:
        with self._lock:
            if self._futures.get(pid) is fut:
                self._finished[pid] = (fut, time.monotonic())

    def _drop_uncollected(self) -> None:
        """Answers nobody asked for long after they came (the keeper gave
        their attempts up: abandoned at a round's close, lost to a hedge)
        are dropped, so that a long session does not hold every one."""
        old = time.monotonic() - UNCOLLECTED_S
        for pid in [p for p, (_, at) in self._finished.items() if at < old]:
            del self._finished[pid]
            del self._futures[pid]

    def wait_for(self, inv: Invocation, timeout_s: float) -> bool:
        """Wait until `inv`'s answer came (or it is not ours to wait for):
        True, and done() then has its outcome; False after `timeout_s`."""
        with self._lock:
            fut = self._futures.get(inv.platform_id)
        if fut is None:
            return True
        if not wait_futures([fut], timeout=max(0.0, timeout_s)).done:
            return False
        self._finish(inv.platform_id, fut)   # its done-callback may not have run yet
        return True

    def done(self, pending: Sequence[Invocation]) -> list[Outcome]:
        """Outcomes of the finished ones among `pending`; no network traffic."""
        out: list[Outcome] = []
        finished: list[tuple[Invocation, Future]] = []
        with self._lock:   # once per call, not per pending invocation
            for inv in pending:
                pid = inv.platform_id
                hit = self._finished.pop(pid, None)
                if hit is not None:
                    del self._futures[pid]
                    finished.append((inv, hit[0]))
                elif pid not in self._futures:
                    # A synchronous HTTP call lives only in the process that
                    # made it; after a keeper restart its answer is gone for good.
                    out.append(Outcome(platform_id=pid, ok=False, error_class=ErrorClass.PLATFORM_ERROR,
                                       error="invocation is not tracked by this keeper process "
                                             "(its answer was lost)"))
        out += [self._outcome(inv, fut) for inv, fut in finished]
        return out

    @staticmethod
    def _outcome(inv: Invocation, fut: Future) -> Outcome:
        try:
            a: _Answer = fut.result()
        except Exception as exc:  # a bug in a hook; still one outcome per call
            return Outcome(platform_id=inv.platform_id, ok=False,
                           error_class=ErrorClass.PLATFORM_ERROR,
                           error=f"invoker failure: {type(exc).__name__}: {exc}")
        kw: dict[str, Any] = {}
        if _OUTCOME_HAS_RETRY_AFTER:
            kw["retry_after"] = a.retry_after
        err = a.error
        if a.retry_after is not None and not _OUTCOME_HAS_RETRY_AFTER and err:
            err = f"{err} (retry after {a.retry_after:.1f}s)"
        return Outcome(platform_id=inv.platform_id, ok=a.ok, error_class=a.error_class,
                       error=err, result=a.result, start=a.start, end=a.end,
                       duration_ms=(a.end - a.start) * 1000.0,
                       wait_ms=max(0.0, (a.start - inv.submitted_at) * 1000.0),
                       cold_start=None, result_bytes=a.result_bytes, **kw)

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if not f.done())

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            sessions, self._sessions = self._sessions, []
            pools, self._origins = list(self._origins.values()), {}
            self._routes.clear()
        for s in sessions:
            s.close()
        for pool in pools:
            pool.close()


#: How an outcome whose answer was lost after its request was sent begins.
ANSWER_LOST = "connection lost after the request was sent"


def _urllib3_cause(exc: Exception) -> Any:
    """The urllib3 error a requests ConnectionError wraps (a MaxRetryError's
    reason when it wraps one), else None."""
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return None
    inner = exc.args[0]
    return inner.reason if isinstance(inner, urllib3.exceptions.MaxRetryError) else inner


def _lost_after_sending(exc: Exception) -> bool:
    """Whether the connection failed after the request was sent (the pool's
    AnswerLost, requests' "Connection aborted"), rather than not opening."""
    return isinstance(exc, AnswerLost) or isinstance(_urllib3_cause(exc), urllib3.exceptions.ProtocolError)


def _timed_out_reading(exc: Exception) -> bool:
    """requests reports a read timeout met while streaming the answer's
    body as a ConnectionError."""
    return isinstance(_urllib3_cause(exc), urllib3.exceptions.ReadTimeoutError)


def _reason(exc: Exception) -> str:
    # requests nests urllib3 errors two levels deep; the innermost reason is
    # the readable one ("Connection refused", "Name or service not known").
    inner: Any = exc
    for _ in range(4):
        nxt = inner.args[0] if getattr(inner, "args", None) else None
        if isinstance(nxt, BaseException):
            inner = nxt
        else:
            break
    reason = getattr(inner, "reason", None)
    text = str(reason if reason is not None else inner)
    return text[:ERROR_TEXT_CHARS]
