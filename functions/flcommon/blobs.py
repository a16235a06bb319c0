"""Weights as numpy .npz, never pickle, decoded within bounds.

Every array list (model weights, client updates, data partitions) is stored
as an .npz of uncompressed members, written by `np.savez` to a seekable
buffer, so each member's local header carries its sizes. Blobs can come from
any function that holds store credentials, so decoding trusts nothing in
them:

- pickles, bare .npy files and anything but a zip of `arr_NNNN.npy` members
  in order are refused; so are object arrays and any dtype that is not a
  plain number (bool, int, uint, float, complex): nothing can execute code;
- compressed, encrypted or streamed members (sizes after the data) are
  refused outright: FedKeeper never writes them, and a few megabytes of
  deflate can inflate to gigabytes;
- before any array is allocated, the size its .npy header declares (shape x
  item size) must equal what its zip header says the member holds, that must
  fit in the bytes of the blob that are actually left, and the total
  decoded so far must stay within `max_bytes` (the caller's bound, e.g. the
  model's size for an update; MAX_DECODED_BYTES otherwise);
- each member's CRC-32 is checked, so flipped bits never become weights.

The archive is read front to back, without seeking: a GridFS blob is read
over one chunk cursor (flcommon.store), and each array is read straight into
its own buffer.
"""
from __future__ import annotations

import functools
import io
import math
import struct
import zipfile
import zlib
from typing import BinaryIO, Iterator, Sequence

import numpy as np

# The most any one read decodes when its caller knows no tighter bound: far
# above any model or partition FedKeeper trains on, far below what would
# take a function down before the bound is reached.
MAX_DECODED_BYTES = 2 << 30
# numpy's own bound on an .npy header (numpy.lib.format's max_header_size).
MAX_NPY_HEADER = 10_000
# Arrays in one blob, and dimensions and extent of one array: far above any
# model's (Keras models hold hundreds of weight arrays), and what keeps
# empty arrays, which declare no bytes, from costing unbounded work (150,000
# of them took 8 s to decode) or failing inside numpy.
MAX_ARRAYS = 10_000
MAX_DIMS = 32
MAX_EXTENT = 1 << 40
# What an archive may hold beyond its arrays' bytes (zip and .npy headers,
# the directory): a blob longer than its decoded bound plus this is refused
# before any of it is read.
MAX_ARCHIVE_OVERHEAD = 4 << 20
NUMERIC_KINDS = "biufc"


def plain_numbers(dtype: np.dtype) -> bool:
    """Whether arrays of `dtype` are what a blob holds: plain numbers (bool,
    int, uint, float, complex), not records, sub-arrays or objects."""
    return dtype.kind in NUMERIC_KINDS and dtype.fields is None and dtype.subdtype is None

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_ZIP64_END = b"PK\x06\x06"
_NPY_MAGIC = b"\x93NUMPY"
_U32_MAX = 0xFFFFFFFF
_COPY_BLOCK = 1 << 20


class BlobError(ValueError):
    """A stored blob is not a valid pickle-free npz of the expected form, or
    declares more than it may; the message says which."""


def _key(i: int) -> str:
    return f"arr_{i:04d}"


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # unreachable


def write_arrays(fp: BinaryIO, arrays: Sequence[np.ndarray]) -> None:
    """Write arrays as an npz of stored members (`fp` must be seekable, so
    the sizes land in each member's header). Refuses what `iter_arrays`
    would refuse to read back, so that no blob is stored unreadable."""
    arrays = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrays):
        if a.dtype.hasobject:
            raise BlobError("object arrays cannot be stored (they would need pickle)")
        if not plain_numbers(a.dtype):
            raise BlobError(f"array {i} ({_describe(a.shape, a.dtype)}) cannot be stored: only plain numbers "
                            "(bool, int, uint, float, complex) are; cast it to one, such as float32")
    np.savez(fp, **{_key(i): a for i, a in enumerate(arrays)})


