"""`lvmirror history` and `lvmirror rewind` end to end on real LVM (inside the VM): classic and thin.

The volume holds a mounted ext4.  Before each sync a file is added to it, and
during each sync tests/harness.writing_to rewrites 4 KiB blocks of a file on
it (``busy``), so every snapshot is taken while the filesystem is written (LVM
freezes it for the snapshot, so each snapshot is a clean ext4).  After each
sync the base snapshot lvmirror holds is hashed: that is what the mirror held
at that generation.  With ``history_points = 3`` the last three generations
before the current one must be listed by ``history``, given back byte for byte
by ``rewind`` (newest first), and one sync after the rewinds must bring the
mirror level with the source again (a compare resync).  ``restore`` writes a
point, once the filesystem is unmounted, onto the origin itself (only the
changes since the base and the undo ranges; on classic, first SIGKILLed half
way and run again).  On classic only (what they read is the mirror's files,
the same for either kind of source, and every VM minute counts): the points
read back through a real ``lvdeltafs mount --mirror`` (the oldest checked by
fsck.ext4 and debugfs), ``restore`` refused onto the mounted origin and
written onto a new LV by block digests.  The summaries say what each restore
read and wrote (run with -s).  History,
rewind and restore over ssh run on the host, against a real sshd
(tests/ssh/test_history_ssh.py): the far side is the same receiver.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lvdeltafs.pairs import device_size
from tests.harness import BIN, VOLUME_MB, MiB, Mirror, sh, sha, sha256_of, text, writing_to
from tests.historykit import composed

pytestmark = pytest.mark.lvm

LVDELTAFS = str(BIN / "lvdeltafs")
SIZE = VOLUME_MB * MiB
BUSY = 4 * MiB  # the file the writer rewrites during each sync
KEEP = "history_points = 3\n"
LAST = 5  # init (generation 1) and four syncs
KEPT = (2, 3, 4)  # the three generations before LAST


def make_volume(vg, tmp: Path, kind: str) -> Mirror:
    if kind == "classic":
        vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
        return Mirror(tmp, vg.name, "data", extra=KEEP)
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "96M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", f"{VOLUME_MB}M", "-T", f"{vg.name}/pool", "-n", "data")
    return Mirror(tmp, vg.name, "data", snapshot_size=None, extra=KEEP)


@contextlib.contextmanager
def ext4_on(dev: str, mnt: Path):
    """A fresh ext4 on ``dev``, mounted at ``mnt`` for as long as the block runs."""
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev)
    mnt.mkdir()
    sh("mount", "-t", "ext4", dev, str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt))


def add_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def held(m: Mirror) -> tuple[str, str]:
    """(snapshot id, sha256) of the base snapshot lvmirror holds now, the only one left; the mirror must
    equal it (Mirror.assert_matches_base, each side hashed once: every VM second counts)."""
    state = m.state()
    owned = m.owned()
    assert [s.snapshot_id for s in owned] == [state["snapshot"]], (owned, state)
    assert device_size(owned[0].path) == os.path.getsize(m.image) == state["size"] == SIZE
    digest = sha256_of(owned[0].path)
    assert sha256_of(m.image) == digest, f"the mirror differs from {owned[0].vg_lv}"
    return state["snapshot"], digest


def undo_files(m: Mirror) -> list[str]:
    return sorted(p.name for p in m.image.parent.glob(f"{m.image.name}.lvmirror-undo-*"))


def sync_while_written(m: Mirror, path: str, size: int, seed: int) -> subprocess.CompletedProcess:
    with writing_to(path, size, seed=seed) as writes:
        out = m.run("sync", m.name)
    assert writes, "the background writer wrote nothing during the sync"
    return out


class Phases:
    """How long each part took (printed; run with -s to see it): every VM minute counts."""

    def __init__(self) -> None:
        self.start, self.parts = time.monotonic(), []

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.parts.append(f"{what} {now - self.start:.0f} s")
        self.start = now

    def __str__(self) -> str:
        return ", ".join(self.parts)


def gen_file(g: int) -> str:
    return f"gen-{g}.txt"


def gen_text(g: int) -> bytes:
    return text(MiB, 500 + g)


@pytest.mark.parametrize("kind", ["classic", "thin"])
def test_four_syncs_history_mount_and_rewind_to_each_point(vg, tmp_path, fuse_mount, kind):
    m = make_volume(vg, tmp_path, kind)
    phases = Phases()
    snap: dict[int, str] = {}
    sums: dict[int, str] = {}
    with ext4_on(m.origin, tmp_path / "fs") as fs:
        add_file(fs / "busy", text(BUSY, 1))
        add_file(fs / gen_file(1), gen_text(1))
        os.sync()
        m.run("init", m.name)
        snap[1], sums[1] = held(m)
        for g in range(2, LAST + 1):
            add_file(fs / gen_file(g), gen_text(g))
            with open(fs / gen_file(1), "r+b") as f:  # and an old file changed in place
                f.seek(g * 70_000)
                f.write(f"generation {g} was here".encode())
                os.fsync(f.fileno())
            sync_while_written(m, str(fs / "busy"), BUSY, seed=g)
            assert m.state()["generation"] == g
            snap[g], sums[g] = held(m)
            assert sums[g] != sums[g - 1]
        phases.done("mkfs, init and four syncs")
        # Kept: the three generations before the current one; the next sync drops the oldest.
        doc = json.loads(m.run("history", m.name, "--json").stdout)
        assert [p["generation"] for p in doc["points"]] == list(KEPT), doc
        assert doc["drops_next"] == [KEPT[0]] and doc["keep"] == {"points": 3, "age": 0, "size": 0}, doc
        for p in doc["points"]:
            assert p["snapshot"] == snap[p["generation"]] and p["size"] == SIZE and p["undo_bytes"] > 0, p
        assert doc["undo_bytes"] == sum(p["undo_bytes"] for p in doc["points"])
        assert undo_files(m) == [f"{m.image.name}.lvmirror-undo-{g}" for g in KEPT]
        if kind == "classic":
            read_points_and_restore_elsewhere(m, vg, kind, tmp_path, fuse_mount, sums)
            phases.done("history, mount, three points read, fsck, restore onto a new LV")

        # Rewind to each kept point, newest first: each drops the newer ones.
        for g in reversed(KEPT):
            m.run("rewind", m.name, "--to", str(g))
            assert os.path.getsize(m.image) == SIZE and sha256_of(m.image) == sums[g], f"rewind to {g}"
            st = m.state()
            assert st["source"] == "rewind" and st["snapshot"] == snap[g], st
            assert [e["generation"] for e in st["history"]] == [k for k in KEPT[:2] if k < g], st
            assert undo_files(m) == [f"{m.image.name}.lvmirror-undo-{k}" for k in KEPT[:2] if k < g]
        phases.done("three rewinds")
        # The point's snapshot is gone from the source: the next sync resyncs by comparing, and what
        # the mirror held before it (the oldest point) is a point again.
        sync_while_written(m, str(fs / "busy"), BUSY, seed=99)
        st = m.state()
        assert st["source"] == "compare", st
        held(m)
        assert len(st["history"]) == 1 and st["history"][0]["snapshot"] == snap[KEPT[0]], st
        assert sha(composed(m.image, st["history"][0]["generation"])) == sums[KEPT[0]]
        phases.done("compare resync")
    # The filesystem unmounted: the oldest point restored onto the origin itself, reading only the changes
    # since the base snapshot and the undo ranges (classic: first SIGKILLed half way, then run again).
    point = str(m.state()["history"][0]["generation"])
    if kind == "classic":
        restore(m, "--point", point, "--to", f"{vg.name}/data", expect=-9,
                env={"LVMIRROR_TEST_KILL_AT": "restore:2"})
    out = restore(m, "--point", point, "--to", f"{vg.name}/data")
    assert sha256_of(m.origin) == sums[KEPT[0]] and "changes since the base snapshot" in out, out
    print(f"{kind}: restore onto the origin ({VOLUME_MB} MiB): {out.strip().splitlines()[-1]}")
    phases.done("restore onto the origin")
    print(f"history on {kind}: {phases}")


def read_points_and_restore_elsewhere(m: Mirror, vg, kind: str, tmp_path: Path, fuse_mount,
                                     sums: dict[int, str]) -> None:
    """Each kept point read through a real mount; restore refused onto the mounted origin, done onto a
    new LV by block digests."""
    # Each point read through a real mount is what the mirror held at that generation.
    mnt = tmp_path / "hist"
    mnt.mkdir()
    fuse_mount([LVDELTAFS, "mount", "-f", "--mirror", f"data={m.image}", str(mnt)], mnt)
    points = mnt / "@mirrors" / "data"
    assert sorted(os.listdir(points), key=int) == [str(g) for g in KEPT]
    for g in KEPT:
        assert (points / str(g) / "image").stat().st_size == SIZE
        assert sha256_of(points / str(g) / "image") == sums[g], f"point {g} differs"
    # The oldest point (composed through every undo delta) is a clean ext4 holding its files.
    oldest = points / str(KEPT[0]) / "image"
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(oldest)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = sh("debugfs", "-R", "ls -l /", str(oldest))
    assert gen_file(KEPT[0]) in listing and gen_file(KEPT[1]) not in listing, listing
    got = subprocess.run(["debugfs", "-R", f"cat /{gen_file(KEPT[0])}", str(oldest)], capture_output=True,
                         check=True).stdout
    assert got == gen_text(KEPT[0])
    sh("fusermount3", "-u", str(mnt))

    # Restore: never onto the mounted origin; onto a new LV by block digests.
    out = restore(m, "--point", str(KEPT[1]), "--to", f"{vg.name}/data", expect=4)
    assert "is open" in out, out
    other = new_lv(vg, kind, "restored")
    out = restore(m, "--point", str(KEPT[1]), "--to", f"{vg.name}/restored")
    assert sha256_of(other) == sums[KEPT[1]] and "block digests" in out, out
    print(f"\n{kind}: restore onto a new LV: {out.strip().splitlines()[-1]}")


def restore(m: Mirror, *args: str, expect: int = 0, env: dict | None = None) -> str:
    out = subprocess.run([str(BIN / "lvmirror"), "-c", str(m.cfg), "restore", m.name, *args],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == expect, f"restore {args} -> {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def new_lv(vg, kind: str, name: str) -> str:
    if kind == "classic":
        vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", name, vg.name)
    else:
        vg.run("lvcreate", "-q", "-V", f"{VOLUME_MB}M", "-T", f"{vg.name}/pool", "-n", name)
    return f"/dev/{vg.name}/{name}"
