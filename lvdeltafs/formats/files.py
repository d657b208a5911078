"""The five delta files as random-access views over a Delta, and the manifest they describe.

Every view knows its exact ``size`` without reading any target data and
serves ``pread(offset, length)`` anywhere through binary search over
cumulative sums, so the FUSE filesystem can stat and read them lazily, and
:mod:`.export` writes the same bytes to disk (:mod:`.verify` checks them).

Only ``manifest.json``'s content needs a full read (the sha256 of
``chunks``); its JSON is fixed-width (a sha256 hex is always 64 characters)
so even its size is known up front.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

import lvdeltafs
from lvdeltafs.delta import Delta
from lvdeltafs.extents import DATA, Extents
from lvdeltafs.formats.stream import HEAD_SIZE, MAX_DATA, StreamLayout

NAMES = ("ranges", "data", "chunks", "manifest.json", "delta")
MANIFEST_FORMAT = "lvdeltafs-manifest"
IO_BLOCK = 1 << 20  # bytes per read/write when copying or checking the files
_U64 = np.uint64


class View(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


# Zeros for the unchanged parts of `data`: one FUSE request (at most 1 MiB, libfuse's max_pages)
# is served from this one constant; only a larger read allocates.
ZEROS = bytes(1 << 20)


def _zeros(n: int) -> bytes:
    return ZEROS[:n] if n <= len(ZEROS) else bytes(n)  # ZEROS[:len(ZEROS)] is ZEROS itself


def _zeros_view(n: int) -> bytes | memoryview:
    return memoryview(ZEROS)[:n] if n <= len(ZEROS) else bytes(n)


def _span(offset: int, length: int, size: int) -> tuple[int, int]:
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    return offset, min(offset + length, size)


class RangesView:
    """The `ranges` text; only the lines a read covers are formatted."""

    def __init__(self, extents: Extents):
        self.extents = extents
        self._cum = np.zeros(len(extents) + 1, _U64)
        np.cumsum(extents.line_lengths(), out=self._cum[1:])
        self.size = int(self._cum[-1])

    def pread(self, offset: int, length: int) -> bytes:
        start, end = _span(offset, length, self.size)
        if start >= end:
            return b""
        i = int(np.searchsorted(self._cum, _U64(start), side="right")) - 1
        j = int(np.searchsorted(self._cum, _U64(end), side="left"))
        base = int(self._cum[i])
        return self.extents.format_bytes(i, j)[start - base:end - base]


class _DataExtents:
    """The DATA extents of a delta, with what is needed to find them fast."""

    def __init__(self, extents: Extents):
        d = extents.data_only()
        self.offsets, self.lengths = d.offsets, d.lengths
        self.ends = d.offsets + d.lengths
        self.cum = np.zeros(len(d) + 1, _U64)  # position of each extent's bytes in `chunks`
        np.cumsum(d.lengths, out=self.cum[1:])
        self.total = int(self.cum[-1])


class DataView:
    """The `data` file: the target at full size, changed data in place, zeros elsewhere."""

    def __init__(self, delta: Delta, dx: _DataExtents | None = None):
        self.delta = delta
        self.dx = dx or _DataExtents(delta.extents)
        self.size = delta.identity.target_size
        self.changed_bytes = self.dx.total  # for st_blocks, so `du` shows the delta's size

    def pread(self, offset: int, length: int) -> bytes:
        # A read wholly inside one changed run (the common case for large runs) is the target's
        # bytes as pread gives them, and one wholly outside is a slice of ZEROS: no buffer to
        # fill, no copy.  Otherwise the pieces are joined once.
        start, end = _span(offset, length, self.size)
        if start >= end:
            return b""
        dx = self.dx
        i = int(np.searchsorted(dx.ends, _U64(start), side="right"))
        n_ext = len(dx.offsets)
        if i >= n_ext or int(dx.offsets[i]) >= end:
            return _zeros(end - start)
        if int(dx.offsets[i]) <= start and int(dx.ends[i]) >= end:
            return self.delta.read(start, end - start)
        parts: list[bytes | memoryview] = []
        pos = start
        while i < n_ext and int(dx.offsets[i]) < end:
            s, e = max(int(dx.offsets[i]), start), min(int(dx.ends[i]), end)
            if s > pos:
                parts.append(_zeros_view(s - pos))
            parts.append(self.delta.read(s, e - s))
            pos = e
            i += 1
        if pos < end:
            parts.append(_zeros_view(end - pos))
        return b"".join(parts)

    def unchanged(self, offset: int, length: int) -> bytes | None:
        """The read's bytes if it touches no changed run (zeros, known without I/O), else None.

        The FUSE adapter answers such a read at once, not through a worker thread.
        """
        start, end = _span(offset, length, self.size)
        if start >= end:
            return b""
        dx = self.dx
        i = int(np.searchsorted(dx.ends, _U64(start), side="right"))
        if i >= len(dx.offsets) or int(dx.offsets[i]) >= end:
            return _zeros(end - start)
        return None


class ChunksView:
    """The `chunks` file: the DATA ranges' bytes back to back, in ranges order."""

    def __init__(self, delta: Delta, dx: _DataExtents | None = None):
        self.delta = delta
        self.dx = dx or _DataExtents(delta.extents)
        self.size = self.dx.total

    def pread(self, offset: int, length: int) -> bytes:
        start, end = _span(offset, length, self.size)
        if start >= end:
            return b""
        dx = self.dx
        i = int(np.searchsorted(dx.cum, _U64(start), side="right")) - 1
        parts = []
        pos = start
        while pos < end:
            base = int(dx.cum[i])
            n = min(int(dx.cum[i + 1]), end) - pos
            parts.append(self.delta.read(int(dx.offsets[i]) + pos - base, n))
            pos += n
            i += 1
        return b"".join(parts)

    def pieces(self) -> Iterator[tuple[int, int]]:
        """(target offset, length) of `chunks`' bytes in order, at most IO_BLOCK each: bounded reads."""
        dx = self.dx
        for off, ln in zip(dx.offsets.tolist(), dx.lengths.tolist(), strict=True):
            for p in range(off, off + ln, IO_BLOCK):
                yield p, min(IO_BLOCK, off + ln - p)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for off, ln in self.pieces():
            h.update(self.delta.read(off, ln))
        return h.hexdigest()


