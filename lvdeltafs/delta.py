"""A delta: who it is between, which byte ranges changed, and where their bytes come from.

Everything downstream (the delta files, the FUSE tree, lvmirror's pipelines)
consumes a :class:`Delta` and nothing else, so there is one implementation of
"what changed" however it was found.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Protocol

from lvdeltafs.extents import Extents

SOURCE_KINDS = ("cow", "thin", "compare")


@dataclass(frozen=True)
class Identity:
    """What a delta is between.

    ``volume`` is an LV UUID, or ``image`` for deltas between image files
    (never a path: a delta of images must chain from one copy to the next,
    wherever each lives); ``base`` and ``target`` name one side each:
    ``LVUUID@creation-time`` for snapshots, ``LVUUID@origin-NONCE`` for a live
    origin (fresh each run: it is not point in time), ``image:SIZE:DIGEST``
    for an image named by its content (see :func:`lvdeltafs.pairs.image_side`);
    sizes are in bytes; ``chunk_size`` is the granularity the source tracks
    changes at.
    """

    volume: str
    base: str
    target: str
    base_size: int
    target_size: int
    chunk_size: int
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.source!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Identity:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def delta_id(self) -> str:
        """A digest of the identity: the same pair always gives the same id."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:32]


class TargetReader(Protocol):
    """Random access to the newer side (a snapshot device or an image file)."""

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class WouldBlock(Exception):
    """A read inside :func:`cached_only` needs bytes the page cache does not hold."""


_CACHED_ONLY: ContextVar[bool] = ContextVar("lvdeltafs_cached_only", default=False)
PROBE_STEP = 128 << 10  # read-ahead fills the page cache in runs at least this long


@contextmanager
def cached_only() -> Iterator[None]:
    """Within it, :meth:`FileReader.pread` reads only what the page cache holds, else WouldBlock.

    For the FUSE adapter, which answers a read on its own thread when that needs no disk
    I/O: handing a read to a worker thread and back costs more than a cached read itself.
    """
    token = _CACHED_ONLY.set(True)
    try:
        yield
    finally:
        _CACHED_ONLY.reset(token)


class FileReader:
    """Reads a block device or file with ``os.pread``; safe to share between threads."""

    def __init__(self, path: str, size: int | None = None):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = size if size is not None else os.lseek(self.fd, 0, os.SEEK_END)
        # RWF_NOWAIT: Linux 4.14 on; a filesystem without it (NFS) answers EOPNOTSUPP once.
        self.nowait = hasattr(os, "RWF_NOWAIT")
        self._probe = bytearray(1)  # its content is never used: threads may share it

    def _require_cached(self, offset: int, length: int) -> None:
        """WouldBlock unless the page cache holds the range (probed every PROBE_STEP and at its end)."""
        if not self.nowait:
            raise WouldBlock
        end = offset + length
        for p in [*range(offset, end, PROBE_STEP), end - 1]:
            try:
                if os.preadv(self.fd, [self._probe], p, os.RWF_NOWAIT) != 1:
                    raise WouldBlock  # past the end: pread, in a thread, says so
            except BlockingIOError:
                raise WouldBlock from None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False
                raise WouldBlock from None

    def pread(self, offset: int, length: int) -> bytes:
        if length and _CACHED_ONLY.get():
            self._require_cached(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(5, f"short read of {self.path} at {offset}: {len(data)} of {length} bytes "
                             "(did the volume shrink or go away?)")
        return data

    def advise(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading this range now (POSIX_FADV_WILLNEED); a hint, never an error.

        Scattered reads made one at a time wait for the disk once each; asked for ahead,
        they are queued together (cold 64 KiB reads of 2% of 8 GiB: 0.42 s one at a time,
        0.17 s advised first)."""
        with suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Delta:
    """Identity + extents + a reader of the newer side."""

    identity: Identity
    extents: Extents
    target: TargetReader
    point_in_time: bool = True
    notes: list[str] = field(default_factory=list)
    # Bytes of the source's data ranges found equal to the base and left out (lvdeltafs.exact);
    # None when the delta was not refined.
    unchanged_bytes: int | None = None
    # The base's bytes, where they can still be read (a sync's base snapshot): a sender may then leave
    # out blocks that did not really change (lvmirror sends them so while the link is the bottleneck).
    base: TargetReader | None = None

    def read(self, offset: int, length: int) -> bytes:
        return self.target.pread(offset, length)

    def advise(self, offset: int, length: int) -> None:
        """The target will soon be read there (a reader without ``advise`` ignores the hint)."""
        advise = getattr(self.target, "advise", None)
        if advise is not None:
            advise(offset, length)

    def close(self) -> None:
        self.target.close()
        if self.base is not None:
            self.base.close()
