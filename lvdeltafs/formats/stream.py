"""The `delta` stream: one self-checking byte stream holding a whole delta.

This module is imported by lvmirror's receiver, which is shipped on its own
to hosts that have nothing but python3, so it uses ONLY the standard library
(and :mod:`lvdeltafs.fsio`, standard-library only and shipped with it) and
raises its own :class:`StreamError` family.  Code inside the project
converts those with :func:`lvdeltafs.formats.project_error` into
CorruptDelta / UnsupportedFormat.

The format is specified in docs/stream-format.md.  In short: a 16-byte
preamble (magic, version), then records, each a 32-byte checksummed head and
a payload: HEADER (identity JSON), SIZE, DATA/ZERO records in ascending
offset order, and END (counts and totals).  Version 2 adds COMPRESSED
records (:mod:`.codecs`), written by lvmirror's sender (:mod:`lvmirror.encoder`);
readers are in :mod:`.reader`.

The layout is a pure function of (header, target size, extent list): DATA
extents are split at 1 MiB from their start.  So :class:`StreamLayout` can
give the exact size and any byte of the stream without generating what
comes before it, which the FUSE `delta` file and resumed sends rely on.
"""

from __future__ import annotations

import json
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def _find_crc32() -> Callable[..., int]:
    """CRC-32 as zlib computes it (the same values), from python-isal where this python has it.

    zlib's crc32 (1.2.13) runs at about 2.5 GB/s here, isal's at over 30: a sync checksums
    every data byte four times (the sender once, the receiver as it stages, verifies and applies)
    and the mount's `delta` once per read.  Optional on both ends (pip install 'lvmirror[fast]';
    Debian 12 has no package of it); the receiver may import it (lvmirror.bundle.OPTIONAL).
    """
    try:
        from isal.isal_zlib import crc32 as isal_crc32  # type: ignore[import-not-found]
    except ImportError:
        return zlib.crc32
    return isal_crc32


crc32 = _find_crc32()

MAGIC = b"LVDELTA\x00"
VERSION = 1  # what StreamLayout writes: no COMPRESSED records, so a pure function of the extents
VERSIONS = (1, 2)  # what readers read; version 2 adds COMPRESSED records
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, crc32 of the first 12 bytes
PREAMBLE_SIZE = PREAMBLE.size  # 16
HEAD = struct.Struct("<BBHIQQI")  # type, flags, reserved, payload length, a, b, payload crc32
HEAD_SIZE = HEAD.size + 4  # 32: the last 4 bytes are the head's own crc32
MAX_DATA = 1 << 20  # bytes of data per DATA record
MAX_HEADER = 64 << 10  # bytes of header JSON
END_PAYLOAD = struct.Struct("<QQQQ")  # data records, zero records, data bytes, zero bytes
END_SIZE = HEAD_SIZE + END_PAYLOAD.size
CRC_CACHE = 64  # payload CRCs StreamLayout.pread keeps: the last 64 records' heads

T_HEADER, T_SIZE, T_DATA, T_ZERO, T_END, T_COMPRESSED = (ord(c) for c in "HSDZEC")
TYPE_NAMES = {T_HEADER: "header", T_SIZE: "size", T_DATA: "data", T_ZERO: "zero", T_END: "end",
              T_COMPRESSED: "compressed"}

# Extent kinds, the same numbers as lvdeltafs.extents (which this module must not import).
KIND_DATA = 0
KIND_ZERO = 1

ReadFn = Callable[[int, int], bytes]  # read(offset, length) of the target


# ---------------------------------------------------------------- errors


