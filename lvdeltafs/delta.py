"""A delta: who it is between, which byte ranges changed, and where their bytes come from.

Everything downstream (the delta files, the FUSE tree, lvmirror's pipelines)
consumes a :class:`Delta` and nothing else, so there is one implementation of
"what changed" however it was found.
"""

from __future__ import annotations

import hashlib
import json
import os
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


class FileReader:
    """Reads a block device or file with ``os.pread``; safe to share between threads."""

    def __init__(self, path: str, size: int | None = None):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = size if size is not None else os.lseek(self.fd, 0, os.SEEK_END)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(5, f"short read of {self.path} at {offset}: {len(data)} of {length} bytes "
                             "(did the volume shrink or go away?)")
        return data

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

    def close(self) -> None:
        self.target.close()
        if self.base is not None:
            self.base.close()
