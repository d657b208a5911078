"""The five delta files as random-access views over a Delta, plus export and verification.

Every view knows its exact ``size`` without reading any target data and
serves ``pread(offset, length)`` anywhere through binary search over
cumulative sums, so the FUSE filesystem can stat and read them lazily, and
``export`` writes the same bytes to disk.

Only ``manifest.json``'s content needs a full read (the sha256 of
``chunks``); its JSON is fixed-width (a sha256 hex is always 64 characters)
so even its size is known up front.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

import lvdeltafs
from lvdeltafs.delta import Delta
from lvdeltafs.errors import BadInput, CorruptDelta
from lvdeltafs.extents import DATA, ZERO, Extents, parse_ranges
from lvdeltafs.formats import project_error
from lvdeltafs.formats.stream import (
    HEAD_SIZE,
    MAX_DATA,
    StreamError,
    StreamLayout,
    StreamReader,
    canonical,
)

NAMES = ("ranges", "data", "chunks", "manifest.json", "delta")
MANIFEST_FORMAT = "lvdeltafs-manifest"
_IO = 1 << 20  # bytes per read/write when copying
_U64 = np.uint64


class View(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


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
        return self.extents.format_lines(i, j).encode()[start - base:end - base]


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
        start, end = _span(offset, length, self.size)
        if start >= end:
            return b""
        dx = self.dx
        out = bytearray(end - start)
        i = int(np.searchsorted(dx.ends, _U64(start), side="right"))
        while i < len(dx.offsets) and int(dx.offsets[i]) < end:
            s, e = max(int(dx.offsets[i]), start), min(int(dx.ends[i]), end)
            out[s - start:e - start] = self.delta.read(s, e - s)
            i += 1
        return bytes(out)


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

    def sha256(self) -> str:
        h = hashlib.sha256()
        for off, ln in _data_pieces(self.dx):
            h.update(self.delta.read(off, ln))
        return h.hexdigest()


def _data_pieces(dx: _DataExtents) -> Iterator[tuple[int, int]]:
    for off, ln in zip(dx.offsets.tolist(), dx.lengths.tolist(), strict=True):
        for p in range(off, off + ln, _IO):
            yield p, min(_IO, off + ln - p)


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

    def __init__(self, delta: Delta, chunks: ChunksView, ranges: RangesView, stream: StreamView):
        self.delta, self.chunks = delta, chunks
        self._doc = manifest_document(delta, ranges.size, stream.layout)
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


# ---------------------------------------------------------------- export


def _write_all(fd: int, buf: bytes | memoryview) -> None:
    mv = memoryview(buf)
    while mv:
        mv = mv[os.write(fd, mv):]


def _pwrite_all(fd: int, buf: bytes, offset: int) -> None:
    mv = memoryview(buf)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


class _Staged:
    """A file written under a temporary name, fsynced, then renamed into place."""

    def __init__(self, directory: str, name: str):
        self.final = os.path.join(directory, name)
        self.tmp = os.path.join(directory, f".{name}.tmp.{os.getpid()}")
        # Private by default: a delta holds the volume's data.
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _staged(directory: str, name: str, fill: Callable[[int], None]) -> None:
    f = _Staged(directory, name)
    try:
        fill(f.fd)
        f.commit()
    finally:
        f.abort()


def export(delta: Delta, directory: str) -> dict[str, int]:
    """Write the five delta files into ``directory``; returns name -> size.

    `data` is sparse: only its DATA ranges are written, the rest are holes.
    `data` and `chunks` are written in one pass over the target, which also
    gives the manifest's digest; the stream is a second pass.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = DeltaFiles(delta)
    ranges: RangesView = files["ranges"]

    def write_ranges(fd: int) -> None:
        e = ranges.extents
        for i in range(0, len(e), 65536):
            _write_all(fd, e.format_lines(i, i + 65536).encode())

    _staged(directory, "ranges", write_ranges)

    data_f, chunks_f = _Staged(directory, "data"), _Staged(directory, "chunks")
    try:
        os.ftruncate(data_f.fd, delta.identity.target_size)
        h = hashlib.sha256()
        for off, ln in _data_pieces(files._data_extents()):
            buf = delta.read(off, ln)
            _pwrite_all(data_f.fd, buf, off)
            _write_all(chunks_f.fd, buf)
            h.update(buf)
        data_f.commit()
        chunks_f.commit()
    finally:
        data_f.abort()
        chunks_f.abort()
    manifest: ManifestView = files["manifest.json"]
    manifest.set_chunks_sha256(h.hexdigest())
    _staged(directory, "manifest.json", lambda fd: _write_all(fd, manifest.content()))

    def write_stream(fd: int) -> None:
        for blk in files["delta"].blocks():
            _write_all(fd, blk)

    _staged(directory, "delta", write_stream)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # make the renames durable
    finally:
        os.close(dfd)
    return {name: os.path.getsize(os.path.join(directory, name)) for name in NAMES}


