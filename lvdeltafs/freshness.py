"""Noticing that an image named with --pair changed in place, and refusing to serve a stale delta of it.

Image files can change in place (or be replaced) while mounted; a delta of
what they held before would then be served as theirs.  :class:`Stamp` says
how that is noticed and what is done about it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from lvdeltafs.replies import VfsError

if TYPE_CHECKING:  # only for annotations: the cache imports this module
    from lvdeltafs.delta import Delta
    from lvdeltafs.deltacache import CacheEntry, DeltaCache, PairSpec


class Stamp(NamedTuple):
    """What stat says of one side of an explicit pair, taken before its delta is computed.

    A write in place moves the size, mtime or ctime; a replacement (rename over
    it, delete and recreate) the inode.  Any difference means the delta no longer
    describes the file.  What is done then (chosen over failing everything with EIO,
    and over serving the old ranges):

    - lookups, stats, listings and opens compute the delta again, so ``ls`` and
      a new ``cat`` show the new state;
    - a file opened before the change fails its reads with EIO: its size and
      content would change under the reader, and a copy mixing two states must
      not look like success.  One warning line in the log says which image changed;
    - an open whose attributes (size) the kernel got from the old delta is
      answered ESTALE, on which the kernel looks the name up again and retries
      the open once, so the reader sees the new size, not the old one;
    - an image that changes while its delta is computed gives EIO (remembered
      for deltacache.FAILURE_TTL), rather than computing again and again while it is written.

    Limits: a block device written in place keeps its stat (only its replacement
    shows), and a write in the same clock tick as the stat before it may keep
    mtime and ctime (coarse timestamps); pair snapshots or copies, not live images.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    rdev: int


def stamp_of(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None  # gone: differs from any stamp taken while it was there
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev)


def stamps_of(spec: PairSpec) -> tuple[Stamp | None, ...]:
    return tuple(stamp_of(p) for p in spec.sources) if spec.watch else ()


def changed_side(spec: PairSpec, before: tuple[Stamp | None, ...],
                 now: tuple[Stamp | None, ...]) -> str | None:
    """The first source whose stamp moved, or None."""
    return next((p for p, a, b in zip(spec.sources, before, now, strict=False) if a != b), None)


def check_unchanged_while_opening(spec: PairSpec, before: tuple[Stamp | None, ...], delta: Delta) -> None:
    """EIO if an image moved while its delta was computed: the delta may mix its two states."""
    side = changed_side(spec, before, stamps_of(spec))
    if side is not None:
        delta.close()
        raise VfsError(errno.EIO, f"{side} changed while the delta from {spec.base} to {spec.target} "
                       "was computed: an image must not be written while it is paired (pair a copy or a "
                       "snapshot of it)")


def checked_pread(cache: DeltaCache, entry: CacheEntry,
                  pread: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    """``pread`` of a file of an image pair, failing with EIO once an image changed (see Stamp).

    Checked after the read, so a change during it is caught too.
    """
    def read(offset: int, length: int) -> bytes:
        data = pread(offset, length)
        if cache.changed(entry):
            raise VfsError(errno.EIO, f"an image of {entry.spec.base}..{entry.spec.target} changed since "
                           "this file was opened: close and reopen it", quiet=True)
        return data

    return read
