"""One run per volume at a time: an advisory lock file per volume.

``flock`` locks die with the process, so a run killed by the OOM killer or a
reboot never leaves a stale lock behind (unlike pid files).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from lvdeltafs.errors import Busy

ENV_LOCK_DIR = "LVMIRROR_LOCK_DIR"


@contextmanager
def volume_lock(lock_dir: str, name: str) -> Iterator[str]:
    """Hold ``LOCK_DIR/NAME.lock`` for the block; raise Busy at once if another run holds it."""
    lock_dir = os.environ.get(ENV_LOCK_DIR) or lock_dir
    os.makedirs(lock_dir, mode=0o755, exist_ok=True)
    path = os.path.join(lock_dir, f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise Busy(f"volume {name} is busy: another lvmirror run{holder} holds {path}; "
                       "try again when it has finished") from None
        # Who holds it, for the message another run prints (advisory only).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
