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


def test_an_instance_whose_slots_all_hold_overrunning_runs_answers_its_504_then_exits():
    app = Blocking()
    exits = []
    limited = function_host.TimeLimit(app, 0.05, 2, exit=exits.append)
    call(limited)
    assert not exits
    assert call(limited) == ("504 Gateway Timeout", function_host.TIME_LIMIT_ANSWER)   # answered first
    assert not exits           # the process exits a moment after, once the answer is written
    for _ in range(100):
        if exits:
            break
        threading.Event().wait(0.05)
    assert exits == [3]
    call(limited)              # a third overrun does not ask for a second exit
    threading.Event().wait(3 * function_host.TimeLimit.EXIT_DELAY_S)
    assert exits == [3]
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
