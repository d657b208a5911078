"""`lvmirror restore` on real LVM (inside the VM), classic and thin, with a writer running during each sync.

Each sync's base snapshot is hashed when the sync has run (what the mirror then held); a kept point is
written back onto the origin (only the changes since the base and the undo ranges read) and onto a new
LV (block digests), each must equal that hash; the figures (read, written, volume size) are printed
(run with -s).  Then: a restore refused while the LV is open, and a restore SIGKILLed half way
(``LVMIRROR_TEST_KILL_AT=restore:N``) finished by running it again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import BIN, MiB, Mirror, seeded_writes, sha256_of, writing_to

pytestmark = pytest.mark.lvm

SIZE_MB = 32


def make_volume(vg, tmp: Path, kind: str) -> Mirror:
    extra = "history_points = 3\n"
    if kind == "classic":
        vg.run("lvcreate", "-q", "-L", f"{SIZE_MB}M", "-n", "data", vg.name)
        return Mirror(tmp, vg.name, "data", snapshot_size="16M", extra=extra)
    vg.run("lvcreate", "-q", "--type", "thin-pool", "-L", "128M", "-n", "pool", vg.name)
    vg.run("lvcreate", "-q", "-V", f"{SIZE_MB}M", "-T", f"{vg.name}/pool", "-n", "tdata")
    return Mirror(tmp, vg.name, "tdata", snapshot_size=None, extra=extra)


def new_lv(vg, kind: str, name: str) -> str:
    if kind == "classic":
        vg.run("lvcreate", "-q", "-L", f"{SIZE_MB}M", "-n", name, vg.name)
    else:
        vg.run("lvcreate", "-q", "-V", f"{SIZE_MB}M", "-T", f"{vg.name}/pool", "-n", name)
    return f"/dev/{vg.name}/{name}"


def syncs_with_a_writer(m: Mirror, count: int) -> dict[int, str]:
    """init, then ``count`` syncs while a writer runs; {generation: sha256 of the base it then held}."""
    size = SIZE_MB * MiB
    seeded_writes(m.origin, size, seed=1, count=40)
    m.run("init", m.name)
    held = {1: sha256_of(m.assert_matches_base().path)}
    for i in range(count):
        seeded_writes(m.origin, size, seed=10 + i)
        with writing_to(m.origin, size, seed=20 + i):
            m.run("sync", m.name)
        base = m.assert_matches_base()
        held[m.state()["generation"]] = sha256_of(base.path)
    return held


def restore(m: Mirror, *args: str, expect: int = 0, env: dict | None = None) -> str:
    out = subprocess.run([str(BIN / "lvmirror"), "-c", str(m.cfg), "restore", m.name, *args],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == expect, f"restore {args} -> {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.mark.parametrize("kind", ["classic", "thin"])
def test_restore_a_point_onto_the_origin_and_onto_a_new_lv(vg, tmp_path, kind):
    m = make_volume(vg, tmp_path, kind)
    held = syncs_with_a_writer(m, 4)
    points = [e["generation"] for e in m.state()["history"]]
    assert points == [2, 3, 4]

    seeded_writes(m.origin, SIZE_MB * MiB, seed=99)  # today's damage
    out = restore(m, "--point", "2", "--to", f"{vg.name}/{m.lv}")
    assert sha256_of(m.origin) == held[2]
    assert "changes since the base snapshot" in out
    print(f"\n{kind}: onto the origin ({SIZE_MB} MiB): {out.strip().splitlines()[-1]}")

    other = new_lv(vg, kind, "restored")
    out = restore(m, "--point", "3", "--to", f"{vg.name}/restored")
    assert sha256_of(other) == held[3] and "block digests" in out
    print(f"{kind}: onto a new LV ({SIZE_MB} MiB): {out.strip().splitlines()[-1]}")

    # The mirror was not touched by either; the next sync carries the restored origin to it.
    assert sha256_of(m.image) == held[5]
    m.run("sync", m.name)
    assert sha256_of(m.image) == held[2]
    m.assert_matches_base()
    assert json.loads(Path(f"{m.image}.lvmirror-state").read_text())["history"][-1]["generation"] == 5


def test_a_restore_refuses_an_open_lv_and_a_killed_one_finishes_when_run_again(vg, tmp_path):
    m = make_volume(vg, tmp_path, "classic")
    held = syncs_with_a_writer(m, 2)
    seeded_writes(m.origin, SIZE_MB * MiB, seed=98, count=30)
    damaged = sha256_of(m.origin)

    fd = os.open(m.origin, os.O_RDONLY)  # a program holding the volume open
    try:
        out = restore(m, "--point", "2", "--to", f"{vg.name}/{m.lv}", expect=4)
        assert "is open" in out and "fuser" in out
    finally:
        os.close(fd)
    assert sha256_of(m.origin) == damaged

    out = restore(m, "--point", "2", "--to", f"{vg.name}/{m.lv}", expect=-9,
                  env={"LVMIRROR_TEST_KILL_AT": "restore:3"})
    assert sha256_of(m.origin) not in (damaged, held[2]), "the kill came before or after every write"
    restore(m, "--point", "2", "--to", f"{vg.name}/{m.lv}")
    assert sha256_of(m.origin) == held[2]
    assert sha256_of(m.image) == held[3]  # the mirror untouched