# ---------------------------------------------------------------- verify


def verify_stream_file(path: str) -> dict[str, Any]:
    """Verify one stream file; CorruptDelta/UnsupportedFormat on failure."""
    try:
        with open(path, "rb") as f:
            reader = StreamReader(f)
            for _ in reader:
                pass
    except StreamError as e:
        raise project_error(e) from None
    s = reader.summary()
    keys = ("target_size", "records", "data_records", "zero_records", "data_bytes", "zero_bytes",
            "stream_bytes")
    return {"kind": "stream", "path": path, **{k: getattr(s, k) for k in keys},
            "delta_id": s.header.get("delta_id")}


def verify_path(path: str) -> dict[str, Any]:
    """Verify a `delta` stream file or a delta directory; raise CorruptDelta saying what is wrong."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise BadInput(f"{path} does not exist")
        return verify_stream_file(path)
    return _verify_dir(path)


def _bad(path: str, what: str) -> CorruptDelta:
    return CorruptDelta(f"delta directory {path} is inconsistent: {what}; export or copy it again")


def _verify_dir(path: str) -> dict[str, Any]:
    p = {n: os.path.join(path, n) for n in NAMES}
    for n in NAMES:
        if not os.path.isfile(p[n]):
            raise _bad(path, f"the file {n} is missing")
    manifest = _load_manifest(path, p["manifest.json"])
    size = manifest["target_size"]
    with open(p["ranges"], "rb") as f:
        try:
            extents = parse_ranges(f.read(), size)
        except BadInput as e:
            raise _bad(path, str(e)) from None
    _check_counts(path, manifest, extents, p)
    dx = _DataExtents(extents)
    sha = _check_chunks_and_data(path, dx, p["chunks"], p["data"])
    if sha != manifest["chunks_sha256"]:
        raise _bad(path, f"sha256 of chunks is {sha} but manifest.json says {manifest['chunks_sha256']}")
    summary = _check_stream(path, p["delta"], manifest, extents, p["chunks"])
    if manifest["bytes"].get("delta") != summary.stream_bytes:
        raise _bad(path, f"manifest.json says bytes.delta = {manifest['bytes'].get('delta')} but the delta "
                   f"stream is {summary.stream_bytes} bytes")
    return {"kind": "directory", "path": path, "delta_id": manifest["delta_id"], "target_size": size,
            "extents": len(extents), "data_bytes": extents.data_bytes, "zero_bytes": extents.zero_bytes,
            "chunks_sha256": sha, "stream_bytes": summary.stream_bytes}


def _load_manifest(path: str, mpath: str) -> dict[str, Any]:
    try:
        with open(mpath, "rb") as f:
            m = json.loads(f.read())
    except ValueError as e:
        raise _bad(path, f"manifest.json is not valid JSON ({e})") from None
    required = {"format": str, "target_size": int, "delta_id": str, "identity": dict, "chunks_sha256": str,
                "counts": dict, "bytes": dict}
    if not isinstance(m, dict) or any(not isinstance(m.get(k), t) for k, t in required.items()):
        raise _bad(path, f"manifest.json lacks one of the fields {sorted(required)}")
    if m["format"] != MANIFEST_FORMAT:
        raise _bad(path, f"manifest.json has format {m['format']!r}, not {MANIFEST_FORMAT!r}")
    return m


def _check_counts(path: str, m: dict[str, Any], e: Extents, p: dict[str, str]) -> None:
    # File sizes first: "chunks is short" says more than "the manifest disagrees".
    if os.path.getsize(p["chunks"]) != e.data_bytes:
        raise _bad(path, f"chunks is {os.path.getsize(p['chunks'])} bytes but ranges lists {e.data_bytes} "
                   "bytes of data")
    if os.path.getsize(p["data"]) != m["target_size"]:
        raise _bad(path, f"data is {os.path.getsize(p['data'])} bytes, not the target size "
                   f"{m['target_size']}")
    want = {("counts", "data_extents"): e.data_count, ("counts", "zero_extents"): e.zero_count,
            ("bytes", "data"): e.data_bytes, ("bytes", "zero"): e.zero_bytes,
            ("bytes", "chunks"): e.data_bytes}
    for (sect, key), have in want.items():
        if m[sect].get(key) != have:
            raise _bad(path, f"manifest.json says {sect}.{key} = {m[sect].get(key)} but ranges gives {have}")


def _check_chunks_and_data(path: str, dx: _DataExtents, chunks: str, data: str) -> str:
    """sha256 of chunks, checking on the way that data holds the same bytes at the ranges' offsets."""
    h = hashlib.sha256()
    with open(chunks, "rb") as cf, open(data, "rb") as df:
        for off, ln in _data_pieces(dx):
            buf = cf.read(ln)
            h.update(buf)
            if os.pread(df.fileno(), ln, off) != buf:
                raise _bad(path, f"data and chunks differ in the range at offset {off} (length {ln})")
    return h.hexdigest()


