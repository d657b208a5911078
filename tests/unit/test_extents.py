"""Extents: normalisation against a naive byte-set model, and the ranges text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvdeltafs.errors import BadInput
from lvdeltafs.extents import DATA, ZERO, Extents, format_ranges, parse_ranges


def model(ranges, size=None):
    """byte -> kind, data winning over zero."""
    m: dict[int, int] = {}
    for off, ln, kind in ranges:
        for b in range(off, off + ln):
            if size is not None and b >= size:
                break
            if kind == DATA or b not in m:
                m[b] = kind
    return m


def ext_model(e: Extents):
    m = {}
    for off, ln, kind in e:
        for b in range(off, off + ln):
            assert b not in m
            m[b] = kind
    return m


def check_invariants(e: Extents):
    t = e.as_tuples()
    for (o1, l1, k1), (o2, _l2, k2) in zip(t, t[1:], strict=False):
        assert o1 + l1 <= o2, "sorted and disjoint"
        assert not (o1 + l1 == o2 and k1 == k2), "coalesced"
    assert all(ln > 0 for _, ln, _ in t)
    assert e.offsets.dtype == np.uint64 and e.kinds.dtype == np.uint8
    assert not e.offsets.flags.writeable


ranges_st = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40), st.sampled_from([DATA, ZERO])),
                     max_size=30)


@given(st.lists(st.integers(0, 60), max_size=40), st.integers(1, 9), st.integers(0, 400))
def test_from_chunks_matches_model(idx, chunk, size):
    e = Extents.from_chunks(np.array(idx, dtype=np.uint64), chunk, size)
    check_invariants(e)
    assert ext_model(e) == model([(i * chunk, chunk, DATA) for i in idx], size)
    assert e.data_bytes == len(ext_model(e)) and e.zero_bytes == 0


@given(ranges_st, st.one_of(st.none(), st.integers(0, 350)))
def test_from_ranges_matches_model(ranges, size):
    offs = [r[0] for r in ranges]
    lens = [r[1] for r in ranges]
    kinds = [r[2] for r in ranges]
    e = Extents.from_ranges(offs, lens, kinds, size)
    check_invariants(e)
    m = model(ranges, size)
    assert ext_model(e) == m
    assert e.data_bytes == sum(1 for k in m.values() if k == DATA)
    assert e.zero_bytes == sum(1 for k in m.values() if k == ZERO)
    assert e.data_count + e.zero_count == len(e)


@given(ranges_st, ranges_st)
def test_union_data_wins(a, b):
    ea = Extents.from_ranges([r[0] for r in a], [r[1] for r in a], [r[2] for r in a])
    eb = Extents.from_ranges([r[0] for r in b], [r[1] for r in b], [r[2] for r in b])
    u = ea.union(eb)
    check_invariants(u)
    assert ext_model(u) == model(a + b)


@given(ranges_st, st.integers(0, 350), st.integers(0, 350))
def test_clip_and_tail(ranges, old, new):
    e = Extents.from_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
    c = e.clip(new)
    check_invariants(c)
    assert ext_model(c) == model(ranges, new)
    t = e.with_tail(old, new)
    check_invariants(t)
    expect = model(ranges + [(old, max(0, new - old), DATA)], new)
    assert ext_model(t) == expect


@given(ranges_st, st.integers(1, 17))
def test_pieces_split_data_only(ranges, max_len):
    e = Extents.from_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
    pieces = list(e.pieces(max_len))
    assert all(ln <= max_len for _, ln, k in pieces if k == DATA)
    assert [p for p in pieces if p[2] == ZERO] == [x for x in e if x[2] == ZERO]
    m = {}
    for off, ln, k in pieces:
        for b in range(off, off + ln):
            m[b] = k
    assert m == ext_model(e)


@given(ranges_st)
def test_ranges_text_round_trip(ranges):
    e = Extents.from_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
    text = format_ranges(e)
    assert parse_ranges(text) == e
    assert parse_ranges(text.encode()) == e
    assert int(e.line_lengths().sum()) == len(text.encode())


def test_ranges_text_exact():
    e = Extents.from_ranges([0, 4096], [4096, 10], [DATA, ZERO])
    assert format_ranges(e) == "0 4096 data\n4096 10 zero\n"
    assert parse_ranges("") == Extents.empty()
    # touching same-kind lines are legal and coalesce
    assert parse_ranges("0 5 data\n5 5 data").as_tuples() == [(0, 10, DATA)]


@pytest.mark.parametrize("text, line", [
    ("0 10 data\n5 10 data\n", 2),       # overlapping
    ("20 10 data\n0 10 data\n", 2),      # unsorted
    ("0 10 dat\n", 1),                   # bad kind
    ("0 0 data\n", 1),                   # empty range
    ("-1 10 data\n", 1),                 # negative
    ("0  10 data\n", 1),                 # double space
    ("0 10 data extra\n", 1),            # extra field
    ("0 10\n", 1),                       # missing field
    ("0 10 data\n\n", 2),                # blank line
    ("0 10 data\r\n", 1),                # CRLF
    ("0x10 10 data\n", 1),               # hex
    ("0 10 data\n10 5 zero\n20 18446744073709551615 data\n", 3),  # past 64 bits
])
def test_malformed_ranges_rejected(text, line):
    with pytest.raises(BadInput, match=f"line {line}"):
        parse_ranges(text)


def test_ranges_past_size_rejected():
    with pytest.raises(BadInput, match="line 1.*past the volume size"):
        parse_ranges("0 100 data\n", size=50)


def test_non_ascii_rejected():
    with pytest.raises(BadInput):
        parse_ranges(b"0 10 d\xffta\n")


def test_from_chunks_large_is_fast():
    import time
    rng = np.random.default_rng(0)
    idx = rng.choice(50_000_000, 10_000_000, replace=False).astype(np.uint64)  # unsorted
    t = time.perf_counter()
    e = Extents.from_chunks(idx, 65536, 50_000_000 * 65536 - 100)
    elapsed = time.perf_counter() - t
    # the last chunk is clipped by 100 bytes if it was chosen
    assert e.data_bytes == 10_000_000 * 65536 - (100 if (idx == 49_999_999).any() else 0)
    assert elapsed < 1.5, elapsed
    check = Extents.from_chunks(np.sort(idx), 65536, 50_000_000 * 65536 - 100)
    assert check == e


@settings(max_examples=50)
@given(st.lists(st.integers(0, 2**40), max_size=20), st.integers(1, 2**20))
def test_from_chunks_duplicates_and_big_offsets(idx, chunk):
    size = 2**62
    e = Extents.from_chunks(np.array(idx + idx, dtype=np.uint64), chunk, size)
    assert e == Extents.from_chunks(np.array(sorted(set(idx)), dtype=np.uint64), chunk, size)
    assert e.data_bytes == len(set(idx)) * chunk


def test_a_number_of_thousands_of_digits_is_malformed_not_a_crash():
    with pytest.raises(BadInput, match="line 1 is malformed"):
        parse_ranges("1" * 5000 + " 4096 data\n", 1 << 20)


def _text_model(offsets, lengths, kinds) -> bytes:
    return "".join(f"{o} {n} {'data' if k == DATA else 'zero'}\n"
                   for o, n, k in zip(offsets, lengths, kinds, strict=True)).encode()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("block", [1, 7, 64, 65536])
def test_block_formatter_matches_plain_formatting(seed, block):
    """Every layout mix: one layout, a few odd lines spliced in, many (scattered), 1 to 20 digits."""
    from lvdeltafs import rangetext
    rng = np.random.default_rng(seed)
    n = 3000
    ln = [np.full(n, 4096), np.where(rng.random(n) < 0.01, 123456789, 4096),
          rng.integers(1, 2**64 - 1, n, dtype=np.uint64, endpoint=True),
          np.uint64(10) ** rng.integers(0, 20, n).astype(np.uint64)][seed % 4]
    off = np.sort(rng.integers(0, 2**63, n, dtype=np.uint64)) if seed % 3 else np.arange(n) * 10**seed
    off, ln = off.astype(np.uint64), np.asarray(ln).astype(np.uint64)
    kinds = (rng.random(n) < (0, 0.3)[seed % 2]).astype(np.uint8)
    blocks: list[bytes] = []
    rangetext.write_text(off, ln, kinds, lambda b: blocks.append(bytes(b)), block)
    want = _text_model(off.tolist(), ln.tolist(), kinds.tolist())
    assert b"".join(blocks) == want == rangetext.format_text(off, ln, kinds)
    assert int(rangetext.line_lengths(off, ln).sum()) == len(want)


def test_from_chunks_takes_uint32_as_is():
    idx = np.array([0, 1, 2, 7, 9, 10, 2**32 - 1], np.uint32)
    e = Extents.from_chunks(idx, 4096, 2**44)
    assert e.as_tuples() == [(0, 3 * 4096, DATA), (7 * 4096, 4096, DATA), (9 * 4096, 2 * 4096, DATA),
                             ((2**32 - 1) * 4096, 4096, DATA)]
    assert e == Extents.from_chunks(idx.astype(np.uint64), 4096, 2**44)
    assert e.offsets.dtype == e.lengths.dtype == np.uint64
