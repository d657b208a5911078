"""The fuse_mount fixture mounts a real FUSE filesystem (bindfs, in C) and always unmounts it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse


@pytest.mark.skipif(shutil.which("bindfs") is None and os.environ.get("CI") != "true",
                    reason="bindfs (a Debian package scripts/setup installs) is not installed")
def test_bindfs_mount_serves_reads_and_unmounts(fuse_mount, tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    payload = os.urandom(300_000)
    (src / "blob").write_bytes(payload)
    fuse_mount(["bindfs", "-f", "--no-allow-other", str(src), str(mnt)], mnt)
    assert os.path.ismount(mnt)
    assert f" {mnt} fuse" in Path("/proc/mounts").read_text()
    assert (mnt / "blob").read_bytes() == payload
