"""Checks of single values whose type alone says too little: URLs, host
names, ports, names, checksums. Each is an annotated `str` so the models keep
plain strings, and each refusal says what was expected."""
from __future__ import annotations

import re
from typing import Annotated, Any, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator

# How a URL may be shown (its user info as ***, its query elided): the
# functions' own rule, so that the keeper and the functions show URLs alike.
from flcommon.urls import shown as shown_url  # noqa: F401  (re-exported)
from flcommon.urls import split_userinfo

from .units import count

# ${VAR} or ${VAR:-default}: how a config refers to the environment.
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def only_references(text: str) -> bool:
    """True when `text` is nothing but ${VAR} references without defaults."""
    return bool(text) and not ENV_RE.sub("", text).strip() and \
        all(not m.group(2) for m in ENV_RE.finditer(text))

# The original sample's "fill me in" markers, e.g. <ADD_IP_HERE>.
_PLACEHOLDER_RE = re.compile(r"<[^<>]*>")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                      r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
# The placeholder `config show` prints for a secret it cannot name a source for.
REDACTED = "***"
# What mongo_config.url holds where mongo_config.password goes: not a secret.
PASSWORD_PLACEHOLDER = "PASSWORD"
# Shorter values are not masked in logs (they would mask common words) and a
# user name this short in a URL is a login name, not a token.
MIN_SECRET_LEN = 4


def no_placeholder(v: str) -> str:
    m = _PLACEHOLDER_RE.search(v)
    if m:
        raise ValueError(f"still holds the placeholder {m.group(0)!r}: put the real value here")
    return v


def url_userinfo(v: str) -> str:
    """The user info of a URL as urlsplit finds it ('' when none), without
    urlsplit, which raises on an unclosed '[' in any string of the config."""
    return split_userinfo(v)[1]


def url_credential(v: str) -> Optional[str]:
    """The secret in a URL's user info: its password, else the user name, as
    a token is written (https://<token>@host), unless it is too short to be
    one (`git@`); None when there is neither."""
    user, _, password = url_userinfo(v).partition(":")
    if password:
        return password
    return user if len(user) >= MIN_SECRET_LEN else None


def _check_port(port: str, text: str) -> None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        shown = shown_url(text)
        # What looks like a port is part of the password when one holds an unescaped '/', '?' or '#'.
        which = f"port {port!r}" if port in shown else "a port that is not a number"
        raise ValueError(f"{shown!r} has {which}; expected a number from 1 to 65535")


