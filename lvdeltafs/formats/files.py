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

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np

import lvdeltafs
from lvdeltafs.delta import Delta
from lvdeltafs.errors import BadInput, CorruptDelta, Refused
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.formats import project_error
from lvdeltafs.formats.stream import (
    HEAD_SIZE,
    MAX_DATA,
    StreamError,
    StreamLayout,
    StreamReader,
    StreamSummary,
    canonical,
)
from lvdeltafs.fsio import Folder, ShortRead, UnsafePath, pread_into, pwrite_all, read_exactly, write_all

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


class _Staging:
    """The delta files under fresh temporary names, renamed into place together once all are complete.

    Every file is created by :meth:`Folder.create_temp` (a new random name,
    O_EXCL, no link followed), so nothing someone planted in the folder is
    ever opened; the final names are only ever renamed over, never opened.
    Until :meth:`commit` the previous set (if any) stays whole.
    """

    def __init__(self, folder: Folder):
        self.folder = folder
        self._temps: dict[str, str] = {}  # final name -> temporary name, in creation order
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def new(self, name: str) -> int:
        tmp, fd = self.folder.create_temp(name)  # private (0600): a delta holds the volume's data
        self._temps[name], self._fds[name] = tmp, fd
        return fd

    def done(self, name: str) -> None:
        """``name`` is complete: make it durable and close it."""
        fd = self._fds.pop(name)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        for name, tmp in list(self._temps.items()):
            _check_final_name(self.folder, name)  # again: a sticky folder lets others add entries meanwhile
            self.folder.rename(tmp, name)
            del self._temps[name]
        self.folder.sync()  # make the renames durable

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for tmp in self._temps.values():
            self.folder.unlink(tmp)
        self._temps.clear()


def _check_final_name(folder: Folder, name: str) -> None:
    """An existing file at a final name is replaced only if it is a regular file of ours."""
    st = folder.stat(name)
    if st is None:
        return
    where = folder.where(name)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{where} is a symbolic link; export does not replace links someone may have "
                         "planted: remove it (or export into a new directory), then run again")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{where} exists and is not a regular file: remove it, or export into a new "
                         "directory")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{where} belongs to uid {st.st_uid}, not to this user: someone else made it; "
                         "remove it (or export into a new directory), then run again")


def _open_export_folder(directory: str) -> Folder:
    """The export directory, created private if missing; refused if others could control it."""
    path = os.path.abspath(directory)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    # Folder follows a link at the directory's own name: only one we or root made may choose where it goes.
    if st is not None and stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(f"{path} is a symbolic link made by uid {st.st_uid}, who would choose where the "
                         "export is written: name the real directory instead")
    return Folder(path, create=True, mode=0o700)


def export(delta: Delta, directory: str) -> dict[str, int]:
    """Write the five delta files into ``directory``; returns name -> size.

    `data` is sparse: only its DATA ranges are written, the rest are holes.
    `data` and `chunks` are written in one pass over the target, which also
    gives the manifest's digest; the stream is a second pass.  A directory
    others may write (unless sticky, like /tmp), or a final name held by a
    link or by another user's file, is refused (Refused, exit 4) before
    anything is written.
    """
    try:
        with _open_export_folder(directory) as folder:
            for name in NAMES:
                _check_final_name(folder, name)
            with _Staging(folder) as staging:
                _stage_all(delta, staging)
                staging.commit()
            return {name: _size_of(folder, name) for name in NAMES}
    except UnsafePath as e:
        raise Refused(f"refusing to export into {directory}: {e}") from None


def _stage_all(delta: Delta, staging: _Staging) -> None:
    files = DeltaFiles(delta)
    ranges: RangesView = files["ranges"]
    fd = staging.new("ranges")
    for i in range(0, len(ranges.extents), 65536):
        write_all(fd, ranges.extents.format_lines(i, i + 65536).encode())
    staging.done("ranges")

    manifest: ManifestView = files["manifest.json"]
    manifest.set_chunks_sha256(_stage_data_and_chunks(delta, files, staging))
    write_all(staging.new("manifest.json"), manifest.content())
    staging.done("manifest.json")

    fd = staging.new("delta")
    for blk in files["delta"].blocks():
        write_all(fd, blk)
    staging.done("delta")


