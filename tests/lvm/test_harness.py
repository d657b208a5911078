"""The VM harness really gives LVM and device-mapper: these run inside scripts/lvm-vm."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest

from tests.harness import sh

pytestmark = pytest.mark.lvm


def lvs_json(vg: str, fields: str) -> list[dict]:
    out = sh("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, vg)
    return json.loads(out)["report"][0]["lv"]


def test_running_on_debian_kernel_with_device_mapper():
    assert os.environ.get("LVMIRROR_IN_VM") == "1"
    assert "Driver version" in sh("dmsetup", "version")
    targets = sh("dmsetup", "targets")
    for target in ("snapshot", "snapshot-origin", "thin-pool", "thin", "error", "flakey", "era"):
        assert f"{target} " in targets, f"device-mapper target {target} missing:\n{targets}"


def test_classic_snapshot_cow_header_matches_lvs(vg):
    vg.run("lvcreate", "-q", "-L", "32M", "-n", "lv0", vg.name)
    vg.run("lvcreate", "-q", "-s", "-L", "8M", "-c", "16k", "-n", "s1", f"{vg.name}/lv0")
    with open(vg.lv_path("lv0"), "r+b", buffering=0) as f:
        f.seek(640 * 1024)
        f.write(os.urandom(3 * 65536))
        os.fsync(f.fileno())
    table = sh("dmsetup", "table", vg.dm("s1")).split()
    assert table[2] == "snapshot" and table[5] == "P"
    cow_majmin = table[4]
    cow_name = Path(f"/sys/dev/block/{cow_majmin}/dm/name").read_text().strip()
    assert cow_name == vg.dm("s1") + "-cow"
    fd = os.open(f"/dev/mapper/{cow_name}", os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], 0)
        magic, valid, version, chunk_sectors = struct.unpack_from("<IIII", buf)
    finally:
        os.close(fd)
    assert magic == 0x70416E53
    assert valid == 1 and version == 1
    (snap,) = [lv for lv in lvs_json(vg.name, "lv_name,chunk_size,lv_attr") if lv["lv_name"] == "s1"]
    assert chunk_sectors * 512 == int(snap["chunk_size"]) == 16384
    assert snap["lv_attr"][0] == "s"


def test_thin_pool_and_thin_snapshot_ids(vg):
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "64M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", "128M", "-T", f"{vg.name}/pool", "-n", "thin1")
    vg.run("lvcreate", "-q", "-s", "-kn", "-n", "thin1s1", f"{vg.name}/thin1")
    lvs = {lv["lv_name"]: lv for lv in lvs_json(vg.name, "lv_name,thin_id,pool_lv,origin")}
    assert lvs["thin1"]["thin_id"] == "1"
    assert lvs["thin1s1"]["thin_id"] == "2"
    assert lvs["thin1s1"]["origin"] == "thin1"
    assert lvs["thin1s1"]["pool_lv"] == "pool"
    assert os.path.exists(vg.lv_path("thin1s1"))


def test_error_target_read_fails_with_eio():
    name = f"lvmirror-err-{os.getpid()}"
    sh("dmsetup", "create", name, "--table", "0 2048 error")
    try:
        fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            with pytest.raises(OSError) as exc:
                os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)
    finally:
        sh("dmsetup", "remove", name)
