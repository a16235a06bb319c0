"""Thin-entry helpers: one for OpenWhisk (`main(args)`), one for HTTP
platforms served by functions-framework (Cloud Functions, Knative).

Rules, the same on every platform:
- configuration bound at deploy time (FK_* keys: OpenWhisk merges action
  parameters into args, HTTP platforms put them in the environment) is split
  off the payload, and OpenWhisk's own `__OW_*` keys are dropped; bound values
  are secrets and are never echoed back;
- a token that does not verify is refused: OpenWhisk gets an `error` result
  (an "application error"), HTTP a 401;
- bad input is refused the same way (HTTP 400): a payload field that is
  missing, of the wrong type or out of its bounds (`check_fields`, before the
  handler runs), ids that name nothing in the store, a stored blob that is
  not a valid pickle-free npz or declares more than it may (`BadRequest`,
  `BlobError`). These are application errors: retrying the same request
  cannot help;
- anything else is a genuine crash (a bug, the store going away, out of
  memory) and is a developer error, which the keeper may retry. On OpenWhisk
  it propagates, so the activation is an "action developer error"; on HTTP the
  entry answers 500 with a JSON body and `X-Google-Status: crash`, exactly the
  marker functions-framework itself puts on an unhandled exception, so the
  keeper classifies it the same way and the body stays JSON;
- a result is strict JSON: a NaN or infinite number in it (a diverged loss)
  is sent as null, since OpenWhisk refuses a result it cannot parse.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Any, Callable, Mapping

from .auth import TokenError, verify
from .blobs import BlobError
from .data_url import secrets_in
from .urls import masked

BOUND_PREFIX = "FK_"
PLATFORM_PREFIX = "__OW_"
JSON_HEADERS = {"Content-Type": "application/json"}
Handler = Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]


class BadRequest(ValueError):
    """The payload or the data it points at is not acceptable."""


BAD_INPUT = (BadRequest, BlobError)


# ------------------------------------------------------------------ payload fields
# Every field a payload may carry is checked here, for every function, before
# its handler runs and so before anything touches the store: a value the
# store cannot hold (an integer beyond 64 bits) or one that makes no sense
# (a negative round, a bool or a float for a count) is bad input, refused as
# an application error and never retried, instead of a crash deep inside.
# A handler then only asks for the fields it needs (`require`).
MAX_ROUND = 1_000_000        # rounds of one session
MAX_ATTEMPT = 1_000_000      # attempts of one invocation in one round
MAX_GROUPS = 1_000           # insights: groups of clients asked for
MAX_ID_CHARS = 256           # session, client, function and target names
MAX_LISTED = 10_000          # clients (or calls) named in one payload


def _whole_number(low: int, high: int) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"payload field {where!r} must be a whole number from {low} to {high}, "
                             f"not {_shown(value)}")
    return check


def _identifier(value: Any, where: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS or not value.isprintable():
        raise BadRequest(f"payload field {where!r} must be a name of 1 to {MAX_ID_CHARS} printable "
                         f"characters, not {_shown(value)}")


def _round_range(value: Any, where: str) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise BadRequest(f"payload field {where!r} must be [first, last]")
    for i, r in enumerate(value):
        _ROUND(r, f"{where}[{i}]")
    if value[0] > value[1]:
        raise BadRequest(f"payload field {where!r} must be [first, last] with first <= last")


def _listed(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def check_all(value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) > MAX_LISTED:
            raise BadRequest(f"payload field {where!r} must be a list of at most {MAX_LISTED}")
        for i, item in enumerate(value):
            check(item, f"{where}[{i}]")
    return check_all


def _stale_update(value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) != {"client", "round"}:
        raise BadRequest(f"payload field {where!r} must be {{\"client\": id, \"round\": int}}")
    _identifier(value["client"], f"{where}.client")
    _ROUND(value["round"], f"{where}.round")


def _call(value: Any, where: str) -> None:
    """A signed client payload that fl_invoker forwards: its fields obey the
    same rules (the invoker records its attempt in the store)."""
    if not isinstance(value, dict):
        raise BadRequest(f"payload field {where!r} must be a signed client payload")
    check_fields(value, f"{where}.")


def _flag(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise BadRequest(f"payload field {where!r} must be true or false, not {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ROUND = _whole_number(0, MAX_ROUND)
FIELDS: dict[str, Callable[[Any, str], None]] = {
    "function": _identifier, "session": _identifier, "client": _identifier, "target": _identifier,
    "what": _identifier,
    "round": _ROUND, "attempt": _whole_number(1, MAX_ATTEMPT), "k": _whole_number(1, MAX_GROUPS),
    "rounds": _round_range,
    "clients": _listed(_identifier), "stale": _listed(_stale_update), "calls": _listed(_call),
    "mark_counted": _flag,
}


def check_fields(payload: Mapping[str, Any], prefix: str = "") -> None:
    """Check every known field present (None counts as absent: a handler
    that needs the field refuses it with `require`)."""
    for key, check in FIELDS.items():
        value = payload.get(key)
        if value is not None:
            check(value, prefix + key)


def split_args(args: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(bound config, payload) from OpenWhisk's merged args."""
    bound = {k: v for k, v in args.items() if k.startswith(BOUND_PREFIX)}
    payload = {k: v for k, v in args.items()
               if not k.startswith(BOUND_PREFIX) and not k.startswith(PLATFORM_PREFIX)}
    return bound, payload