def _stage_data_and_chunks(delta: Delta, files: DeltaFiles, staging: _Staging) -> str:
    """`data` (sparse) and `chunks` in one pass over the target; returns the sha256 of `chunks`."""
    data_fd, chunks_fd = staging.new("data"), staging.new("chunks")
    os.ftruncate(data_fd, delta.identity.target_size)
    h = hashlib.sha256()
    for off, ln in _data_pieces(files._data_extents()):
        buf = delta.read(off, ln)
        pwrite_all(data_fd, buf, off)
        write_all(chunks_fd, buf)
        h.update(buf)
    staging.done("data")
    staging.done("chunks")
    return h.hexdigest()


def _size_of(folder: Folder, name: str) -> int:
    st = folder.stat(name)
    return st.st_size if st is not None else 0


# ---------------------------------------------------------------- verify

# manifest.json is about 1 KiB; a file this large is not one lvdeltafs wrote.
_MAX_MANIFEST = 1 << 20
# The longest valid ranges line: two 20-digit numbers, the kind, two spaces.
_MAX_RANGE_LINE = 20 + 1 + 20 + 1 + 4
_RANGE_LINE = re.compile(rb"(0|[1-9][0-9]*) ([1-9][0-9]*) (data|zero)")
_RANGES_BLOCK = 64 << 10  # bytes of ranges text parsed at a time
_KIND_BY_NAME = {b"data": DATA, b"zero": ZERO}


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


@dataclass
class _Totals:
    """What the ranges file adds up to, counted in one streaming pass."""

    extents: int = 0
    data_extents: int = 0
    zero_extents: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0


def _verify_dir(path: str) -> dict[str, Any]:
    """Every check in a few streaming passes: memory stays bounded however long `ranges` is."""
    p = {n: os.path.join(path, n) for n in NAMES}
    for n in NAMES:
        if not os.path.isfile(p[n]):
            raise _bad(path, f"the file {n} is missing")
    manifest = _load_manifest(path, p["manifest.json"])
    size = manifest["target_size"]

    def ranges() -> Iterator[tuple[int, int, int]]:
        return _read_ranges(path, p["ranges"], size)

    totals = _count(ranges())
    _check_counts(path, manifest, totals, p)
    sha = _check_chunks_and_data(path, ranges(), p["chunks"], p["data"], size)
    if sha != manifest["chunks_sha256"]:
        raise _bad(path, f"sha256 of chunks is {sha} but manifest.json says {manifest['chunks_sha256']}")
    summary = _check_stream(path, p["delta"], manifest, ranges(), p["chunks"])
    if manifest["bytes"].get("delta") != summary.stream_bytes:
        raise _bad(path, f"manifest.json says bytes.delta = {manifest['bytes'].get('delta')} but the delta "
                   f"stream is {summary.stream_bytes} bytes")
    return {"kind": "directory", "path": path, "delta_id": manifest["delta_id"], "target_size": size,
            "extents": totals.extents, "data_bytes": totals.data_bytes, "zero_bytes": totals.zero_bytes,
            "chunks_sha256": sha, "stream_bytes": summary.stream_bytes}


def _load_manifest(path: str, mpath: str) -> dict[str, Any]:
    with open(mpath, "rb") as f:
        raw = f.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise _bad(path, f"manifest.json is over {_MAX_MANIFEST} bytes, so not one lvdeltafs wrote")
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:  # deep nesting raises RecursionError
        raise _bad(path, f"manifest.json is not valid JSON ({e})") from None
    required = {"format": str, "target_size": int, "delta_id": str, "identity": dict, "chunks_sha256": str,
                "counts": dict, "bytes": dict}
    if not isinstance(m, dict) or any(not isinstance(m.get(k), t) for k, t in required.items()):
        raise _bad(path, f"manifest.json lacks one of the fields {sorted(required)}")
    if m["format"] != MANIFEST_FORMAT:
        raise _bad(path, f"manifest.json has format {m['format']!r}, not {MANIFEST_FORMAT!r}")
    return m


