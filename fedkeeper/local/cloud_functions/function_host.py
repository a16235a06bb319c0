"""One local Cloud Functions instance: Google's functions-framework app for
one HTTP function, served on loopback.

Run as a plain script (`python function_host.py --source ... --target ...`),
not as a module of the keeper, so that the function's process imports
nothing of the keeper: the function's own source folder comes first on
sys.path, as in the image Cloud Functions builds.

The HTTP server is a thread per connection with a read timeout (idle or
slow connections cost a thread each, for a bounded time, and never hold the
function's request slots); at most `--threads` requests run the function at
once, as an instance's request concurrency, the others wait for a slot.
Request bodies are bounded (413 above `--max-request-bytes`, chunked ones
too). Every response closes its connection (the server does not keep
connections alive), so a body left unread can never be taken for a request.

With `--preload MODULE,...` (the heavy modules of the function's runtime:
numpy, TensorFlow, ...) the instance imports them in the background as soon
as it starts, before functions-framework and the function's source, as a
prewarmed (min) instance has, so that its first request does not pay for
them; requests wait until they are loaded. Python's import locks keep a
module the source imports meanwhile from being imported twice at once.

A request still running at the function's time limit (`--timeout-s`) is
answered 504 at once, as Cloud Functions (2nd gen) does: the function
carries on in its thread until it returns on its own, and what it returns
then is dropped. Its request slot is freed at the limit, as the platform
counts the request as over. So that runs which never return cannot pile
up without end in one process, an instance with as many of them still
running as it has request slots is replaced: it answers that request's
504 and exits; the keeper then finds the function gone, deploys it again
and retries what was running in it.

Injected faults (`--faults`, JSON) are drawn before the function runs, with
the local platforms' one fault model (fedkeeper/local/faults.py, loaded by
path):
  crash            500 with X-Google-Status: crash, as functions-framework
                   answers a function that raised
  timeout          held until the function's time limit, then 504, as the
                   platform answers a function that overran it
  timeout_instant  408 at once
  throttle         429 with Retry-After: 1
  slow_ms          added before the function runs
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import os
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The keeper's package directory must not shadow the function's modules.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
# The local platforms' fault model and preloading (standard library only), loaded by path.
FAULT_MODEL = os.path.join(os.path.dirname(HERE), "faults.py")
PRELOADING = os.path.join(os.path.dirname(HERE), "preloading.py")
PRELOAD_LOG_PREFIX = "[instance] runtime modules loaded:"
# The body Cloud Functions' front end answers a request past its time limit with.
TIME_LIMIT_ANSWER = b"upstream request timeout"

# How long a connection may stay silent (before or between requests, or
# while sending one) before it is closed.
READ_TIMEOUT_S = 10.0
# How long a request's whole body may take to arrive. It is read before the
# request takes a slot or its time limit starts: a body sent a byte at a
# time would otherwise hold a slot, and count as a run past the limit.
BODY_DEADLINE_S = 30.0
# Set in the WSGI environ when a request declares several different lengths.
CONFLICTING_LENGTHS = "fedkeeper.conflicting_content_length"
# Connections served at once unless --max-connections says otherwise; more
# wait in the listen backlog. The host sets it to the requests the keeper
# may send at once, so that those wait here for a slot, not for a connect.
MAX_CONNECTIONS = 256


def _load_local(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class FaultInjector:
    """WSGI middleware drawing one fault per request of the function."""

    def __init__(self, app, plan, name: str, timeout_s: float):
        self.app = app
        self.plan = plan
        self.name = name
        self.timeout_s = timeout_s
        self._seq = itertools.count()
        self._lock = threading.Lock()

    @staticmethod
    def _answer(start_response, status: str, body: bytes, headers: list | None = None):
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
                       + (headers or []))
        return [body]

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/robots.txt" or not self.plan.applies_to(self.name):
            return self.app(environ, start_response)
        with self._lock:
            n = next(self._seq)
        if self.plan.slow_ms:
            time.sleep(self.plan.slow_ms / 1000.0)
        fault = self.plan.draw("gcf", self.name, n)
        if fault == "crash":
            return self._answer(start_response, "500 Internal Server Error", b"injected crash",
                                [("X-Google-Status", "crash")])
        if fault == "timeout":
            time.sleep(self.timeout_s)
            return self._answer(start_response, "504 Gateway Timeout", TIME_LIMIT_ANSWER)
        if fault == "timeout_instant":
            return self._answer(start_response, "408 Request Timeout", TIME_LIMIT_ANSWER)
        if fault == "throttle":
            return self._answer(start_response, "429 Too Many Requests", b"Rate exceeded.",
                                [("Retry-After", "1")])
        return self.app(environ, start_response)


class _Late(Exception):
    """The body did not arrive within BODY_DEADLINE_S."""


class BodyLimit:
    """Request bodies of at most `limit` bytes, whatever their framing, read
    here whole within BODY_DEADLINE_S and handed on with their length: the
    function never sees a truncated body, and a slowly sent one is refused
    (408) before it takes a request slot."""

    def __init__(self, app, limit: int, deadline_s: float = BODY_DEADLINE_S):
        self.app = app
        self.limit = limit
        self.deadline_s = deadline_s

    def _read(self, stream, most: int, sock=None) -> bytes:
        """Up to `most` bytes (fewer at the body's end), each read returning
        what has arrived, so the deadline is checked as the body comes. A
        chunked body's reader (werkzeug's) reads on until it has what it was
        asked for, chunk after chunk: with `sock`, the connection's, its
        reading side is shut at the deadline, which ends such a read too."""
        read = getattr(stream, "read1", None) or stream.read
        deadline = time.monotonic() + self.deadline_s
        late = threading.Event()
        timer = None
        if sock is not None:
            def shut() -> None:
                late.set()
                try:
                    sock.shutdown(socket.SHUT_RD)   # the answer can still be written
                except OSError:
                    pass
            timer = threading.Timer(self.deadline_s, shut)
            timer.daemon = True
            timer.start()
        parts, total = [], 0
        try:
            while total < most:
                try:
                    part = read(min(1 << 20, most - total))
                except (OSError, ValueError):
                    if late.is_set():
                        raise _Late from None
                    raise
                if late.is_set() or time.monotonic() > deadline:
                    raise _Late
                if not part:
                    break
                parts.append(part)
                total += len(part)
        finally:
            if timer is not None:
                timer.cancel()
        return b"".join(parts)

    @staticmethod
    def _refuse(start_response, status: str, message: str):
        body = message.encode()
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/robots.txt":   # the host's liveness probe
            return self.app(environ, start_response)
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = bool(environ.get("wsgi.input_terminated"))
        if environ.get(CONFLICTING_LENGTHS):
            return self._refuse(start_response, "400 Bad Request",
                                "The request has conflicting Content-Length headers.")
        if length and not chunked:
            # "²".isdigit() holds too, and int() refuses it
            if not (length.isascii() and length.isdigit()) or len(length) > 18:
                return self._refuse(start_response, "400 Bad Request", "Content-Length is not a length.")
            if int(length) > self.limit:
                return self._refuse(start_response, "413 Request Entity Too Large",
                                    f"The request body is over {self.limit} bytes.")
            most = int(length)
        elif chunked:
            most = self.limit + 1
        else:
            return self.app(environ, start_response)
        try:
            # a Content-Length body is read as it arrives (read1): only a chunked one needs the socket shut
            data = self._read(environ["wsgi.input"], most, environ.get("werkzeug.socket") if chunked else None)
        except _Late:
            return self._refuse(start_response, "408 Request Timeout",
                                f"The request body did not arrive within {self.deadline_s:g} s.")
        except (OSError, ValueError):
            return self._refuse(start_response, "400 Bad Request", "The request body is malformed.")
        if len(data) > self.limit:
            return self._refuse(start_response, "413 Request Entity Too Large",
                                f"The request body is over {self.limit} bytes.")
        if not chunked and len(data) != most:
            return self._refuse(start_response, "400 Bad Request", "The request body ended before its Content-Length.")
        environ["wsgi.input"] = io.BytesIO(data)
        environ["CONTENT_LENGTH"] = str(len(data))
        environ.pop("wsgi.input_terminated", None)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)


class Concurrency:
    """At most `n` requests inside the function at once; the rest wait."""

    def __init__(self, app, n: int):
        self.app = app
        self.slots = threading.BoundedSemaphore(max(1, n))

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/robots.txt":   # the host's liveness probe
            return self.app(environ, start_response)
        with self.slots:
            # The response is produced inside the slot (Flask answers with a
            # list of bytes, so nothing of the function runs after this).
            return list(self.app(environ, start_response))


class TimeLimit:
    """Each request of the function answered by `limit_s` after it began to
    run: past it, 504 at once, while the function's thread carries on and
    its answer is dropped. When `max_overrunning` runs are past their limit
    and still going, the instance is replaced: the request that made it so
    gets its 504, and the process exits (`exit`) a moment later. Requests
    still running in it then lose their connection: the host finds the
    instance gone, and the keeper deploys the function again and retries
    them (turning new requests away while the others finished, for up to
    the function's limit, would have cost every caller meanwhile an
    attempt)."""

    #: how long the 504 has to be written before the process exits
    EXIT_DELAY_S = 0.2

    def __init__(self, app, limit_s: float, max_overrunning: int, exit=os._exit):
        self.app = app
        self.limit_s = limit_s
        self.max_overrunning = max(1, max_overrunning)
        self._exit = exit
        self._lock = threading.Lock()
        self.overrunning = 0
        self.replaced = False

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/robots.txt":
            return self.app(environ, start_response)
        run = _Run(self.app, environ)
        threading.Thread(target=run.go, name="function", daemon=True).start()
        finished = run.done.wait(self.limit_s)
        with self._lock:
            if finished or run.done.is_set():   # ended, or as the limit passed: its answer stands
                return run.answer(start_response)
            self.overrunning += 1
            wedged = self.overrunning >= self.max_overrunning and not self.replaced
            self.replaced = self.replaced or wedged
        print(f"[instance] a request ran past its time limit of {self.limit_s:g} s: answered 504; "
              f"{self.overrunning} run(s) past their limit still running", file=sys.stderr, flush=True)
        threading.Thread(target=self._forget, args=(run,), daemon=True).start()
        if wedged:
            print(f"[instance] stopping: {self.overrunning} run(s) past their time limit hold the instance",
                  file=sys.stderr, flush=True)
            threading.Timer(self.EXIT_DELAY_S, self._exit, args=(3,)).start()
        return _plain(start_response, "504 Gateway Timeout", TIME_LIMIT_ANSWER)

    def _forget(self, run: "_Run") -> None:
        run.done.wait()
        with self._lock:
            self.overrunning -= 1


def _plain(start_response, status: str, body: bytes, headers: list | None = None):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))] + (headers or []))
    return [body]


class _Run:
    """One call of the function in its own thread, its answer kept whole."""

    def __init__(self, app, environ):
        self.app = app
        self.environ = environ
        self.done = threading.Event()
        self.overran = False
        self.status = self.headers = self.body = self.error = None

    def _start_response(self, status, headers, exc_info=None):
        self.status, self.headers = status, headers
        return lambda data: None    # the write() callable of WSGI, which Flask never uses

    def go(self) -> None:
        try:
            self.body = list(self.app(self.environ, self._start_response))
        except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
            self.error = exc
        finally:
            self.done.set()

    def answer(self, start_response):
        if self.error is not None:
            raise self.error
        start_response(self.status, self.headers)
        return self.body


class Preloaded:
    """Imports `modules` in a thread from its creation (fedkeeper/local/
    preloading.py); requests to the function (`app`, set once it is
    created) wait until that is done."""

    def __init__(self, modules: list[str], app=None):
        self.app = app
        self.modules = modules
        self.done = threading.Event()
        threading.Thread(target=self._load, name="preload", daemon=True).start()

    def _load(self) -> None:
        started = time.time()
        try:
            _load_local(PRELOADING, "_fk_preloading").import_all(self.modules)
        finally:
            self.done.set()
            # the instance's log: when its cold start's module load began and how long it took
            print(f"{PRELOAD_LOG_PREFIX} started={started:.3f} load_ms={(time.time() - started) * 1000:.0f}",
                  file=sys.stderr, flush=True)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/robots.txt":   # the host's liveness probe does not wait
            self.done.wait()
        return self.app(environ, start_response)


def make_server(host: str, port: int, app, max_connections: int = MAX_CONNECTIONS):
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = READ_TIMEOUT_S
        disable_nagle_algorithm = True

        def make_environ(self):
            environ = super().make_environ()
            # werkzeug takes one of several Content-Length headers; which
            # one the sender meant cannot be known
            if len({v.strip() for v in self.headers.get_all("Content-Length") or []}) > 1:
                environ[CONFLICTING_LENGTHS] = True
            return environ

        def log_request(self, code="-", size="-"):  # the function logs what matters
            pass

    class Server(ThreadedWSGIServer):
        daemon_threads = True
        request_queue_size = max(256, max_connections)

        def __init__(self, *args, **kwargs):
            self._conns = threading.BoundedSemaphore(max_connections)
            super().__init__(*args, **kwargs)

        def process_request(self, request, client_address):
            self._conns.acquire()
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._conns.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._conns.release()

    return Server(host, port, app, Handler)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8, help="requests running the function at once")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="connections served at once (requests accepted, running or waiting for a slot)")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--faults", default="")
    p.add_argument("--preload", default="", help="modules to import ahead of the first request, comma-separated")
    a = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.source)))
    # The runtime's modules start loading before functions-framework and the
    # function's source: on a cold start the import of TensorFlow is the long
    # part, and the source's own imports (numpy, ...) only wait for the
    # modules the preload is importing at that moment.
    modules = [m for m in a.preload.split(",") if m]
    preloaded = Preloaded(modules) if modules else None

    import functions_framework
    flask_app = functions_framework.create_app(a.target, a.source, "http")
    flask_app.config["MAX_CONTENT_LENGTH"] = a.max_request_bytes
    app = TimeLimit(flask_app, a.timeout_s, a.threads)
    if a.faults:
        plan = _load_local(FAULT_MODEL, "_fk_fault_model").FaultPlan.parse(json.loads(a.faults))
        # An injected timeout holds its request slot to the limit, as a hung call holds an instance.
        app = FaultInjector(app, plan, a.name, a.timeout_s)
    app = BodyLimit(Concurrency(app, a.threads), a.max_request_bytes)
    if preloaded is not None:
        preloaded.app, app = app, preloaded
    server = make_server(a.host, a.port, app, max(1, a.max_connections))
    server.serve_forever()


if __name__ == "__main__":
    main()
