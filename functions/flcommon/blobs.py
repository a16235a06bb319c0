"""Weights as numpy .npz, never pickle.

Every array list (model weights, client updates, data partitions) is stored as
an uncompressed .npz with `allow_pickle=False` on both sides: a blob written by
a function can never execute code in the keeper or in another function.
"""
from __future__ import annotations

import io
import zipfile
from typing import BinaryIO, Iterable, Sequence

import numpy as np


class BlobError(ValueError):
    """A stored blob is not a valid pickle-free npz of the expected form."""


def _key(i: int) -> str:
    return f"arr_{i:04d}"


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    write_arrays(buf, arrays)
    return buf.getvalue()


def write_arrays(fp: BinaryIO, arrays: Sequence[np.ndarray]) -> None:
    for a in arrays:
        if np.asarray(a).dtype.hasobject:
            raise BlobError("object arrays cannot be stored (they would need pickle)")
    np.savez(fp, **{_key(i): np.asarray(a) for i, a in enumerate(arrays)})


def decode_arrays(data: bytes | BinaryIO) -> list[np.ndarray]:
    """Decode an npz into its arrays in order; reject pickle and non-npz data."""
    return list(iter_arrays(data))


def iter_arrays(data: bytes | BinaryIO) -> Iterable[np.ndarray]:
    """Yield the arrays one at a time so a reader holds one layer at most."""
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    # Look at the magic before numpy does: np.load falls back to unpickling
    # anything that is neither zip nor .npy.
    head = fp.read(6)
    fp.seek(0)
    if head[:1] == b"\x80":
        raise BlobError("blob refused: it is a pickle, and pickle is never loaded")
    if head == b"\x93NUMPY":
        raise BlobError("blob is a bare .npy array, not an .npz archive")
    if head[:4] != b"PK\x03\x04":
        raise BlobError("blob is not a valid npz archive (no zip header)")
    try:
        with np.load(fp, allow_pickle=False) as npz:
            names = sorted(npz.files)
            if names != [_key(i) for i in range(len(names))]:
                raise BlobError(f"unexpected array names in npz: {names[:5]}")
            for name in names:
                yield npz[name]
    except BlobError:
        raise
    except ValueError as exc:  # numpy raises ValueError for pickled content
        raise BlobError(f"blob refused: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise BlobError(f"blob is not a valid npz archive: {exc}") from None
