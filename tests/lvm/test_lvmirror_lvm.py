"""lvmirror end to end on real LVM (inside the VM): classic and thin volumes, image-file mirrors.

Every sync runs while another thread keeps writing to the origin, and after
every round the mirror must equal that round's snapshot byte for byte, with
only lvmirror's base snapshot left.  Also: a classic snapshot that overflows,
a base removed by hand, a volume grown between syncs, a wrong-base apply.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from lvdeltafs import lvm
from lvdeltafs.errors import EXIT_MISMATCH, EXIT_NO_SPACE, EXIT_REFUSED
from lvdeltafs.pairs import device_size
from tests.harness import BIN, VOLUME_MB, MiB, Mirror, seeded_writes, sh, sha256_of, write_at, writing_to

pytestmark = pytest.mark.lvm

def classic(vg, tmp: Path) -> Mirror:
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    return Mirror(tmp, vg.name, "data")


def thin(vg, tmp: Path) -> Mirror:
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "96M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", f"{VOLUME_MB}M", "-T", f"{vg.name}/pool", "-n", "tdata")
    return Mirror(tmp, vg.name, "tdata", snapshot_size=None)


@pytest.mark.parametrize("make", [classic, thin], ids=["classic", "thin"])
def test_init_then_three_rounds_while_the_origin_is_written(vg, tmp_path, make):
    m = make(vg, tmp_path)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=1, count=20)
    m.run("init", m.name)
    base = m.assert_matches_base()
    # The first copy skipped zero runs: the image is sparse.
    assert os.stat(m.image).st_blocks * 512 < size
    m.run("check", m.name)
    for rnd in range(3):  # more rounds show nothing new, and each VM minute counts
        seeded_writes(m.origin, size, seed=100 + rnd)
        with writing_to(m.origin, size, seed=200 + rnd) as writes:
            m.run("sync", m.name)
        assert writes, "the background writer wrote nothing during the sync"
        new = m.assert_matches_base()
        assert new.uuid != base.uuid
        assert m.state()["generation"] == rnd + 2
        base = new
    m.run("check", m.name)
    out = m.run("status")
    assert base.name in out.stdout and "generation 4" in out.stdout
    # A thin snapshot has no COW space of its own: its pool's data and metadata use is what fills.
    if base.is_thin:
        assert f"thin pool {m.vg}/pool: data " in out.stdout and "COW" not in out.stdout, out.stdout
    else:
        assert "% full" in out.stdout and "thin pool" not in out.stdout, out.stdout


def test_overflowed_and_removed_base_fall_back_to_compare_resync(vg, tmp_path):
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    m = Mirror(tmp_path, vg.name, "data", snapshot_size="4M")
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=3)
    m.run("init", m.name)
    base = m.assert_matches_base()
    # 8 MiB of new data overflows the base's 4 MiB of COW space.
    write_at(m.origin, 2 * MiB, random.Random(4).randbytes(8 * MiB))
    assert lvm.get_lv(vg.name, base.name).is_invalid
    out = m.run("sync", m.name)
    assert base.name in out.stderr and "invalid" in out.stderr and "compare resync" in out.stderr
    m.assert_matches_base()
    assert m.state()["source"] == "compare"
    # A base removed by hand: said so, and resynced by compare.
    gone = m.owned()[0]
    vg.run("lvremove", "-q", "-y", f"{vg.name}/{gone.name}")
    seeded_writes(m.origin, size, seed=5)
    out = m.run("sync", m.name)
    assert gone.uuid in out.stderr and "is gone" in out.stderr
    m.assert_matches_base()
    m.run("check", m.name)
    # Behind lvmirror's back: check finds it (exit 6), --repair mends it.
    write_at(str(m.image), 5 * MiB, b"x" * 4096)
    out = m.run("check", m.name, expect=EXIT_MISMATCH)
    assert out.stdout.startswith(f"{5 * MiB} {MiB} data")
    m.run("check", "--repair", m.name)
    m.assert_matches_base()
    # A dry run sends nothing and keeps no snapshot.
    seeded_writes(m.origin, size, seed=6)
    before = (m.state(), [s.uuid for s in m.owned()])
    out = m.run("sync", "--dry-run", m.name)
    assert "would send" in out.stdout
    assert (m.state(), [s.uuid for s in m.owned()]) == before


def test_volume_grown_between_syncs(make_vg, tmp_path):
    vg = make_vg(size_mb=256)
    size = VOLUME_MB * MiB
    (tmp_path / "t").mkdir()
    t = thin(vg, tmp_path / "t")
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    (tmp_path / "c").mkdir()
    c = Mirror(tmp_path / "c", vg.name, "data")
    for m in (t, c):
        seeded_writes(m.origin, size, seed=7)
        m.run("init", m.name)
    # Thin: lvextend works with snapshots present; the new tail is sent.
    vg.run("lvextend", "-q", "-L", f"{VOLUME_MB + 8}M", f"{vg.name}/tdata")
    write_at(t.origin, size + MiB, random.Random(8).randbytes(64 * 1024))
    t.run("sync", t.name)
    assert device_size(t.assert_matches_base().path) == size + 8 * MiB
    # Classic: LVM refuses to resize an active origin that has snapshots; the mirror goes on.
    grown = subprocess.run(["lvextend", "-q", "-L", f"{VOLUME_MB + 8}M", f"{vg.name}/data"],
                           capture_output=True, text=True)
    seeded_writes(c.origin, size, seed=9)
    c.run("sync", c.name)
    base = c.assert_matches_base()
    assert device_size(base.path) == (size + 8 * MiB if grown.returncode == 0 else size), grown.stderr


def test_apply_of_a_delta_to_a_mirror_holding_another_base_is_refused(vg, tmp_path):
    m = classic(vg, tmp_path)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=10)
    m.run("init", m.name)
    base = m.assert_matches_base()
    # A delta between two hand-made snapshots: its base is not what the mirror holds.
    vg.run("lvcreate", "-q", "-s", "-L", "8M", "-n", "s1", f"{vg.name}/data")
    seeded_writes(m.origin, size, seed=11)
    vg.run("lvcreate", "-q", "-s", "-L", "8M", "-n", "s2", f"{vg.name}/data")
    sh(str(BIN / "lvdeltafs"), "export", f"{vg.name}/s1", f"{vg.name}/s2", str(tmp_path / "d"))
    out = m.run("apply", str(tmp_path / "d"), str(m.image), expect=EXIT_REFUSED)
    assert "refusing delta" in out.stderr
    m.assert_matches_base()
    assert m.owned()[0].uuid == base.uuid


KILL_POINTS = ["receive:2", "apply:3", "applied:1", "committed:1", "rotate:1"]


def kill_on_lvremove(tmp_path: Path) -> Path:
    """A folder whose `lvremove` SIGKILLs its caller (lvmirror), as a crash mid-rotation would."""
    shim = tmp_path / "kill-on-lvremove"
    shim.mkdir(exist_ok=True)
    script = shim / "lvremove"
    script.write_text("#!/bin/sh\nkill -KILL $PPID\nsleep 5\nexit 1\n")
    script.chmod(0o755)
    return shim


def test_sync_killed_then_run_again_ends_equal_to_a_snapshot(vg, tmp_path):
    """SIGKILL during transfer, during apply, between apply and state, during rotation.

    LVMIRROR_TEST_KILL_AT is the receiver's test hook: the receiver kills
    itself at that event, as a crash would.  ``rotate`` puts an ``lvremove``
    first on PATH that SIGKILLs lvmirror (its parent) before any snapshot is
    removed.  One volume serves every point, one after another (each VM minute counts).
    """
    m = classic(vg, tmp_path)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=31)
    m.run("init", m.name)
    for n, point in enumerate(KILL_POINTS):
        write_at(m.origin, 4 * MiB, random.Random(32 + n).randbytes(3 * MiB))
        seeded_writes(m.origin, size, seed=40 + n)
        env = {**os.environ, "LVMIRROR_TEST_KILL_AT": point}
        if point.startswith("rotate"):
            env["PATH"] = f"{kill_on_lvremove(tmp_path)}:{env['PATH']}"
        killed = subprocess.run([str(BIN / "lvmirror"), "-c", str(m.cfg), "sync", m.name],
                                capture_output=True, text=True, env=env)
        assert killed.returncode != 0, f"the kill hook {point} did not fire"
        # Whatever the mirror holds now, the next run finishes or undoes it.
        m.run("sync", m.name)
        m.assert_matches_base()
    m.run("check", m.name)


def test_destination_filesystem_runs_full_then_space_is_freed(vg, tmp_path):
    """A clear error and nothing applied; after space is freed, the next sync completes."""
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small))
    try:
        vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
        m = Mirror(small, vg.name, "data")
        seeded_writes(m.origin, VOLUME_MB * MiB, seed=51)
        m.run("init", m.name)
        before = sha256_of(m.image)
        write_at(m.origin, 8 * MiB, random.Random(52).randbytes(16 * MiB))
        out = m.run("sync", m.name, expect=EXIT_NO_SPACE)
        assert "no space" in out.stderr.lower() and "nothing was applied" in out.stderr, out.stderr
        assert sha256_of(m.image) == before
        sh("mount", "-o", "remount,size=96m", str(small))
        m.run("sync", m.name)
        m.assert_matches_base()
    finally:
        sh("umount", "-l", str(small))


def test_block_device_destination(vg, tmp_path):
    """A mirror on a block device (another LV holding old data): state kept in state_dir."""
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "mirror", vg.name)
    dest = f"/dev/{vg.name}/mirror"
    write_at(dest, 0, b"\xee" * (VOLUME_MB * MiB))  # what the device held before: must all go
    m = Mirror(tmp_path, vg.name, "data", device=dest)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=61)
    m.run("init", m.name)
    m.assert_matches_base()
    for rnd in range(2):
        seeded_writes(m.origin, size, seed=62 + rnd)
        m.run("sync", m.name)
        m.assert_matches_base()
    m.run("check", m.name)


def test_destinations_changed_between_runs_are_resynced_never_patched(vg, tmp_path):
    """Deleted, truncated, shrunk, swapped (an image file; an LV swapped in under the device's path):
    each next sync says so and resyncs by compare, and the mirror equals the new base."""
    m = classic(vg, tmp_path)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=71)
    m.run("init", m.name)

    def swap(image: Path) -> None:
        other = image.with_name("other.img")
        other.write_bytes(b"\x5a" * size)
        os.replace(other, image)

    damages = [("deleted", lambda p: p.unlink(), "no longer exists"),
               ("truncated", lambda p: os.truncate(p, 0), "truncated or resized"),
               ("shrunk", lambda p: os.truncate(p, size // 2), "truncated or resized"),
               ("swapped", swap, "replaced or recreated")]
    for n, (what, damage, said) in enumerate(damages):
        seeded_writes(m.origin, size, seed=72 + n)
        damage(m.image)
        out = m.run("sync", m.name)
        assert said in out.stderr and "compare resync" in out.stderr, (what, out.stderr)
        m.assert_matches_base()
    m.run("check", m.name)


def test_a_block_device_swapped_under_its_path_is_resynced(vg, tmp_path):
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "mirror", vg.name)
    dest = f"/dev/{vg.name}/mirror"
    m = Mirror(tmp_path, vg.name, "data", device=dest)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=81)
    m.run("init", m.name)
    m.assert_matches_base()
    # Another LV (full of other bytes) now answers to the mirror's path.
    vg.run("lvrename", "-q", vg.name, "mirror", "mirror-old")
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "mirror", vg.name)
    write_at(dest, 0, b"\x33" * size)
    seeded_writes(m.origin, size, seed=82)
    out = m.run("sync", m.name)
    assert "another device" in out.stderr and "compare resync" in out.stderr, out.stderr
    m.image = Path(dest)
    states = list(m.state_dir.glob("*.json"))
    assert len(states) == 2  # one per device, never shared
    new_state = max(states, key=lambda p: p.stat().st_mtime)
    [base] = m.owned()
    assert json.loads(new_state.read_text())["snapshot"] == base.snapshot_id
    assert sha256_of(base.path) == sha256_of(dest)
