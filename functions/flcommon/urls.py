"""How a URL's user info is found, dropped and shown: one rule for the
keeper's messages and the functions' alike. Plain string work, so that no
malformed URL makes any of it raise."""
from __future__ import annotations

import re

REDACTED = "***"
# A URL's scheme and user info inside free text (an error message): up to
# the last '@' before the host part's end, so that a password holding an
# '@' is masked whole.
_USERINFO_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]*@")


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


def user_info_ends_early(url: str) -> bool:
    """Whether `url`'s user info holds an unescaped '/', '?' or '#', which a
    parser takes for the end of the host (showing part of the password as
    the host): an '@' past the host part, not inside a query option
    (`?appName=x@lab`)."""
    scheme, sep, rest = url.partition("://")
    netloc, tail = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
    before = tail.partition("@")[0]
    in_query = "?" in before[1:] or (before.startswith("?") and "=" in before)
    return bool(sep) and "@" not in netloc and "@" in tail and not in_query


def origin(url: str) -> str:
    """'scheme://host[:port]' of `url`, lower case, without user info."""
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


def masked(text: str) -> str:
    """`text` (say, an error a library wrote) with the user info of every
    URL in it as ***."""
    return _USERINFO_IN_TEXT.sub(rf"\1{REDACTED}@", text)