def _range_lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of a ranges file, read in bounded blocks (a large delta's is tens of MB)."""
    rest = b""
    while block := f.read(_RANGES_BLOCK):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
        if len(rest) > _MAX_RANGE_LINE:
            yield rest  # no valid line is this long: the parser names it, without reading on
            return
    if rest:
        yield rest  # a last line without its newline is accepted, as parse_ranges does


def _read_ranges(path: str, rpath: str, size: int) -> Iterator[tuple[int, int, int]]:
    """The extents the ranges file lists, checked as strictly as parse_ranges, touching ones coalesced."""
    cur: tuple[int, int, int] | None = None
    prev_end = 0
    with open(rpath, "rb") as f:
        for no, line in enumerate(_range_lines(f), 1):
            off, ln, kind = _range_line(path, no, line, prev_end, size)
            prev_end = off + ln
            if cur is not None and cur[0] + cur[1] == off and cur[2] == kind:
                cur = (cur[0], cur[1] + ln, kind)
                continue
            if cur is not None:
                yield cur
            cur = (off, ln, kind)
    if cur is not None:
        yield cur


def _range_line(path: str, no: int, line: bytes, prev_end: int, size: int) -> tuple[int, int, int]:
    m = _RANGE_LINE.fullmatch(line)
    if not m:
        raise _bad(path, f"ranges line {no} is malformed: {line[:80]!r} (expected 'OFFSET LENGTH "
                   "data|zero', decimal bytes, one space apart)")
    off, ln = int(m[1]), int(m[2])
    if off < prev_end:
        raise _bad(path, f"ranges line {no}: offset {off} is before the end of the previous range "
                   f"({prev_end}); ranges must be ascending and must not overlap")
    if off + ln > size:
        raise _bad(path, f"ranges line {no}: range {off}+{ln} ends past the volume size {size}")
    return off, ln, _KIND_BY_NAME[m[3]]


def _count(ranges: Iterator[tuple[int, int, int]]) -> _Totals:
    t = _Totals()
    for _, ln, kind in ranges:
        t.extents += 1
        if kind == DATA:
            t.data_extents += 1
            t.data_bytes += ln
        else:
            t.zero_extents += 1
            t.zero_bytes += ln
    return t


def _check_counts(path: str, m: dict[str, Any], t: _Totals, p: dict[str, str]) -> None:
    # File sizes first: "chunks is short" says more than "the manifest disagrees".
    if os.path.getsize(p["chunks"]) != t.data_bytes:
        raise _bad(path, f"chunks is {os.path.getsize(p['chunks'])} bytes but ranges lists {t.data_bytes} "
                   "bytes of data")
    if os.path.getsize(p["data"]) != m["target_size"]:
        raise _bad(path, f"data is {os.path.getsize(p['data'])} bytes, not the target size "
                   f"{m['target_size']}")
    want = {("counts", "data_extents"): t.data_extents, ("counts", "zero_extents"): t.zero_extents,
            ("bytes", "data"): t.data_bytes, ("bytes", "zero"): t.zero_bytes,
            ("bytes", "chunks"): t.data_bytes}
    for (sect, key), have in want.items():
        if m[sect].get(key) != have:
            raise _bad(path, f"manifest.json says {sect}.{key} = {m[sect].get(key)} but ranges gives {have}")


def _check_chunks_and_data(path: str, ranges: Iterator[tuple[int, int, int]], chunks: str, data: str,
                           size: int) -> str:
    """sha256 of chunks, checking on the way that data holds those bytes at the ranges' offsets and
    zeros everywhere else."""
    h = hashlib.sha256()
    pos = 0  # data is checked up to here
    with open(chunks, "rb") as cf, open(data, "rb") as df:
        window = _Window(path, df.fileno(), size)
        for off, ln, kind in ranges:
            if kind != DATA:
                continue  # a zero range reads as zeros in data too: checked with the gaps
            _check_zeros(path, window, pos, off)
            for p in range(off, off + ln, _IO):
                n = min(_IO, off + ln - p)
                try:
                    piece = read_exactly(cf.read, n)
                except ShortRead:
                    raise _changed(path, "chunks") from None
                h.update(piece)
                if window.get(p, n) != piece:
                    raise _bad(path, f"data and chunks differ in the range at offset {p} (length {n})")
            pos = off + ln
        _check_zeros(path, window, pos, size)
    return h.hexdigest()


def _changed(path: str, name: str) -> CorruptDelta:
    return _bad(path, f"{name} ended early: it changed while being verified")


class _Window:
    """Ascending reads of `data`, served from one read of up to 1 MiB at a time.

    Ranges are often small and close together: one read then serves many of
    them and the gaps between, instead of a read (and a seek) for each.
    """

    def __init__(self, path: str, fd: int, size: int):
        self.path, self.fd, self.size = path, fd, size
        self.start = 0
        self.buf = bytearray(_IO)
        self.len = 0

    def get(self, offset: int, n: int) -> memoryview:
        """``n`` (at most 1 MiB) bytes of data at ``offset``; valid until the next call."""
        if not (self.start <= offset and offset + n <= self.start + self.len):
            self.start, self.len = offset, min(_IO, self.size - offset)
            try:
                pread_into(self.fd, memoryview(self.buf)[:self.len], offset)
            except ShortRead:
                raise _changed(self.path, "data") from None
        return memoryview(self.buf)[offset - self.start:offset - self.start + n]


def _check_zeros(path: str, window: _Window, start: int, end: int) -> None:
    """`data` must read as zeros in [start, end): it holds nothing outside its data ranges.

    A gap of more than 1 MiB is read only where the file has data: holes
    (most of a sparse `data`) are skipped, where the filesystem can say.
    """
    regions = [(start, end)] if end - start <= _IO else _maybe_data(window.fd, start, end)
    for s, e in regions:
        for p in range(s, e, _IO):
            view = window.get(p, min(_IO, e - p))
            arr = np.frombuffer(view, np.uint8)
            if arr.any():
                first = p + int(np.flatnonzero(arr)[0])
                raise _bad(path, f"data holds a non-zero byte at offset {first}, outside every data range "
                           "(data must read as zeros there)")


def _maybe_data(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) that may hold data: holes are skipped where the filesystem can say."""
    pos = start
    while pos < end:
        try:
            found = os.lseek(fd, pos, os.SEEK_DATA)
            hole = os.lseek(fd, found, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # nothing but a hole from pos to the end of the file
            yield pos, end  # the filesystem cannot say: read it all
            return
        if found >= end:
            return
        if hole <= found:  # a filesystem that answers nonsense: read the rest
            yield max(pos, found), end
            return
        yield max(pos, found), min(hole, end)
        pos = hole


def _check_stream(path: str, spath: str, m: dict[str, Any], ranges: Iterator[tuple[int, int, int]],
                  chunks: str) -> StreamSummary:
    """Verify the stream and that it carries exactly the ranges and the chunks' bytes."""
    try:
        with open(spath, "rb") as sf, open(chunks, "rb") as cf:
            reader = StreamReader(sf)
            body = _body_pieces(path, reader, m, cf)
            for got in canonical(body):
                exp = next(ranges, None)
                if got != exp:
                    raise _bad(path, f"the delta stream has the range {_fmt(got)} where ranges has "
                               f"{_fmt(exp)}")
    except StreamError as e:
        raise project_error(e) from None
    extra = next(ranges, None)
    if extra is not None:
        raise _bad(path, f"ranges lists {_fmt(extra)} which the delta stream lacks")
    return reader.summary()


def _body_pieces(path: str, reader: StreamReader, m: dict[str, Any],
                 cf: BinaryIO) -> Iterator[tuple[int, int, int]]:
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
