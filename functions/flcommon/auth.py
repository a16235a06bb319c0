"""HMAC tokens that bind an invocation to its payload.

The keeper signs each payload (ids and the few small arguments it carries)
with a per-deployment secret. The secret is bound to the function at deploy
time (action parameter / env var) and never travels in a payload. A function
refuses any request whose token does not verify, so nobody who can reach the
endpoint can write an update into someone else's session or round, or change
the client list of an aggregation.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any, Mapping

TOKEN_FIELD = "token"
# What sign() makes: a SHA-256 HMAC in lower-case hex.
_TOKEN = re.compile(r"[0-9a-f]{64}")


class TokenError(Exception):
    """The request's token is missing or does not verify."""


def _message(payload: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in payload.items() if k != TOKEN_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: str, payload: Mapping[str, Any]) -> str:
    if not secret:
        raise TokenError("no token secret configured")
    return hmac.new(secret.encode(), _message(payload), hashlib.sha256).hexdigest()


def signed(secret: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with its token added."""
    out = dict(payload)
    out[TOKEN_FIELD] = sign(secret, payload)
    return out


def verify(secret: str, payload: Mapping[str, Any]) -> None:
    """TokenError unless the payload's token is the one sign() gives it.
    Whatever an unauthenticated caller sends is refused as such, never a
    crash: a token that is not hex (compare_digest raises on non-ASCII
    text) or a payload too deep to encode."""
    token = payload.get(TOKEN_FIELD)
    if not isinstance(token, str) or not token:
        raise TokenError("request carries no token")
    if not _TOKEN.fullmatch(token):
        raise TokenError("token is not a token")
    try:
        expected = sign(secret, payload)
    except (ValueError, TypeError, RecursionError):
        raise TokenError("token does not verify for this payload") from None
    if not hmac.compare_digest(expected.encode(), token.encode()):
        raise TokenError("token does not verify for this payload")
