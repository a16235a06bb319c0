"""SecAgg+'s sparse neighbour graph (Bell et al. 2020): instead of every
pair of clients, each client masks with, and shares its secrets among, only
its k neighbours, k = O(log n). A client's masking work and the shares it
sends then grow with log n instead of n.

The graph is a Harary-style ring: the round's U1 is put in an order every
party can compute and nobody chooses (sorted by SHA-256 of the round's
context and the client id), and each client is joined to the k/2 clients on
either side of it (k rounded up to even). Every client has exactly k
neighbours and the graph is connected. With k >= n - 1 it is the complete
graph of the original protocol.

`neighbours: log` chooses k = 2 x ceil(log2 n), at least 2: logarithmic,
as SecAgg+ asks. Bell et al. derive the constant from the share of
dropouts tolerated and the failure probability wanted; this default does
not, so set k for a stated guarantee. Their analysis draws the graph's
order at random on the server; here it follows from the round's context,
which no party chooses (semi-honest setting). A server that drops clients
on purpose can still cut a neighbourhood below its threshold, which the
aggregator then refuses.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable

LOG = "log"


def degree(setting: Any, n: int) -> int | None:
    """The neighbours each of n clients has (None: every other client)."""
    if setting is None:
        return None
    k = 2 * math.ceil(math.log2(max(n, 2))) if setting == LOG else int(setting)
    k += k % 2
    return None if k >= n - 1 else k


def neighbourhood_size(setting: Any, n: int) -> int:
    """Holders of one client's shares: its neighbours and itself."""
    k = degree(setting, n)
    return n if k is None else k + 1


def neighbours(context: bytes, clients: Iterable[str], setting: Any) -> dict[str, frozenset[str]] | None:
    """client -> its neighbours (itself excluded) in the round's graph; None
    for the complete graph."""
    clients = sorted(set(clients))
    k = degree(setting, len(clients))
    if k is None:
        return None
    order = sorted(clients, key=lambda c: (hashlib.sha256(b"fk-secagg/graph/" + context + b"/" + c.encode())
                                           .digest(), c))
    n, half = len(order), k // 2
    out: dict[str, set[str]] = {c: set() for c in order}
    for i, c in enumerate(order):
        for d in range(1, half + 1):
            other = order[(i + d) % n]
            out[c].add(other)
            out[other].add(c)
    return {c: frozenset(v) for c, v in out.items()}


def parts(neighbours: dict[str, frozenset[str]] | None, clients: Iterable[str]) -> list[list[str]]:
    """The connected parts of the graph the `clients` form among themselves
    (one part for the complete graph), each sorted, largest first."""
    members = set(clients)
    if neighbours is None:
        return [sorted(members)] if members else []
    left, out = set(members), []
    while left:
        start = min(left)
        seen, todo = {start}, [start]
        while todo:
            for other in neighbours.get(todo.pop(), ()):
                if other in left and other not in seen:
                    seen.add(other)
                    todo.append(other)
        left -= seen
        out.append(sorted(seen))
    return sorted(out, key=lambda part: (-len(part), part))
