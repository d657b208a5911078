"""A real lvdeltafs mount over real classic and thin snapshots (inside the VM)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lvdeltafs.extents import DATA, parse_ranges
from tests.harness import BIN, sh, write_at

pytestmark = pytest.mark.lvm

LVDELTAFS = str(BIN / "lvdeltafs")
MiB = 1 << 20
# The tree trusts an LVM listing for 2 s and the kernel its entries for 1 s.
STALE_AFTER = 3.5




def scribble(dev: str, seed: int) -> None:
    """A few writes of different shapes, seeded."""
    import random
    rng = random.Random(seed)
    size = int(sh("blockdev", "--getsize64", dev))
    for length in (512, 4096, 70_000, 1 * MiB, 8192):
        write_at(dev, rng.randrange((size - length) // 512) * 512, rng.randbytes(length))


def check_pair(pair: Path, target_dev: str, tmp: Path) -> None:
    """data is the target over the ranges, zeros elsewhere; chunks match the manifest; delta verifies."""
    tmp.mkdir(exist_ok=True)
    ranges = parse_ranges((pair / "ranges").read_text())
    manifest = json.loads((pair / "manifest.json").read_text())
    size = manifest["target_size"]
    assert (pair / "data").stat().st_size == size
    assert ranges.data_bytes > 0
    with open(pair / "data", "rb") as data, open(target_dev, "rb") as dev:
        pos = 0
        for off, length, kind in ranges:
            assert data.read(off - pos) == bytes(off - pos)
            dev.seek(off)
            want = dev.read(length) if kind == DATA else bytes(length)
            assert data.read(length) == want, f"data differs from {target_dev} at {off}+{length}"
            pos = off + length
        assert data.read() == bytes(size - pos)
    assert (pair / "data").stat().st_blocks * 512 == -(-ranges.data_bytes // 512) * 512
    sha = hashlib.sha256((pair / "chunks").read_bytes()).hexdigest()
    assert sha == manifest["chunks_sha256"]
    copy = tmp / f"copy-{pair.name}"
    sh("cp", "-r", str(pair), str(copy))
    sh(LVDELTAFS, "verify", str(copy))
    attrs = sh("getfattr", "-d", str(pair / "delta"))
    assert f'user.lvdeltafs.delta_id="{manifest["delta_id"]}"' in attrs


def errno_of_stat(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno
    return 0


def test_mount_over_classic_and_thin_snapshots(make_vg, fuse_mount, tmp_path):
    vg = make_vg("vg-mnt", size_mb=300, extent_size="16k")
    # classic: lv with s1, s2
    vg.run("lvcreate", "-q", "-L", "24M", "-n", "lv", vg.name)
    sh("dd", "if=/dev/urandom", f"of={vg.lv_path('lv')}", "bs=1M", "count=6", "oflag=direct", "status=none")
    vg.run("lvcreate", "-q", "-s", "-L", "12M", "-c", "16k", "-n", "s1", f"{vg.name}/lv")
    scribble(vg.lv_path("lv"), 1)
    vg.run("lvcreate", "-q", "-s", "-L", "12M", "-n", "s2", f"{vg.name}/lv")
    scribble(vg.lv_path("lv"), 2)
    # thin: thin with t1, t2
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "64M", "-c", "64k", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", "20M", "-T", f"{vg.name}/pool", "-n", "thin")
    sh("dd", "if=/dev/urandom", f"of={vg.lv_path('thin')}", "bs=1M", "count=4", "oflag=direct", "status=none")
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "t1", f"{vg.name}/thin")
    scribble(vg.lv_path("thin"), 3)
    sh("blkdiscard", "-o", str(1 * MiB), "-l", str(1 * MiB), vg.lv_path("thin"))  # mapped in t1
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "t2", f"{vg.name}/thin")
    scribble(vg.lv_path("thin"), 4)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse_mount([LVDELTAFS, "mount", "-f", "--vg", vg.name, str(mnt)], mnt)
    root = mnt / vg.name
    assert sorted(os.listdir(root)) == ["lv", "thin"]
    assert os.listdir(root / "lv") == ["snapshots", "s1..s2", "s2..@origin"]  # creation order
    assert os.listdir(root / "lv" / "snapshots") == ["s1", "s2"]
    assert json.loads((root / "lv" / "snapshots" / "s2").read_text())["kind"] == "classic"
    assert os.listdir(root / "thin") == ["snapshots", "t1..t2", "t2..@origin"]

    check_pair(root / "lv" / "s1..s2", vg.lv_path("s2"), tmp_path)
    check_pair(root / "thin" / "t1..t2", vg.lv_path("t2"), tmp_path)
    thin_ranges = parse_ranges((root / "thin" / "t1..t2" / "ranges").read_text())
    assert any(k != DATA for _, _, k in thin_ranges), "the discard should be a zero range"
    live = json.loads((root / "lv" / "s2..@origin" / "manifest.json").read_text())
    assert live["point_in_time"] is False and live["source"] == "cow"
    assert json.loads((root / "thin" / "t1..t2" / "manifest.json").read_text())["point_in_time"] is True
    # the snapshots' times
    lv_time = int(sh("lvs", "--noheadings", "--config", 'report/time_format="%s"', "-o", "lv_time",
                     f"{vg.name}/s2").strip())
    assert int((root / "lv" / "s1..s2" / "data").stat().st_mtime) == lv_time
    # an unlisted pair resolves by name; bad ones do not
    assert (root / "lv" / "s1..@origin" / "ranges").read_text()
    for bad in ["s2..s1", "s1..", "..s2", "x..y", "s1..s1", "s1..t1", "t1..t2"]:
        assert errno_of_stat(root / "lv" / bad) == errno.ENOENT, bad

    # An idle mount keeps no snapshot busy: lvremove works, and the pair turns into ENOENT.
    vg.run("lvremove", "-f", f"{vg.name}/s2")
    time.sleep(STALE_AFTER)
    assert errno_of_stat(root / "lv" / "s1..s2" / "data") in (errno.ENOENT, errno.EIO)
    assert errno_of_stat(root / "lv" / "s1..s2") == errno.ENOENT
    assert os.listdir(root / "lv") == ["snapshots", "s1..@origin"]
    # the mount is alive and other pairs still work
    check_pair(root / "thin" / "t1..t2", vg.lv_path("t2"), tmp_path / "again")


def test_overflowed_snapshot_is_eio_and_the_mount_lives(make_vg, fuse_mount, tmp_path):
    vg = make_vg("vg-ovf-mnt", size_mb=200)
    vg.run("lvcreate", "-q", "-L", "24M", "-n", "lv", vg.name)
    vg.run("lvcreate", "-q", "-s", "-L", "12M", "-n", "a1", f"{vg.name}/lv")
    scribble(vg.lv_path("lv"), 5)
    vg.run("lvcreate", "-q", "-s", "-L", "4M", "-n", "a2", f"{vg.name}/lv")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse_mount([LVDELTAFS, "mount", "-f", "--vg", vg.name, str(mnt)], mnt)
    pair = mnt / vg.name / "lv" / "a1..a2"
    assert (pair / "ranges").read_text()
    # Overflow a2's 4 MiB of COW space: the kernel invalidates it.
    sh("dd", "if=/dev/urandom", f"of={vg.lv_path('lv')}", "bs=1M", "count=8", "oflag=direct",
       "status=none", check=False)
    time.sleep(STALE_AFTER)
    assert errno_of_stat(pair / "data") in (errno.EIO, errno.ENOENT)
    proc = subprocess.run(["cat", str(pair / "chunks")], capture_output=True)
    assert proc.returncode != 0
    assert os.path.ismount(mnt)
    assert (mnt / vg.name / "lv" / "snapshots" / "a1").read_text()
    assert os.listdir(mnt / vg.name / "lv") == ["snapshots", "a1..a2", "a2..@origin"]
