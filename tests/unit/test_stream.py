"""The `delta` stream: round trip, layout/random access, resume, and rejection of every corruption."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvdeltafs.formats import stream as S
from lvdeltafs.formats.reader import StreamReader, iter_records, verify_stream
from lvdeltafs.formats.stream import (
    HEAD_SIZE,
    MAX_DATA,
    StreamError,
    StreamLayout,
    StreamTruncated,
    StreamUnsupported,
)
from tests.encoder import write_stream

D, Z = S.KIND_DATA, S.KIND_ZERO
IDENT = {"volume": "vol-uuid", "base": "b@1", "target": "t@2", "base_size": 0, "target_size": 0,
         "chunk_size": 4096, "source": "cow"}


def ident(size):
    return {**IDENT, "base_size": size, "target_size": size}


def make(size, pieces, seed=0):
    rnd = random.Random(seed)
    target = rnd.randbytes(size)
    read = lambda off, n: target[off:off + n]  # noqa: E731
    blob = b"".join(write_stream(ident(size), size, pieces, read, delta_id="abc"))
    return target, read, blob


def apply(blob, size):
    """What a receiver would build: zeros everywhere, then the stream's records."""
    out = bytearray(size)
    recs = list(iter_records(io.BytesIO(blob)))
    for r in recs:
        if r.type == "data":
            out[r.offset:r.offset + r.length] = r.data
        elif r.type == "zero":
            out[r.offset:r.offset + r.length] = bytes(r.length)
    return bytes(out), recs


def expected(target, pieces, size):
    out = bytearray(size)
    for off, ln, kind in pieces:
        out[off:off + ln] = target[off:off + ln] if kind == D else bytes(ln)
    return bytes(out)


@st.composite
def extents_st(draw, max_size=3 * MAX_DATA):
    size = draw(st.integers(0, max_size))
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))))
    pieces = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        kind = draw(st.sampled_from([D, Z, None]))
        if kind is not None:
            pieces.append((a, b - a, kind))
    return size, pieces


SMALL = (100_000, [(0, 10, D), (10, 90, Z), (500, 3000, D), (5000, 1, D), (7000, 20000, Z), (40000, 9000, D)])
MEDIUM = (4 * MAX_DATA, [(0, 100, D), (4096, 2 * MAX_DATA + 123, D), (3 * MAX_DATA, 4096, Z),
                         (3 * MAX_DATA + 8192, MAX_DATA - 8192, D)])


def boundaries(blob):
    return [0, S.PREAMBLE_SIZE] + [r.end for r in iter_records(io.BytesIO(blob))]


@settings(max_examples=60, deadline=None)
@given(extents_st())
def test_round_trip(ext):
    size, pieces = ext
    target, read, blob = make(size, pieces)
    got, recs = apply(blob, size)
    assert got == expected(target, pieces, size)
    assert recs[0].type == "header" and recs[0].header["identity"] == ident(size)
    assert recs[0].header["delta_id"] == "abc"
    assert recs[1].type == "size" and recs[1].offset == size
    assert recs[-1].type == "end" and recs[-1].end == len(blob)
    assert all(r.length <= MAX_DATA for r in recs if r.type == "data")
    s = verify_stream(io.BytesIO(blob))
    assert s.data_bytes == sum(ln for _, ln, k in pieces if k == D)
    assert s.zero_bytes == sum(ln for _, ln, k in pieces if k == Z)
    assert s.stream_bytes == len(blob) and s.records == len(recs)
    layout = StreamLayout.from_pieces(ident(size), size, pieces, delta_id="abc")
    assert layout.size == len(blob)
    assert b"".join(layout.blocks(read)) == blob


@settings(max_examples=30, deadline=None)
@given(extents_st(), st.integers(1, 5000), st.randoms(use_true_random=False))
def test_layout_is_pure_function_of_extents(ext, split, rnd):
    """Pre-split or coalesced input gives the same stream; pread anywhere equals the full stream."""
    size, pieces = ext
    target, read, blob = make(size, pieces)
    split_pieces = []
    for off, ln, kind in pieces:
        if kind == D:
            split_pieces += [(p, min(split, off + ln - p), D) for p in range(off, off + ln, split)]
        else:
            split_pieces.append((off, ln, kind))
    assert b"".join(write_stream(ident(size), size, split_pieces, read, delta_id="abc")) == blob
    layout = StreamLayout.from_pieces(ident(size), size, split_pieces, delta_id="abc")
    assert layout.size == len(blob)
    for _ in range(20):
        off = rnd.randrange(len(blob) + 10)
        n = rnd.choice([1, 7, 4096, 131072, MAX_DATA + HEAD_SIZE + 5])
        assert layout.pread(off, n, read) == blob[off:off + n]


