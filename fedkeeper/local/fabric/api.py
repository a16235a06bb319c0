"""The fabric's HTTP server: OpenWhisk's REST API subset (see the package
docstring for the routes), its own /_fabric administration, and /metrics."""
from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import admin
from .body import BodyError, parse_json, read_body
from .entities import DEFAULT_NAMESPACE
from .metrics import METRICS_CONTENT_TYPE
from .core import Fabric
from .status import BLOCKING_HTTP, MSG_BAD_AUTH, MSG_NOT_FOUND, MSG_SERVER_ERROR, ApiError

log = logging.getLogger("fedkeeper.fabric")

_ROUTE = re.compile(r"/api/v1/namespaces/([^/]+)/(actions|activations|limits)(?:/(.*?))?/?")
# A connection that sends nothing (or only part of a request) for this long
# is closed: idle sockets cannot hold the server.
IDLE_TIMEOUT_S = 120.0
# Connections served at once; more wait in the listen backlog.
MAX_CONNECTIONS = 512


def _qbool(q: dict, key: str, default: bool = False) -> bool:
    v = q.get(key)
    if v is None:
        return default
    return v[-1].lower() in ("true", "1", "yes", "")


def _qint(q: dict, key: str, default: int | None = None) -> int | None:
    v = q.get(key)
    if v is None or v[-1] == "":
        return default
    raw = v[-1].strip()
    if not re.fullmatch(r"-?[0-9]{1,18}", raw):
        raise ApiError(400, f"Parameter {key} must be an integer: {raw[:40]}")
    return int(raw)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without this, every keep-alive response waits ~40 ms for Nagle's
    # algorithm and the delayed ACK of the client.
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    server_version = "fedkeeper-fabric"
    fabric: Fabric = None  # set on the subclass made by make_server
    auth_header: str = ""

    def log_message(self, fmt, *args):  # no per-request logging: the hot path
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one segment per small response.
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "code": uuid.uuid4().hex})

    def _body(self, limit: int) -> Any:
        self._body_read = True
        try:
            raw = read_body(self.headers, self.rfile, limit)
        except BodyError:
            self.close_connection = True
            raise
        return parse_json(raw)

    def _handle(self, method: str) -> None:
        self._body_read = False
        try:
            self._route(method)
        finally:
            # A body the route did not read (a GET or DELETE that declares
            # one, /metrics, a request refused before its body) is read
            # and dropped, within bounds, else the connection closes: it
            # must never be taken for the next request.
            if not self._body_read and not self.close_connection:
                self._body_discard()

    def _route(self, method: str) -> None:
        try:
            if method == "GET" and self.path.split("?", 1)[0] == "/metrics":
                # Unauthenticated, as OpenWhisk's user-events service serves
                # it: Prometheus scrapes without the namespace's key.
                body = self.fabric.events.exposition()
                return self._send(200, body, content_type=METRICS_CONTENT_TYPE)
            if not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                       self.auth_header.encode()):
                # Read a body we will not use, so keep-alive stays in step
                # (within bounds; otherwise the connection closes).
                self._body_discard()
                raise ApiError(401, MSG_BAD_AUTH)
            url = urlsplit(self.path)
            q = parse_qs(url.query, keep_blank_values=True, max_num_fields=64)
            path = url.path
            if path.startswith("/_fabric/"):
                return self._admin(method, path, q)
            if path.rstrip("/") == "/api/v1/namespaces" and method == "GET":
                return self._json(200, sorted(set(self.fabric.namespaces) | {DEFAULT_NAMESPACE}))
            m = _ROUTE.fullmatch(path)
            if not m:
                raise ApiError(404, MSG_NOT_FOUND)
            ns, coll, rest = unquote(m.group(1)), m.group(2), unquote(m.group(3) or "")
            if coll == "actions":
                return self._actions(method, ns, rest, q)
            if coll == "activations":
                return self._activations(method, ns, rest, q)
            if coll == "limits" and method == "GET" and not rest:
                return self._json(200, admin.limits(self.fabric, ns))
            raise ApiError(405 if not rest else 404, "Method not allowed." if not rest else MSG_NOT_FOUND)
        except ApiError as exc:
            self._error(exc.status, exc.message)
        except ValueError as exc:  # parse_qs's field limit, and the like: the request's fault
            self.close_connection = True
            self._error(400, f"The request is malformed: {str(exc)[:200]}")
        except (ConnectionError, BrokenPipeError, socket.timeout):
            self.close_connection = True
        except Exception:  # a bug in the fabric must not kill the connection silently
            log.exception("fabric request %s %s failed", method, self.path[:200])
            self.close_connection = True
            self._error(500, MSG_SERVER_ERROR)

    def _body_discard(self) -> None:
        self._body_read = True
        try:
            read_body(self.headers, self.rfile, self.fabric.settings.payload_limit)
        except BodyError:
            self.close_connection = True

    do_GET = lambda self: self._handle("GET")        # noqa: E731
    do_PUT = lambda self: self._handle("PUT")        # noqa: E731
    do_POST = lambda self: self._handle("POST")      # noqa: E731
    do_DELETE = lambda self: self._handle("DELETE")  # noqa: E731

    def _actions(self, method: str, ns: str, name: str, q: dict) -> None:
        f = self.fabric
        if not name:
            if method != "GET":
                raise ApiError(405, "Method not allowed.")
            limit = _qint(q, "limit", 30) or 0
            skip = _qint(q, "skip", 0) or 0
            if limit < 0 or skip < 0:
                raise ApiError(400, "limit and skip must be non-negative.")
            return self._json(200, f.list_actions(ns, min(limit, 200) if limit else 0, skip))
        if method == "PUT":
            body = self._body(f.settings.code_limit)
            return self._json(200, f.put_action(ns, name, body, _qbool(q, "overwrite")))
        if method == "GET":
            return self._json(200, f.get_action(ns, name).to_json(code=_qbool(q, "code", True)))
        if method == "DELETE":
            return self._json(200, f.delete_action(ns, name))
        if method == "POST":
            return self._invoke(ns, name, q)
        raise ApiError(405, "Method not allowed.")

    def _invoke(self, ns: str, name: str, q: dict) -> None:
        f = self.fabric
        payload = self._body(f.settings.payload_limit)
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise ApiError(400, "The request content was malformed: the payload must be a JSON object.")
        blocking = _qbool(q, "blocking")
        want_result = _qbool(q, "result")
        wait_ms = _qint(q, "timeout", None) if blocking else None
        act = f.invoke(ns, name, payload)
        hdr = {"x-openwhisk-activation-id": act.id}
        if blocking:
            wait = f.settings.blocking_wait_s if wait_ms is None else min(wait_ms / 1000.0,
                                                                          f.settings.blocking_wait_s)
            if act.done.wait(max(0.0, wait)):
                status = BLOCKING_HTTP.get(act.status, 500)
                if want_result:
                    return self._json(status, json.loads(act.record)["response"]["result"], hdr)
                return self._send(status, act.record, hdr)
        return self._send(202, b'{"activationId":"' + act.id.encode() + b'"}', hdr)

    def _activations(self, method: str, ns: str, rest: str, q: dict) -> None:
        if method != "GET":
            raise ApiError(405, "Method not allowed.")
        f = self.fabric
        if not rest:
            name = (q.get("name") or [""])[-1] or None
            if name and "/" in name:
                name = name.split("/")[-1]
            since, upto = _qint(q, "since"), _qint(q, "upto")
            n = f.ns(ns)
            if _qbool(q, "count"):
                with f.lock:
                    return self._json(200, {"activations": n.records.count(name, since, upto)})
            limit = _qint(q, "limit", 30)
            if limit < 0 or limit > 200:
                raise ApiError(400, f"The value {limit} is not in the range of 0 to 200.")
            skip = _qint(q, "skip", 0)
            if skip < 0:
                raise ApiError(400, f"The value {skip} must be non-negative.")
            with f.lock:
                docs = n.records.list(name, since, upto, limit or 200, skip, _qbool(q, "docs"))
            return self._send(200, b"[" + b",".join(docs) + b"]")
        aid, _, sub = rest.partition("/")
        _, _, doc, _ = f.get_activation(ns, aid)
        if not sub:
            return self._send(200, doc)
        if sub == "result":
            return self._json(200, json.loads(doc)["response"])
        if sub == "logs":
            return self._json(200, {"logs": []})
        raise ApiError(404, MSG_NOT_FOUND)

    def _admin(self, method: str, path: str, q: dict) -> None:
        f = self.fabric
        ns = (q.get("namespace") or ["_"])[-1]
        what = path[len("/_fabric/"):].strip("/")
        if what == "faults":
            if method == "PUT":
                return self._json(200, admin.set_faults(f, ns, self._body(f.settings.payload_limit)))
            if method == "GET":
                return self._json(200, admin.get_faults(f, ns))
        elif what == "limits":
            if method == "PUT":
                return self._json(200, admin.set_limits(f, ns, self._body(f.settings.payload_limit)))
            if method == "GET":
                return self._json(200, admin.limits(f, ns))
        elif what == "status" and method == "GET":
            return self._json(200, admin.status(f))
        elif what == "prewarm" and method == "PUT":
            return self._json(200, admin.prewarm(f, self._body(f.settings.payload_limit)))
        raise ApiError(404, MSG_NOT_FOUND)


class FabricServer(ThreadingHTTPServer):
    """A thread per connection (so idle ones hold nothing but their thread),
    at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(fabric: Fabric, host: str = "127.0.0.1", port: int = 0) -> FabricServer:
    handler = type("FabricHandler", (Handler,),
                   {"fabric": fabric,
                    "auth_header": "Basic " + base64.b64encode(fabric.auth.encode()).decode()})
    return FabricServer((host, port), handler)
