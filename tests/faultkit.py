"""What the fault suites share: receiver sessions with the kill hook, and a filesystem that runs full."""

from __future__ import annotations

import os
from pathlib import Path

from lvmirror.transports import LocalTransport
from tests.harness import BytesSource, MiB, delta, image

SMALL_SYNC = {"LVMIRROR_STAGING_SYNC_BYTES": str(256 << 10)}


def session(dest: Path, kill_at: str | None = None) -> LocalTransport:
    env = dict(SMALL_SYNC)
    if kill_at:
        env["LVMIRROR_TEST_KILL_AT"] = kill_at
    return LocalTransport(str(dest), env=env)


def fill(fs: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on ``fs``."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\x01" * max(0, free - leave))
    return filler


SMALL_OLD = image(4 * MiB, [(0, MiB), (2 * MiB, MiB)], seed=21)
SMALL_NEW = image(4 * MiB, [(0, 3 * MiB)], seed=22)  # rewrites 3 MiB, one of them in a hole


def init_small(dest: Path) -> None:
    ident, blob = delta(None, SMALL_OLD, "", "vol@1")
    with session(dest) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()


