"""lvdeltafs.exact: a delta's data ranges cut down to the 4 KiB blocks whose bytes differ from the base.

The property that matters: applied to the base, the refined delta gives the
target exactly, whatever the ranges, sizes and rewrites; and it keeps no
block whose bytes are the same on both sides (unless the volume grew there).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import Refused
from lvdeltafs.exact import BLOCK, fd_reader, refine, refine_delta
from lvdeltafs.extents import DATA, ZERO, Extents

KiB = 1024


def reader(buf: bytes, max_len: int | None = None, calls: list | None = None):
    """A ReadInto over bytes; with ``max_len``, a read asking for more fails the test."""
    def read(offset: int, view: memoryview) -> None:
        assert max_len is None or len(view) <= max_len, f"read of {len(view)} bytes"
        assert offset >= 0 and offset + len(view) <= len(buf), "read outside the side"
        view[:] = buf[offset:offset + len(view)]
        if calls is not None:
            calls.append((offset, len(view)))
    return read


def apply(base: bytes, extents: Extents, target: bytes, size: int) -> bytes:
    """The receiver's rule: size the destination, then write data ranges and zero ranges."""
    out = bytearray(base[:size]) + bytearray(max(0, size - len(base)))
    for off, ln, kind in extents:
        out[off:off + ln] = target[off:off + ln] if kind == DATA else bytes(ln)
    return bytes(out)