def stream_layout(delta: Delta) -> StreamLayout:
    """The `delta` stream's layout, its per-extent positions computed vectorised."""
    e = delta.extents
    isdata = e.kinds == DATA
    nrec = np.where(isdata, (e.lengths + _U64(MAX_DATA - 1)) // _U64(MAX_DATA), _U64(1))
    nbytes = nrec * _U64(HEAD_SIZE) + np.where(isdata, e.lengths, _U64(0))
    starts = np.zeros(len(e) + 1, _U64)
    np.cumsum(nbytes, out=starts[1:])
    totals = (int(nrec[isdata].sum()), e.zero_count, e.data_bytes, e.zero_bytes)
    ident = delta.identity
    return StreamLayout(ident.to_dict(), ident.target_size, e.offsets, e.lengths, e.kinds,
                        delta_id=ident.delta_id, starts=starts, totals=totals)


class StreamView:
    """The `delta` file: the self-checking stream, generated only where it is read."""

    def __init__(self, delta: Delta, layout: StreamLayout | None = None):
        self.delta = delta
        self.layout = layout or stream_layout(delta)
        self.size = self.layout.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.layout.pread(offset, length, self.delta.read)

    def blocks(self, start: int = 0) -> Iterator[bytes]:
        return self.layout.blocks(self.delta.read, start)


class ManifestView:
    """`manifest.json`: fixed-width JSON, so its size is known before the digest is."""

    def __init__(self, delta: Delta, chunks: ChunksView, ranges: RangesView, stream: StreamView | None,
                 *, doc: dict[str, Any] | None = None):
        # ``doc``: a manifest (without its digest) made elsewhere, for a delta whose stream is a file
        # as it is (an undo delta, lvdeltafs.formats.undofiles), not one StreamLayout generates.
        self.delta, self.chunks = delta, chunks
        if doc is None:
            assert stream is not None
            doc = manifest_document(delta, ranges.size, stream.layout)
        self._doc = doc
        self._sha: str | None = None
        self._text: bytes | None = None
        self.size = len(self._render("0" * 64))

    def _render(self, sha: str) -> bytes:
        return (json.dumps({**self._doc, "chunks_sha256": sha}, indent=2, sort_keys=True) + "\n").encode()

    def set_chunks_sha256(self, sha: str) -> None:
        """Export computes the digest while writing `chunks`; saves reading everything twice."""
        self._sha = sha
        self._text = None

    def content(self) -> bytes:
        if self._text is None:
            if self._sha is None:
                self._sha = self.chunks.sha256()
            self._text = self._render(self._sha)
            assert len(self._text) == self.size
        return self._text

    def pread(self, offset: int, length: int) -> bytes:
        start, end = _span(offset, length, self.size)
        return self.content()[start:end] if start < end else b""


def manifest_document(delta: Delta, ranges_size: int, layout: StreamLayout) -> dict[str, Any]:
    """The manifest without its digest: every value is fixed by identity and extents."""
    ident, e = delta.identity, delta.extents
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tool": "lvdeltafs",
        "tool_version": lvdeltafs.__version__,
        "delta_id": ident.delta_id,
        "identity": ident.to_dict(),
        "base_size": ident.base_size,
        "target_size": ident.target_size,
        "chunk_size": ident.chunk_size,
        "source": ident.source,
        "point_in_time": bool(delta.point_in_time),
        "counts": {"extents": len(e), "data_extents": e.data_count, "zero_extents": e.zero_count,
                   "stream_records": layout.records + 1},
        "bytes": {"data": e.data_bytes, "zero": e.zero_bytes, "ranges": ranges_size,
                  "chunks": e.data_bytes, "delta": layout.size},
    }


class DeltaFiles:
    """name -> view for the five delta files; views are built on first use."""

    def __init__(self, delta: Delta):
        self.delta = delta
        self._views: dict[str, View] = {}
        self._dx: _DataExtents | None = None

    def _data_extents(self) -> _DataExtents:
        if self._dx is None:
            self._dx = _DataExtents(self.delta.extents)
        return self._dx

    def __getitem__(self, name: str) -> Any:
        if name not in NAMES:
            raise KeyError(name)
        if name not in self._views:
            self._views[name] = self._build(name)
        return self._views[name]

    def _build(self, name: str) -> View:
        d = self.delta
        if name == "ranges":
            return RangesView(d.extents)
        if name == "data":
            return DataView(d, self._data_extents())
        if name == "chunks":
            return ChunksView(d, self._data_extents())
        if name == "delta":
            return StreamView(d)
        return ManifestView(d, self["chunks"], self["ranges"], self["delta"])

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __contains__(self, name: object) -> bool:
        return name in NAMES

    def keys(self) -> tuple[str, ...]:
        return NAMES

