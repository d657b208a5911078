"""Verifying a `delta` stream file or an exported delta directory, in bounded memory.

A directory is checked in a few streaming passes over its files: `ranges`
(read in blocks, by the same rules as :func:`~lvdeltafs.extents.parse_ranges`)
against `manifest.json`, `chunks` and `data` against `ranges`, and the
`delta` stream against both; any disagreement is a CorruptDelta saying what.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from lvdeltafs.errors import BadInput, CorruptDelta
from lvdeltafs.extents import DATA, ZERO, RangeLines
from lvdeltafs.formats import project_error
from lvdeltafs.formats.files import IO_BLOCK, MANIFEST_FORMAT, NAMES
from lvdeltafs.formats.reader import StreamReader, StreamSummary
from lvdeltafs.formats.stream import StreamError, canonical
from lvdeltafs.fsio import ShortRead, pread_into, read_exactly

# manifest.json is about 1 KiB; a file this large is not one lvdeltafs wrote.
_MAX_MANIFEST = 1 << 20
# The longest valid ranges line: two 20-digit numbers, the kind, two spaces.
_MAX_RANGE_LINE = 20 + 1 + 20 + 1 + 4
_RANGES_BLOCK = 64 << 10  # bytes of ranges text parsed at a time


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


def _range_line_blocks(f: BinaryIO) -> Iterator[list[bytes]]:
    """The lines of a ranges file, a block's worth at a time (a large delta's is tens of MB)."""
    rest = b""
    while block := f.read(_RANGES_BLOCK):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield lines
        if len(rest) > _MAX_RANGE_LINE:
            yield [rest]  # no valid line is this long: the parser names it, without reading on
            return
    if rest:
        yield [rest]  # a last line without its newline is accepted, as parse_ranges does


def _read_ranges(path: str, rpath: str, size: int) -> Iterator[tuple[int, int, int]]:
    """The extents the ranges file lists, checked by parse_ranges' rules, touching ones coalesced."""
    check = RangeLines(size, u64=False)
    cur: tuple[int, int, int] | None = None
    with open(rpath, "rb") as f:
        for lines in _range_line_blocks(f):
            try:
                offsets, lengths, kinds = check.feed(lines)
            except BadInput as e:
                raise _bad(path, str(e)) from None
            for off, ln, kind in zip(offsets, lengths, kinds, strict=True):
                if cur is not None and cur[0] + cur[1] == off and cur[2] == kind:
                    cur = (cur[0], cur[1] + ln, kind)
                    continue
                if cur is not None:
                    yield cur
                cur = (off, ln, kind)
    if cur is not None:
        yield cur


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
            for p in range(off, off + ln, IO_BLOCK):
                n = min(IO_BLOCK, off + ln - p)
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
        self.buf = bytearray(IO_BLOCK)
        self.len = 0

    def get(self, offset: int, n: int) -> memoryview:
        """``n`` (at most 1 MiB) bytes of data at ``offset``; valid until the next call."""
        if not (self.start <= offset and offset + n <= self.start + self.len):
            self.start, self.len = offset, min(IO_BLOCK, self.size - offset)
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
    regions = [(start, end)] if end - start <= IO_BLOCK else _maybe_data(window.fd, start, end)
    for s, e in regions:
        for p in range(s, e, IO_BLOCK):
            view = window.get(p, min(IO_BLOCK, e - p))
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
