"""The masks: a seed of 32 bytes expanded into field elements by ChaCha20
(a cryptographic PRG, from the `cryptography` package). Both ends of a pair
expand the same seed, so their masks cancel in the sum."""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .field import P

SEED_BYTES = 32


def mask(seed: bytes, length: int) -> np.ndarray:
    """`length` field elements, uniform up to a bias of 2^-61."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    # The seed is never reused for anything else, so a fixed nonce is safe.
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\0" * (8 * length))
    out = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    out >>= np.uint64(3)       # 61 random bits
    out %= np.uint64(P)        # only 2^61 - 1 itself folds onto 0
    return out
