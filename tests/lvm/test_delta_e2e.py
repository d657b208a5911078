"""Deltas on real LVM: base + delta reproduces the target snapshot byte for byte.

Runs inside the VM.  Writes are seeded and recorded, so the test also checks
that every byte written between the two snapshots lies in a data range.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from lvdeltafs.extents import DATA, ZERO, parse_ranges
from tests.harness import BIN, apply_stream, sh, sha256_of, write_at

pytestmark = pytest.mark.lvm

LVDELTAFS = str(BIN / "lvdeltafs")
SECTOR = 512




def lv_size(path: str) -> int:
    return int(sh("blockdev", "--getsize64", path))




def seeded_writes(rng: random.Random, size: int, chunk: int) -> list[tuple[int, int]]:
    """Writes of many shapes: sectors, chunk-straddling, the last sector, a large run, many small."""
    w = [(rng.randrange(size // SECTOR) * SECTOR, SECTOR),           # one sector
         (chunk * 3 - SECTOR, 2 * SECTOR),                           # straddles a chunk edge
         (size - SECTOR, SECTOR),                                    # the volume's last sector
         (rng.randrange(size // 4) // SECTOR * SECTOR, 3 << 20)]     # a large run
    for _ in range(60):
        length = rng.choice([SECTOR, 4096, 8192, chunk, chunk + SECTOR, 3 * chunk])
        w.append((rng.randrange((size - length) // SECTOR) * SECTOR, length))
    return w




def assert_covers(ranges_text: str, writes: list[tuple[int, int]], size: int) -> None:
    ext = parse_ranges(ranges_text)
    data = [(o, o + n) for o, n, k in ext if k == DATA]
    import bisect
    starts = [s for s, _ in data]
    for off, length in writes:
        end = min(off + length, size)
        i = bisect.bisect_right(starts, off) - 1
        assert i >= 0 and data[i][0] <= off and data[i][1] >= end, \
            f"written bytes {off}..{end} are not inside one data range"


def export_and_check(base_lv: str, target_lv: str, base_dev: str, target_dev: str,
                     workdir: Path) -> str:
    base_img = workdir / "base.img"
    sh("dd", f"if={base_dev}", f"of={base_img}", "bs=1M", "status=none")
    out = workdir / "delta"
    sh(LVDELTAFS, "export", base_lv, target_lv, str(out))
    sh(LVDELTAFS, "verify", str(out))
    apply_stream(base_img, out / "delta")
    size = lv_size(target_dev)
    assert base_img.stat().st_size == size
    assert sha256_of(base_img) == sha256_of(target_dev)
    return (out / "ranges").read_text()


@pytest.mark.parametrize("chunk_k", [4, 64])
def test_classic_delta_reproduces_target(make_vg, tmp_path, chunk_k):
    vg = make_vg("vg-e2e", size_mb=400, extent_size="16k")
    # 48 MiB + 16 KiB: not a multiple of a 64 KiB chunk.
    size_arg = f"{48 * 1024 + 16}k"
    vg.run("lvcreate", "-q", "-L", size_arg, "-n", "my-lv", vg.name)
    origin = vg.lv_path("my-lv")
    size = lv_size(origin)
    rng = random.Random(1000 + chunk_k)
    sh("dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=8", "oflag=direct", "status=none")
    vg.run("lvcreate", "-q", "-s", "-L", "40M", "-c", f"{chunk_k}k", "-n", "snap-1", f"{vg.name}/my-lv")
    writes = seeded_writes(rng, size, chunk_k * 1024)
    for off, length in writes:
        write_at(origin, off, rng.randbytes(length))
    vg.run("lvcreate", "-q", "-s", "-L", "40M", "-n", "snap-2", f"{vg.name}/my-lv")
    # Written after the target: must not reach the mirror (data comes from snap-2).
    write_at(origin, 0, b"\xee" * 65536)
    ranges = export_and_check(f"{vg.name}/snap-1", f"{vg.name}/snap-2",
                              vg.lv_path("snap-1"), vg.lv_path("snap-2"), tmp_path)
    assert_covers(ranges, writes, size)


def test_thin_delta_with_discards_reproduces_target(make_vg, tmp_path):
    vg = make_vg("vg-thin-e2e", size_mb=400, extent_size="16k")
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "128M", "-c", "64k", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", f"{40 * 1024 + 48}k", "-T", f"{vg.name}/pool", "-n", "thin-lv")
    origin = vg.lv_path("thin-lv")
    size = lv_size(origin)
    assert size % 65536 != 0
    rng = random.Random(7)
    sh("dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=12", "oflag=direct", "status=none")
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "thin-s1", f"{vg.name}/thin-lv")
    writes = seeded_writes(rng, size, 65536)
    for off, length in writes:
        write_at(origin, off, rng.randbytes(length))
    # Discard whole pool blocks (unmapped in the target: zero ranges) and a ragged range.
    sh("blkdiscard", "-o", str(2 << 20), "-l", str(1 << 20), origin)
    sh("blkdiscard", "-o", str(5 * 65536 + 4096), "-l", str(3 * 65536), origin)
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "thin-s2", f"{vg.name}/thin-lv")
    write_at(origin, 4096, b"\xee" * 8192)
    ranges = export_and_check(f"{vg.name}/thin-s1", f"{vg.name}/thin-s2",
                              vg.lv_path("thin-s1"), vg.lv_path("thin-s2"), tmp_path)
    ext = parse_ranges(ranges)
    zeros = [(o, n) for o, n, k in ext if k == ZERO]
    assert any(o <= 2 << 20 and o + n >= 3 << 20 for o, n in zeros), "discarded MiB is not a zero range"
    # The metadata snapshot was released: another can be reserved.
    pool = f"{vg.dm('pool')}-tpool"
    sh("dmsetup", "message", pool, "0", "reserve_metadata_snap")
    sh("dmsetup", "message", pool, "0", "release_metadata_snap")


def test_overflowed_classic_snapshot_is_refused(make_vg, tmp_path):
    vg = make_vg("vg-ovf")
    vg.run("lvcreate", "-q", "-L", "32M", "-n", "lv", vg.name)
    vg.run("lvcreate", "-q", "-s", "-L", "4M", "-n", "s1", f"{vg.name}/lv")
    sh("dd", "if=/dev/urandom", f"of={vg.lv_path('lv')}", "bs=1M", "count=8", "oflag=direct",
       "status=none", check=False)
    vg.run("lvcreate", "-q", "-s", "-L", "16M", "-n", "s2", f"{vg.name}/lv")
    proc = subprocess.run([LVDELTAFS, "ranges", f"{vg.name}/s1", f"{vg.name}/s2"],
                          capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    assert "invalid" in proc.stderr.lower()
    assert proc.stdout == ""
