"""Bounded decoding of stored blobs: what an array declares is checked
against the bytes present before anything is allocated, compressed members
are refused, the total decoded is bounded; and a poisoned update in a round
is rejected with its reason while the round aggregates the rest and
fl_insights still answers about it."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from flcommon import blobs
from flcommon import store as fs
from flcommon.blobs import BlobError, iter_arrays, write_arrays
from reference_fedavg import fedavg
from test_functions import call, make_session

NAME = b"arr_0000.npy"
TERABYTES = (1_000_000, 1_000_000)      # float32: 4e12 bytes, 3.6 TiB
BOMB_BYTES = 3 << 30                    # what the deflated member inflates to


def encode_arrays(arrays) -> bytes:
    buf = io.BytesIO()
    write_arrays(buf, arrays)
    return buf.getvalue()


def decode_arrays(data, **bounds) -> list[np.ndarray]:
    return list(iter_arrays(data, **bounds))


def npy_header(shape, descr: str = "<f4") -> bytes:
    """A version 1.0 .npy header declaring `shape`, padded as numpy pads it."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def stored_npz(*members: bytes) -> bytes:
    """An npz of stored members, as np.savez lays it out."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, member in enumerate(members):
            zf.writestr(f"arr_{i:04d}.npy", member)
    return buf.getvalue()


def one_member_zip(data: bytes, *, method: int, crc: int, csize: int, usize: int, zip64: bool = False) -> bytes:
    """A zip of one member named arr_0000.npy whose headers say what we are told."""
    extra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
    sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (csize, usize)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, method, 0, 0x21, crc, *sizes,
                        len(NAME), len(extra)) + NAME + extra
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, method, 0, 0x21, crc, *sizes,
                          len(NAME), len(extra), 0, 0, 0, 0o644 << 16, 0) + NAME + extra
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def terabyte_blob() -> bytes:
    """254 bytes whose only array declares 3.6 TiB (and holds 4 bytes)."""
    return stored_npz(npy_header(TERABYTES) + b"\0" * 4)


def deflate_bomb() -> bytes:
    """About 3 MB: one deflated member that inflates to a 3 GiB float32 .npy.
    Zeros compressed a MiB at a time with full flushes give the same block
    each time, so the bomb is built without compressing 3 GiB. Its CRC is
    left at 0: a decoder that inflated would learn that only after
    allocating and writing 3 GiB."""
    count = 0
    for _ in range(2):  # the header's length depends on the count it declares
        header = npy_header(((BOMB_BYTES - len(npy_header((count,)))) // 4,))
        count = (BOMB_BYTES - len(header)) // 4
    header = npy_header((count,))
    assert len(header) + 4 * count == BOMB_BYTES
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header + bytes(mib - len(header))) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    last = c.compress(bytes(mib)) + c.flush()
    body = first + block * (BOMB_BYTES // mib - 2) + last
    return one_member_zip(body, method=zipfile.ZIP_DEFLATED, crc=0, csize=len(body), usize=BOMB_BYTES)


def refused_without_allocating(data, match: str, **kwargs) -> str:
    """Decode `data`, expecting a refusal; the traced peak must stay far
    below anything the blob declares."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(BlobError, match=match) as info:
            decode_arrays(data, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    return str(info.value)


# ---------------------------------------------------------------- the codec

def test_a_blob_declaring_terabytes_is_refused_before_anything_is_allocated(fn_db):
    raw = terabyte_blob()
    assert len(raw) < 300
    reason = refused_without_allocating(raw, "declares a 1000000x1000000 float32 array")
    assert "3.6 TiB" in reason and "holds 4 bytes" in reason
    # From the store, the same.
    blob = fs.bucket(fn_db).upload_from_stream("t.npz", io.BytesIO(raw))
    with pytest.raises(BlobError, match="3.6 TiB"):
        fs.get_arrays(fn_db, blob)


def test_a_member_claiming_more_bytes_than_the_blob_has_is_refused():
    data = npy_header((4,)) + b"\0" * 16
    liar = one_member_zip(data, method=0, crc=zlib.crc32(data), csize=4 * 10**12, usize=4 * 10**12, zip64=True)
    reason = refused_without_allocating(liar, "of the blob are left")
    assert "3.6 TiB" in reason
    # The same member with honest sizes decodes.
    honest = one_member_zip(data, method=0, crc=zlib.crc32(data), csize=len(data), usize=len(data), zip64=True)
    assert np.array_equal(decode_arrays(honest)[0], np.zeros(4, np.float32))


def test_a_deflate_bomb_is_refused_without_inflating():
    bomb = deflate_bomb()
    assert 2_000_000 < len(bomb) < 4_000_000
    # It is what it claims to be: a valid zip whose member inflates to 3 GiB of .npy.
    info = zipfile.ZipFile(io.BytesIO(bomb)).infolist()[0]
    assert info.file_size == BOMB_BYTES and info.compress_type == zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(io.BytesIO(bomb)).open(info) as member:
        assert member.read(128).startswith(b"\x93NUMPY")
    refused_without_allocating(bomb, r"arr_0000.npy is compressed \(deflate\)")
    # numpy's own compressed npz is refused the same way.
    small = io.BytesIO()
    np.savez_compressed(small, arr_0000=np.ones(1000, np.float32))
    refused_without_allocating(small.getvalue(), "compressed")


def test_the_total_decoded_is_bounded_by_the_caller_or_the_absolute_cap(monkeypatch):
    raw = encode_arrays([np.ones(100, np.float32), np.ones(100, np.float32)])
    assert [a.sum() for a in decode_arrays(raw, max_bytes=800)] == [100, 100]
    reason = refused_without_allocating(raw, "this read allows", max_bytes=799)
    assert reason.startswith("blob refused: arr_0001.npy (100 float32) brings its arrays to 800 bytes")
    monkeypatch.setattr(blobs, "MAX_DECODED_BYTES", 500)
    refused_without_allocating(raw, "arr_0001.npy .* 500 bytes this read allows")


def test_only_plain_numbers_in_well_formed_members_decode():
    for member, reason in (
            (npy_header((2,), "<U3") + b"\0" * 24, "only plain numbers"),
            (npy_header((-2, -3)) + b"\0" * 24, "negative dimension"),
            (npy_header((3,)) + b"\0" * 8, "declares a 3 float32 array"),
            (b"\x93NUMPY\x02\x00" + struct.pack("<I", 20_000) + b" " * 20_000, "header is 20000 bytes long"),
            (b"\x93NUMPY\x03\x00" + b"\0" * 80, "format version 3")):
        refused_without_allocating(stored_npz(member), reason)
    structured = io.BytesIO()
    np.savez(structured, arr_0000=np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))
    refused_without_allocating(structured.getvalue(), "only plain numbers")
    misnamed = io.BytesIO()
    np.savez(misnamed, weights=np.zeros(2))
    refused_without_allocating(misnamed.getvalue(), "unexpected array name")
    flipped = bytearray(encode_arrays([np.arange(50, dtype=np.int64)]))
    flipped[200] ^= 1
    refused_without_allocating(bytes(flipped), "CRC mismatch")


