"""A data set URL's credentials: how they reach the function that
downloads it, and how a request for it is authorised.

Credentials are never stored with a session: the store and every attempt
record are read by whoever looks at the session. The keeper stores the URL
without its user info and binds the user info of each origin to the
functions that download data sets (BOUND_KEY: a JSON object from
"scheme://host[:port]" to "user:password" as the URL wrote it). A URL that
still carries its user info (a local check of the user's own model, a
`model validate --data` URL) is used as it is. Either way the user info is
sent as HTTP Basic authorisation, only to that URL and never on to where it
redirects.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Mapping
from urllib.parse import unquote

from .urls import origin, split_userinfo

BOUND_KEY = "FK_DATA_CREDENTIALS"
#: A bound value longer than this is not credentials (JSON of a few origins).
MAX_BOUND_BYTES = 64 * 1024


def bound_credentials(bound: Mapping[str, Any]) -> dict[str, str]:
    """The credentials bound to this function ({} when none). Malformed
    ones are bad input (a new deploy binds them again), refused without
    showing them."""
    from .entry import BadRequest   # here: the entry scrubs with secrets_in() below
    raw = bound.get(BOUND_KEY)
    if not raw:
        return {}
    try:
        if not isinstance(raw, str) or len(raw) > MAX_BOUND_BYTES:
            raise ValueError
        creds = json.loads(raw)
        if not isinstance(creds, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in creds.items()):
            raise ValueError
    except (ValueError, RecursionError):
        raise BadRequest(f"the data credentials bound to this function ({BOUND_KEY}) are not a JSON object "
                         "of origins to user info; deploy the function again") from None
    return creds


def secrets_in(bound: Mapping[str, Any]) -> list[str]:
    """The pieces of the bound credentials a message could quote: each user
    info and its password, as written and unescaped."""
    try:
        creds = bound_credentials(bound)
    except ValueError:
        return []
    out = []
    for userinfo in creds.values():
        password = userinfo.partition(":")[2]
        out += [userinfo, unquote(userinfo), password, unquote(password)]
    return [s for s in out if s]


def authorised(url: str, credentials: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(the URL to request, its Authorization header or None): the user
    info written in `url`, else what `credentials` bind to its origin."""
    bare, userinfo = split_userinfo(url)
    if not userinfo and credentials:
        userinfo = credentials.get(origin(bare), "")
    if not userinfo:
        return bare, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return bare, f"Basic {token}"
