"""Secure aggregation: pairwise masking with key agreement (Bonawitz et al.
2017), Shamir shares of the mask secrets to recover dropouts, updates
quantized to a prime field. Pure functions; the functions that run the
stages relay what they produce through the store. Needs `cryptography`
(X25519, HKDF, AES-GCM, ChaCha20)."""
from __future__ import annotations

from .field import DEFAULT_SCALE, P, FieldError
from .protocol import (ProtocolError, advertise, default_threshold, mask, share_keys, unmask,
                       unmasked_sum)
from .shamir import ShareError
from .updates import decode_mean, encode_update, error_bound

__all__ = ["DEFAULT_SCALE", "P", "FieldError", "ProtocolError", "ShareError", "advertise",
           "default_threshold", "mask", "share_keys", "unmask", "unmasked_sum", "decode_mean",
           "encode_update", "error_bound"]
