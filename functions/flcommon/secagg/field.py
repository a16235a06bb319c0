"""The finite field updates are masked in, GF(p) with the Mersenne prime
p = 2^61 - 1, and the fixed-point quantization that maps float updates into
it. Elements are numpy uint64 below p: the sum of two fits in 64 bits, so
masking costs one add and one reduction per coordinate.

A float x becomes round(x * scale) mod p, a negative value wrapping to the
top of the field; the sum of k quantized vectors decodes exactly as long as
it stays within (-p/2, p/2), which quantize() guarantees by bounding each
client's values by p / (2 * max_clients). Rounding moves each coordinate
of each client's vector by at most 0.5 / scale, so a decoded sum of k
vectors is within k * 0.5 / scale of the float sum.
"""
from __future__ import annotations

import numpy as np

P = (1 << 61) - 1
DEFAULT_SCALE = float(1 << 24)  # resolution 6e-8: far below float32's on update magnitudes


class FieldError(ValueError):
    """A vector that is not made of field elements, or would overflow."""


def check(vector: np.ndarray) -> np.ndarray:
    if vector.dtype != np.uint64 or vector.ndim != 1:
        raise FieldError(f"expected a flat uint64 vector of field elements, got {vector.dtype} {vector.shape}")
    if vector.size and int(vector.max()) >= P:
        raise FieldError("vector holds values outside the field")
    return vector


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = a + b
    out %= np.uint64(P)
    return out


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = a + (np.uint64(P) - b)
    out %= np.uint64(P)
    return out


def value_bound(max_clients: int) -> int:
    """The largest |round(x * scale)| one of max_clients vectors may hold so
    that their sum cannot wrap around the field; at most 2^53, where
    float64 still holds every integer, so the bound itself is exact."""
    if max_clients < 1:
        raise FieldError(f"max_clients must be at least 1, got {max_clients}")
    return min((P // 2) // max_clients, 1 << 53)


def quantize(values: np.ndarray, scale: float, max_clients: int) -> tuple[np.ndarray, int]:
    """Flat float values -> field elements. Values beyond the bound are
    clipped to it; returns (vector, how many were clipped)."""
    if not scale > 0:
        raise FieldError(f"scale must be positive, got {scale}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise FieldError("cannot quantize values that are not finite")
    bound = value_bound(max_clients)
    q = np.rint(x * scale)
    clipped = int(np.count_nonzero(np.abs(q) > bound))
    np.clip(q, -bound, bound, out=q)
    signed = q.astype(np.int64)
    out = signed.astype(np.uint64)          # two's complement for negatives...
    neg = signed < 0
    out[neg] = np.uint64(P) - (-signed[neg]).astype(np.uint64)  # ...made p - |q|
    return out, clipped


def dequantize(vector: np.ndarray, scale: float) -> np.ndarray:
    """Field elements (a sum) -> float64 values, the top half of the field
    read as negative."""
    check(vector)
    signed = vector.astype(np.int64)
    top = vector > np.uint64(P // 2)
    signed[top] = signed[top] - P
    return signed.astype(np.float64) / scale
