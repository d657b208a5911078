"""compare: deltas between two images by reading both, directly or through block digests."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from lvdeltafs.errors import BadInput
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.sources.compare import (
    DIGEST_DTYPE,
    block_digests,
    compare_extents,
    compare_images,
    content_digest,
    diff_digests,
    digest_block,
    digests_from_bytes,
)

BS = 4096
BASE_SIZE = 10 * BS + 100  # ten full blocks and a partial one


def image(seed: int, size: int = BASE_SIZE) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def write(tmp_path, name: str, data: bytes | bytearray) -> str:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


def apply(base: bytes, target: bytes, extents: Extents) -> bytes:
    """Make base into target using only the extents; a grown tail starts as garbage, not zeros."""
    out = bytearray(base[:len(target)])
    out += b"\xaa" * (len(target) - len(out))
    for off, ln, kind in extents:
        out[off:off + ln] = target[off:off + ln] if kind == DATA else bytes(ln)
    return bytes(out)


def both_ways(tmp_path, base: bytes, target: bytes, bs: int = BS) -> Extents:
    """compare_extents, checked against diff_digests and against applying it."""
    bp, tp = write(tmp_path, "base", base), write(tmp_path, "target", target)
    direct = compare_extents(bp, tp, bs)
    bd, td = block_digests(bp, bs), block_digests(tp, bs)
    via_digests = diff_digests(bd, td, bs, len(base), len(target))
    assert direct == via_digests
    # The same read also names each side by its content, as its block digests do.
    found = compare_images(bp, tp, bs)
    assert found.extents == direct
    assert found.base_digest == content_digest(bd, len(base), bs)
    assert found.target_digest == content_digest(td, len(target), bs)
    assert hashlib.sha256(apply(base, target, direct)).digest() == hashlib.sha256(target).digest()
    return direct


def test_identical_images_have_no_extents(tmp_path):
    base = image(1)
    assert both_ways(tmp_path, base, base).as_tuples() == []


def test_single_byte_marks_its_whole_block(tmp_path):
    base = image(2)
    target = bytearray(base)
    target[3 * BS + 777] ^= 0x01
    assert both_ways(tmp_path, base, target).as_tuples() == [(3 * BS, BS, DATA)]


def test_change_in_last_partial_block_is_clipped_to_the_size(tmp_path):
    base = image(3)
    target = bytearray(base)
    target[-1] ^= 0xFF
    assert both_ways(tmp_path, base, target).as_tuples() == [(10 * BS, 100, DATA)]


def test_grown_target_tail_is_data(tmp_path):
    base = image(4)
    target = base + image(40, 2 * BS + 5)
    assert both_ways(tmp_path, base, target).as_tuples() == [(10 * BS, 2 * BS + 105, DATA)]


def test_grown_target_zero_tail_is_zero_extents(tmp_path):
    base = image(5)
    target = base + bytes(13 * BS - len(base))
    # Block 10 still holds the base's 100 bytes, now followed by zeros: data.
    assert both_ways(tmp_path, base, target).as_tuples() == [(10 * BS, BS, DATA), (11 * BS, 2 * BS, ZERO)]


def test_shrunk_target_is_clipped(tmp_path):
    base = image(6)
    assert both_ways(tmp_path, base, base[:7 * BS]).as_tuples() == []
    # Block 7 ends at a different length on each side, so it differs.
    assert both_ways(tmp_path, base, base[:7 * BS + 50]).as_tuples() == [(7 * BS, 50, DATA)]


def test_zeroed_block_is_a_zero_extent_and_zeros_on_both_sides_are_unchanged(tmp_path):
    base = image(7)
    base[1 * BS:2 * BS] = bytes(BS)
    target = bytearray(base)
    target[5 * BS:7 * BS] = bytes(2 * BS)
    target[8 * BS + 9] ^= 0x10
    assert both_ways(tmp_path, base, target).as_tuples() == [(5 * BS, 2 * BS, ZERO), (8 * BS, BS, DATA)]


def test_zeroed_partial_last_block(tmp_path):
    base = image(8)
    target = base[:10 * BS] + bytes(100)
    assert both_ways(tmp_path, base, target).as_tuples() == [(10 * BS, 100, ZERO)]


@pytest.mark.parametrize("seed", range(12))
def test_random_differences_roundtrip(tmp_path, seed):
    rng = random.Random(seed)
    bs = rng.choice([512, 4096, 65536])
    base = bytearray(rng.randbytes(rng.randrange(1, 40 * bs)))
    target = bytearray(base)
    for _ in range(rng.randrange(0, 6)):
        pos, ln = rng.randrange(len(target)), rng.randrange(1, 3 * bs)
        piece = bytes(ln) if rng.random() < 0.3 else rng.randbytes(ln)
        target[pos:pos + ln] = piece[:len(target) - pos]  # overwrite in place, never past the end
    if rng.random() < 0.5:
        target = target[:rng.randrange(1, 50 * bs)]
    target += bytes(rng.choice([0, 0, bs, 2 * bs + 3]))
    both_ways(tmp_path, bytes(base), bytes(target), bs)


def test_empty_images(tmp_path):
    assert both_ways(tmp_path, b"", b"").as_tuples() == []
    assert both_ways(tmp_path, b"", bytes(BS + 1)).as_tuples() == [(0, BS + 1, ZERO)]
    assert both_ways(tmp_path, image(9), b"").as_tuples() == []


def test_block_digests_match_hashlib_and_flag_zero_blocks(tmp_path):
    data = image(10)
    data[2 * BS:3 * BS] = bytes(BS)
    data[10 * BS:] = bytes(100)
    path = write(tmp_path, "img", data)
    d = block_digests(path, BS)
    assert d.dtype == DIGEST_DTYPE and len(d) == 11
    assert d["digest"].tobytes() == b"".join(
        hashlib.sha256(data[o:o + BS]).digest()[:16] for o in range(0, len(data), BS))
    assert np.flatnonzero(d["zero"]).tolist() == [2, 10]
    # Whatever the thread count, and from a start offset, the rows are the same.
    assert np.array_equal(block_digests(path, BS, workers=1), d)
    assert np.array_equal(block_digests(path, BS, start=4 * BS), d[4:])
    assert np.array_equal(block_digests(path, BS, size=5 * BS), d[:5])


def test_digests_from_bytes_is_what_a_stdlib_receiver_sends(tmp_path):
    data = image(11)
    raw = b"".join(digest_block(data[o:o + BS]) for o in range(0, len(data), BS))
    path = write(tmp_path, "img", data)
    assert np.array_equal(digests_from_bytes(raw, BS, len(data)), block_digests(path, BS))
    with pytest.raises(BadInput, match="expected 11 block digests"):
        digests_from_bytes(raw[:-1], BS, len(data))


def test_diff_digests_rejects_arrays_that_do_not_fit_the_sizes(tmp_path):
    d = block_digests(write(tmp_path, "img", image(12)), BS)
    with pytest.raises(BadInput, match="base digests"):
        diff_digests(d[:-1], d, BS, BASE_SIZE, BASE_SIZE)


def test_unaligned_start_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a multiple"):
        block_digests(write(tmp_path, "img", image(13)), BS, start=100)


def test_a_side_shorter_than_its_stated_size_is_an_error_not_zeros(tmp_path):
    bp = write(tmp_path, "base", image(14))
    with pytest.raises(OSError, match="short read"):
        block_digests(bp, BS, size=BASE_SIZE + BS)
    with pytest.raises(OSError, match="short read"):
        compare_extents(bp, bp, BS, target_size=BASE_SIZE + 1)


def test_progress_counts_every_byte(tmp_path):
    bp = write(tmp_path, "base", image(15))
    seen: list[int] = []
    compare_extents(bp, bp, BS, progress=seen.append)
    assert sum(seen) == BASE_SIZE
    seen.clear()
    block_digests(bp, BS, progress=seen.append)
    assert sum(seen) == BASE_SIZE


def test_an_error_in_one_thread_stops_the_others(tmp_path, monkeypatch):
    import lvdeltafs.sources.compare as compare

    bp = write(tmp_path, "base", image(16, 64 * BS))
    calls: list[int] = []
    real = compare.digest_block

    def failing(view):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(view)
    monkeypatch.setattr(compare, "digest_block", failing)
    with pytest.raises(RuntimeError, match="boom"):
        block_digests(bp, BS, workers=4)
    assert len(calls) < 64


# ---------------------------------------------------------------- content names and identities


def test_content_digest_names_content_not_path_or_thread_order(tmp_path):
    data = image(20, 64 * BS + 7)
    a, b = write(tmp_path, "a", data), write(tmp_path, "elsewhere-b", data)
    one = compare_images(a, b, BS, workers=1)
    many = compare_images(b, a, BS, workers=4)
    assert one.base_digest == one.target_digest == many.base_digest == many.target_digest
    changed = bytearray(data)
    changed[40 * BS] ^= 1
    assert compare_images(a, write(tmp_path, "c", changed), BS).target_digest != one.target_digest
    # The size is part of the name: zeros appended are a different image.
    assert compare_images(a, write(tmp_path, "d", data + bytes(BS)), BS).target_digest != one.target_digest


def test_a_longer_base_is_read_to_its_end_for_its_name(tmp_path):
    base = image(21, 20 * BS)
    other = bytearray(base)
    other[-1] ^= 1  # differs only past the target's end
    target = write(tmp_path, "t", base[:5 * BS])
    a = compare_images(write(tmp_path, "a", base), target, BS)
    b = compare_images(write(tmp_path, "b", other), target, BS)
    assert a.extents == b.extents and a.target_digest == b.target_digest
    assert a.base_digest != b.base_digest


def test_image_deltas_chain_by_content(tmp_path):
    """The target of A->B is, by name, the base of B->C wherever B lives; the volume is no path."""
    from lvdeltafs import pairs

    a = image(30, 40 * BS)
    b = bytearray(a)
    b[3 * BS] ^= 1
    c = bytearray(b)
    c[9 * BS] ^= 1
    ab = pairs.compare_delta(write(tmp_path, "a.img", a), write(tmp_path, "b.img", b))
    bc = pairs.compare_delta(write(tmp_path, "copy-of-b.img", b), write(tmp_path, "c.img", c))
    try:
        assert ab.identity.volume == bc.identity.volume == pairs.IMAGE_VOLUME
        assert ab.identity.target == bc.identity.base
        assert ab.identity.target_size == bc.identity.base_size
        assert ab.identity.target == pairs.image_id(str(tmp_path / "b.img"))
        assert ab.identity.target.startswith(f"image:{len(b)}:")
        assert str(tmp_path) not in str(ab.identity.to_dict())
    finally:
        ab.close()
        bc.close()


def test_an_image_changed_in_place_gets_a_new_name_and_delta_id(tmp_path):
    from lvdeltafs import pairs

    a = write(tmp_path, "a.img", image(31, 16 * BS))
    b_data = bytearray(image(31, 16 * BS))
    b_data[BS] ^= 1
    b = write(tmp_path, "b.img", b_data)
    first, again = pairs.compare_delta(a, b), pairs.compare_delta(a, b)
    with open(b, "r+b") as f:  # in place: same path, same size
        f.seek(2 * BS)
        f.write(b"changed")
    changed = pairs.compare_delta(a, b)
    for d in (first, again, changed):
        d.close()
    assert first.identity.delta_id == again.identity.delta_id  # same content, same delta
    assert changed.identity.target != first.identity.target
    assert changed.identity.delta_id != first.identity.delta_id


def test_an_image_written_during_the_compare_is_refused(tmp_path, monkeypatch):
    from lvdeltafs import pairs
    from lvdeltafs.errors import Refused
    from lvdeltafs.sources import compare

    a, b = write(tmp_path, "a.img", image(32)), write(tmp_path, "b.img", image(33))
    real = compare.compare_images

    def writing(*args, **kw):
        found = real(*args, **kw)
        with open(b, "r+b") as f:
            f.write(b"late")
        return found
    monkeypatch.setattr(compare, "compare_images", writing)
    with pytest.raises(Refused, match="written to while they were compared"):
        pairs.compare_delta(a, b)


def test_sides_not_read_whole_are_named_afresh_each_run(tmp_path):
    """A COW-store pair and a live origin are not named by content: a new name each run."""
    from types import SimpleNamespace

    from lvdeltafs import pairs
    from tests.cowimage import write_cow_image

    write_cow_image(tmp_path / "cow", BS, [1, 3])
    target = write(tmp_path, "t.img", image(34, 8 * BS))
    cow = str(tmp_path / "cow")
    one, two = pairs.cow_image_delta(cow, target), pairs.cow_image_delta(cow, target)
    one.close()
    two.close()
    assert one.identity.delta_id != two.identity.delta_id
    assert one.identity.volume == pairs.IMAGE_VOLUME

    origin = SimpleNamespace(uuid="ORIGIN-UUID")
    snap = SimpleNamespace(uuid="SNAP-UUID", snapshot_id="SNAP-UUID@2024-01-01T00:00:00Z")
    live = pairs.LvmPair(base=snap, target=origin, origin=origin, base_size=BS, target_size=BS)
    ids = {pairs._identity(live, BS, "cow").target for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("ORIGIN-UUID@origin-") for i in ids)
    fixed = pairs.LvmPair(base=snap, target=SimpleNamespace(uuid="T", snapshot_id="T@1"), origin=origin,
                          base_size=BS, target_size=BS)
    assert pairs._identity(fixed, BS, "cow") == pairs._identity(fixed, BS, "cow")
