"""What the filesystem's calls answer: stat attributes, and errors carrying the errno to return.

The vocabulary between :mod:`lvdeltafs.vfs` and the FUSE adapter, kept apart so
every part of the tree can raise and build these without importing the whole.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass


class VfsError(Exception):
    """An error with the errno a filesystem call should return.

    ``quiet``: already said once in the log (or ordinary), so the adapter logs it at debug level only.
    """

    def __init__(self, err: int, message: str = "", *, quiet: bool = False):
        super().__init__(message or os.strerror(err))
        self.errno = err
        self.quiet = quiet


def errno_of(exc: BaseException) -> int:
    """The errno a failed call returns: its own, or EIO for anything that could not produce data."""
    if isinstance(exc, VfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ValueError | OverflowError):
        return errno.EINVAL
    return errno.EIO


@dataclass(frozen=True)
class Attr:
    """What stat shows for one entry."""

    ino: int
    is_dir: bool
    size: int
    blocks: int          # 512-byte units
    mtime_ns: int
    mode: int            # permission bits only
    uid: int
    gid: int


def stat_mode(attr: Attr) -> int:
    return (stat.S_IFDIR if attr.is_dir else stat.S_IFREG) | attr.mode