def url(v: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """A URL with one of `schemes` and a host."""
    no_placeholder(v)
    expected = " or ".join(f"{s}://" for s in schemes)
    shown = shown_url(v)
    if any(c.isspace() for c in v):
        raise ValueError(f"{shown!r} is not a URL: it contains white space")
    try:
        u = urlsplit(v)
    except ValueError:  # e.g. an unclosed '[' of an IPv6 address
        raise ValueError(f"{shown!r} is not a URL; expected {expected}host...") from None
    if not u.scheme or "://" not in v:
        raise ValueError(f"{shown!r} is not a URL; expected {expected}host...")
    if u.scheme.lower() not in schemes:
        raise ValueError(f"{shown!r} has scheme {u.scheme!r}; expected {expected}")
    netloc = u.netloc.rpartition("@")[2]
    host, port = (netloc.rsplit(":", 1) + [""])[:2] if not netloc.endswith("]") else (netloc, "")
    if not host or not _HOST_RE.fullmatch(host):
        raise ValueError(f"{shown!r} has no valid host name")
    if port or netloc.endswith(":"):
        _check_port(port, v)
    return v


def http_url(v: str) -> str:
    return url(v, ("http", "https"))


def host_port(v: str) -> str:
    """host, host:port, or an http(s) URL."""
    no_placeholder(v)
    if "://" in v:
        return http_url(v)
    host, sep, port = v.rpartition(":") if not v.endswith("]") else (v, "", "")
    if not sep:
        host = v
    if not host or not _HOST_RE.fullmatch(host):
        raise ValueError(f"{shown_url(v)!r} is not a host name or host:port")
    if sep:
        _check_port(port, v)
    return v


def dns_label(v: str) -> str:
    """A Kubernetes namespace or similar: lower-case letters, digits, '-'."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
        raise ValueError(f"{v!r} is not a valid name: lower-case letters, digits and '-', "
                         "at most 63, starting and ending with a letter or digit")
    return v


def openwhisk_name(v: str) -> str:
    """An OpenWhisk namespace: what the controller's entity name pattern allows."""
    if len(v) > 256 or not re.fullmatch(r"\w|\w[\w@ .\-]*[\w@.\-]", v, re.ASCII):
        raise ValueError(f"{v!r} is not a valid OpenWhisk namespace")
    return v


_IMAGE_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_REGISTRY = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_IMAGE_RE = re.compile(rf"(?:{_REGISTRY}/)?{_IMAGE_PATH}(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?")
_PREFIX_RE = re.compile(rf"{_REGISTRY}(?:/{_IMAGE_PATH})?")


def image_ref(v: str) -> str:
    """A container image reference: [registry[:port]/]path[:tag][@sha256:...]."""
    no_placeholder(v)
    if not _IMAGE_RE.fullmatch(v):
        raise ValueError(f"{v!r} is not a container image reference such as ghcr.io/acme/image:tag "
                         "(lower-case path, no scheme)")
    return v


def registry_prefix(v: str) -> str:
    """Where images are pushed: registry[:port][/path], no tag, no scheme."""
    no_placeholder(v)
    if not _PREFIX_RE.fullmatch(v.rstrip("/")):
        raise ValueError(f"{v!r} is not a registry prefix such as ghcr.io/acme or localhost:5000 "
                         "(no scheme, no tag)")
    return v


def session_name(v: str) -> str:
    """A name that can lead file names and store keys as it is."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
        raise ValueError(f"{v!r} cannot name sessions: use letters, digits, '_', '.' and '-' "
                         "(at most 64, starting with a letter or digit)")
    return v


def session_id(v: str) -> str:
    """A session id as `start` and `sweep` make them, <name>-<time>-<hex> or
    <sweep id>-<run>: one file name (of the run log), never a path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
        raise ValueError(f"{v!r} is not a session id: letters, digits, '_', '.' and '-' (at most 128, "
                         "starting with a letter or digit), as `fedkeeper status` lists them")
    return v


def cluster_name(v: str) -> str:
    """A cluster's name leads state directories, namespaces and metric labels."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
        raise ValueError(f"cluster name {v!r}: use letters, digits, '_', '.' and '-' "
                         "(at most 63, starting with a letter or digit)")
    return v


def sha256_hex(v: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", v):
        raise ValueError(f"{v!r} is not a sha256 checksum (64 hexadecimal digits)")
    return v


def port_number(v: Any) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {v!r}")
    return v


def currency_code(v: str) -> str:
    if not re.fullmatch(r"[A-Z]{3}", v):
        raise ValueError(f"{v!r} is not a currency code such as USD or EUR (three capital letters)")
    return v


def positive_count(v: Any) -> Any:
    """A count written as a number or a numeric string; '' means unset."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return v
    return count(v, "count")


HttpUrl = Annotated[str, AfterValidator(http_url)]
HostPort = Annotated[str, AfterValidator(host_port)]
DnsLabel = Annotated[str, AfterValidator(dns_label)]
OpenWhiskName = Annotated[str, AfterValidator(openwhisk_name)]
Sha256 = Annotated[str, AfterValidator(sha256_hex)]
SessionName = Annotated[str, AfterValidator(session_name)]
ImageRef = Annotated[str, AfterValidator(image_ref)]
RegistryPrefix = Annotated[str, AfterValidator(registry_prefix)]
Port = Annotated[int, BeforeValidator(port_number)]
Currency = Annotated[str, AfterValidator(currency_code)]
