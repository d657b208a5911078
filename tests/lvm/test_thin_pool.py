"""thin_delta on a live pool, under a metadata snapshot (inside scripts/lvm-vm)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from lvdeltafs.extents import DATA, ZERO
from lvdeltafs.sources.thin import MetadataSnapshot, thin_delta_extents, thin_mapped_extents

pytestmark = pytest.mark.lvm

MIB = 1 << 20
KIB = 1 << 10
SIZE = 64 * MIB
BLOCK = 64 * KIB  # the pool's chunk size (-c 64k)


def write_seeded(path: str, writes: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in writes:
            os.pwrite(fd, rng.integers(1, 256, length, dtype=np.uint8).tobytes(), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def thin_id(vg, lv: str) -> int:
    return int(vg.run("lvs", "--noheadings", "-o", "thin_id", f"{vg.name}/{lv}").strip())


def covered(ext, offset: int, length: int, kind: int) -> bool:
    i = int(np.searchsorted(ext.offsets, offset, side="right")) - 1
    return i >= 0 and ext.kinds[i] == kind and int(ext.offsets[i] + ext.lengths[i]) >= offset + length


def test_thin_delta_rebuilds_the_newer_snapshot(vg):
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-c", "64k", "-L", "160M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", f"{SIZE // MIB}M", "-T", f"{vg.name}/pool", "-n", "thin")
    base = [(0, 2 * MIB), (10 * MIB, 4 * MIB), (40 * MIB + 512, 4096), (SIZE - 3 * BLOCK, 3 * BLOCK)]
    write_seeded(vg.lv_path("thin"), base, seed=1)
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "snap1", f"{vg.name}/thin")

    changes = [(512, 512), (BLOCK - 100, 200), (11 * MIB, 1 * MIB + 4096), (50 * MIB, 256 * KIB),
               (SIZE - 512, 512)]
    write_seeded(vg.lv_path("thin"), changes, seed=2)
    # Whole pool blocks, so the discards unmap: they must come out as zeros.
    discards = [(12 * MIB + 512 * KIB, 512 * KIB), (1 * MIB, 1 * MIB)]
    for offset, length in discards:
        vg.run("blkdiscard", "-o", str(offset), "-l", str(length), vg.lv_path("thin"))
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "snap2", f"{vg.name}/thin")

    id1, id2 = thin_id(vg, "snap1"), thin_id(vg, "snap2")
    tmeta = f"/dev/mapper/{vg.dm('pool_tmeta')}"
    with MetadataSnapshot(vg.dm("pool")):
        ext = thin_delta_extents(tmeta, id1, id2, SIZE, metadata_snap=True)
        mapped = thin_mapped_extents(tmeta, id2, SIZE, True)

    for offset, length in changes:
        assert covered(ext, offset, length, DATA), (offset, length, ext.as_tuples())
    for offset, length in discards:
        assert covered(ext, offset, length, ZERO), (offset, length, ext.as_tuples())
    assert ext.data_bytes < 8 * MIB  # a delta, not the volume

    older = bytearray(read_all(vg.lv_path("snap1")))
    newer = read_all(vg.lv_path("snap2"))
    for offset, length, kind in ext:
        older[offset:offset + length] = newer[offset:offset + length] if kind == DATA else bytes(length)
    assert hashlib.sha256(older).hexdigest() == hashlib.sha256(newer).hexdigest()

    # A first full copy reads only the mapped blocks: everything else is zeros.
    rebuilt = bytearray(SIZE)
    for offset, length, _ in mapped:
        rebuilt[offset:offset + length] = newer[offset:offset + length]
    assert rebuilt == newer

    # Released: a new reservation succeeds (then give it back).
    pool = f"{vg.dm('pool')}-tpool"
    vg.run("dmsetup", "message", pool, "0", "reserve_metadata_snap")
    vg.run("dmsetup", "message", pool, "0", "release_metadata_snap")


def test_stale_reservation_is_released_and_errors_release(vg):
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "64M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", "32M", "-T", f"{vg.name}/pool", "-n", "thin")
    pool = f"{vg.dm('pool')}-tpool"
    vg.run("dmsetup", "message", pool, "0", "reserve_metadata_snap")  # a crashed run's leftover
    with pytest.raises(RuntimeError), MetadataSnapshot(pool):
        raise RuntimeError("failure inside the block")
    vg.run("dmsetup", "message", pool, "0", "reserve_metadata_snap")
    vg.run("dmsetup", "message", pool, "0", "release_metadata_snap")
    # Releasing when nothing is held: the exact failure MetadataSnapshot tolerates.
    with MetadataSnapshot(pool) as snap:
        assert snap.held
