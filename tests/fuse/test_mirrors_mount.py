"""Real lvdeltafs mounts of --mirror: past points of a mirror read with ordinary tools, an ext4 among them."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from lvdeltafs.formats.stream import KIND_DATA
from tests.harness import LVDELTAFS, run
from tests.mirrorkit import Kept, history_entry, make_mirror, write_state, write_undo

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def mnt(tmp_path) -> Path:
    m = tmp_path / "mnt"
    m.mkdir()
    return m


def test_each_point_reads_as_its_content_through_cmp_and_sha256sum(fuse_mount, tmp_path, mnt):
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    sizes = {3: 3 * MiB, 4: 5 * MiB + 17, 6: 2 * MiB}
    image, kept = make_mirror(folder, 11, sizes, random.Random(2).randbytes(4 * MiB), 8)
    fuse_mount([LVDELTAFS, "mount", "-f", "--mirror", f"data={image}", str(mnt)], mnt)
    assert run("ls", mnt).stdout.split() == ["@mirrors"]
    assert run("ls", mnt / "@mirrors" / "data").stdout.split() == ["3", "4", "6"]
    for k in kept:
        point = mnt / "@mirrors" / "data" / str(k.generation)
        expected = tmp_path / f"expected{k.generation}"
        expected.write_bytes(k.content)
        assert (point / "image").stat().st_size == k.size
        run("cmp", point / "image", expected)
        got = run("sha256sum", point / "image").stdout.split()[0]
        assert got == hashlib.sha256(k.content).hexdigest()
        run("cp", point / "image", tmp_path / "copy.img")
        assert (tmp_path / "copy.img").read_bytes() == k.content
        # The undo directory copies out as a delta directory that verifies; its stream is the file itself.
        run("cp", "-r", point / "undo", tmp_path / f"undo{k.generation}")
        assert "OK" in run(LVDELTAFS, "verify", tmp_path / f"undo{k.generation}").stdout
        run("cmp", point / "undo" / "delta", k.undo)
    proc = run("dd", f"of={mnt}/@mirrors/data/3/image", "if=/dev/zero", "count=1", "conv=notrunc",
               check=False)
    assert proc.returncode != 0


def mkfs_with(tmp: Path, name: str, text: str) -> Path:
    """A 16 MiB ext4 image holding /f; made the same way each time, so two differ in few blocks."""
    src = tmp / f"{name}.d"
    src.mkdir()
    (src / "f").write_text(text)
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    run("mkfs.ext4", "-F", "-q", "-b", "4096", "-U", "0b0e0d6c-1c55-4d6e-9d4e-5b8f8a5c1d11",
        "-E", "hash_seed=6a1d3c52-64a8-4f0e-9d9b-0d5b3c1f2e40,lazy_itable_init=0,nodiscard",
        "-d", src, img, env={"E2FSPROGS_FAKE_TIME": "1700000000", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return img


@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs") and shutil.which("fsck.ext4")),
                    reason="needs e2fsprogs")
def test_an_ext4_point_checks_clean_and_gives_back_the_old_file(fuse_mount, tmp_path, mnt):
    old_text = "the file as it was last Tuesday\n" * 50
    a = mkfs_with(tmp_path, "a", old_text)
    b = mkfs_with(tmp_path, "b", "what the file says now, after the sync\n" * 80)
    old, new = a.read_bytes(), b.read_bytes()
    differing = [off for off in range(0, len(new), BLOCK) if old[off:off + BLOCK] != new[off:off + BLOCK]]
    assert 0 < len(differing) < 64
    folder = tmp_path / "m"
    folder.mkdir(mode=0o700)
    image = folder / "fs.img"
    image.write_bytes(new)
    undo = folder / "fs.img.lvmirror-undo-1"
    write_undo(undo, 1, len(old), [(off, BLOCK, KIND_DATA) for off in differing], old, base="snap2",
               target="snap1")
    write_state(image, 2, [history_entry(image, Kept(1, len(old), old, undo))])
    fuse_mount([LVDELTAFS, "mount", "-f", "--mirror", f"fs={image}", str(mnt)], mnt)
    point = mnt / "@mirrors" / "fs" / "1" / "image"
    run("cmp", point, a)
    fsck = run("fsck.ext4", "-n", "-f", point, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert run("debugfs", "-R", "cat /f", point).stdout == old_text
    # The README's recipe, where the host can loop-mount (root, a loop driver, ext4): cp the file back.
    loop = tmp_path / "loop"
    loop.mkdir()
    if run("mount", "-o", "ro,loop", point, loop, check=False).returncode == 0:
        try:
            run("cp", loop / "f", tmp_path / "f.back")
        finally:
            run("umount", loop)
        assert (tmp_path / "f.back").read_text() == old_text
    # The mirror itself says what it says now: nothing was written to it.
    assert image.read_bytes() == new
