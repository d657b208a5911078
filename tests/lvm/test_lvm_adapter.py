"""lvdeltafs.lvm against real LVM and device-mapper: runs inside scripts/lvm-vm."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import time

import pytest

from lvdeltafs import lvm
from lvdeltafs.errors import CommandFailed, Refused, SnapshotUnusable

pytestmark = pytest.mark.lvm


def make_thin(vg, name: str = "thin1") -> None:
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "64M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", "128M", "-T", f"{vg.name}/pool", "-n", name)


def test_snapshots_of_is_in_creation_order(vg):
    vg.run("lvcreate", "-q", "-L", "16M", "-n", "lv0", vg.name)
    # Names sort against creation order, so only the times can put them right.
    for i, name in enumerate(("snap-c", "snap-b", "snap-a")):
        if i:
            time.sleep(1.1)  # lv_time has one-second resolution
        lvm.create_snapshot(vg.name, "lv0", name, size="4M")
    assert [s.name for s in lvm.snapshots_of(vg.name, "lv0")] == ["snap-c", "snap-b", "snap-a"]

    # Thin snapshots taken within one second tie on lv_time: the pool's device ids decide.
    make_thin(vg)
    for name in ("t-z", "t-y", "t-x"):
        lvm.create_snapshot(vg.name, "thin1", name)
    snaps = lvm.snapshots_of(vg.name, "thin1")
    assert [s.name for s in snaps] == ["t-z", "t-y", "t-x"]
    assert [s.thin_id for s in snaps] == sorted(s.thin_id for s in snaps)


def test_cow_device_with_dashes_in_names(make_vg):
    vg = make_vg(name=f"my-vg-{os.getpid()}")
    vg.run("lvcreate", "-q", "-L", "16M", "-n", "my-lv", vg.name)
    snap = lvm.create_snapshot(vg.name, "my-lv", "my-snap", size="4M", chunk_size=8192)
    assert lvm.dm_name(vg.name, "my-snap") == vg.dm("my-snap") == f"my--vg--{os.getpid()}-my--snap"
    assert snap.dm_path == f"/dev/mapper/{vg.dm('my-snap')}"
    cow = lvm.cow_device(vg.name, "my-snap")
    assert cow == f"/dev/mapper/{vg.dm('my-snap')}-cow"
    # It really is the exception store: the header says so, with the chunk size asked for.
    fd = os.open(cow, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    magic, valid, version, chunk_sectors = struct.unpack_from("<IIII", buf)
    assert (magic, valid, version, chunk_sectors * 512) == (0x70416E53, 1, 1, 8192)
    # The origin is not a snapshot: its table says snapshot-origin, and that is refused.
    with pytest.raises(SnapshotUnusable, match="snapshot-origin"):
        lvm.cow_device(vg.name, "my-lv")


def test_create_tag_and_remove_classic_snapshot(vg):
    vg.run("lvcreate", "-q", "-L", "16M", "-n", "lv0", vg.name)
    snap = lvm.create_snapshot(vg.name, "lv0", "s1", size=8 << 20, chunk_size=16384, tags=["lvmirror"])
    assert snap.is_classic_snapshot and snap.is_active and snap.origin == "lv0"
    assert snap.size == 8 << 20 and snap.chunk_size == 16384 and snap.tags == ("lvmirror",)
    assert lvm.require_usable(snap) is snap
    assert lvm.lv_by_uuid(snap.uuid) == snap

    lvm.add_tag(vg.name, "s1", "gen:2")
    assert lvm.get_lv(vg.name, "s1").tags == ("gen:2", "lvmirror")
    lvm.remove_tag(vg.name, "s1", "lvmirror")
    assert lvm.get_lv(vg.name, "s1").tags == ("gen:2",)

    with pytest.raises(Refused, match="not a snapshot"):
        lvm.remove_lv(vg.name, "lv0")
    assert lvm.remove_lv(vg.name, "s1") is True
    assert lvm.get_lv(vg.name, "s1") is None
    assert lvm.remove_lv(vg.name, "s1") is False
    assert lvm.get_lv(vg.name, "lv0") is not None


def test_create_tag_and_remove_thin_snapshot(vg):
    make_thin(vg)
    snap = lvm.create_snapshot(vg.name, "thin1", "ts1", tags=["lvmirror"])
    assert snap.is_thin and snap.is_snapshot and snap.is_active
    assert not snap.needs_activation_skip_override and snap.pool == "pool" and snap.thin_id == 2
    assert os.path.exists(snap.path) and lvm.require_usable(snap) is snap

    # A snapshot made the LVM default way skips activation; activate() overrides that.
    vg.run("lvcreate", "-q", "-s", "-n", "ts2", f"{vg.name}/thin1")
    skipped = lvm.get_lv(vg.name, "ts2")
    assert skipped.needs_activation_skip_override and not skipped.is_active
    with pytest.raises(SnapshotUnusable, match="lvchange -ay -K"):
        lvm.require_usable(skipped)
    assert lvm.activate(vg.name, "ts2").is_active

    devs = lvm.pool_devices(vg.name, "pool")
    assert os.path.exists(devs.tpool) and os.path.exists(devs.tmeta)
    assert devs.tpool_name == f"{vg.name}-pool-tpool"

    lvm.add_tag(vg.name, "ts1", "gen:1")
    assert lvm.get_lv(vg.name, "ts1").tags == ("gen:1", "lvmirror")
    assert lvm.remove_lv(vg.name, "ts1") and lvm.remove_lv(vg.name, "ts2")
    assert lvm.snapshots_of(vg.name, "thin1") == []
    with pytest.raises(Refused):
        lvm.remove_lv(vg.name, "thin1")
    with pytest.raises(SnapshotUnusable, match="'thin'"):
        lvm.cow_device(vg.name, "thin1")


def test_overflowed_classic_snapshot_is_invalid(vg):
    vg.run("lvcreate", "-q", "-L", "32M", "-n", "lv0", vg.name)
    lvm.create_snapshot(vg.name, "lv0", "small", size="4M")
    subprocess.run(["dd", "if=/dev/urandom", f"of={vg.lv_path('lv0')}", "bs=1M", "count=8",
                    "oflag=direct"], check=True, capture_output=True)
    snap = lvm.get_lv(vg.name, "small")
    assert snap.is_invalid and snap.attr[4] == "I"
    with pytest.raises(SnapshotUnusable, match="invalid"):
        lvm.require_usable(snap)
    # An invalid snapshot is still a snapshot, and removable.
    assert lvm.remove_lv(vg.name, "small")


def test_failing_commands_carry_stderr(vg):
    with pytest.raises(CommandFailed) as exc:
        lvm.list_lvs(f"{vg.name}nosuch")
    assert "not found" in exc.value.stderr and exc.value.returncode not in (0, None)
    vg.run("lvcreate", "-q", "-L", "16M", "-n", "lv0", vg.name)
    lvm.create_snapshot(vg.name, "lv0", "s1", size="4M")
    with pytest.raises(CommandFailed) as exc:
        lvm.create_snapshot(vg.name, "lv0", "s1", size="4M")
    assert "already exists" in exc.value.stderr
    with pytest.raises(CommandFailed, match="dmsetup"):
        lvm.cow_device(vg.name, "nosuch")
