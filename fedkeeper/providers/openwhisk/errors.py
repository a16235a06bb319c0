"""OpenWhisk's answers -> ErrorClass: the controller's HTTP statuses,
failed connections, and activation records (status strings and codes,
timeouts as OpenWhisk annotates them)."""
from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

import requests
import urllib3

from ..base import ErrorClass, Outcome, ProviderError
from ..http_answers import error_snippet, retry_after_seconds
from .http import ConnectFailed

_STATUS_BY_CODE = {0: "success", 1: "application error", 2: "action developer error",
                   3: "whisk internal error"}


def _error_text(data: bytes | str | None) -> str:
    if not data:
        return ""
    try:
        j = json.loads(data)
        if isinstance(j, dict) and j.get("error"):
            return error_snippet(str(j["error"]).encode())
    except (ValueError, TypeError):
        pass
    return error_snippet(data if isinstance(data, bytes) else str(data).encode())


def transport_error(where: str, exc: BaseException) -> ProviderError:
    """A failed connection to the controller, classified (UNREACHABLE):
    `requests` errors of the control plane, standard library ones
    (http.client, socket, ssl) of the hot path (http.py)."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError, ssl.SSLError)) \
            or "ssl" in low or "certificate" in low:
        return ProviderError(ErrorClass.UNREACHABLE,
                             f"TLS with {where} failed ({type(exc).__name__}); if the cluster "
                             "uses a self-signed certificate, trust it or set insecure: true for it")
    if "refused" in low:
        reason = "connection refused"
    elif "name or service not known" in low or "nodename nor servname" in low \
            or "name resolution" in low:
        reason = "host name not found"
    elif isinstance(exc, (urllib3.exceptions.NewConnectionError, ConnectFailed)):
        reason = "cannot connect"
    elif isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return ProviderError(ErrorClass.UNREACHABLE, f"{where} did not answer in time")
    elif isinstance(exc, (urllib3.exceptions.ProtocolError, http.client.HTTPException, ConnectionError)):
        reason = "connection closed"
    else:
        reason = type(exc).__name__
    return ProviderError(ErrorClass.UNREACHABLE, f"cannot reach {where} ({reason})")

def status_error(where: str, status: int, data: bytes | str | None, what: str,
                 headers: Any = None) -> ProviderError:
    """An HTTP answer of the controller other than the expected one, classified."""
    detail = _error_text(data)
    msg = f"{what}: {where} answered {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return ProviderError(ErrorClass.AUTH, msg + " (check the cluster's auth key)", status=status)
    if status == 404:
        return ProviderError(ErrorClass.FUNCTION_MISSING, msg, status=status)
    if status == 413:
        return ProviderError(ErrorClass.PAYLOAD_TOO_LARGE, msg, status=status)
    if status == 429:
        ra = retry_after_seconds(headers.get("Retry-After") if headers is not None else None)
        return ProviderError(ErrorClass.THROTTLED, msg, retry_after=ra, status=status)
    if status >= 500 or status == 409:
        return ProviderError(ErrorClass.PLATFORM_ERROR, msg, status=status)
    return ProviderError(ErrorClass.APPLICATION_ERROR, msg, status=status)


# Longest error text kept from an activation record (the rest is cut).
MAX_ERROR_CHARS = 2000


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def activation_outcome(rec: dict) -> Outcome:
    """An activation record as an Outcome, its status mapped onto ErrorClass.
    The record comes from the controller: fields of the wrong type are
    dropped, and a record without a response object is a platform error."""
    aid = rec.get("activationId")
    aid = aid if isinstance(aid, str) else ""
    resp = rec.get("response")
    if not isinstance(resp, dict):
        return Outcome(platform_id=aid, ok=False, error_class=ErrorClass.PLATFORM_ERROR,
                       error="the activation record has no response")
    code = resp.get("statusCode", rec.get("statusCode"))
    status = resp.get("status") or (_STATUS_BY_CODE.get(code) if isinstance(code, int) else None)
    result = resp.get("result")
    if result is not None and not isinstance(result, dict):
        result = {"value": result}
    annotations = rec.get("annotations")
    ann = {a["key"]: a.get("value") for a in annotations
           if isinstance(a, dict) and isinstance(a.get("key"), str)} if isinstance(annotations, list) else {}
    start = _number(rec.get("start"))
    end = _number(rec.get("end"))
    init_ms = _number(ann.get("initTime"))
    size = _number(resp.get("size"))
    out = Outcome(platform_id=aid, ok=status == "success", result=result,
                  start=start / 1000.0 if start is not None else None,
                  end=end / 1000.0 if end else None,
                  duration_ms=_number(rec.get("duration")), wait_ms=_number(ann.get("waitTime")),
                  init_ms=init_ms, cold_start=init_ms is not None,
                  result_bytes=int(size) if size else (len(json.dumps(result)) if result else 0))
    if out.ok:
        return out
    err = result.get("error") if isinstance(result, dict) else None
    if err is not None and not isinstance(err, str):
        err = json.dumps(err)
    out.error = (err or (status if isinstance(status, str) else None) or "failed")[:MAX_ERROR_CHARS]
    if status == "application error":
        out.error_class = ErrorClass.APPLICATION_ERROR
    elif status == "action developer error":
        timed_out = ann.get("timeout") is True or "exceeded its time limits" in (err or "")
        out.error_class = ErrorClass.TIMEOUT if timed_out else ErrorClass.DEVELOPER_ERROR
    else:
        out.error_class = ErrorClass.PLATFORM_ERROR
    return out
