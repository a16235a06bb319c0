"""Secure aggregation (Bonawitz et al. 2017, semi-honest variant) as pure
functions, one per stage. Each runs in its own function invocation; what
one stage hands the next is relayed through the store by the caller.

  U1 advertise    each client publishes two X25519 public keys (c: to
                  encrypt shares, s: to agree pairwise mask seeds).
  U2 share_keys   each client Shamir-shares its s private key and its
                  self-mask seed b among all of U1 (threshold t), each share
                  encrypted to its receiver under AES-GCM.
  U3 mask         each client adds to its quantized update PRG(b) and, for
                  every other j in U2, +PRG(s_ij) if its id sorts before j,
                  -PRG(s_ij) otherwise: the pairwise masks cancel in the sum.
     unmask       each client still there reveals, for every j in U3, its
                  share of b_j, and for every j in U2 but not U3 (dropped
                  after sharing), its share of j's s private key.
  server          with shares from at least t clients it rebuilds the b of
                  every survivor and the s key of every dropout, and strips
                  the masks that do not cancel from the sum of U3's masked
                  vectors. It never holds an unmasked update.

SecAgg+ (Bell et al. 2020), with `neighbours`: the same stages over a sparse
graph (graph.py): a client shares its secrets only with its k neighbours
and itself, masks pairwise only with its neighbours, and t counts among
those k + 1 holders; the server rebuilds each secret from its holders.

Ids are sorted lexicographically; a client's Shamir x-coordinate is its
position in sorted U1, plus one. Everything a client computes comes from
its own secret and the round's context (keys.client_material), so a retried
stage repeats exactly what the first try sent.
"""
from __future__ import annotations

from typing import AbstractSet, Iterable, Mapping, Optional

import numpy as np

from . import field, graph, keys, prg, shamir

PublicKeys = Mapping[str, Mapping[str, bytes]]  # client -> {"c_pk": ..., "s_pk": ...}
# client -> its neighbours in SecAgg+'s sparse graph (graph.py); None: every other client
Neighbours = Optional[Mapping[str, AbstractSet[str]]]


class ProtocolError(ValueError):
    """A stage asked for something the protocol does not allow (too few
    clients, a client asked to reveal both secrets of another, a roster
    that does not carry this client's keys)."""