@pytest.mark.parametrize("step", [1 << 20, 4096, MAX_DATA + HEAD_SIZE + 5, 33])
def test_pread_sequential_and_again(step, monkeypatch):
    """Sequential reads as FUSE makes them (a head's CRC kept, the rest of its payload read alone),
    a second pass, and a CRC cache cleared as it fills, all give the stream's bytes."""
    monkeypatch.setattr(S, "CRC_CACHE", 2)
    size, pieces = MEDIUM
    target, read, blob = make(size, pieces)
    layout = StreamLayout.from_pieces(ident(size), size, pieces, delta_id="abc")
    asked = []

    def counted(off, n):
        asked.append(n)
        return read(off, n)
    for _ in range(2):
        asked.clear()
        got = b"".join(layout.pread(off, step, counted) for off in range(0, len(blob), step))
        assert got == blob
        if step >= MAX_DATA:  # each target byte read once: no payload read again for its tail
            assert sum(asked) == sum(ln for _, ln, k in pieces if k == D)
    for off in (len(blob) - 1, 0, 100, 100):  # backwards: heads whose CRC is kept or not
        assert layout.pread(off, MAX_DATA, read) == blob[off:off + MAX_DATA]


@pytest.mark.parametrize("case", [SMALL, MEDIUM])
def test_resume_from_every_boundary(case):
    size, pieces = case
    target, read, blob = make(size, pieces)
    layout = StreamLayout.from_pieces(ident(size), size, pieces, delta_id="abc")
    for b in boundaries(blob):
        assert layout.is_boundary(b)
        assert b"".join(write_stream(ident(size), size, pieces, read, delta_id="abc", start=b)) == blob[b:]
        assert b"".join(layout.blocks(read, b)) == blob[b:]
    for bad in (1, S.PREAMBLE_SIZE + 1, len(blob) - 1):
        assert not layout.is_boundary(bad)
        with pytest.raises(ValueError, match="boundary"):
            list(write_stream(ident(size), size, pieces, read, delta_id="abc", start=bad))
        with pytest.raises(ValueError, match="boundary"):
            list(layout.blocks(read, bad))


def test_resume_reader_state():
    """A receiver keeps state after record k; a fresh reader fed the tail finishes the same stream."""
    size, pieces = SMALL
    target, read, blob = make(size, pieces)
    all_recs = list(iter_records(io.BytesIO(blob)))
    for k in range(2, len(all_recs) - 1):
        reader = StreamReader(io.BytesIO(blob))
        it = iter(reader)
        head = [next(it) for _ in range(k)]
        state = reader.state()
        assert state["position"] == head[-1].end
        tail = StreamReader(io.BytesIO(blob[state["position"]:]), resume=state)
        rest = list(tail)
        assert [(r.type, r.offset, r.length, r.data) for r in head + rest] == \
               [(r.type, r.offset, r.length, r.data) for r in all_recs]
        assert tail.summary().stream_bytes == len(blob)


# ---------------------------------------------------------------- corruption


def rejects(blob, exc=StreamError, match=None):
    with pytest.raises(exc, match=match) as ei:
        verify_stream(io.BytesIO(blob))
    return ei.value


def flip(blob, byte, bit):
    b = bytearray(blob)
    b[byte] ^= 1 << bit
    return bytes(b)


def test_every_bit_of_prefix_rejected():
    """Preamble, header record and size record: every single-bit flip is caught."""
    size, pieces = SMALL
    _, _, blob = make(size, pieces)
    prefix_end = boundaries(blob)[3]  # after the size record
    for i in range(prefix_end):
        for bit in range(8):
            rejects(flip(blob, i, bit))


def test_every_bit_of_sample_heads_and_end_rejected():
    size, pieces = MEDIUM
    _, _, blob = make(size, pieces)
    recs = list(iter_records(io.BytesIO(blob)))
    sample = [r for r in recs[2:] if r.type in ("data", "zero")][:4] + [recs[-1]]
    for r in sample:
        for i in range(r.start, min(r.end, r.start + HEAD_SIZE + (32 if r.type == "end" else 0))):
            for bit in range(8):
                rejects(flip(blob, i, bit))


def test_data_bit_flips_rejected():
    size, pieces = MEDIUM
    _, _, blob = make(size, pieces)
    rnd = random.Random(5)
    for r in iter_records(io.BytesIO(blob)):
        if r.type != "data":
            continue
        for _ in range(8):
            i = rnd.randrange(r.start + HEAD_SIZE, r.end)
            e = rejects(flip(blob, i, rnd.randrange(8)), match="checksum mismatch in the payload")
            assert e.offset == r.start + HEAD_SIZE