class StreamError(Exception):
    """A delta stream failed verification.  ``offset`` is the stream byte where it went wrong."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.offset = offset


class StreamTruncated(StreamError):
    """The stream ends early: the file or the transfer is incomplete."""


class StreamUnsupported(StreamError):
    """A version, record type or flag this release does not understand."""


_COPY_AGAIN = "the file was damaged in transit or on disk — copy it again"


def corrupt(at: int, what: str) -> StreamError:
    return StreamError(f"delta stream is corrupt at byte {at}: {what}; {_COPY_AGAIN}", at)


def truncated(at: int, where: str) -> StreamTruncated:
    return StreamTruncated(
        f"delta stream is truncated at byte {at}: it ends {where}; the file is incomplete — copy it again",
        at)


# ---------------------------------------------------------------- encoding


def encode_header(identity: dict[str, Any], target_size: int, delta_id: str | None = None) -> bytes:
    """The HEADER payload: canonical JSON, so the same delta always gives the same bytes."""
    doc = {
        "format": "lvdelta-stream",
        "identity": identity,
        "delta_id": delta_id if delta_id is not None else identity.get("delta_id", ""),
        "base_size": identity.get("base_size"),
        "target_size": target_size,
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise ValueError(f"header JSON is {len(raw)} bytes; the limit is {MAX_HEADER}")
    return raw


def record_head(rtype: int, plen: int, a: int, b: int, pcrc: int, seed: int) -> bytes:
    h = HEAD.pack(rtype, 0, 0, plen, a, b, pcrc)
    return h + crc32(h, seed).to_bytes(4, "little")


def preamble(version: int = VERSION) -> bytes:
    first = PREAMBLE.pack(MAGIC, version, 0, 0)[:12]
    return first + crc32(first).to_bytes(4, "little")


def stream_prefix(header: bytes, target_size: int, version: int = VERSION) -> tuple[list[bytes], int]:
    """Preamble, HEADER and SIZE records, and the seed for every later head checksum.

    Later heads are checksummed with the header's crc as seed, which binds
    each record to this delta: a record spliced in from another stream fails.
    """
    seed = crc32(header)
    blocks = [preamble(version), record_head(T_HEADER, len(header), 0, 0, seed, 0) + header,
              record_head(T_SIZE, 0, target_size, 0, 0, seed)]
    return blocks, seed


def _read_piece(read: ReadFn, off: int, n: int) -> bytes:
    data = read(off, n)
    if len(data) != n:
        raise OSError(5, f"short read of the target at {off}: {len(data)} of {n} bytes")
    return data


def data_records(length: int) -> int:
    """How many DATA records an extent of ``length`` bytes becomes."""
    return -(-length // MAX_DATA)


def extent_stream_bytes(length: int, kind: int) -> int:
    """Stream bytes of one extent's records."""
    if kind == KIND_DATA:
        return length + HEAD_SIZE * data_records(length)
    return HEAD_SIZE


