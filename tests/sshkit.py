"""What the ssh suites share: destination URLs, the host key's fingerprint, a stream source that cuts
the link, and waiting for a cut-off receiver to let go."""

from __future__ import annotations

import fcntl
import subprocess
import time
from pathlib import Path

from tests.harness import BytesSource


def url(sshd, path: str | Path) -> str:
    return f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{path}"


def host_fingerprint(sshd) -> str:
    """The host key's fingerprint as OpenSSH prints it (ssh-keygen -lf)."""
    out = subprocess.run(["ssh-keygen", "-lf", str(sshd.workdir / "host_key.pub")], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


class CutAfter(BytesSource):
    """A stream source that cuts the ssh connection once ``limit`` stream bytes have gone to the link.

    ``at_cut`` records how many bytes the link had sent when it was cut (everything, the bootstrap
    blob and requests included: an upper bound on the stream bytes that left this host).
    """

    def __init__(self, data: bytes, limit: int, link, cut):
        super().__init__(data)
        self.limit, self.link, self.cut = limit, link, cut
        self.start = link.bytes_sent
        self.at_cut: int | None = None

    def read_from(self, offset: int, resume=None):
        for blk in super().read_from(offset, resume):
            if self.at_cut is None and self.link.bytes_sent - self.start >= self.limit:
                self.at_cut = self.link.bytes_sent - self.start
                self.cut()
            yield blk


def wait_unlocked(lock: Path, timeout: float = 15.0) -> None:
    """Wait for the old receiver to let go of the destination (it saves what it verified first)."""
    deadline = time.monotonic() + timeout
    with open(lock, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the cut-off receiver never exited"
                time.sleep(0.05)