def test_truncation_at_every_byte_of_small_stream():
    size, pieces = SMALL
    _, _, blob = make(size, pieces)
    for n in range(len(blob)):
        e = rejects(blob[:n], StreamTruncated)
        assert e.offset == n


def test_truncation_at_and_between_every_boundary():
    size, pieces = MEDIUM
    _, _, blob = make(size, pieces)
    bs = boundaries(blob)
    for a, b in zip(bs, bs[1:], strict=False):
        for n in (a, a + 1, (a + b) // 2, b - 1):
            if 0 < n < len(blob):
                rejects(blob[:n], StreamTruncated, match=f"truncated at byte {n}:")


def test_truncated_data_message():
    _, _, blob = make(*MEDIUM)
    rec = [r for r in iter_records(io.BytesIO(blob)) if r.type == "data"][1]
    cut = rec.start + HEAD_SIZE + 10
    e = rejects(blob[:cut], StreamTruncated)
    assert str(e) == (f"delta stream is truncated at byte {cut}: it ends inside a data record "
                      f"(offset {rec.offset}, length {rec.length}) starting at byte {rec.start}; "
                      "the file is incomplete — copy it again")


def test_empty_and_bad_magic():
    rejects(b"", StreamTruncated, match="empty")
    rejects(b"LVDE", StreamTruncated)
    rejects(b"NOTADELTA" * 10, match="bad magic")
    rejects(b"\x00" * 100, match="bad magic")


def test_trailing_garbage():
    _, _, blob = make(*SMALL)
    rejects(blob + b"\x00", match="trailing garbage")
    rejects(blob + blob, match="trailing garbage")


# Streams crafted record by record, with valid checksums, to hit semantic checks.

def craft(size, body, version=S.VERSION, end=True, end_override=None):
    header = S.encode_header(ident(size), size, "abc")
    prefix, seed = S.stream_prefix(header, size)
    if version != S.VERSION:
        first = struct.pack("<8sHH", S.MAGIC, version, 0)
        prefix[0] = first + zlib.crc32(first).to_bytes(4, "little")
    out = b"".join(prefix)
    nd = nz = db = zb = 0
    for rtype, a, b, payload in body:
        out += S.record_head(rtype, len(payload), a, b, zlib.crc32(payload), seed) + payload
        if rtype == S.T_DATA:
            nd, db = nd + 1, db + b
        elif rtype == S.T_ZERO:
            nz, zb = nz + 1, zb + b
    if end:
        totals = end_override or (nd, nz, db, zb)
        payload = struct.pack("<QQQQ", *totals)
        nrec = 2 + len(body)
        out += S.record_head(S.T_END, len(payload), len(out), nrec, zlib.crc32(payload), seed) + payload
    return out


def test_crafted_valid_stream_passes():
    blob = craft(1000, [(S.T_DATA, 0, 4, b"abcd"), (S.T_ZERO, 10, 990, b"")])
    s = verify_stream(io.BytesIO(blob))
    assert (s.data_bytes, s.zero_bytes) == (4, 990)


def test_unknown_version():
    e = rejects(craft(1000, [], version=3), StreamUnsupported, match="version 3")
    assert e.offset == 8


def test_unknown_record_type():
    rejects(craft(1000, [(ord("X"), 0, 0, b"")]), StreamUnsupported, match="unknown record type 0x58")


def test_range_outside_target():
    rejects(craft(1000, [(S.T_DATA, 998, 4, b"abcd")]), match="past the target size 1000")
    rejects(craft(1000, [(S.T_ZERO, 500, 501, b"")]), match="past the target size 1000")


def test_unsorted_and_overlapping():
    rejects(craft(1000, [(S.T_DATA, 10, 4, b"abcd"), (S.T_DATA, 0, 4, b"abcd")]), match="ascending")
    rejects(craft(1000, [(S.T_DATA, 0, 4, b"abcd"), (S.T_ZERO, 2, 4, b"")]), match="overlap")


def test_record_too_large():
    big = bytes(MAX_DATA + 1)
    rejects(craft(2 * MAX_DATA, [(S.T_DATA, 0, len(big), big)]), match="limit")


def test_zero_length_and_mismatched_payload():
    rejects(craft(1000, [(S.T_ZERO, 5, 0, b"")]), match="length 0")
    rejects(craft(1000, [(S.T_DATA, 0, 5, b"abcd")]), match="malformed")
    rejects(craft(1000, [(S.T_ZERO, 0, 4, b"abcd")]), match="payload")


def test_end_totals_mismatch_and_missing_end():
    rejects(craft(1000, [(S.T_DATA, 0, 4, b"abcd")], end_override=(1, 0, 5, 0)), match="totals")
    rejects(craft(1000, [(S.T_DATA, 0, 4, b"abcd")], end=False), StreamTruncated, match="no end record")


def test_record_dropped_is_caught():
    """Removing a whole (valid) record from the middle is caught by the END record."""
    _, _, blob = make(*SMALL)
    recs = list(iter_records(io.BytesIO(blob)))
    r = recs[3]
    rejects(blob[:r.start] + blob[r.end:], match="records are missing")


def test_record_spliced_from_other_delta_is_caught():
    """Heads are seeded with the header's checksum, so a record from another delta does not fit."""
    size, pieces = SMALL
    target, read, blob = make(size, pieces)
    other = b"".join(write_stream({**ident(size), "volume": "other"}, size, pieces, read, delta_id="xyz"))
    assert len(other) != len(blob) or other != blob
    ra = list(iter_records(io.BytesIO(blob)))[3]
    rb = [r for r in iter_records(io.BytesIO(other)) if (r.offset, r.type) == (ra.offset, ra.type)][0]
    spliced = blob[:ra.start] + other[rb.start:rb.end] + blob[ra.end:]
    rejects(spliced, match="checksum mismatch in the head")


def test_header_and_size_order():
    size = 1000
    header = S.encode_header(ident(size), size, "abc")
    prefix, seed = S.stream_prefix(header, size)
    # a stream whose SIZE record is missing: DATA right after HEADER
    payload = b"abcd"
    blob = prefix[0] + prefix[1] + S.record_head(S.T_DATA, 4, 0, 4, zlib.crc32(payload), seed) + payload
    rejects(blob, match="size record must be")
    # a size record that disagrees with the header
    bad = prefix[0] + prefix[1] + S.record_head(S.T_SIZE, 0, 999, 0, 0, seed)
    rejects(bad, match="size record says 999")


def test_slow_reader_short_reads():
    """A pipe that returns a few bytes at a time still verifies."""
    _, _, blob = make(*SMALL)

    class Dribble(io.RawIOBase):
        def __init__(self, data):
            self.b = io.BytesIO(data)

        def read(self, n=-1):
            return self.b.read(min(n, 7) if n > 0 else 7)

    s = verify_stream(Dribble(blob))
    assert s.stream_bytes == len(blob)


def header_stream(payload: bytes, size: int = 1000) -> bytes:
    """A stream whose HEADER payload is ``payload``, every checksum valid."""
    prefix, seed = S.stream_prefix(payload, size)
    return b"".join(prefix)


def test_deeply_nested_header_json_is_corrupt_not_a_crash():
    """json.loads raises RecursionError (not ValueError) on deep nesting: still 'corrupt'."""
    deep = b"[" * 30000 + b"]" * 30000
    assert len(deep) <= S.MAX_HEADER
    e = rejects(header_stream(deep), match="not the expected JSON object")
    assert e.offset == S.PREAMBLE_SIZE + HEAD_SIZE
    nested_in_identity = (b'{"identity":' + b'{"a":' * 10000 + b"1" + b"}" * 10000
                          + b',"target_size":1000}')
    rejects(header_stream(nested_in_identity), match="not the expected JSON object")


def test_identity_disagreeing_with_header_target_size_is_corrupt():
    size = 1000
    header = S.encode_header({**ident(size), "target_size": size + 4096}, size, "abc")
    rejects(header_stream(header, size), match="identity says the target is 5096 bytes")
    header = S.encode_header({**ident(size), "target_size": "1000"}, size, "abc")
    rejects(header_stream(header, size), match="identity says")
    # No target_size in the identity at all: nothing to disagree with.
    no_key = {k: v for k, v in ident(size).items() if k != "target_size"}
    blob = b"".join(write_stream(no_key, size, [(0, 4, D)], lambda o, n: b"abcd"[o:o + n], delta_id="abc"))
    assert verify_stream(io.BytesIO(blob)).data_bytes == 4


def test_truncated_preamble_keeps_what_it_read():
    """A short read at EOF still hands back the bytes, so a cut preamble is 'truncated', not 'bad magic'."""
    _, _, blob = make(*SMALL)
    for n in range(1, S.PREAMBLE_SIZE):
        e = rejects(blob[:n], StreamTruncated)
        assert e.offset == n


def test_the_stream_crc32_is_zlibs_whichever_library_computes_it():
    """stream.crc32 is python-isal's where it is installed: the same values as zlib's, seeds included."""
    import random

    rnd = random.Random(5)
    for n in (0, 1, 31, 4096, 1 << 20):
        data = rnd.randbytes(n)
        seed = rnd.getrandbits(32)
        assert S.crc32(data) == zlib.crc32(data) and S.crc32(data, seed) == zlib.crc32(data, seed)
        assert S.crc32(memoryview(data)) == zlib.crc32(data)
