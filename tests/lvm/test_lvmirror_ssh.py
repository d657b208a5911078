"""lvmirror to an ssh:// destination, with real LVM as the source (inside the VM).

The far side is a real OpenSSH sshd on 127.0.0.1 in the guest; the mirror is
reached only through ssh (the receiver shipped over the channel), while the
test reads the image directly to compare it with the snapshot.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from lvdeltafs.errors import EXIT_MISMATCH
from tests.harness import BIN, VOLUME_MB, MiB, Mirror, seeded_writes, write_at

pytestmark = pytest.mark.lvm


def ssh_mirror(vg, tmp_path, sshd) -> Mirror:
    vg.run("lvcreate", "-q", "-L", f"{VOLUME_MB}M", "-n", "data", vg.name)
    image = tmp_path / "data.img"
    url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{image}"
    extra = f'ssh_key = "{sshd.client_key}"\nknown_hosts = "{sshd.known_hosts}"\n'
    return Mirror(tmp_path, vg.name, "data", snapshot_size="40M", url=url, extra=extra)


def test_init_sync_check_repair_over_ssh(vg, tmp_path, sshd):
    # Classic only: thin volumes reach the receiver through the same pipeline
    # (tests/lvm/test_lvmirror_lvm.py), and each VM minute counts.
    m = ssh_mirror(vg, tmp_path, sshd)
    size = VOLUME_MB * MiB
    seeded_writes(m.origin, size, seed=11, count=16)
    m.run("init", m.name)
    m.assert_matches_base()
    # Over a link a dry run that would compress estimates the compressed size from a sample.
    seeded_writes(m.origin, size, seed=19)
    out = m.run("sync", "--dry-run", "--compress", "zlib", "--bwlimit", "1M", m.name)
    assert "compressed (estimated from a sample) the data would be about" in out.stdout, out.stdout
    assert "at the cap of 1.0 MiB/s sending" in out.stdout, out.stdout
    seeded_writes(m.origin, size, seed=20)
    m.run("sync", m.name)
    m.assert_matches_base()
    # Changed behind lvmirror's back: the far side's digests show it, --repair mends it.
    write_at(str(m.image), 3 * MiB + 5, b"\x99" * 100)
    out = m.run("check", m.name, expect=EXIT_MISMATCH)
    assert out.stdout.startswith(f"{3 * MiB} {MiB} data")
    m.run("check", "--repair", m.name)
    m.assert_matches_base()
    m.run("check", m.name)


def staged_bytes(m: Mirror) -> int:
    try:
        return os.path.getsize(f"{m.image}.lvmirror-staging")
    except FileNotFoundError:
        return 0


def test_sender_killed_mid_transfer_resumes(vg, tmp_path, sshd):
    """SIGKILL the sending lvmirror early and late in a transfer; each next run resumes from the receiver's
    bytes.  More points and the receiver's own kill points over ssh run on the host (tests/ssh, fakelvm)."""
    m = ssh_mirror(vg, tmp_path, sshd)
    m.run("init", m.name)
    resent = []
    for point, threshold in enumerate((3 * MiB, 12 * MiB)):
        write_at(m.origin, 0, random.Random(point).randbytes(20 * MiB))
        proc = subprocess.Popen([str(BIN / "lvmirror"), "-c", str(m.cfg), "sync", m.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while staged_bytes(m) < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"the sync ended before it could be killed at {threshold} bytes: "
                        f"{proc.stderr.read().decode()}")
        staged_at_kill = staged_bytes(m)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # the far side notices the dropped channel and keeps what it verified
        out = m.run("sync", m.name)
        found = re.search(r"resuming delta \w+ at byte (\d+)(?: of (\d+))?", out.stderr)
        assert found, f"the next run did not resume:\n{out.stderr}"
        at, total = int(found[1]), found[2]  # no total for a compressed stream
        # What the receiver held verified is not sent again: at most one 1 MiB record
        # (and what was in flight) is lost.
        assert at >= threshold - 2 * MiB - 64 * 1024, (at, threshold)
        resent.append((staged_at_kill, at, total))
        m.assert_matches_base()
    print("killed with N bytes staged, resumed at byte R of T (N, R, T):", resent)
    m.run("check", m.name)
