"""Cloud Functions answers -> ErrorClass.

Two kinds of answers reach the keeper: control-plane errors, which the
official client raises as `google.api_core.exceptions`, and data-plane HTTP
answers from the function URL, which the shared HTTP invoker classifies with
`google_status_hook` added for the one Google-specific signal.
"""
from __future__ import annotations

from typing import Mapping

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

from ..base import ErrorClass, ProviderError
from ..http_answers import error_snippet, retry_after_seconds

# functions-framework (and the Cloud Functions front end) mark an uncaught
# exception in the function with this header on the 500 answer.
GOOGLE_STATUS_HEADER = "X-Google-Status"


def google_status_hook(status: int, headers: Mapping[str, str], body: bytes):
    marker = (headers.get(GOOGLE_STATUS_HEADER) or "").strip().lower()
    if status == 500 and marker == "crash":
        text = error_snippet(body) or "function crashed"
        return ErrorClass.DEVELOPER_ERROR, f"crash: {text}"
    return None


def _retry_after(exc: gexc.GoogleAPICallError) -> float | None:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is None:
        return None
    try:
        return retry_after_seconds(headers.get("Retry-After"))
    except Exception:
        return None


def map_api_error(exc: BaseException, what: str) -> ProviderError:
    """A control-plane failure as a classified ProviderError."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, gexc.GoogleAPICallError):
        code = getattr(exc, "code", None)
        status = int(code) if isinstance(code, int) else None
        msg = f"{what}: {exc.message}" if getattr(exc, "message", None) else f"{what}: {exc}"
        if isinstance(exc, gexc.NotFound):
            return ProviderError(ErrorClass.FUNCTION_MISSING, msg, status=status)
        if isinstance(exc, (gexc.PermissionDenied, gexc.Unauthenticated, gexc.Unauthorized,
                            gexc.Forbidden)):
            return ProviderError(ErrorClass.AUTH, msg, status=status)
        if isinstance(exc, (gexc.ResourceExhausted, gexc.TooManyRequests)):
            return ProviderError(ErrorClass.THROTTLED, msg, status=status,
                                 retry_after=_retry_after(exc))
        if isinstance(exc, (gexc.DeadlineExceeded, gexc.GatewayTimeout)):
            return ProviderError(ErrorClass.TIMEOUT, msg, status=status)
        if isinstance(exc, gexc.ServiceUnavailable):
            return ProviderError(ErrorClass.UNREACHABLE, msg, status=status)
        return ProviderError(ErrorClass.PLATFORM_ERROR, msg, status=status)
    if isinstance(exc, auth_exc.RefreshError):
        if getattr(exc, "retryable", False):
            # google-auth marks the token endpoint's 5xx and 429 (after its
            # own tries) retryable: an outage, not refused credentials.
            return ProviderError(ErrorClass.UNREACHABLE, f"{what}: token endpoint unavailable: {exc}")
        return ProviderError(ErrorClass.AUTH, f"{what}: credentials refused: {exc}")
    if isinstance(exc, (auth_exc.TransportError, requests.exceptions.ConnectionError,
                        requests.exceptions.Timeout)):
        return ProviderError(ErrorClass.UNREACHABLE, f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):  # concurrent.futures.TimeoutError is an alias
        return ProviderError(ErrorClass.TIMEOUT, f"{what}: operation did not finish in time")
    if isinstance(exc, gexc.RetryError):
        return ProviderError(ErrorClass.TIMEOUT, f"{what}: {exc}")
    return ProviderError(ErrorClass.PLATFORM_ERROR, f"{what}: {type(exc).__name__}: {exc}")