def iter_arrays(data: bytes | bytearray | memoryview | BinaryIO, *, length: int | None = None,
                max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Yield an npz's arrays one at a time, so a reader holds one at most
    besides what it keeps. `data` is the blob's bytes or a stream positioned
    at its start; `length` is how many bytes the stream holds (found by
    seeking when not given); `max_bytes` bounds the arrays' total size."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        length = memoryview(data).nbytes
        data = io.BytesIO(data)
    elif length is None:
        if not (hasattr(data, "seekable") and data.seekable()):
            raise ValueError("the length of a stream that cannot seek must be given")
        here = data.tell()
        length = data.seek(0, io.SEEK_END) - here
        data.seek(here)
    limit = MAX_DECODED_BYTES if max_bytes is None else int(max_bytes)
    if length > limit + MAX_ARCHIVE_OVERHEAD:
        raise BlobError(f"blob refused: it is {human_bytes(length)} long, more than the {human_bytes(limit)} "
                        "of arrays this read allows and their headers")
    return _guarded(_decode(_Source(data, length), limit))


def _guarded(arrays: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """What decoding raises, as a BlobError: a blob that makes the decoder
    or numpy fail in a way no check above foresaw is still a bad blob, which
    its reader rejects, never a crash of the function reading it."""
    try:
        yield from arrays
    except BlobError:
        raise
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise BlobError(f"blob refused: {type(exc).__name__}: {str(exc)[:200]}") from None


class _Source:
    """The blob's bytes, front to back, with a count of what is left, so a
    size can be checked against the bytes present before it is read."""

    def __init__(self, fp: BinaryIO, length: int):
        self.fp = fp
        self.left = length
        self._readinto = getattr(fp, "readinto", None)

    def take(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.fill(memoryview(buf), what)
        return bytes(buf)

    def fill(self, view: memoryview, what: str) -> None:
        n = view.nbytes
        if n > self.left:
            raise BlobError(f"blob is not a valid npz archive: truncated in {what}")
        pos = 0
        while pos < n:
            if self._readinto is not None:
                got = self._readinto(view[pos:])
            else:
                block = self.fp.read(min(_COPY_BLOCK, n - pos))
                got = len(block)
                view[pos:pos + got] = block
            if not got:
                raise BlobError(f"blob is not a valid npz archive: truncated in {what}")
            pos += got
        self.left -= n


def _decode(src: _Source, limit: int) -> Iterator[np.ndarray]:
    head = src.take(min(4, src.left), "the first bytes")
    if head[:1] == b"\x80":
        raise BlobError("blob refused: it is a pickle, and pickle is never loaded")
    if head == _NPY_MAGIC[:4]:
        raise BlobError("blob is a bare .npy array, not an .npz archive")
    if head not in (_LOCAL, _END):
        raise BlobError("blob is not a valid npz archive (no zip header)")
    index = total = 0
    while head != _END and head != _CENTRAL and head != _ZIP64_END:
        if head != _LOCAL:
            raise BlobError("blob is not a valid npz archive: bad member header")
        if index >= MAX_ARRAYS:
            raise BlobError(f"blob refused: it holds more than {MAX_ARRAYS:,} arrays")
        name, size, crc = _member_header(src, index)
        header, shape, order, dtype = _npy_header(src, name, size)
        declared = math.prod(shape) * dtype.itemsize
        if len(header) + declared != size:
            raise BlobError(f"blob refused: {name} declares a {_describe(shape, dtype)} array "
                            f"({human_bytes(declared)}), but its member holds {human_bytes(size - len(header))}")
        total += declared
        if total > limit:
            raise BlobError(f"blob refused: {name} ({_describe(shape, dtype)}) brings its arrays to "
                            f"{human_bytes(total)}, more than the {human_bytes(limit)} this read allows")
        out = np.empty(shape, dtype=dtype, order=order)
        view = memoryview(out.reshape(-1, order="A").view(np.uint8)) if declared else memoryview(b"")
        src.fill(view, name)
        if zlib.crc32(view, zlib.crc32(header)) != crc:
            raise BlobError(f"blob is corrupt: CRC mismatch in {name}")
        yield out
        index += 1
        head = src.take(4, "the archive's directory")


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"


def _member_header(src: _Source, index: int) -> tuple[str, int, int]:
    """(name, size, crc) of the next stored member, whose signature was read."""
    (_, flags, method, _, _, crc, csize, usize, nlen, xlen) = struct.unpack(
        "<HHHHHIIIHH", src.take(26, "a member header"))
    name = src.take(nlen, "a member name").decode("utf-8", "replace")
    extra = src.take(xlen, "a member header")
    expected = _key(index) + ".npy"
    if name != expected:
        raise BlobError(f"blob refused: unexpected array name in npz: {name[:40]!r} (expected {expected!r})")
    if method != zipfile.ZIP_STORED:
        kind = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
        raise BlobError(f"blob refused: {name} is compressed ({kind.get(method, f'method {method}')}); "
                        "arrays are only ever stored uncompressed")
    if flags & 0x1:
        raise BlobError(f"blob refused: {name} is encrypted")
    if flags & 0x8:
        raise BlobError(f"blob refused: {name} gives its sizes after its data, not in its header")
    if usize == _U32_MAX or csize == _U32_MAX:
        usize, csize = _zip64_sizes(extra, usize, csize, name)
    if csize != usize:
        raise BlobError(f"blob is not a valid npz archive: stored member {name} has two sizes")
    if usize > src.left:
        raise BlobError(f"blob refused: {name} declares {human_bytes(usize)}, "
                        f"only {human_bytes(src.left)} of the blob are left")
    return name, usize, crc


def _zip64_sizes(extra: bytes, usize: int, csize: int, name: str) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[pos:pos + 4])
        body = extra[pos + 4:pos + 4 + size]
        if tag == 1:
            fields = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
            wanted = [usize == _U32_MAX, csize == _U32_MAX]
            if len(fields) < sum(wanted):
                break
            values = iter(fields)
            return (next(values) if wanted[0] else usize), (next(values) if wanted[1] else csize)
        pos += 4 + size
    raise BlobError(f"blob is not a valid npz archive: zip64 member {name} without its sizes")


@functools.lru_cache(maxsize=256)
def _parsed_header(major: int, header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's parse of an .npy header (its length field and text): a
    Python literal compiled with `ast`, 60 us, most of decoding a small
    array. The updates of one model share their headers, so a parse is kept
    for the same bytes (the result is immutable); a header that does not
    parse raises each time, and is never kept."""
    from numpy.lib import format as npy
    reader = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
    return reader(io.BytesIO(header), max_header_size=MAX_NPY_HEADER)


def _npy_header(src: _Source, name: str, size: int) -> tuple[bytes, tuple[int, ...], str, np.dtype]:
    """(raw header bytes, shape, order, dtype) of a member's .npy header."""
    lead = src.take(min(10, size), f"{name}'s header")
    if len(lead) < 10 or lead[:6] != _NPY_MAGIC:
        raise BlobError(f"blob is not a valid npz archive: {name} is not an .npy array")
    major = lead[6]
    if major == 1:
        hlen_bytes, text_len = lead[8:10], struct.unpack("<H", lead[8:10])[0]
    elif major == 2:
        hlen_bytes = lead[8:10] + src.take(2, f"{name}'s header")
        text_len = struct.unpack("<I", hlen_bytes)[0]
    else:
        raise BlobError(f"blob refused: {name} uses .npy format version {major}")
    if text_len > MAX_NPY_HEADER:
        raise BlobError(f"blob refused: {name}'s .npy header is {text_len} bytes long (at most {MAX_NPY_HEADER})")
    raw = lead[:8] + hlen_bytes
    if len(raw) + text_len > size:
        raise BlobError(f"blob is not a valid npz archive: {name}'s header is longer than its member")
    text = src.take(text_len, f"{name}'s header")
    try:
        shape, fortran, dtype = _parsed_header(major, hlen_bytes + text)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise BlobError(f"blob refused: {name}: {exc}") from None
    if len(shape) > MAX_DIMS:
        raise BlobError(f"blob refused: {name} declares {len(shape)} dimensions (at most {MAX_DIMS})")
    if any(int(n) < 0 for n in shape):
        raise BlobError(f"blob refused: {name} declares a negative dimension {shape}")
    if any(int(n) > MAX_EXTENT for n in shape):
        raise BlobError(f"blob refused: {name} declares a dimension over {MAX_EXTENT:,}")
    if dtype.hasobject:
        raise BlobError(f"blob refused: {name} is an object array, which would need pickle")
    if not plain_numbers(dtype):
        raise BlobError(f"blob refused: {name} has dtype {dtype}; only plain numbers are stored")
    return raw + text, tuple(int(n) for n in shape), "F" if fortran else "C", dtype