def _scrub(text: str, bound: Mapping[str, str]) -> str:
    """Exception texts may quote a URL or a setting; never let a bound value
    out, nor a piece of the bound data credentials, nor any URL's user info."""
    values = [v for v in bound.values() if isinstance(v, str)] + secrets_in(bound)
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return masked(text)


def _checked(handle: Handler, bound: dict[str, str], payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Verify, then run; bad input becomes (4xx, error). Crashes propagate."""
    try:
        verify(bound.get("FK_TOKEN_SECRET", ""), payload)
    except TokenError as exc:
        return 401, {"error": f"unauthorized: {exc}"}
    function = bound.get("FK_FUNCTION")
    if function and payload.get("function") != function:
        # One secret signs for every function: the signed name is what
        # keeps a payload made for one function from being replayed to another.
        return 401, {"error": f"unauthorized: the token was issued for another function than {function}"}
    try:
        check_fields(payload)
        result = handle(payload, bound)
    except BAD_INPUT as exc:
        return 400, {"error": _scrub(f"bad request: {exc}", bound)}
    if not isinstance(result, dict):  # a handler bug, not bad input
        raise TypeError(f"handler returned {type(result).__name__}, not a dict")
    return (400 if "error" in result else 200), _finite(result)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity made null. A loss diverges to NaN
    on a bad learning rate; strict JSON has no such number, and OpenWhisk
    refuses an action whose result it cannot parse, which would fail the
    client instead of reporting its (meaningless) loss."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Crash(RuntimeError):
    """A crash whose own text quoted a bound value: raised in its place,
    with that value as ***, so that the activation's error does not carry it."""


def openwhisk_main(handle: Handler, args: Mapping[str, Any]) -> dict[str, Any]:
    bound, payload = split_args(args)
    try:
        return _checked(handle, bound, payload)[1]
    except Exception as exc:  # noqa: BLE001 - a crash propagates (a developer error), scrubbed
        # The whole traceback, chained exceptions included, goes to the
        # activation's log: raised as it is only when it quotes no secret.
        trace = traceback.format_exc()
        if _scrub(trace, bound) == trace:
            raise
        sys.stderr.write(_scrub(trace, bound))
        raise Crash(_scrub(f"{type(exc).__name__}: {exc}", bound)) from None


def http_main(handle: Handler, request) -> tuple[str, int, dict[str, str]]:
    """functions-framework entry: returns (JSON body, status, headers)."""
    bound = {k: v for k, v in os.environ.items() if k.startswith(BOUND_PREFIX)}
    try:
        payload = request.get_json(silent=True)
    except RecursionError:  # nested deeper than the parser goes: not a payload of ours
        payload = None
    if not isinstance(payload, dict):
        return json.dumps({"error": "bad request: expected a JSON object"}), 400, dict(JSON_HEADERS)
    try:
        status, body = _checked(handle, bound, payload)
    except Exception as exc:  # noqa: BLE001 - a crash: logged, answered as one
        sys.stderr.write(_scrub(traceback.format_exc(), bound))
        error = _scrub(f"crash: {type(exc).__name__}: {exc}", bound)[:500]
        return json.dumps({"error": error}), 500, {**JSON_HEADERS, "X-Google-Status": "crash"}
    return json.dumps(body), status, dict(JSON_HEADERS)


def require(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadRequest(f"payload field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value
