"""The exception-store reader against tables a real kernel wrote (inside scripts/lvm-vm)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from lvdeltafs.errors import SnapshotUnusable
from lvdeltafs.sources.cow import (
    RECORD_BYTES,
    SNAP_MAGIC,
    area_chunk,
    cow_extents,
    read_exception_table,
)
from tests.cowimage import kernel_new_chunks, write_cow_image

pytestmark = pytest.mark.lvm

MIB = 1 << 20
ORIGIN = 128 * MIB


def cow_device(vg, snap: str) -> str:
    """The snapshot's COW device, found the safe way: argument 2 of its snapshot table."""
    table = vg.run("dmsetup", "table", vg.dm(snap)).split()
    assert table[2] == "snapshot", table
    majmin = table[4]
    name = Path(f"/sys/dev/block/{majmin}/dm/name").read_text().strip()
    return f"/dev/mapper/{name}"


def write_seeded(path: str, writes: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in writes:
            os.pwrite(fd, rng.integers(0, 256, length, dtype=np.uint8).tobytes(), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks_of(writes: list[tuple[int, int]], chunk: int) -> set[int]:
    out: set[int] = set()
    for offset, length in writes:
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return out


def read_raw(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        # The kernel writes the COW around the page cache: drop it before reading.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# chunk option -> (chunk bytes, COW size, scattered single-chunk writes)
CASES = {
    "default": (4096, "8M", 256 + 50),     # more than one metadata area (E = 256)
    "16k": (16384, "32M", 1024 + 50),      # more than one metadata area (E = 1024)
    "64k": (65536, "16M", 100),            # E = 4096 would need a 256 MiB COW
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_table_is_read_exactly(vg, tmp_path, case):
    chunk, cow_size, scattered = CASES[case]
    vg.run("lvcreate", "-q", "-L", f"{ORIGIN // MIB}M", "-n", "lv", vg.name)
    chunk_opt = [] if case == "default" else ["-c", case]
    vg.run("lvcreate", "-q", "-s", "-L", cow_size, *chunk_opt, "-n", "s1", f"{vg.name}/lv")
    writes = [
        (7 * 512, 512),                        # one sector
        (5 * chunk - 1024, 2048),              # straddling two chunks
        (ORIGIN - 512, 512),                   # the last sector of the volume
        (20 * MIB + 4096, 3 * MIB),            # a multi-MiB run
    ]
    writes += [(32 * MIB + i * 2 * chunk + 512, 1024) for i in range(scattered)]
    write_seeded(vg.lv_path("lv"), writes, seed=len(case))
    expected = chunks_of(writes, chunk)

    cow = cow_device(vg, "s1")
    table = read_exception_table(cow, name=f"{vg.name}/s1", origin_size=ORIGIN)
    lvs_chunk = int(vg.run("lvs", "--noheadings", "-o", "chunk_size", "--units", "b", "--nosuffix",
                           f"{vg.name}/s1").strip())
    assert table.header.magic == SNAP_MAGIC and table.header.valid == 1 and table.header.version == 1
    assert table.chunk_size == lvs_chunk == chunk
    assert set(table.old_chunks.tolist()) == expected
    assert table.new_chunks == len(expected)
    epa = chunk // RECORD_BYTES
    assert table.areas == len(expected) // epa + 1
    if case != "64k":
        assert table.areas >= 2

    ext = cow_extents(table, ORIGIN)
    for offset, length in writes:  # every written byte is covered
        i = np.searchsorted(ext.offsets, offset, side="right") - 1
        assert i >= 0 and ext.offsets[i] + ext.lengths[i] >= offset + length

    _compare_with_cowimage(cow, table, tmp_path / "synthetic", chunk, epa)


def _records(raw_area: bytes) -> list[tuple[int, int]]:
    pairs = list(struct.iter_unpack("<QQ", raw_area))
    return pairs[:next((i for i, (_, new) in enumerate(pairs) if new == 0), len(pairs))]


def _compare_with_cowimage(cow: str, table, synthetic: Path, chunk: int, epa: int) -> None:
    """cowimage lays out what the kernel does: header chunk, areas, terminator, new_chunk numbering."""
    kernel_pairs: list[tuple[int, int]] = []
    kernel_areas = []
    for a in range(table.areas):
        raw = read_raw(cow, area_chunk(a, epa) * chunk, chunk)
        kernel_areas.append(raw)
        kernel_pairs += _records(raw)
    assert len(kernel_pairs) == table.new_chunks
    old_in_kernel_order = [old for old, _ in kernel_pairs]
    write_cow_image(synthetic, chunk, old_in_kernel_order, device_size=table.device_size)
    ours = synthetic.read_bytes()

    # The header chunk, byte for byte (LVM zeroes the start of a new COW; the kernel writes 16 bytes).
    assert read_raw(cow, 0, chunk) == ours[:chunk]
    # The kernel hands out data chunks 2, 3, ... skipping metadata: the same set of new_chunks.
    assert sorted(new for _, new in kernel_pairs) == kernel_new_chunks(len(kernel_pairs), chunk).tolist()
    same_order = [new for _, new in kernel_pairs] == kernel_new_chunks(len(kernel_pairs), chunk).tolist()
    for a, raw in enumerate(kernel_areas):
        mine = ours[area_chunk(a, epa) * chunk:(area_chunk(a, epa) + 1) * chunk]
        if same_order:
            assert raw == mine, f"metadata area {a} differs"
        else:
            # Copies complete out of order: records sit in commit order, not allocation order.
            assert {old for old, _ in _records(raw)} == {old for old, _ in _records(mine)}
            assert raw[len(_records(raw)) * RECORD_BYTES:] == mine[len(_records(mine)) * RECORD_BYTES:]


def test_overflowed_snapshot_is_refused(vg):
    vg.run("lvcreate", "-q", "-L", "32M", "-n", "lv", vg.name)
    vg.run("lvcreate", "-q", "-s", "-L", "4M", "-n", "s1", f"{vg.name}/lv")
    write_seeded(vg.lv_path("lv"), [(0, 8 * MIB)], seed=7)
    attr = vg.run("lvs", "--noheadings", "-o", "lv_attr", f"{vg.name}/s1").strip()
    assert attr[4] == "I", attr
    with pytest.raises(SnapshotUnusable, match=f"{vg.name}/s1 was invalidated.*resync with a compare"):
        read_exception_table(cow_device(vg, "s1"), name=f"{vg.name}/s1")
