"""Key agreement and encryption for secure aggregation, from the
`cryptography` package: X25519 key pairs, HKDF-SHA256 to turn a shared
secret (or a client's own secret) into keys and seeds, AES-GCM for the key
shares relayed through the store.

A client's keys for a round are derived from its own long-lived secret and
the round's context with HKDF. Functions are stateless, and this way every
stage's invocation (and any retry of it) recovers the same keys without
keeping a private key anywhere between invocations.
"""
from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
MIN_CLIENT_SECRET_BYTES = 16


class CryptoError(ValueError):
    """A key or ciphertext that is malformed or does not authenticate."""


def derive(material: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def client_material(client_secret: bytes, context: bytes, client: str, purpose: str, length: int = KEY_BYTES) -> bytes:
    """Bytes only this client can compute, for one purpose in one round."""
    if len(client_secret) < MIN_CLIENT_SECRET_BYTES:
        raise CryptoError(f"a client secret must have at least {MIN_CLIENT_SECRET_BYTES} bytes")
    return derive(client_secret, b"fk-secagg/" + context + b"/" + client.encode() + b"/" + purpose.encode(), length)


def private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def agree(own: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive from their X25519 exchange."""
    if len(peer_public) != KEY_BYTES:
        raise CryptoError(f"a public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive(shared, info)


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    if len(ciphertext) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag:
        raise CryptoError("ciphertext does not authenticate (wrong key, sender or round)") from None
