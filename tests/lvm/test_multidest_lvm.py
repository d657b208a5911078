"""A volume with two destinations (an image file here, one over ssh), on real LVM inside the VM.

After every run each mirror must equal, byte for byte, the snapshot its own
state names, and only the snapshots some destination holds (or has part of a
delta to) may be left.  Shown along the way: the source read once for both;
one destination unreachable for a run while the other is synced; the one
behind brought up to date by its own delta, or by a compare resync once its
base is gone.  A transfer cut or killed for one destination, resumed while the
other is not disturbed, runs on the host against a real sshd
(tests/ssh/test_two_destinations_faults.py): the same code, minutes less VM.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lvdeltafs import lvm
from lvdeltafs.errors import EXIT_CONNECTION
from lvdeltafs.pairs import device_size
from lvmirror import config
from tests.harness import (
    BIN,
    VOLUME_MB,
    MiB,
    _popen_sshd,
    seeded_writes,
    sha256_of,
    start_sshd,
    wait_for_banner,
    write_at,
    writing_to,
)

pytestmark = pytest.mark.lvm


class TwoMirrors:
    def __init__(self, vg, tmp: Path, sshd):
        vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
        self.vg, self.tmp, self.sshd = vg.name, tmp, sshd
        self.local, self.far = tmp / "local" / "data.img", tmp / "far" / "data.img"
        self.local.parent.mkdir()
        self.far.parent.mkdir()
        self.url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{self.far}"
        self.cfg = tmp / "lvmirror.toml"
        self.cfg.write_text(
            f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\n'
            f'[volume.data]\nvg = "{vg.name}"\nlv = "data"\nsnapshot_size = "40M"\n'
            f'destinations = ["{self.local}", "{self.url}"]\n'
            f'ssh_key = "{sshd.client_key}"\nknown_hosts = "{sshd.known_hosts}"\n')
        self.cfg.chmod(0o600)
        views = config.load(str(self.cfg)).volume("data").views()
        self.records = {v.destination.raw: tmp / "work" / "runs" / f"{v.record_name}.json" for v in views}

    origin = property(lambda self: f"/dev/{self.vg}/data")

    def run(self, *args: str, expect: int | None = 0):
        import subprocess
        out = subprocess.run([str(BIN / "lvmirror"), "-c", str(self.cfg), *args], capture_output=True,
                             text=True)
        if expect is not None:
            assert out.returncode == expect, f"lvmirror {' '.join(args)} -> {out.returncode}:\n{out.stderr}"
        return out

    def owned(self) -> list[lvm.LogicalVolume]:
        return [x for x in lvm.list_lvs(self.vg) if {"lvmirror", "lvmirror_vol_data"} <= set(x.tags)]

    def held(self, image: Path) -> str:
        return json.loads(Path(f"{image}.lvmirror-state").read_text())["snapshot"]

    def assert_matches(self, image: Path) -> lvm.LogicalVolume:
        """The mirror equals the snapshot its own state names (which must still be there)."""
        held = self.held(image)
        (snap,) = [s for s in self.owned() if s.snapshot_id == held]
        assert device_size(str(image)) == device_size(snap.path)
        assert sha256_of(snap.path) == sha256_of(image), f"{image} differs from {snap.vg_lv}"
        return snap

    def assert_both_match_one_snapshot(self) -> lvm.LogicalVolume:
        a, b = self.assert_matches(self.local), self.assert_matches(self.far)
        assert a.snapshot_id == b.snapshot_id
        assert [s.snapshot_id for s in self.owned()] == [a.snapshot_id], "an unneeded snapshot was left"
        return a

    def last(self, dest: str) -> dict:
        return json.loads(self.records[dest].read_text())["last_run"]


def restart(sshd) -> None:
    """The same sshd (port, keys) again, after sshd.stop()."""
    with open(sshd.workdir / "sshd.log", "ab") as log:
        sshd.process = _popen_sshd(sshd.port, sshd.workdir / "host_key", sshd.workdir / "authorized_keys",
                                   log, sshd.host)
    wait_for_banner(sshd.port, sshd.process, sshd.workdir / "sshd.log", host=sshd.host)


def test_two_destinations_read_once_fail_alone_and_catch_up(vg, tmp_path):
    (tmp_path / "sshd").mkdir()
    sshd = start_sshd(tmp_path / "sshd")  # our own: stopped and restarted below
    try:
        m = TwoMirrors(vg, tmp_path, sshd)
        run_rounds(m, sshd)
    finally:
        sshd.stop()


def run_rounds(m: TwoMirrors, sshd) -> None:
    size = VOLUME_MB * MiB
    figures = []
    seeded_writes(m.origin, size, seed=1, count=20)
    out = m.run("init", "data")
    assert re.search(r"read [0-9.]+ \w+ of the new snapshot for 2 destinations", out.stderr), out.stderr
    m.assert_both_match_one_snapshot()

    # Two rounds while the origin is written: one delta, read once for both.
    for rnd in range(2):
        write_at(m.origin, 2 * MiB, random.Random(10 + rnd).randbytes(3 * MiB))
        seeded_writes(m.origin, size, seed=20 + rnd)
        with writing_to(m.origin, size, seed=30 + rnd) as writes:
            m.run("sync", "data")
        assert writes
        m.assert_both_match_one_snapshot()
        local, far = m.last(str(m.local)), m.last(m.url)
        assert local["bytes_sent"] == far["bytes_sent"] > 3 * MiB
        # The source read once: the bytes read are one delta's data bytes, not two.
        assert local["read_bytes"] == far["read_bytes"] == local["bytes_sent"], (local, far)
        figures.append(("same base", local["bytes_sent"], local["read_bytes"]))

    # The far destination unreachable for one run: the local one is synced all the same.
    behind = m.held(m.far)
    sshd.stop()
    write_at(m.origin, 8 * MiB, random.Random(40).randbytes(2 * MiB))
    out = m.run("sync", "data", expect=None)
    assert out.returncode == EXIT_CONNECTION, out.stderr
    assert m.url in out.stderr and "1 of 2 destinations failed" in out.stderr, out.stderr
    now = m.assert_matches(m.local)
    assert {s.snapshot_id for s in m.owned()} == {behind, now.snapshot_id}  # what the far one holds is kept
    assert m.last(m.url)["exit_code"] == EXIT_CONNECTION and m.last(m.url)["snapshot"] == behind
    restart(sshd)
    # Back: it gets its own delta from the snapshot it holds (the local one, the next one from its own).
    write_at(m.origin, 14 * MiB, random.Random(41).randbytes(1 * MiB))
    out = m.run("sync", "data")
    assert "compare resync" not in out.stderr, out.stderr
    m.assert_both_match_one_snapshot()
    local, far = m.last(str(m.local)), m.last(m.url)
    assert far["action"] == "sync" and far["bytes_sent"] >= 3 * MiB > local["bytes_sent"]
    assert local["read_bytes"] == local["bytes_sent"] + far["bytes_sent"]  # two deltas: each read once
    figures.append(("different bases", local["bytes_sent"] + far["bytes_sent"], local["read_bytes"]))

    # Unreachable again, and meanwhile its base removed by hand: a compare resync brings it back.
    sshd.stop()
    write_at(m.origin, 20 * MiB, random.Random(42).randbytes(2 * MiB))
    m.run("sync", "data", expect=EXIT_CONNECTION)
    gone = m.held(m.far)
    (snap,) = [s for s in m.owned() if s.snapshot_id == gone]
    lvm.remove_lv(snap.vg, snap.name)
    restart(sshd)
    out = m.run("sync", "data")
    assert "is gone" in out.stderr and "compare resync" in out.stderr, out.stderr
    m.assert_both_match_one_snapshot()
    assert m.last(m.url)["action"] == "resync" and m.last(str(m.local))["action"] == "sync"

    m.run("check", "data")
    status = json.loads(m.run("status", "--json").stdout)
    (vol,) = status["volumes"]
    assert len(vol["destinations"]) == 2 and not vol["problems"], vol["problems"]
    print("two destinations: (case, data bytes sent to them, bytes read from the snapshot):", figures)