def test_a_header_is_parsed_once_and_what_it_declares_is_checked_every_time():
    """The updates of one model share their .npy headers: numpy's parse of
    one (a compiled literal) is kept, and every check after it still runs."""
    blobs._parsed_header.cache_clear()
    data = encode_arrays([np.zeros((3, 4), np.float32), np.ones(5, np.float32)])
    for _ in range(3):
        assert [a.shape for a in decode_arrays(data)] == [(3, 4), (5,)]
    info = blobs._parsed_header.cache_info()
    assert (info.misses, info.hits) == (2, 4)
    for _ in range(2):   # parsed once, refused each time
        refused_without_allocating(stored_npz(npy_header((2,), "<U3") + b"\0" * 24), "only plain numbers")
        refused_without_allocating(stored_npz(npy_header((3,)) + b"\0" * 8), "declares a 3 float32 array")
    unparsable = b"\x93NUMPY\x01\x00" + struct.pack("<H", 54) + b"{'descr': <f4 ...}".ljust(53) + b"\n"
    for _ in range(2):
        refused_without_allocating(stored_npz(unparsable + b"\0" * 8), "blob refused: arr_0000.npy")
    assert blobs._parsed_header.cache_info().currsize == 4


def test_every_plain_array_round_trips_from_bytes_and_from_streams():
    arrays = [np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), np.array([True, False]),
              np.array([1 + 2j], np.complex64), np.arange(-3, 3, dtype=np.int8), np.zeros((0, 5)),
              np.array(7.5), np.arange(6, dtype=">u2")]
    raw = encode_arrays(arrays)

    class OneWay(io.RawIOBase):  # a stream that cannot seek: its length must be given
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), 7, len(self.data) - self.pos)  # short reads, as sockets give
            b[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    for back in (decode_arrays(raw), decode_arrays(io.BytesIO(raw)), list(iter_arrays(OneWay(raw), length=len(raw)))):
        assert len(back) == len(arrays)
        for a, b in zip(arrays, back):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert back[0].flags.f_contiguous
    with pytest.raises(ValueError, match="length"):
        decode_arrays(OneWay(raw))
    assert decode_arrays(encode_arrays([])) == []


# ---------------------------------------------------------------- through the functions

def test_a_poisoned_round_aggregates_the_rest_and_insights_answer_about_it(fn_db):
    from test_aggregator import _put_update
    db = fn_db
    sid = make_session(db, clients=5)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    valid = {f"client_{i}": [w + 0.01 * (i + 1) for w in weights] for i in range(3)}
    for client, arrays in valid.items():
        _put_update(db, sid, 0, client, arrays)
    _put_update(db, sid, 0, "client_3", raw=terabyte_blob())
    _put_update(db, sid, 0, "client_4", raw=deflate_bomb())
    clients = [f"client_{i}" for i in range(5)]
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=clients)
    assert "error" not in out and out["accepted"] == 3 and out["rejected_count"] == 2
    reasons = {r["client"]: r["reason"] for r in out["rejected"]}
    assert "3.6 TiB" in reasons["client_3"] and "compressed (deflate)" in reasons["client_4"]
    for client in ("client_3", "client_4"):
        doc = db[fs.UPDATES].find_one({"session": sid, "round": 0, "client": client})
        assert doc["status"] == "rejected" and doc["reason"] == reasons[client]
    model = db[fs.MODELS].find_one({"session": sid, "round": 1})
    assert sorted(model["accepted_clients"]) == sorted(valid)
    assert {r["client"]: r["reason"] for r in model["rejected"]} == reasons
    sizes = {d["client"]: d["num_examples"] for d in db[fs.PARTITIONS].find({"session": sid})}
    expected = fedavg([(valid[c], sizes[c]) for c in valid], [(w.shape, w.dtype) for w in weights])
    for a, b in zip(fs.get_arrays(db, model["blob_id"]), expected):
        assert np.allclose(a, b, atol=1e-6)

    answer = call("fl_insights", db, session=sid, what="contributions", rounds=[0, 0])
    assert "error" not in answer, answer
    rows = {r["client"]: r for r in answer["data"]["rows"]}
    assert set(rows) == set(clients)
    for client in ("client_3", "client_4"):
        assert rows[client]["status"] == "rejected" and rows[client]["reason"] == reasons[client]
        assert {"rejected", "unreadable"} <= set(rows[client]["flags"])
        assert rows[client]["norm"] is None and rows[client]["share"] is None
    for client in valid:
        assert rows[client]["status"] == "accepted" and rows[client]["norm"] > 0 and rows[client]["share"] > 0
    assert answer["data"]["flagged"] >= 2