def default_threshold(n: int) -> int:
    """More than half of U1 (and at least 2): a server that wanted both a
    client's b and its s key would need a majority to disagree."""
    return max(2, n // 2 + 1)


def _mask_info(context: bytes) -> bytes:
    return b"fk-secagg/mask/" + context


def _enc_info(context: bytes) -> bytes:
    return b"fk-secagg/enc/" + context


def _own(secret: bytes, context: bytes, client: str):
    c_sk = keys.private_key(keys.client_material(secret, context, client, "c"))
    s_sk = keys.private_key(keys.client_material(secret, context, client, "s"))
    b = keys.client_material(secret, context, client, "b")
    return c_sk, s_sk, b


def _index(roster: Iterable[str]) -> dict[str, int]:
    return {c: i + 1 for i, c in enumerate(sorted(roster))}


def _around(neighbours: Mapping[str, AbstractSet[str]], client: str, roster: Iterable[str]) -> list[str]:
    """A client and its neighbours, as the roster has them."""
    if client not in neighbours:
        raise ProtocolError(f"{client} is not in the round's neighbour graph")
    return [c for c in roster if c == client or c in neighbours[client]]


def _one_part(neighbours: Neighbours, survivors: AbstractSet[str]) -> None:
    """Refuse survivors that the neighbour graph splits: each part's masks
    would cancel on their own, and unmasking would reveal each part's sum."""
    split = graph.parts(neighbours, survivors)
    if len(split) > 1:
        raise ProtocolError(f"the clients that sent masked input fall into {len(split)} unconnected parts of "
                            f"the neighbour graph (sizes {', '.join(str(len(p)) for p in split)}): unmasking "
                            "would reveal each part's own sum, so nothing is unmasked")


def _need(count: int, threshold: int, what: str) -> None:
    if count < threshold:
        raise ProtocolError(f"{what}: {count} clients, the threshold is {threshold}")


# --------------------------------------------------------------------------- client stages
def advertise(secret: bytes, context: bytes, client: str) -> dict[str, bytes]:
    c_sk, s_sk, _ = _own(secret, context, client)
    return {"c_pk": keys.public_bytes(c_sk), "s_pk": keys.public_bytes(s_sk)}


def share_keys(secret: bytes, context: bytes, client: str, roster: PublicKeys,
               threshold: int, neighbours: Neighbours = None) -> dict[str, bytes]:
    """receiver -> ciphertext of (share of s key, share of b), for every
    client of U1 (this one included), or with a sparse graph for this client
    and its neighbours."""
    if dict(roster.get(client) or {}) != advertise(secret, context, client):
        raise ProtocolError(f"the roster does not carry {client}'s keys")
    _need(len(roster), threshold, "share_keys")
    c_sk, s_sk, b = _own(secret, context, client)
    index = _index(roster)

    def coefficients(which: str):
        return lambda k: int.from_bytes(keys.client_material(secret, context, client, f"shamir/{which}/{k}", 80),
                                        "big")

    s_shares = dict(shamir.split(keys.private_bytes(s_sk), len(index), threshold, coefficients("s")))
    b_shares = dict(shamir.split(b, len(index), threshold, coefficients("b")))
    receivers = index if neighbours is None else {c: index[c] for c in _around(neighbours, client, index)}
    _need(len(receivers), threshold, "share_keys among the neighbours")
    out = {}
    for receiver, x in receivers.items():
        key = keys.agree(c_sk, roster[receiver]["c_pk"], _enc_info(context))
        nonce = keys.client_material(secret, context, client, f"nonce/{receiver}", keys.NONCE_BYTES)
        plain = shamir.y_to_bytes(s_shares[x]) + shamir.y_to_bytes(b_shares[x])
        out[receiver] = keys.encrypt(key, nonce, plain, _associated(context, client, receiver))
    return out


def _associated(context: bytes, sender: str, receiver: str) -> bytes:
    return context + b"|" + sender.encode() + b"->" + receiver.encode()


def mask(secret: bytes, context: bytes, client: str, vector: np.ndarray, shared: PublicKeys,
         threshold: int, neighbours: Neighbours = None) -> np.ndarray:
    """The quantized update plus its self mask and pairwise masks with every
    other client of U2 (`shared`: the clients whose shares were delivered),
    or with a sparse graph with its neighbours in U2."""
    field.check(vector)
    if client not in shared:
        raise ProtocolError(f"{client} is not among the clients that shared their keys")
    _need(len(shared), threshold, "mask")
    _, s_sk, b = _own(secret, context, client)
    out = field.add(vector, prg.mask(b, vector.size))
    peers = shared if neighbours is None else [c for c in shared if c in neighbours.get(client, ())]
    for other in sorted(peers):
        if other == client:
            continue
        seed = keys.agree(s_sk, shared[other]["s_pk"], _mask_info(context))
        m = prg.mask(seed, vector.size)
        out = field.add(out, m) if client < other else field.sub(out, m)
    return out


def unmask(secret: bytes, context: bytes, client: str, roster: PublicKeys, inbox: Mapping[str, bytes],
           shared: Iterable[str], survivors: Iterable[str], threshold: int,
           neighbours: Neighbours = None) -> dict[str, dict[str, bytes]]:
    """This client's shares: of b for every survivor (U3), of the s key for
    every client that shared (U2) but sent no masked input. Never both for
    the same client: with b and the s key the server could unmask that
    client's vector alone. Nothing when the survivors do not form one part
    of the neighbour graph (graph.parts)."""
    shared, survivors = set(shared), set(survivors)
    if client not in survivors:
        raise ProtocolError(f"{client} sent no masked input; it reveals nothing")
    if not survivors <= shared <= set(roster):
        raise ProtocolError("survivors must have shared their keys, and those must be in the roster")
    _need(len(survivors), threshold, "unmask")
    _one_part(neighbours, survivors)
    c_sk, _, _ = _own(secret, context, client)
    out: dict[str, dict[str, bytes]] = {"b": {}, "s": {}}
    for sender in sorted(shared):
        ciphertext = inbox.get(sender)
        if ciphertext is None:
            continue  # its share for us was lost; the others' suffice above the threshold
        key = keys.agree(c_sk, roster[sender]["c_pk"], _enc_info(context))
        plain = keys.decrypt(key, ciphertext, _associated(context, sender, client))
        which = "b" if sender in survivors else "s"
        out[which][sender] = plain[:shamir.Y_BYTES] if which == "s" else plain[shamir.Y_BYTES:]
    return out


# --------------------------------------------------------------------------- server
def unmasked_sum(context: bytes, roster: PublicKeys, shared: Iterable[str],
                 masked: Mapping[str, np.ndarray], revealed: Mapping[str, Mapping[str, Mapping[str, bytes]]],
                 threshold: int, neighbours: Neighbours = None) -> np.ndarray:
    """The sum of the survivors' quantized updates, from their masked
    vectors and the shares at least `threshold` clients revealed."""
    shared = set(shared)
    survivors = set(masked)
    if not survivors <= shared <= set(roster):
        raise ProtocolError("masked vectors from clients that did not share their keys")
    _need(len(survivors), threshold, "aggregation")
    _need(len(revealed), threshold, "revealed shares")
    _one_part(neighbours, survivors)
    index = _index(roster)
    vectors = [field.check(masked[c]) for c in sorted(survivors)]
    length = vectors[0].size
    if any(v.size != length for v in vectors):
        raise ProtocolError("masked vectors differ in length")
    total = vectors[0].copy()
    for v in vectors[1:]:
        total = field.add(total, v)

    def rebuild(which: str, owner: str) -> bytes:
        points = []
        for responder, shares in revealed.items():
            y = (shares.get(which) or {}).get(owner)
            if y is not None:
                points.append((index[responder], shamir.y_from_bytes(y)))
        if len(points) < threshold:
            raise ProtocolError(f"{len(points)} shares of {owner}'s {which} revealed, {threshold} needed")
        return shamir.combine(points, threshold)

    for owner in sorted(survivors):
        total = field.sub(total, prg.mask(rebuild("b", owner), length))
    for dropped in sorted(shared - survivors):
        s_sk = keys.private_key(rebuild("s", dropped))
        if keys.public_bytes(s_sk) != roster[dropped]["s_pk"]:
            raise ProtocolError(f"the shares of {dropped}'s key do not rebuild the key it advertised")
        peers = survivors if neighbours is None else survivors & set(neighbours.get(dropped, ()))
        for owner in sorted(peers):
            m = prg.mask(keys.agree(s_sk, roster[owner]["s_pk"], _mask_info(context)), length)
            # owner added +m when it sorts before the dropped client: take it back out
            total = field.sub(total, m) if owner < dropped else field.add(total, m)
    return total
