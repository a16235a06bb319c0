"""A data set's URL: the credentials it may carry, how a request for it is
authorised, and how a message may show it.

Credentials are never stored with a session: the store and every attempt
record are read by whoever looks at the session. The keeper stores the URL
without its user info and binds the user info of each origin to the
function that downloads the data set (BOUND_KEY: a JSON object from
"scheme://host[:port]" to "user:password" as the URL wrote it). A URL that
still carries its user info (a local check of the user's own model) is used
as it is. Either way the user info is sent as HTTP Basic authorisation,
only to that URL and never on to where it redirects.

Plain string work, so that no malformed URL makes any of it raise.
"""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Mapping
from urllib.parse import unquote

from .entry import BadRequest

BOUND_KEY = "FK_DATA_CREDENTIALS"
#: A bound value longer than this is not credentials (JSON of a few origins).
MAX_BOUND_BYTES = 64 * 1024
REDACTED = "***"


def split_userinfo(url: str) -> tuple[str, str]:
    """(`url` without its user info, the user info) as a URL parser reads
    them: the last '@' before the first '/', '?' or '#' after the scheme.
    ('url', '') when there is none."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, ""
    netloc, tail = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
    userinfo, at, host = netloc.rpartition("@")
    return (f"{scheme}://{host}{tail}", userinfo) if at else (url, "")


def origin(url: str) -> str:
    """'scheme://host[:port]' of `url`, lower case, without user info: the
    key its credentials are bound under."""
    bare, _ = split_userinfo(url)
    scheme, _, rest = bare.partition("://")
    return f"{scheme.lower()}://{re.match(r'[^/?#]*', rest).group(0).lower()}"


def shown(url: str) -> str:
    """`url` as a message may print it: what precedes its last '@' (the user
    info, so a key or token) as ***, and its query and fragment (signed URLs
    carry tokens there) elided. The last '@' of the whole string, not of the
    host part: a password with an unescaped '/', '?' or '#' must not show
    either."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _, at, rest = rest.rpartition("@")
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut + 1] + "..."
    return scheme + sep + (f"{REDACTED}@" if at else "") + rest


# A URL's scheme and user info inside free text (an error message).
_USERINFO_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@]*@")


def masked(text: str) -> str:
    """`text` (say, an error a library wrote) with the user info of every
    URL in it as ***."""
    return _USERINFO_IN_TEXT.sub(rf"\1{REDACTED}@", text)


def bound_credentials(bound: Mapping[str, Any]) -> dict[str, str]:
    """The credentials bound to this function ({} when none). Malformed
    ones are bad input (a new deploy binds them again), refused without
    showing them."""
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