def test_a_poisoned_global_model_is_bad_input_for_the_client(fn_db):
    """A model blob that declares more than the session's model size is
    refused as bad input (an application error, not retried) before any
    training starts."""
    db = fn_db
    sid = make_session(db, clients=2)
    call("fl_server_init", db, session=sid, round=0)
    model = db[fs.MODELS].find_one({"session": sid, "round": 0})
    twice = fs.put_arrays(db, [np.zeros(model["model_bytes"] // 4 + 1, np.float32)], "m.npz", {"kind": "model"})
    for blob in (fs.bucket(db).upload_from_stream("m.npz", io.BytesIO(terabyte_blob())), twice):
        db[fs.MODELS].update_one({"_id": model["_id"]}, {"$set": {"blob_id": blob}})
        out = call("fl_client", db, session=sid, round=0, client="client_0", attempt=1)
        assert out["error"].startswith("bad request: blob refused")
    assert db[fs.UPDATES].count_documents({"session": sid}) == 0


@pytest.mark.parametrize("length", ["x", None, float("nan"), True])
def test_a_blob_record_with_a_malformed_length_is_refused_and_the_round_aggregates_the_rest(fn_db, length):
    """Anyone who can write to the store can write a blob's files document:
    a length that is not a whole number rejects that update, it does not
    crash the aggregation."""
    from test_aggregator import _put_update
    db = fn_db
    sid = make_session(db, clients=3)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    for i in range(3):
        blob = _put_update(db, sid, 0, f"client_{i}", [w + 0.01 for w in weights])
    db[f"{fs.BUCKET}.files"].update_one({"_id": blob}, {"$set": {"length": length}})
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=[f"client_{i}" for i in range(3)])
    assert "error" not in out, out
    assert out["accepted"] == 2 and [r["client"] for r in out["rejected"]] == ["client_2"]
    assert "corrupt in the store" in out["rejected"][0]["reason"]


# ------------------------------------------------ what numpy or the store would have failed on

@pytest.mark.parametrize("shape,match", [
    ((0, 10 ** 30), "a dimension over"),              # 0 bytes declared; numpy refuses the extent
    ((0,) * 40, "40 dimensions"),                      # past numpy's own limit on dimensions
])
def test_an_empty_array_numpy_cannot_make_is_refused(shape, match):
    refused_without_allocating(stored_npz(npy_header(shape)), match)


def test_a_blob_of_more_arrays_than_any_model_is_refused_early(monkeypatch):
    monkeypatch.setattr(blobs, "MAX_ARRAYS", 50)
    member = npy_header((0,))
    assert len(decode_arrays(stored_npz(*[member] * 50))) == 50
    refused_without_allocating(stored_npz(*[member] * 51), "more than 50 arrays")


def test_a_blob_far_longer_than_its_arrays_may_be_is_refused_before_it_is_read():
    class Unread(io.RawIOBase):
        def readinto(self, b):
            raise AssertionError("read")
    limit = 1 << 20
    with pytest.raises(BlobError, match="long, more than"):
        iter_arrays(Unread(), length=limit + blobs.MAX_ARCHIVE_OVERHEAD + 1, max_bytes=limit)
    assert decode_arrays(encode_arrays([np.ones(4, np.float32)]), max_bytes=16)[0].sum() == 4


@pytest.mark.parametrize("poison", ["dims", "text chunk", "int chunk", "list client", "list round"])
def test_updates_poisoned_past_the_codec_are_rejected_and_the_round_aggregates_the_rest(fn_db, poison):
    """Whoever holds the store's credentials (every function) can write an
    update, its blob's chunks or its document: each of these once crashed
    the aggregator (and with it every retry, then the session) or fl_insights."""
    from test_aggregator import _put_update
    db = fn_db
    sid = make_session(db, clients=3)
    call("fl_server_init", db, session=sid, round=0)
    weights = fs.get_arrays(db, db[fs.MODELS].find_one({"session": sid, "round": 0})["blob_id"])
    for i in range(2):
        _put_update(db, sid, 0, f"client_{i}", [w + 0.01 for w in weights])
    if poison == "dims":
        _put_update(db, sid, 0, "client_2", raw=stored_npz(npy_header((0, 10 ** 30))))
    else:
        blob = _put_update(db, sid, 0, "client_2", [w + 0.01 for w in weights])
        chunks = db[f"{fs.BUCKET}.chunks"]
        if poison == "text chunk":
            data = chunks.find_one({"files_id": blob, "n": 0})["data"]
            chunks.update_one({"files_id": blob, "n": 0}, {"$set": {"data": "x" * len(data)}})
        elif poison == "int chunk":
            chunks.update_one({"files_id": blob, "n": 0}, {"$set": {"data": 7}})
        else:
            field, value = ("client", ["client_2"]) if poison == "list client" else ("round", [0, 1])
            db[fs.UPDATES].update_one({"session": sid, "client": "client_2"}, {"$set": {field: value}})
    clients = [f"client_{i}" for i in range(3)]
    out = call("fl_server_aggregator", db, session=sid, round=0, clients=clients)
    assert "error" not in out, out
    assert out["accepted"] == 2 and [r["client"] for r in out["rejected"]] == ["client_2"], out
    answer = call("fl_insights", db, session=sid, what="contributions", rounds=[0, 0])
    assert "error" not in answer, answer
    assert {r["client"] for r in answer["data"]["rows"] if r["status"] == "accepted"} == {"client_0", "client_1"}


@pytest.mark.parametrize("data", ["text", 7, None])
def test_a_chunk_that_is_not_bytes_is_a_corrupt_blob(fn_db, monkeypatch, data):
    monkeypatch.setattr(fs, "CHUNK_SIZE", 256)
    blob = fs.put_arrays(fn_db, [np.arange(200, dtype=np.float32)], "u.npz", {"kind": "update"})
    chunks = fn_db[f"{fs.BUCKET}.chunks"]
    assert chunks.count_documents({"files_id": blob}) > 2
    size = len(chunks.find_one({"files_id": blob, "n": 1})["data"])
    chunks.update_one({"files_id": blob, "n": 1}, {"$set": {"data": data * size if data == "text" else data}})
    for prefetch in (False, True):
        with pytest.raises(BlobError, match="corrupt in the store: chunk 1"):
            fs.get_arrays(fn_db, blob, prefetch=prefetch)
