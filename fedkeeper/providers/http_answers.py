"""How the answer of a function that is an HTTP endpoint maps onto an
outcome: its status, body and Retry-After, read the same way for every
platform. A platform adds its own rules through a `StatusHook` (for
example a header that marks a crashed function)."""
from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any, Callable, Mapping, Optional

from .base import ErrorClass

#: (status, headers, body) -> (error class, message) or None to fall through
#: to the generic rules. Headers are case-insensitive (http.client's message,
#: or requests' mapping for a request sent through a proxy).
StatusHook = Callable[[int, Mapping[str, str], bytes], Optional[tuple[ErrorClass, str]]]
#: error texts taken from an answer are cut to this many characters
ERROR_TEXT_CHARS = 300


#: The longest Retry-After honoured: a proxy's `inf` or a date years ahead
#: would stall a retry (or a helper call's sleep) for good.
MAX_RETRY_AFTER_S = 600.0


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110);
    bounded to MAX_RETRY_AFTER_S, None when it is neither (or not finite)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def error_snippet(body: bytes) -> str:
    """The start of an error answer's body, on one line, at most
    ERROR_TEXT_CHARS characters."""
    text = body[:ERROR_TEXT_CHARS * 2].decode("utf-8", "replace").strip()
    text = " ".join(text.split())
    return text[:ERROR_TEXT_CHARS]


def classify_response(status: int, headers: Mapping[str, str], body: bytes,
                      hook: StatusHook | None = None
                      ) -> tuple[bool, ErrorClass | None, str | None, dict[str, Any] | None]:
    """(ok, error class, error text, result) for one HTTP answer.

    The platform's own answers (throttling, size limits, gateway errors) are
    decided by status. For 4xx/5xx statuses that a function itself may send
    (400, 401, 403, 404, 500...) a JSON object with an "error" key means the
    function ran and refused: that is an application error, not an auth or
    missing-function problem of the platform.
    """
    if 200 <= status < 300:
        if status == 204 or not body:
            return True, None, None, {}
        obj = _json_object(body)
        if obj is None:
            return False, ErrorClass.APPLICATION_ERROR, \
                f"function answered {status} with a body that is not a JSON object", None
        return True, None, None, obj
    if hook is not None:
        decided = hook(status, headers, body)
        if decided is not None:
            return False, decided[0], decided[1], None
    obj = _json_object(body)
    if status in (408, 504):
        return False, ErrorClass.TIMEOUT, f"HTTP {status}: {error_snippet(body) or 'timed out'}", None
    if status == 429:
        return False, ErrorClass.THROTTLED, f"HTTP 429: {error_snippet(body) or 'too many requests'}", None
    if status == 413:
        return False, ErrorClass.PAYLOAD_TOO_LARGE, "HTTP 413: request entity too large", None
    if status in (502, 503):
        return False, ErrorClass.PLATFORM_ERROR, f"HTTP {status}: {error_snippet(body)}", None
    if obj is not None and "error" in obj:
        return False, ErrorClass.APPLICATION_ERROR, \
            f"HTTP {status}: {str(obj['error'])[:ERROR_TEXT_CHARS]}", None
    if status in (401, 403):
        return False, ErrorClass.AUTH, f"HTTP {status}: {error_snippet(body) or 'not authorized'}", None
    if status == 404:
        return False, ErrorClass.FUNCTION_MISSING, f"HTTP 404: {error_snippet(body) or 'not found'}", None
    if 400 <= status < 500:
        return False, ErrorClass.APPLICATION_ERROR, f"HTTP {status}: {error_snippet(body)}", None
    return False, ErrorClass.PLATFORM_ERROR, f"HTTP {status}: {error_snippet(body)}", None
