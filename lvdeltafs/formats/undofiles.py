"""The five delta files of an undo delta, served from the undo file itself and its index.

An undo delta (docs/history.md) is already a version-1 stream file, so its
``delta`` file is that file's bytes, unchanged: whatever copies it gets the
receiver's own stream, which ``lvdeltafs verify`` checks.  ``ranges``,
``data`` and ``chunks`` are the ordinary views of :mod:`.files` over the
index :func:`lvdeltafs.formats.overlay.index_undo` made: their bytes are
read straight from the undo file's DATA records.  ``manifest.json`` is made
from the stream's own header (identity and delta id as the receiver wrote
them, source ``undo``) and its END record (the record count), so a copy of
the directory verifies like an exported one.

This costs what indexing cost (done once, when the point is first used) plus
one Extents built from the index: no pass over the data.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lvdeltafs
from lvdeltafs.extents import Extents
from lvdeltafs.formats.files import (
    MANIFEST_FORMAT,
    NAMES,
    ChunksView,
    DataView,
    ManifestView,
    RangesView,
    View,
    _DataExtents,
)
from lvdeltafs.formats.overlay import UndoIndex
from lvdeltafs.formats.stream import END_SIZE, HEAD, KIND_DATA, T_END, corrupt
from lvdeltafs.fsio import pread_into


@dataclass(frozen=True)
class UndoIdentity:
    """The part of an identity the views read: the size the undo delta restores."""

    target_size: int


class UndoDelta:
    """What :class:`~lvdeltafs.formats.files.DataView` and ``ChunksView`` need of a Delta: its extents,
    its target size, and the bytes of its DATA ranges (here: pread from the undo file's records)."""

    def __init__(self, index: UndoIndex, fd: int):
        self.index, self.fd = index, fd
        self.identity = UndoIdentity(index.target_size)
        data = [r for r in index.ranges if r[2] == KIND_DATA]
        self._data = data
        self._starts = [r[0] for r in data]
        self.extents = Extents.from_ranges([r[0] for r in index.ranges], [r[1] for r in index.ranges],
                                           [r[2] for r in index.ranges], size=index.target_size)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the restored content inside DATA ranges (one range may span many records)."""
        buf = bytearray(length)
        view = memoryview(buf)
        pos, end = offset, offset + length
        i = bisect_right(self._starts, offset) - 1
        while pos < end:
            if not 0 <= i < len(self._data) or not self._data[i][0] <= pos < sum(self._data[i][:2]):
                raise ValueError(f"offset {pos} is in no data range of this undo delta")
            off, ln, _kind, src = self._data[i]
            stop = min(end, off + ln)
            pread_into(self.fd, view[pos - offset:stop - offset], src + pos - off)
            pos = stop
            i += 1
        return bytes(buf)


class FileView:
    """The undo file as it is: the ``delta`` file."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def pread(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self.size - offset))
        return os.pread(self.fd, n, offset) if n else b""


def stream_records(fd: int, size: int) -> int:
    """The stream's record count, END included, from its END record (the file was verified whole)."""
    raw = os.pread(fd, END_SIZE, size - END_SIZE) if size >= END_SIZE else b""
    if len(raw) != END_SIZE:
        raise corrupt(max(0, size - END_SIZE), "the undo delta ends before its end record")
    rtype, _flags, _res, _plen, _a, nrec, _crc = HEAD.unpack(raw[:HEAD.size])
    if rtype != T_END:
        raise corrupt(size - END_SIZE, "the undo delta does not end with an end record")
    return nrec + 1


def manifest_of(index: UndoIndex, extents: Extents, ranges_size: int, stream_size: int,
                records: int) -> dict[str, Any]:
    """The manifest (without its digest) of an undo delta, in the shape ``manifest_document`` gives."""
    hdr = index.header
    ident = hdr.get("identity") if isinstance(hdr.get("identity"), dict) else {}
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tool": "lvdeltafs",
        "tool_version": lvdeltafs.__version__,
        "delta_id": str(hdr.get("delta_id", "")),
        "identity": ident,
        "base_size": ident.get("base_size"),
        "target_size": index.target_size,
        "chunk_size": ident.get("chunk_size"),
        "source": ident.get("source", "undo"),
        "point_in_time": True,
        "counts": {"extents": len(extents), "data_extents": extents.data_count,
                   "zero_extents": extents.zero_count, "stream_records": records},
        "bytes": {"data": extents.data_bytes, "zero": extents.zero_bytes, "ranges": ranges_size,
                  "chunks": extents.data_bytes, "delta": stream_size},
    }


class UndoFiles:
    """name -> view for the five files of one undo delta; built on first use, like DeltaFiles."""

    def __init__(self, index: UndoIndex, fd: int, size: int):
        self.delta = UndoDelta(index, fd)
        self.fd, self.size = fd, size
        self._views: dict[str, View] = {}
        self._dx: _DataExtents | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in NAMES:
            raise KeyError(name)
        if name not in self._views:
            self._views[name] = self._build(name)
        return self._views[name]

    def _dx_(self) -> _DataExtents:
        if self._dx is None:
            self._dx = _DataExtents(self.delta.extents)
        return self._dx

    def _build(self, name: str) -> View:
        d = self.delta
        if name == "ranges":
            return RangesView(d.extents)
        if name == "data":
            return DataView(d, self._dx_())  # type: ignore[arg-type]  # UndoDelta is what it reads
        if name == "chunks":
            return ChunksView(d, self._dx_())  # type: ignore[arg-type]
        if name == "delta":
            return FileView(self.fd, self.size)
        ranges = self["ranges"]
        doc = manifest_of(d.index, d.extents, ranges.size, self.size, stream_records(self.fd, self.size))
        return ManifestView(d, self["chunks"], ranges, None, doc=doc)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __contains__(self, name: object) -> bool:
        return name in NAMES
