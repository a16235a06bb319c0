"""A session's secure-aggregation settings and what a function needs to
take part: the client secret bound to client functions, the round's
context and threshold.

The session spec carries `secure_aggregation: {threshold, scale,
neighbours}` (the keeper writes it): threshold is the share of the holders
of a client's key shares that rebuild its secrets (None: more than half),
scale the fixed-point scale of quantization, neighbours SecAgg+'s sparse
graph (None: every pair of clients; see graph.py).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..entry import BadRequest
from . import graph
from .field import DEFAULT_SCALE
from .protocol import default_threshold

CLIENT_SECRET_KEY = "FK_CLIENT_SECRET"


def settings(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The session's secure-aggregation settings, checked; None when off."""
    raw = spec.get("secure_aggregation")
    if raw in (None, False):
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("session secure_aggregation must be a mapping")
    threshold = raw.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold <= 1):
        raise BadRequest(f"secure_aggregation threshold must be a share in (0, 1], got {threshold!r}")
    scale = raw.get("scale", DEFAULT_SCALE)
    if scale is None:
        scale = DEFAULT_SCALE
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 2 ** 40 \
            or not math.isfinite(scale):
        raise BadRequest(f"secure_aggregation scale must be a positive number below 2^40, got {scale!r}")
    neighbours = raw.get("neighbours")
    if neighbours is not None and neighbours != graph.LOG and (
            isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 2 <= neighbours <= 10_000):
        raise BadRequest(f"secure_aggregation neighbours must be `log` or a number of neighbours from 2, "
                         f"got {neighbours!r}")
    return {"threshold": threshold, "scale": float(scale), "neighbours": neighbours}


def threshold(sa: Mapping[str, Any], n: int) -> int:
    """Shares needed to rebuild a secret of a round whose U1 has n clients:
    a share of the holders of one client's shares (all of U1, or with
    SecAgg+'s neighbours, the client and its neighbours)."""
    m = graph.neighbourhood_size(sa.get("neighbours"), n)
    if sa.get("threshold") is None:
        return default_threshold(m)
    return min(m, max(2, math.ceil(sa["threshold"] * m)))


def neighbours(sa: Mapping[str, Any], session: str, rnd: int, u1) -> dict[str, frozenset[str]] | None:
    """The round's neighbour graph over U1 (None: every pair of clients)."""
    return graph.neighbours(context(session, rnd), u1, sa.get("neighbours"))


def client_secret(bound: Mapping[str, str]) -> bytes:
    """The secret client functions derive their keys from. It is bound to
    client functions only: the aggregator never has it."""
    value = bound.get(CLIENT_SECRET_KEY) or ""
    if len(value) < 16:
        raise BadRequest(f"secure aggregation needs {CLIENT_SECRET_KEY} (16 characters or more) bound "
                         "to the client functions")
    return value.encode()


def context(session: str, rnd: int) -> bytes:
    """What binds keys, seeds and ciphertexts to one round of one session."""
    return f"{session}/{rnd}".encode()