def canonical(pieces: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
    """Coalesce touching same-kind pieces, so the layout depends only on the bytes covered.

    Callers may pass extents already split (e.g. Extents.pieces); the stream
    is the same either way.
    """
    cur: list[int] | None = None
    for off, ln, kind in pieces:
        if ln <= 0:
            raise ValueError(f"empty piece at {off}")
        if kind not in (KIND_DATA, KIND_ZERO):
            raise ValueError(f"unknown extent kind {kind}")
        if cur is not None:
            cur_end = cur[0] + cur[1]
            if off < cur_end:
                raise ValueError(f"pieces unsorted or overlapping at {off}")
            if off == cur_end and kind == cur[2]:
                cur[1] += ln
                continue
            yield cur[0], cur[1], cur[2]
        cur = [off, ln, kind]
    if cur is not None:
        yield cur[0], cur[1], cur[2]


def end_record(pos: int, nrec: int, ndata: int, nzero: int, dbytes: int, zbytes: int, seed: int) -> bytes:
    payload = END_PAYLOAD.pack(ndata, nzero, dbytes, zbytes)
    return record_head(T_END, len(payload), pos, nrec, crc32(payload), seed) + payload


# ---------------------------------------------------------------- layout


class StreamLayout:
    """Size and random access of a stream, from its extent list alone.

    ``offsets``, ``lengths``, ``kinds`` are indexable sequences of canonical
    extents (ascending, disjoint, touching extents differ in kind): lists,
    ``array.array`` or numpy arrays all work, and are not copied.
    ``starts`` (n + 1 entries: each extent's first record, relative to the
    body, then the body size) and ``totals`` (data records, zero records,
    data bytes, zero bytes) may be given precomputed (vectorised) by callers
    with millions of extents; otherwise they are computed here.
    """

    def __init__(self, identity: dict[str, Any], target_size: int, offsets: Any, lengths: Any, kinds: Any,
                 *, delta_id: str | None = None, starts: Any = None,
                 totals: tuple[int, int, int, int] | None = None):
        self.header = encode_header(identity, target_size, delta_id)
        self.target_size = target_size
        self._prefix, self.seed = stream_prefix(self.header, target_size)
        self.offsets, self.lengths, self.kinds = offsets, lengths, kinds
        self.count = len(offsets)
        if starts is None or totals is None:
            starts, totals = self._compute(lengths, kinds)
        self.starts = starts
        self.data_records, self.zero_records, self.data_bytes, self.zero_bytes = (int(t) for t in totals)
        self.body_start = sum(len(b) for b in self._prefix)
        self.end_start = self.body_start + int(starts[self.count])
        self.size = self.end_start + END_SIZE
        self.records = 2 + self.data_records + self.zero_records  # before END
        self._crcs: dict[int, int] = {}  # payload target offset -> its CRC-32 (_payload_crc)
        self._last: tuple[int, bytes] | None = None  # the last payload summed: at most 1 MiB kept

    @classmethod
    def from_pieces(cls, identity: dict[str, Any], target_size: int,
                    pieces: Iterable[tuple[int, int, int]], *, delta_id: str | None = None) -> StreamLayout:
        """Build from any iterable of (offset, length, kind), compactly (array.array, 17 bytes per extent)."""
        offs, lens, kinds = array("Q"), array("Q"), array("B")
        for off, ln, kind in canonical(pieces):
            offs.append(off)
            lens.append(ln)
            kinds.append(kind)
        return cls(identity, target_size, offs, lens, kinds, delta_id=delta_id)

    @staticmethod
    def _compute(lengths: Any, kinds: Any) -> tuple[array, tuple[int, int, int, int]]:
        starts = array("Q", [0])
        pos = ndata = nzero = dbytes = zbytes = 0
        for ln, kind in zip(lengths, kinds, strict=True):
            ln, kind = int(ln), int(kind)
            pos += extent_stream_bytes(ln, kind)
            starts.append(pos)
            if kind == KIND_DATA:
                ndata += data_records(ln)
                dbytes += ln
            else:
                nzero += 1
                zbytes += ln
        return starts, (ndata, nzero, dbytes, zbytes)

    # A record is named by (extent index, piece index); the END record is (count, 0).

    def _locate(self, pos: int) -> tuple[int, int, int]:
        """The record containing body byte ``pos``: (extent, piece, record start in the stream)."""
        rel = pos - self.body_start
        i = bisect_right(self.starts, rel, 0, self.count + 1) - 1
        if i >= self.count:
            return self.count, 0, self.end_start
        s = int(self.starts[i])
        k = (rel - s) // (HEAD_SIZE + MAX_DATA) if int(self.kinds[i]) == KIND_DATA else 0
        return i, k, self.body_start + s + k * (HEAD_SIZE + MAX_DATA)

    def _records_from(self, i: int, k: int, read: ReadFn) -> Iterator[list[bytes]]:
        """Encoded records (head and payload blocks) from record (i, k) to the end."""
        seed, offsets, lengths, kinds = self.seed, self.offsets, self.lengths, self.kinds
        head, rp = record_head, _read_piece
        for j in range(i, self.count):
            off, ln = int(offsets[j]), int(lengths[j])
            if int(kinds[j]) == KIND_ZERO:
                yield [head(T_ZERO, 0, off, ln, 0, seed)]
                continue
            end = off + ln
            for p in range(off + k * MAX_DATA, end, MAX_DATA):
                n = min(MAX_DATA, end - p)
                data = rp(read, p, n)
                yield [head(T_DATA, n, p, n, crc32(data), seed), data]
            k = 0
        yield [end_record(self.end_start, self.records, self.data_records, self.zero_records,
                           self.data_bytes, self.zero_bytes, seed)]

    def is_boundary(self, pos: int) -> bool:
        if pos == self.size:
            return True
        if pos < self.body_start:
            return pos in self.prefix_boundaries()
        return pos < self.size and self._locate(pos)[2] == pos

    def prefix_boundaries(self) -> list[int]:
        out, pos = [0], 0
        for b in self._prefix:
            pos += len(b)
            out.append(pos)
        return out

    def blocks(self, read: ReadFn, start: int = 0) -> Iterator[bytes]:
        """The stream from record boundary ``start`` to its end, as bytes blocks."""
        if not self.is_boundary(start):
            raise ValueError(f"stream offset {start} is not a record boundary")
        if start == self.size:
            return
        pos = 0
        for b in self._prefix:
            if pos >= start:
                yield b
            pos += len(b)
        i, k, _ = self._locate(max(start, self.body_start))
        for rec in self._records_from(i, k, read):
            yield from rec

    def pread(self, offset: int, length: int, read: ReadFn) -> bytes:
        """``length`` bytes of the stream at ``offset`` (fewer at the end), as a file read would give.

        Each target byte is read once and each payload checksummed once, where a
        sequential reader needs it: a FUSE read of 1 MiB straddles two records (a
        record is 1 MiB + 32); the read that covers a head reads the whole payload for
        its CRC and keeps both (:meth:`_payload_crc`), and the next read takes the rest
        of that payload from there.  Then one join: no other copy.
        """
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out: list[bytes | memoryview] = []
        if offset < self.body_start:
            prefix = b"".join(self._prefix)
            out.append(prefix[offset:end])
            offset = self.body_start
        offsets, lengths, kinds, seed = self.offsets, self.lengths, self.kinds, self.seed
        while offset < end:
            i, k, rec_start = self._locate(offset)
            if i >= self.count:
                rec = end_record(self.end_start, self.records, self.data_records, self.zero_records,
                                 self.data_bytes, self.zero_bytes, seed)
                out.append(rec[offset - rec_start:end - rec_start])
                break
            off, ln = int(offsets[i]), int(lengths[i])
            if int(kinds[i]) == KIND_ZERO:
                rec = record_head(T_ZERO, 0, off, ln, 0, seed)
                out.append(rec[offset - rec_start:end - rec_start])
                offset = rec_start + HEAD_SIZE
                continue
            p = off + k * MAX_DATA
            n = min(MAX_DATA, off + ln - p)
            body = rec_start + HEAD_SIZE  # stream position of the payload's first byte
            stop = min(end, body + n)
            payload: bytes | None = None
            if offset < body:
                crc, payload = self._payload_crc(p, n, read)
                head = record_head(T_DATA, n, p, n, crc, seed)
                out.append(head[offset - rec_start:min(stop, body) - rec_start])
                offset = body
            if offset < stop:
                a, b = offset - body, stop - body
                if payload is None:
                    last = self._last  # one read: another thread may replace it
                    if last is not None and last[0] == p:
                        payload = last[1]
                if payload is not None:
                    out.append(memoryview(payload)[a:b])
                else:
                    out.append(_read_piece(read, p + a, b - a))
            offset = stop
        return b"".join(out)

    def _payload_crc(self, p: int, n: int, read: ReadFn) -> tuple[int, bytes | None]:
        """The CRC-32 of the DATA payload at target offset ``p``, and the payload if it was read for it.

        The CRCs of the last few heads served are kept (``CRC_CACHE`` entries, 8 bytes
        of key and value each, cleared when full) for reads that need a head again:
        read-ahead racing a re-read, or a reader going back a little.  A sequential
        reader meets each head once, so every payload is still read and summed afresh
        on every pass.
        """
        crcs = self._crcs
        crc = crcs.get(p)
        if crc is not None:
            return crc, None
        payload = _read_piece(read, p, n)
        crc = crc32(payload)
        if len(crcs) >= CRC_CACHE:
            crcs.clear()  # atomic under the GIL, unlike evicting one entry while other threads add
        crcs[p] = crc
        # The rest of this payload is the start of the next read: served from here, not read
        # again (up to 1 MiB a read, half on average), and the same bytes the CRC was taken of.
        self._last = (p, payload)
        return crc, payload
