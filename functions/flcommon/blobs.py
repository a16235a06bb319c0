"""Weights as numpy .npz, never pickle.

Every array list (model weights, client updates, data partitions) is stored as
an uncompressed .npz with `allow_pickle=False` on both sides: a blob written by
a function can never execute code in the keeper or in another function.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
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


_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_ZIP64_END = b"PK\x06\x06"
_COPY_BLOCK = 1 << 20


class NeedsSeek(BlobError):
    """The npz cannot be decoded front to back and the stream cannot seek."""


class _NotSequential(Exception):
    """The archive is valid zip but not laid out as np.savez writes it to a
    seekable file (stored members with sizes in their local headers)."""


def _read_exact(fp: BinaryIO, n: int, what: str) -> bytes:
    out = fp.read(n)
    if len(out) != n:
        raise BlobError(f"blob is not a valid npz archive: truncated in {what}")
    return out


def iter_arrays_sequential(fp: BinaryIO) -> Iterable[np.ndarray]:
    """Decode an npz front to back without seeking, one array at a time.

    A GridFS download stream is seekable, but every seek starts a new chunk
    query; zipfile seeks to the central directory and back to each member,
    which made reading an update 8x slower than reading its bytes. Each array
    is read straight into its own buffer (no second copy) and its CRC-32 is
    checked. Archives laid out otherwise (compressed members, data
    descriptors) fall back to `iter_arrays` when the stream can seek."""
    try:
        yield from _sequential(fp)
    except _NotSequential:
        if not (hasattr(fp, "seek") and fp.seekable()):
            raise NeedsSeek("blob is an npz layout that needs a seekable stream") from None
        fp.seek(0)
        yield from iter_arrays(fp)


def _sequential(fp: BinaryIO) -> Iterable[np.ndarray]:
    head = fp.read(4)
    if head[:1] == b"\x80":
        raise BlobError("blob refused: it is a pickle, and pickle is never loaded")
    if head == b"\x93NUM":
        raise BlobError("blob is a bare .npy array, not an .npz archive")
    if head != _LOCAL:
        raise BlobError("blob is not a valid npz archive (no zip header)")
    index = 0
    while True:
        if head in (_CENTRAL, _END, _ZIP64_END):
            return
        if head != _LOCAL:
            raise BlobError("blob is not a valid npz archive: bad member header")
        (_, flags, method, _, _, crc, csize, usize, nlen, xlen) = struct.unpack(
            "<HHHHHIIIHH", _read_exact(fp, 26, "a member header"))
        name = _read_exact(fp, nlen, "a member name").decode("utf-8", "replace")
        extra = _read_exact(fp, xlen, "a member header")
        if flags & 0x08 or method != zipfile.ZIP_STORED:
            if index:  # arrays were handed out already: no starting over
                raise BlobError("blob is not a valid npz archive: mixed member layouts")
            raise _NotSequential()
        if usize == 0xFFFFFFFF or csize == 0xFFFFFFFF:  # zip64: the real sizes are in the extra field
            pos = 0
            while pos + 4 <= len(extra):
                tag, size = struct.unpack("<HH", extra[pos:pos + 4])
                if tag == 1:
                    usize = struct.unpack("<Q", extra[pos + 4:pos + 12])[0]
                    break
                pos += 4 + size
            else:
                raise BlobError("blob is not a valid npz archive: zip64 member without sizes")
        expected = _key(index) + ".npy"
        if name != expected:
            raise BlobError(f"unexpected array name in npz: {name!r} (expected {expected!r})")
        yield _read_member(fp, usize, crc, name)
        index += 1
        head = fp.read(4)


def _read_member(fp: BinaryIO, size: int, crc: int, name: str) -> np.ndarray:
    from numpy.lib import format as npy
    header = _read_exact(fp, 6, f"{name}'s header")
    if header != b"\x93NUMPY":
        raise BlobError(f"blob is not a valid npz archive: {name} is not an .npy array")
    version = _read_exact(fp, 2, f"{name}'s header")
    hlen_bytes = _read_exact(fp, 2 if version[0] == 1 else 4, f"{name}'s header")
    hlen = struct.unpack("<H" if version[0] == 1 else "<I", hlen_bytes)[0]
    text = _read_exact(fp, hlen, f"{name}'s header")
    raw = header + version + hlen_bytes + text
    readers = {1: npy.read_array_header_1_0, 2: npy.read_array_header_2_0}
    if version[0] not in readers:
        raise BlobError(f"blob refused: {name} uses .npy format version {version[0]}")
    try:
        shape, fortran, dtype = readers[version[0]](io.BytesIO(hlen_bytes + text))
    except ValueError as exc:
        raise BlobError(f"blob refused: {name}: {exc}") from None
    if dtype.hasobject:
        raise BlobError(f"blob refused: {name} is an object array, which would need pickle")
    out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    nbytes = out.nbytes
    if len(raw) + nbytes != size:
        raise BlobError(f"blob is not a valid npz archive: {name} has {size - len(raw)} data bytes, "
                        f"its header says {nbytes}")
    check = zlib.crc32(raw)
    view = memoryview(out.reshape(-1, order="A").view(np.uint8)) if nbytes else memoryview(b"")
    pos = 0
    while pos < nbytes:
        block = fp.read(min(_COPY_BLOCK, nbytes - pos))
        if not block:
            raise BlobError(f"blob is not a valid npz archive: truncated in {name}")
        view[pos:pos + len(block)] = block
        check = zlib.crc32(block, check)
        pos += len(block)
    if check != crc:
        raise BlobError(f"blob is corrupt: CRC mismatch in {name}")
    return out
