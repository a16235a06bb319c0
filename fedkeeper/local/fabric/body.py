"""Bounded reading of request bodies for the fabric's HTTP server:
Content-Length or chunked transfer coding, never more than a limit, and any
framing it cannot trust refused with a 4xx (the connection is then closed,
so that a body it did not read can never be taken for the next request)."""
from __future__ import annotations

import json
import math
import re
from typing import Any, BinaryIO

from .status import ApiError

# A chunk-size line: hex digits, optional extensions; anything longer is not one.
_MAX_CHUNK_LINE = 1024
# The size itself: hex digits only (int(x, 16) would also take "-1", "+5",
# "1_0" and "0x10", and a negative size read the socket to its end).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_TRAILER_LINES = 32
# Deeper JSON than this is refused before the parser recurses into it.
MAX_JSON_DEPTH = 512


class BodyError(ApiError):
    """A request body that cannot be read; the connection must close."""


def _too_large(n: int | str, limit: int) -> BodyError:
    return BodyError(413, f"The request content was malformed:\nRequest entity too large: {n} > {limit} bytes.")


def content_length(headers) -> int | None:
    """The declared length, None when there is none; BodyError when it is
    not a single non-negative decimal number."""
    values = headers.get_all("Content-Length") or []
    if not values:
        return None
    if len(set(v.strip() for v in values)) != 1:
        raise BodyError(400, "The request has conflicting Content-Length headers.")
    raw = values[0].strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:   # "²".isdigit() holds too
        raise BodyError(400, f"The request's Content-Length is not a valid length: {raw[:40]!r}.")
    return int(raw)


def read_body(headers, rfile: BinaryIO, limit: int) -> bytes:
    """The request body (b"" when there is none), at most `limit` bytes."""
    te = headers.get_all("Transfer-Encoding") or []
    n = content_length(headers)
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise BodyError(501, f"Transfer-Encoding {', '.join(codings)[:60]} is not supported; "
                                 "send the body with Content-Length or chunked.")
        if n is not None:
            raise BodyError(400, "The request has both Content-Length and Transfer-Encoding.")
        return _read_chunked(rfile, limit)
    if not n:
        return b""
    if n > limit:
        raise _too_large(n, limit)
    data = rfile.read(n)
    if len(data) != n:
        raise BodyError(400, "The request body ended before its Content-Length.")
    return data


def _read_line(rfile: BinaryIO) -> bytes:
    line = rfile.readline(_MAX_CHUNK_LINE + 1)
    if len(line) > _MAX_CHUNK_LINE or not line.endswith(b"\n"):
        raise BodyError(400, "The request's chunked body is malformed.")
    return line.rstrip(b"\r\n")


def _read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    # One buffer, not a bytes object per chunk: a body sent in tiny chunks
    # would otherwise hold many times its size.
    body = bytearray()
    while True:
        size_text = _read_line(rfile).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise BodyError(400, "The request's chunked body is malformed.")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise _too_large(f"more than {limit}", limit)
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.read(2) != b"\r\n":
            raise BodyError(400, "The request's chunked body is malformed.")
        body += chunk
    for _ in range(_MAX_TRAILER_LINES):
        if not _read_line(rfile):
            return bytes(body)
    raise BodyError(400, "The request's chunked body has too many trailer lines.")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e400) is
    refused rather than read as infinity, which JSON cannot hold."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of brackets outside strings, counted without
    recursion (the JSON parser recurses once per level)."""
    depth = deepest = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json(raw: bytes) -> Any:
    """A JSON document (None for an empty body); 400 for anything else."""
    if not raw:
        return None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _nesting_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, f"The request content was malformed: JSON nested deeper than {MAX_JSON_DEPTH} levels.")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request content was malformed: not valid JSON.") from None