def _check_stream(path: str, spath: str, m: dict[str, Any], extents: Extents, chunks: str):
    """Verify the stream and that it carries exactly the ranges and the chunks' bytes."""
    want = iter(extents)
    try:
        with open(spath, "rb") as sf, open(chunks, "rb") as cf:
            reader = StreamReader(sf)
            body = _body_pieces(path, reader, m, cf)
            for got in canonical(body):
                exp = next(want, None)
                if got != exp:
                    raise _bad(path, f"the delta stream has the range {_fmt(got)} where ranges has "
                               f"{_fmt(exp)}")
    except StreamError as e:
        raise project_error(e) from None
    extra = next(want, None)
    if extra is not None:
        raise _bad(path, f"ranges lists {_fmt(extra)} which the delta stream lacks")
    return reader.summary()


def _body_pieces(path: str, reader: StreamReader, m: dict[str, Any], cf) -> Iterator[tuple[int, int, int]]:
    for rec in reader:
        if rec.type == "header":
            hdr = rec.header or {}
            if hdr.get("delta_id") != m["delta_id"] or hdr.get("identity") != m["identity"]:
                raise _bad(path, "the delta stream's header names a different delta than manifest.json")
        elif rec.type == "size" and rec.offset != m["target_size"]:
            raise _bad(path, f"the delta stream's target size {rec.offset} differs from manifest.json's")
        elif rec.type == "data":
            if cf.read(rec.length) != rec.data:
                raise _bad(path, f"the delta stream's data at offset {rec.offset} differs from chunks")
            yield rec.offset, rec.length, DATA
        elif rec.type == "zero":
            yield rec.offset, rec.length, ZERO


def _fmt(r: tuple[int, int, int] | None) -> str:
    if r is None:
        return "nothing"
    return f"{r[0]}+{r[1]} {'data' if r[2] == DATA else 'zero'}"
