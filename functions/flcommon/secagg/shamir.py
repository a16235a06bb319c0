"""Shamir secret sharing of 32-byte secrets (mask seeds and X25519 private
keys) over GF(2^521 - 1): any `threshold` shares rebuild the secret, fewer
reveal nothing about it. A share is (x, y) with x in 1..n."""
from __future__ import annotations

from typing import Callable, Sequence

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
Y_BYTES = 66  # 521 bits


class ShareError(ValueError):
    """Too few shares, or shares that do not belong together."""


def split(secret: bytes, n: int, threshold: int, coefficient: Callable[[int], int]) -> list[tuple[int, int]]:
    """n shares of a secret; `coefficient(k)` gives the polynomial's k-th
    random coefficient (k = 1..threshold-1), uniform below PRIME: the caller
    chooses the randomness (the protocol derives it from the client's
    secret, so that a retried invocation sends the same shares)."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= n:
        raise ShareError(f"threshold must be in 1..{n}, got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [coefficient(k) % PRIME for k in range(1, threshold)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[tuple[int, int]], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange at 0)."""
    points = list(dict(shares).items())  # one share per x
    if len(points) < threshold:
        raise ShareError(f"{len(points)} distinct shares, {threshold} needed")
    points = points[:threshold]
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise ShareError("a share is outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not rebuild a secret of this size: they do not belong together")
    return secret.to_bytes(SECRET_BYTES, "big")


def y_to_bytes(y: int) -> bytes:
    return y.to_bytes(Y_BYTES, "big")


def y_from_bytes(data: bytes) -> int:
    if len(data) != Y_BYTES:
        raise ShareError(f"a share value has {Y_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")
