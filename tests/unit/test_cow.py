"""The classic snapshot exception-store reader, on stores written by tests.cowimage."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lvdeltafs.errors import BadInput, NotACowStore, SnapshotUnusable, UnsupportedFormat
from lvdeltafs.extents import DATA
from lvdeltafs.sources import cow
from lvdeltafs.sources.cow import (
    SNAP_MAGIC,
    area_chunk,
    cow_extents,
    parse_exception_table,
    read_exception_table,
)
from tests.cowimage import kernel_new_chunks, write_cow_image


def _both(path, **kw):
    """Parse the image from memory and read it from the file: they must agree."""
    raw = path.read_bytes()
    pure = parse_exception_table(raw, len(raw), **kw)
    dev = read_exception_table(str(path), **kw)
    assert np.array_equal(pure.old_chunks, dev.old_chunks)
    assert (pure.new_chunks, pure.areas, pure.chunk_size) == (dev.new_chunks, dev.areas, dev.chunk_size)
    return dev


SHAPES = [
    (4096, 0), (4096, 1), (4096, 255), (4096, 256), (4096, 257), (4096, 256 * 5 + 3),
    (8192, 512 * 3), (16384, 1024 + 1), (65536, 4096), (131072, 100), (524288, 3),
]


@pytest.mark.parametrize(("chunk", "count"), SHAPES)
def test_round_trip(tmp_path, chunk, count):
    rng = np.random.default_rng(count + chunk)
    old = rng.permutation(max(count * 3, 1))[:count]
    if count:
        old[count // 2] = 0  # old_chunk 0 is a real chunk, never the terminator
    path = tmp_path / "cow"
    write_cow_image(path, chunk, old)
    table = _both(path)
    assert table.chunk_size == chunk
    assert table.new_chunks == count
    assert np.array_equal(table.old_chunks, np.unique(old))
    assert table.old_chunks.dtype == np.uint64
    epa = chunk // 16
    assert table.areas == count // epa + 1


def test_small_batches_walk_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(cow, "FIRST_BATCH_AREAS", 1)
    monkeypatch.setattr(cow, "MAX_BATCH_BYTES", 3 * 4096)
    monkeypatch.setattr(cow, "READ_THREADS", 2)
    old = np.arange(256 * 20 + 7)[::-1]
    path = tmp_path / "cow"
    write_cow_image(path, 4096, old)
    assert np.array_equal(_both(path).old_chunks, np.arange(old.size, dtype=np.uint64))


def test_header_bytes_match_the_kernel(tmp_path):
    # Seen on a real kernel (reference/dm-snapshot-cow.md): 3 x 64 KiB at 640 KiB, 4 KiB chunks.
    path = tmp_path / "cow"
    write_cow_image(path, 4096, np.arange(0xA0, 0xA0 + 48))
    raw = path.read_bytes()
    assert raw[:16] == bytes.fromhex("536e417001000000010000000800000000")[:16]
    assert struct.unpack_from("<6Q", raw, 4096) == (0xA0, 2, 0xA1, 3, 0xA2, 4)


def test_kernel_new_chunks_skip_metadata():
    new = kernel_new_chunks(600, 4096)
    assert new[0] == 2 and new[255] == 257 and new[256] == 259  # 258 is area 1
    assert not np.any(new % 257 == 1)


def test_duplicates_and_order_do_not_matter(tmp_path):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [9, 3, 9, 0, 3])
    assert _both(path).old_chunks.tolist() == [0, 3, 9]


def test_out_of_order_new_chunks_are_accepted(tmp_path):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [5, 6, 7], new_chunks=[4, 2, 3])
    table = _both(path)
    assert table.old_chunks.tolist() == [5, 6, 7] and table.new_chunks == 3


def test_never_initialised_is_empty(tmp_path):
    path = tmp_path / "cow"
    path.write_bytes(bytes(65536))
    table = _both(path)
    assert table.old_chunks.size == 0 and not table.initialised
    assert len(cow_extents(table, 1 << 20)) == 0


@pytest.mark.parametrize(("kw", "error", "words"), [
    ({"magic": 0x12345678}, NotACowStore, "bad magic"),
    ({"version": 2}, UnsupportedFormat, "version 2"),
    ({"valid": 0}, SnapshotUnusable, "invalidated"),
    ({"valid": 7}, NotACowStore, "valid=7"),
    ({"header_chunk_sectors": 12}, NotACowStore, "chunk size 12"),
    ({"header_chunk_sectors": 4}, NotACowStore, "chunk size 4"),
    ({"header_chunk_sectors": 2048}, NotACowStore, "chunk size 2048"),
])
def test_header_refusals(tmp_path, kw, error, words):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [1, 2, 3], **kw)
    raw = path.read_bytes()
    for attempt in (lambda: parse_exception_table(raw, len(raw), name="vg/s1"),
                    lambda: read_exception_table(str(path), name="vg/s1")):
        with pytest.raises(error, match=words) as info:
            attempt()
        assert "vg/s1" in str(info.value)


def test_invalid_message_says_what_to_do(tmp_path):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [1], valid=0)
    with pytest.raises(SnapshotUnusable, match="resync with a compare.*more space"):
        read_exception_table(str(path), name="vg0/s1")


@pytest.mark.parametrize(("new_chunk", "words"), [
    ((1 << 56) | 5, "top byte set"),
    (258, "metadata area"),
    (1, "metadata area"),
    (10_000, "past the end"),
])
def test_bad_records_name_their_index(tmp_path, new_chunk, words):
    path = tmp_path / "cow"
    n = 300
    new = kernel_new_chunks(n, 4096)
    new[270] = new_chunk
    write_cow_image(path, 4096, np.arange(n), new_chunks=new, device_size=400 * 4096)
    raw = path.read_bytes()
    with pytest.raises(NotACowStore, match=f"record 270 .*area 1, slot 14.*{words}"):
        parse_exception_table(raw, len(raw))
    with pytest.raises(NotACowStore, match="record 270"):
        read_exception_table(str(path))


def test_old_chunk_outside_the_origin(tmp_path):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [0, 5, 1000, 7])
    raw = path.read_bytes()
    with pytest.raises(BadInput, match="record 2 names origin chunk 1000"):
        parse_exception_table(raw, len(raw), origin_size=1000 * 4096)
    table = read_exception_table(str(path))
    with pytest.raises(BadInput, match="past the end of the origin"):
        cow_extents(table, 1000 * 4096)
    assert cow_extents(table, 1001 * 4096).as_tuples() == [
        (0, 4096, DATA), (5 * 4096, 4096, DATA), (7 * 4096, 4096, DATA), (1000 * 4096, 4096, DATA)]


def test_truncated_device_stops_at_its_end(tmp_path):
    # Area 0 full, and the device ends before area 1: the table is area 0.
    path = tmp_path / "cow"
    write_cow_image(path, 4096, np.arange(256), device_size=area_chunk(1, 256) * 4096)
    table = _both(path)
    assert table.new_chunks == 256 and table.areas == 1


def test_buffer_shorter_than_the_table(tmp_path):
    path = tmp_path / "cow"
    size = write_cow_image(path, 4096, np.arange(300))
    raw = path.read_bytes()[:4096 * 100]
    with pytest.raises(BadInput, match="pass the whole device"):
        parse_exception_table(raw, size)


def test_garbage_past_the_terminator_is_ignored(tmp_path):
    # Areas after the zeroed one may hold stale bytes from an earlier LV.
    path = tmp_path / "cow"
    size = write_cow_image(path, 4096, np.arange(10), device_size=600 * 4096)
    with open(path, "r+b") as f:
        f.seek(area_chunk(1, 256) * 4096)
        f.write(b"\xff" * 4096)
    assert _both(path).new_chunks == 10
    assert size == 600 * 4096


def test_cow_extents_coalesce_and_clip(tmp_path):
    path = tmp_path / "cow"
    write_cow_image(path, 65536, [3, 1, 2, 9])
    table = read_exception_table(str(path))
    # The origin ends half way into chunk 9.
    ext = cow_extents(table, 9 * 65536 + 4096)
    assert ext.as_tuples() == [(65536, 3 * 65536, DATA), (9 * 65536, 4096, DATA)]


def test_magic_constant():
    assert SNAP_MAGIC.to_bytes(4, "little") == b"SnAp"


def test_reads_only_the_metadata(tmp_path, monkeypatch):
    path = tmp_path / "cow"
    write_cow_image(path, 4096, np.arange(300), device_size=1 << 30)
    offsets = []
    real = cow.os.preadv

    def counting(fd, buffers, offset):
        offsets.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(cow.os, "preadv", counting)
    assert read_exception_table(str(path)).new_chunks == 300
    # The header, the first batch, and the second batch read ahead: not the 1 GiB device.
    assert sum(n for _, n in offsets) <= 4096 * (1 + 3 * cow.FIRST_BATCH_AREAS)
    assert all(off == 0 or (off // 4096) % 257 == 1 for off, _ in offsets)


def test_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    # tmpfs refuses O_DIRECT with EINVAL at open.
    path = tmp_path / "cow"
    write_cow_image(path, 4096, [4, 2])
    real = cow.os.open

    def no_direct(p, flags, *a):
        if flags & cow.os.O_DIRECT:
            raise OSError(cow.errno.EINVAL, "Invalid argument")
        return real(p, flags, *a)

    monkeypatch.setattr(cow.os, "open", no_direct)
    assert read_exception_table(str(path)).old_chunks.tolist() == [2, 4]


def test_chunks_kept_as_uint32_when_they_fit(tmp_path):
    path = tmp_path / "cow.img"
    write_cow_image(path, 4096, [5, 2**32 - 1, 3])
    table = read_exception_table(str(path))
    assert table.chunks.dtype == np.uint32 and table.old_chunks.dtype == np.uint64
    assert table.old_chunks.tolist() == [3, 5, 2**32 - 1]
    write_cow_image(path, 4096, [5, 2**32, 3])
    table = read_exception_table(str(path))
    assert table.chunks.dtype == np.uint64 and table.old_chunks.tolist() == [3, 5, 2**32]
