"""The local Cloud Functions instance's time limit (function_host.TimeLimit),
on a stand-in WSGI app: runs past the limit are answered 504 and carry on,
and an instance whose every slot holds such a run stops, as a wedged
instance is replaced."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import fedkeeper.local.cloud_functions as cf

spec = importlib.util.spec_from_file_location("_fk_function_host", Path(cf.__file__).with_name("function_host.py"))
function_host = importlib.util.module_from_spec(spec)
spec.loader.exec_module(function_host)


class Blocking:
    """A WSGI app whose calls return only once `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        self.release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]


def call(app, path="/"):
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"] = status

    body = b"".join(app({"PATH_INFO": path}, start_response))
    return got["status"], body


def test_an_answer_within_the_limit_passes_through():
    app = Blocking()
    app.release.set()
    limited = function_host.TimeLimit(app, 5.0, 2, exit=lambda code: None)
    assert call(limited) == ("200 OK", b"late")
    assert limited.overrunning == 0


def test_a_run_past_the_limit_is_answered_504_and_carries_on():
    app = Blocking()
    exits = []
    limited = function_host.TimeLimit(app, 0.05, 2, exit=exits.append)
    assert call(limited) == ("504 Gateway Timeout", function_host.TIME_LIMIT_ANSWER)
    assert limited.overrunning == 1 and not exits
    app.release.set()            # the function returns on its own: no longer counted
    for _ in range(200):
        if limited.overrunning == 0:
            break
        threading.Event().wait(0.01)
    assert limited.overrunning == 0
    assert call(limited) == ("200 OK", b"late")


def test_an_instance_whose_slots_all_hold_overrunning_runs_answers_its_504_then_exits(monkeypatch):
    timers = []

    class Timer:
        """threading.Timer, held: the test says when it fires."""
        def __init__(self, delay, fn, args=()):
            self.delay, self.fire = delay, lambda: fn(*args)

        def start(self):
            timers.append(self)

    monkeypatch.setattr(function_host.threading, "Timer", Timer)
    app = Blocking()
    exits = []
    limited = function_host.TimeLimit(app, 0.05, 2, exit=exits.append)
    call(limited)
    assert not timers
    assert call(limited) == ("504 Gateway Timeout", function_host.TIME_LIMIT_ANSWER)   # answered first
    # the process exits a moment after, once the answer is written
    assert [t.delay for t in timers] == [function_host.TimeLimit.EXIT_DELAY_S] and not exits
    timers[0].fire()
    assert exits == [3]
    call(limited)              # a third overrun does not ask for a second exit
    assert len(timers) == 1
    app.release.set()


def test_an_error_of_the_app_reaches_the_request_thread():
    def failing(environ, start_response):
        raise ValueError("inside")

    limited = function_host.TimeLimit(failing, 5.0, 2, exit=lambda code: None)
    try:
        call(limited)
    except ValueError as exc:
        assert str(exc) == "inside"
    else:
        raise AssertionError("the app's error was swallowed")


def test_the_liveness_probe_is_not_limited():
    app = Blocking()
    app.release.set()
    limited = function_host.TimeLimit(app, 0.0, 1, exit=lambda code: (_ for _ in ()).throw(AssertionError))
    assert call(limited, "/robots.txt") == ("200 OK", b"late")


class Dripping:
    """A request body that arrives a byte at a time, each after a pause."""

    def __init__(self, size: int, pause_s: float):
        self.left, self.pause_s = size, pause_s

    def read1(self, n: int) -> bytes:
        threading.Event().wait(self.pause_s)
        if self.left <= 0:
            return b""
        self.left -= 1
        return b"x"


def test_a_body_sent_slowly_is_refused_before_it_takes_a_slot():
    """Read whole before the function: a body that does not arrive within
    the deadline is answered 408, and the function (its slot, its time
    limit) never sees the request."""
    app = Blocking()
    app.release.set()
    limited = function_host.BodyLimit(app, 1 << 20, deadline_s=0.2)
    got = {}
    environ = {"PATH_INFO": "/", "CONTENT_LENGTH": "1000", "wsgi.input": Dripping(1000, 0.02)}
    body = b"".join(limited(environ, lambda status, headers: got.update(status=status)))
    assert got["status"] == "408 Request Timeout" and b"did not arrive within 0.2 s" in body
    assert app.calls == 0
    environ = {"PATH_INFO": "/", "CONTENT_LENGTH": "3", "wsgi.input": Dripping(3, 0.0)}
    assert b"".join(limited(environ, lambda status, headers: got.update(status=status))) == b"late"
    assert got["status"] == "200 OK" and app.calls == 1


def test_a_chunked_body_trickled_in_is_refused_at_its_deadline_not_at_its_end():
    """werkzeug's reader of a chunked body reads on until it has what it was
    asked for: each of its waits on the connection is bounded by the time
    left, or a body sent a chunk at a time held the request past its deadline."""
    import socket
    import time

    from werkzeug.serving import DechunkedInput
    ours, theirs = socket.socketpair()
    sent = []

    def trickle():
        try:
            for _ in range(40):
                theirs.sendall(b"1\r\nx\r\n")
                sent.append(1)
                time.sleep(0.05)
            theirs.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    app = Blocking()
    app.release.set()
    limited = function_host.BodyLimit(app, 1 << 20, deadline_s=0.2)
    got = {}
    environ = {"PATH_INFO": "/", "wsgi.input_terminated": True, "werkzeug.socket": ours,
               "wsgi.input": DechunkedInput(ours.makefile("rb"))}
    try:
        body = b"".join(limited(environ, lambda status, headers: got.update(status=status)))
        assert got["status"] == "408 Request Timeout", body
        assert len(sent) < 40 and app.calls == 0     # refused while the body was still coming
    finally:
        ours.close()
        theirs.close()
        sender.join(5)