def check_minimal(base: bytes, target: bytes, refined: Extents, original: Extents, block: int) -> None:
    """Every kept data range lies in an original one, and holds a differing byte in each of its blocks."""
    orig = {(o, n, k) for o, n, k in original if k == ZERO}
    assert {(o, n, k) for o, n, k in refined if k == ZERO} == orig, "zero ranges kept as they are"
    data = [(o, o + n) for o, n, k in original if k == DATA]
    for off, ln, kind in refined:
        if kind != DATA:
            continue
        assert any(s <= off and off + ln <= e for s, e in data), "inside an original data range"
        for b in range(off // block * block, off + ln, block):
            lo, hi = max(b, off), min(b + block, off + ln)
            assert hi > len(base) or base[lo:hi] != target[lo:hi], f"block {b} kept though unchanged"


@st.composite
def scenario(draw):
    """A base, the target made from it by writes (some with the same bytes), discards and a resize,
    and the extents a source would report: every written range as data, every discard as zeros."""
    base_size = draw(st.integers(0, 40_000))
    size = draw(st.one_of(st.just(base_size), st.integers(0, 48_000)))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    base = rnd.randbytes(base_size)
    target = bytearray(base[:size]) + bytearray(max(0, size - base_size))
    ranges = []
    for _ in range(draw(st.integers(0, 8))):
        if size == 0:
            break
        off = draw(st.integers(0, size - 1))
        ln = draw(st.integers(1, min(12_000, size - off)))
        how = draw(st.sampled_from(["new", "same", "same", "few", "zero"]))
        if how == "new":
            target[off:off + ln] = rnd.randbytes(ln)
        elif how == "few":  # a few bytes changed in a rewritten range
            for p in rnd.sample(range(off, off + ln), min(3, ln)):
                target[p] ^= 0xFF
        elif how == "zero":
            target[off:off + ln] = bytes(ln)
        ranges.append((off, ln, ZERO if how == "zero" else DATA))
        # how == "same": the bytes put back are the ones there (a chunk reported, nothing changed)
    chunk = draw(st.sampled_from([1, 512, 4096, 65536]))  # the source's granularity
    offs, lens, kinds = [], [], []
    for off, ln, kind in ranges:
        if kind == DATA:  # a source reports whole chunks; a discard only what it zeroed
            end = min(size, -(-(off + ln) // chunk) * chunk)
            off = off // chunk * chunk
            ln = end - off
        offs.append(off)
        lens.append(ln)
        kinds.append(kind)
    if size > base_size:  # a grown tail: sent whole (classic), or zeros where unmapped (thin)
        offs.append(base_size)
        lens.append(size - base_size)
        kinds.append(draw(st.sampled_from([DATA, ZERO])))
        if kinds[-1] == ZERO:
            # What was written in the grown tail stays data (data wins where ranges overlap).
            pass
    extents = Extents.from_ranges(offs, lens, kinds, size)
    # A tail reported as zeros must read as zeros except where written (data ranges win).
    return base, bytes(target), size, extents


@settings(max_examples=300, deadline=None)
@given(scenario(), st.sampled_from([BLOCK, 4096 * 2]), st.sampled_from([4096, 8192, 65536]))
def test_refined_delta_applied_to_the_base_gives_the_target(case, block, piece):
    base, target, size, extents = case
    piece = max(piece, block)
    refined = refine(extents, reader(base, piece), reader(target, piece), size, base_size=len(base),
                     block=block, piece=piece)
    assert apply(base, refined, target, size) == apply(base, extents, target, size) == target
    check_minimal(base, target, refined, extents, block)
    assert refined.data_bytes <= extents.data_bytes


def test_rewrites_of_the_same_bytes_send_nothing_and_zero_ranges_stay():
    size = 1 << 20
    base = os.urandom(size)
    extents = Extents.from_ranges([0, 512 * KiB], [256 * KiB, 64 * KiB], [DATA, ZERO], size)
    target = base[:512 * KiB] + bytes(64 * KiB) + base[576 * KiB:]
    refined = refine(extents, reader(base), reader(target), size)
    assert refined.as_tuples() == [(512 * KiB, 64 * KiB, ZERO)]


def test_one_changed_byte_sends_its_block_only():
    size = 3 * 65536
    base = os.urandom(size)
    target = bytearray(base)
    target[70_000] ^= 1
    extents = Extents.from_ranges([65536], [65536], DATA, size)
    refined = refine(extents, reader(base), reader(bytes(target)), size)
    assert refined.as_tuples() == [(69632, BLOCK, DATA)]


def test_the_partial_last_block_and_a_grown_tail():
    base_size, size = 10 * BLOCK + 100, 12 * BLOCK + 7
    base = os.urandom(base_size)
    target = bytearray(base) + bytearray(os.urandom(size - base_size))
    target[base_size - 1] ^= 1  # the last byte of the base's partial last block
    extents = Extents.from_ranges([8 * BLOCK], [size - 8 * BLOCK], DATA, size)
    refined = refine(extents, reader(base), reader(bytes(target)), size, base_size=base_size)
    # The base's partial block from its start, then all that lies past the base's end.
    assert refined.as_tuples() == [(10 * BLOCK, size - 10 * BLOCK, DATA)]
    assert apply(base, refined, bytes(target), size) == bytes(target)


def test_a_shrunk_volume_compares_only_what_both_hold():
    base = os.urandom(5 * BLOCK)
    target = base[:3 * BLOCK + 10]
    extents = Extents.from_ranges([0], [len(target)], DATA, len(target))
    assert len(refine(extents, reader(base), reader(target), len(target), base_size=len(base))) == 0


def test_unaligned_ranges_never_grow_past_themselves():
    size = 4 * BLOCK
    base = bytes(size)
    target = bytes([1]) * size  # every byte differs
    extents = Extents.from_ranges([100, 5000], [50, 4000], DATA, size)
    assert refine(extents, reader(base), reader(target), size).as_tuples() == [(100, 50, DATA),
                                                                              (5000, 4000, DATA)]
    # Two ranges sharing one block (a zero range between them): each keeps only its own bytes.
    extents = Extents.from_ranges([0, 100, 200], [100, 100, 300], [DATA, ZERO, DATA], size)
    assert refine(extents, reader(base), reader(target), size).as_tuples() == [
        (0, 100, DATA), (100, 100, ZERO), (200, 300, DATA)]


def test_reads_are_bounded_and_each_side_is_read_once():
    size = 20 << 20
    rnd = random.Random(5)
    base = rnd.randbytes(size)
    target = bytearray(base)
    for p in (3, 9 << 20, size - 1):
        target[p] ^= 0x55
    piece = 1 << 20
    calls_a: list = []
    calls_b: list = []
    extents = Extents.from_ranges([0], [size], DATA, size)
    refined = refine(extents, reader(base, piece, calls_a), reader(bytes(target), piece, calls_b), size,
                     piece=piece)
    assert refined.as_tuples() == [(0, BLOCK, DATA), (9 << 20, BLOCK, DATA), (size - BLOCK, BLOCK, DATA)]
    assert calls_a == calls_b and sum(n for _, n in calls_a) == size and len(calls_a) == 20
    # Many small ranges share one piece: bounded too, never more than the piece.
    extents = Extents.from_chunks(list(range(0, 5000, 3)), BLOCK, size)
    calls_a.clear()
    refine(extents, reader(base, piece, calls_a), reader(bytes(target), piece), size, piece=piece)
    assert sum(n for _, n in calls_a) == extents.data_bytes


def test_progress_counts_the_bytes_compared():
    size = 1 << 20
    base = os.urandom(size)
    done: list[int] = []
    extents = Extents.from_ranges([0, 600_000], [300_000, 100_000], [DATA, ZERO], size)
    refine(extents, reader(base), reader(base), size, piece=65536, progress=done.append)
    assert sum(done) == 300_000


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError):
        refine(Extents.empty(), reader(b""), reader(b""), 0, block=100)
    with pytest.raises(ValueError):
        refine(Extents.empty(), reader(b""), reader(b""), 0, piece=6000)


def test_refine_delta_over_files_keeps_the_identity(tmp_path):
    size = 1 << 20
    base = os.urandom(size)
    target = bytearray(base)
    target[300_000:300_010] = b"0123456789"
    (tmp_path / "a").write_bytes(base)
    (tmp_path / "b").write_bytes(bytes(target))
    ident = Identity("vol", "vol@1", "vol@2", size, size, 65536, "cow")
    extents = Extents.from_ranges([0, 262144], [65536, 131072], DATA, size)
    delta = Delta(ident, extents, FileReader(str(tmp_path / "b")), notes=["x"])
    refined = refine_delta(delta, str(tmp_path / "a"))
    try:
        assert refined.identity == ident and refined.notes == ["x"]
        assert refined.extents.as_tuples() == [(299_008, BLOCK, DATA)]
        assert refined.unchanged_bytes == 65536 + 131072 - BLOCK
        assert refined.read(299_008, BLOCK) == bytes(target[299_008:299_008 + BLOCK])
        # fd_reader reads through pread_into: the same bytes.
        fd = os.open(tmp_path / "a", os.O_RDONLY)
        buf = bytearray(10)
        fd_reader(fd)(300_000, memoryview(buf))
        os.close(fd)
        assert bytes(buf) == base[300_000:300_010]
        # A base of another size is not the delta's base.
        (tmp_path / "c").write_bytes(base[:-4096])
        with pytest.raises(Refused, match="not that base"):
            refine_delta(delta, str(tmp_path / "c"))
    finally:
        refined.close()
