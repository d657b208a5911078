"""One run per volume at a time: an advisory lock file per volume, through the one lock of lvdeltafs.fsio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from lvdeltafs.errors import Busy, Refused
from lvdeltafs.fsio import Folder, Locked, UnsafePath

ENV_LOCK_DIR = "LVMIRROR_LOCK_DIR"


@contextmanager
def volume_lock(lock_dir: str, name: str) -> Iterator[str]:
    """Hold ``LOCK_DIR/NAME.lock`` for the block; raise Busy at once if another run holds it."""
    lock_dir = os.environ.get(ENV_LOCK_DIR) or lock_dir
    try:
        with Folder(lock_dir, create=True) as folder:
            fd = folder.lock(f"{name}.lock")
            path = folder.where(f"{name}.lock")
    except Locked as e:
        raise Busy(f"volume {name} is busy: another lvmirror run (pid {e.holder or '?'}) holds {e.path}; "
                   "try again when it has finished") from None
    except UnsafePath as e:
        raise Refused(f"the lock folder of volume {name} is unsafe: {e}") from None
    try:
        yield path
    finally:
        os.close(fd)
