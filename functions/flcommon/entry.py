"""Thin-entry helpers: one for OpenWhisk (`main(args)`), one for HTTP
platforms served by functions-framework (Cloud Functions, Knative).

Rules, the same on every platform:
- configuration bound at deploy time (FK_* keys: OpenWhisk merges them into
  args, HTTP platforms put them in the environment) is split off the payload
  and never echoed back;
- a token that does not verify is refused (OpenWhisk: an `error` result,
  i.e. "application error"; HTTP: 401);
- bad input (`BadRequest`, a corrupt blob) is refused the same way (HTTP 400);
- anything else is a genuine crash and is left to the platform to report
  ("action developer error" / HTTP 500), so the keeper retries it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from .auth import TokenError, verify
from .blobs import BlobError

BOUND_PREFIX = "FK_"
Handler = Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]


class BadRequest(ValueError):
    """The payload or the data it points at is not acceptable."""


def split_args(args: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    bound = {k: v for k, v in args.items() if k.startswith(BOUND_PREFIX)}
    payload = {k: v for k, v in args.items() if not k.startswith(BOUND_PREFIX) and not k.startswith("__")}
    return bound, payload


def _run(handle: Handler, bound: dict[str, str], payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        verify(bound.get("FK_TOKEN_SECRET", ""), payload)
    except TokenError as exc:
        return 401, {"error": f"unauthorized: {exc}"}
    try:
        return 200, handle(payload, bound)
    except (BadRequest, BlobError) as exc:
        return 400, {"error": f"bad request: {exc}"}


def openwhisk_main(handle: Handler, args: Mapping[str, Any]) -> dict[str, Any]:
    bound, payload = split_args(args)
    return _run(handle, bound, payload)[1]


def http_main(handle: Handler, request) -> tuple[str, int, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    bound = {k: v for k, v in os.environ.items() if k.startswith(BOUND_PREFIX)}
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return json.dumps({"error": "bad request: expected a JSON object"}), 400, headers
    status, body = _run(handle, bound, payload)
    return json.dumps(body), status, headers


def require(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise BadRequest(f"payload field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value
