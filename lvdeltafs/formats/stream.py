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
offset order, and END (counts and totals).

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
from dataclasses import dataclass
from typing import Any, BinaryIO

# Shipped with this module wherever it goes (lvmirror.remote.SHIPPED), and standard-library only too.
from lvdeltafs.fsio import ShortRead, read_exactly

MAGIC = b"LVDELTA\x00"
VERSION = 1
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, crc32 of the first 12 bytes
PREAMBLE_SIZE = PREAMBLE.size  # 16
_HEAD = struct.Struct("<BBHIQQI")  # type, flags, reserved, payload length, a, b, payload crc32
HEAD_SIZE = _HEAD.size + 4  # 32: the last 4 bytes are the head's own crc32
MAX_DATA = 1 << 20  # bytes of data per DATA record
MAX_HEADER = 64 << 10  # bytes of header JSON
_END = struct.Struct("<QQQQ")  # data records, zero records, data bytes, zero bytes
END_SIZE = HEAD_SIZE + _END.size

T_HEADER, T_SIZE, T_DATA, T_ZERO, T_END = (ord(c) for c in "HSDZE")
_TYPE_NAMES = {T_HEADER: "header", T_SIZE: "size", T_DATA: "data", T_ZERO: "zero", T_END: "end"}

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


def _corrupt(at: int, what: str) -> StreamError:
    return StreamError(f"delta stream is corrupt at byte {at}: {what}; {_COPY_AGAIN}", at)


def _truncated(at: int, where: str) -> StreamTruncated:
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


def _head(rtype: int, plen: int, a: int, b: int, pcrc: int, seed: int) -> bytes:
    h = _HEAD.pack(rtype, 0, 0, plen, a, b, pcrc)
    return h + zlib.crc32(h, seed).to_bytes(4, "little")


def _preamble() -> bytes:
    first = PREAMBLE.pack(MAGIC, VERSION, 0, 0)[:12]
    return first + zlib.crc32(first).to_bytes(4, "little")


def _prefix(header: bytes, target_size: int) -> tuple[list[bytes], int]:
    """Preamble, HEADER and SIZE records, and the seed for every later head checksum.

    Later heads are checksummed with the header's crc as seed, which binds
    each record to this delta: a record spliced in from another stream fails.
    """
    seed = zlib.crc32(header)
    blocks = [_preamble(), _head(T_HEADER, len(header), 0, 0, seed, 0) + header,
              _head(T_SIZE, 0, target_size, 0, 0, seed)]
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


def _end_record(pos: int, nrec: int, ndata: int, nzero: int, dbytes: int, zbytes: int, seed: int) -> bytes:
    payload = _END.pack(ndata, nzero, dbytes, zbytes)
    return _head(T_END, len(payload), pos, nrec, zlib.crc32(payload), seed) + payload


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
        self._prefix, self.seed = _prefix(self.header, target_size)
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
        self._cache: tuple[int, bytes] | None = None

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
        crc32, head, rp = zlib.crc32, _head, _read_piece
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
        yield [_end_record(self.end_start, self.records, self.data_records, self.zero_records,
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
        """``length`` bytes of the stream at ``offset`` (fewer at the end), as a file read would give."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out: list[bytes] = []
        if offset < self.body_start:
            prefix = b"".join(self._prefix)
            out.append(prefix[offset:end])
            offset = self.body_start
        if offset < end:
            i, k, rec_start = self._locate(offset)
            for rec in self._records_from(i, k, read):
                blob = self._cached(rec_start, rec)
                out.append(blob[offset - rec_start:end - rec_start])
                rec_start += len(blob)
                offset = rec_start
                if offset >= end:
                    break
        return b"".join(out)

    def _cached(self, rec_start: int, rec: list[bytes]) -> bytes:
        # FUSE reads a 1 MiB record in many small pieces; keep the last one joined.
        c = self._cache
        if c is not None and c[0] == rec_start:
            return c[1]
        blob = b"".join(rec)
        self._cache = (rec_start, blob)
        return blob


# ---------------------------------------------------------------- reading


@dataclass(slots=True)
class Record:
    """One verified record.  ``start``/``end`` are its stream byte offsets (``end`` is a resume point)."""

    type: str  # header | size | data | zero | end
    offset: int = 0  # data/zero: target offset; size: the target size
    length: int = 0
    data: bytes | None = None
    start: int = 0
    end: int = 0
    header: dict[str, Any] | None = None


@dataclass
class StreamSummary:
    header: dict[str, Any]
    target_size: int
    records: int  # including HEADER, SIZE and END
    data_records: int
    zero_records: int
    data_bytes: int
    zero_bytes: int
    stream_bytes: int


class StreamReader:
    """Streaming verifier: iterate to get records, each yielded only once fully verified.

    Memory is bounded by one record (at most 1 MiB of data).  To resume,
    keep ``state()`` (JSON-able) after the last record you made durable, and
    later pass it back as ``resume`` with a file that continues at
    ``state()["position"]``.
    """

    def __init__(self, fileobj: BinaryIO, resume: dict[str, Any] | None = None):
        self.f = fileobj
        self.pos = 0
        self.header: dict[str, Any] | None = None
        self.seed = 0
        self.target_size: int | None = None
        self.prev_end = 0
        self.nrec = self.ndata = self.nzero = self.dbytes = self.zbytes = 0
        self.done = False
        if resume:
            if resume.get("target_size") is None:
                raise ValueError("can only resume after the size record")
            self.pos = resume["position"]
            for k in self._STATE:
                setattr(self, k, resume[k])

    _STATE = ("header", "seed", "target_size", "prev_end", "nrec", "ndata", "nzero", "dbytes", "zbytes")

    def state(self) -> dict[str, Any]:
        """Everything needed to continue verifying at ``state()["position"]``."""
        return {"position": self.pos, **{k: getattr(self, k) for k in self._STATE}}

    def summary(self) -> StreamSummary:
        if not self.done or self.header is None or self.target_size is None:
            raise RuntimeError("stream not fully read")
        return StreamSummary(self.header, self.target_size, self.nrec + 1, self.ndata, self.nzero,
                             self.dbytes, self.zbytes, self.pos)

    def _read(self, n: int) -> bytes:
        """``n`` bytes, or at EOF what was left (shorter), so the caller can say where the stream ends."""
        got: list[bytes] = []

        def read(k: int) -> bytes:
            part = self.f.read(k) or b""
            got.append(part)
            return part
        try:
            return read_exactly(read, n)  # pipes and sockets may return less than asked before EOF
        except ShortRead:
            return b"".join(got)

    def __iter__(self) -> Iterator[Record]:
        if self.done:
            return
        if self.pos == 0:
            self._preamble()
        while True:
            rec = self._record()
            if rec.type == "end":
                self._trailing()
                self.done = True
                yield rec
                return
            yield rec

    def _preamble(self) -> None:
        raw = self._read(PREAMBLE_SIZE)
        if not raw:
            raise StreamTruncated("delta stream is empty (0 bytes): the file is incomplete — copy it again",
                                  0)
        if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
            raise StreamError("not a delta stream: bad magic at byte 0 "
                              f"(found {raw[:8]!r}, expected {MAGIC!r})", 0)
        if len(raw) < PREAMBLE_SIZE:
            raise _truncated(len(raw), "inside the 16-byte preamble")
        _magic, version, flags, crc = PREAMBLE.unpack(raw)
        if zlib.crc32(raw[:12]) != crc:
            raise _corrupt(0, "preamble checksum mismatch")
        if version != VERSION:
            raise StreamUnsupported(f"delta stream at byte 8 has format version {version}; this release "
                                    f"reads version {VERSION} only (upgrade lvdeltafs/lvmirror)", 8)
        if flags:
            raise StreamUnsupported(f"delta stream at byte 10 uses flags 0x{flags:04x} this release does not "
                                    "know (upgrade lvdeltafs/lvmirror)", 10)
        self.pos = PREAMBLE_SIZE

    def _record(self) -> Record:
        at = self.pos
        raw = self._read(HEAD_SIZE)
        if len(raw) < HEAD_SIZE:
            if not raw:
                raise _truncated(at, f"after {self.nrec} records with no end record")
            raise _truncated(at + len(raw), f"inside the head of the record starting at byte {at}")
        rtype, flags, reserved, plen, a, b, pcrc = _HEAD.unpack_from(raw)
        seed = self.seed if self.header is not None else 0
        stored = int.from_bytes(raw[28:], "little")
        if zlib.crc32(memoryview(raw)[:28], seed) != stored:
            raise _corrupt(at, "checksum mismatch in the head of the record starting there "
                           f"(stored 0x{stored:08x})")
        name = _TYPE_NAMES.get(rtype)
        if name is None:
            raise StreamUnsupported(f"delta stream has an unknown record type 0x{rtype:02x} at byte {at} "
                                    "(written by a newer release?)", at)
        if flags or reserved:
            raise StreamUnsupported(f"delta stream record at byte {at} uses flags this release does not know",
                                    at)
        self._check_order(name, at)
        check = getattr(self, f"_check_{name}")
        check(at, plen, a, b)
        payload = b""
        if plen:
            payload = self._read(plen)
            if len(payload) < plen:
                desc = f"(offset {a}, length {b})" if name == "data" else f"({plen}-byte payload)"
                article = "an" if name == "end" else "a"
                raise _truncated(at + HEAD_SIZE + len(payload), f"inside {article} {name} record {desc} "
                                 f"starting at byte {at}")
            if zlib.crc32(payload) != pcrc:
                raise _corrupt(at + HEAD_SIZE, f"checksum mismatch in the payload of the {name} record "
                               f"starting at byte {at}")
        elif pcrc:
            raise _corrupt(at, "a record without payload has a payload checksum")
        self.pos = at + HEAD_SIZE + plen
        rec = Record(name, a, b, None, at, self.pos)
        getattr(self, f"_apply_{name}")(rec, payload)
        if name != "end":
            self.nrec += 1
        return rec

    def _check_order(self, name: str, at: int) -> None:
        expected = "header" if self.header is None else "size" if self.target_size is None else None
        if expected and name != expected:
            raise _corrupt(at, f"found a {name} record where the {expected} record must be")
        if not expected and name in ("header", "size"):
            raise _corrupt(at, f"found a second {name} record")

    def _check_header(self, at: int, plen: int, a: int, b: int) -> None:
        if not 0 < plen <= MAX_HEADER or a or b:
            raise _corrupt(at, f"header record of {plen} bytes is malformed (limit {MAX_HEADER})")

    def _apply_header(self, rec: Record, payload: bytes) -> None:
        at = rec.start + HEAD_SIZE
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):  # deeply nested JSON exhausts the parser's recursion
            doc = None
        if (not isinstance(doc, dict) or not isinstance(doc.get("identity"), dict)
                or type(doc.get("target_size")) is not int or doc["target_size"] < 0):
            raise _corrupt(at, "the header is not the expected JSON object")
        named = doc["identity"].get("target_size", doc["target_size"])
        if type(named) is not int or named != doc["target_size"]:
            # The receiver takes sizes from the identity and writes by the header: they must agree.
            raise _corrupt(at, f"the header's identity says the target is {named!r} bytes but the header "
                           f"says {doc['target_size']}")
        self.header = doc
        self.seed = zlib.crc32(payload)
        rec.header = doc

    def _check_size(self, at: int, plen: int, a: int, b: int) -> None:
        assert self.header is not None
        if plen or b or a != self.header["target_size"]:
            raise _corrupt(at, f"size record says {a} bytes but the header says {self.header['target_size']}")

    def _apply_size(self, rec: Record, payload: bytes) -> None:
        self.target_size = rec.offset

    def _check_range(self, at: int, name: str, a: int, b: int) -> None:
        assert self.target_size is not None
        if b == 0:
            raise _corrupt(at, f"{name} record at offset {a} has length 0")
        if a < self.prev_end:
            raise _corrupt(at, f"{name} record (offset {a}, length {b}) starts before the end of the "
                           f"previous record's range ({self.prev_end}); records must be ascending and "
                           "must not overlap")
        if a + b > self.target_size:
            raise _corrupt(at, f"{name} record (offset {a}, length {b}) reaches past the target size "
                           f"{self.target_size}")

    def _check_data(self, at: int, plen: int, a: int, b: int) -> None:
        if b > MAX_DATA or plen != b:
            raise _corrupt(at, f"data record (offset {a}, length {b}, payload {plen}) is malformed or larger "
                           f"than the {MAX_DATA}-byte limit")
        self._check_range(at, "data", a, b)

    def _apply_data(self, rec: Record, payload: bytes) -> None:
        rec.data = payload
        self.prev_end = rec.offset + rec.length
        self.ndata += 1
        self.dbytes += rec.length

    def _check_zero(self, at: int, plen: int, a: int, b: int) -> None:
        if plen:
            raise _corrupt(at, "zero record carries a payload")
        self._check_range(at, "zero", a, b)

    def _apply_zero(self, rec: Record, payload: bytes) -> None:
        self.prev_end = rec.offset + rec.length
        self.nzero += 1
        self.zbytes += rec.length

    def _check_end(self, at: int, plen: int, a: int, b: int) -> None:
        if plen != _END.size:
            raise _corrupt(at, f"end record has a {plen}-byte payload (expected {_END.size})")
        if a != at or b != self.nrec:
            raise _corrupt(at, f"end record says it starts at byte {a} after {b} records, but it starts at "
                           f"byte {at} after {self.nrec}; records are missing or duplicated")

    def _apply_end(self, rec: Record, payload: bytes) -> None:
        got = _END.unpack(payload)
        have = (self.ndata, self.nzero, self.dbytes, self.zbytes)
        if got != have:
            raise _corrupt(rec.start, "end record totals (data records, zero records, data bytes, "
                           f"zero bytes) {got} do not match the stream's {have}")

    def _trailing(self) -> None:
        extra = self._read(1)
        if extra:
            raise _corrupt(self.pos, "unexpected bytes after the end record (trailing garbage)")


def iter_records(fileobj: BinaryIO, resume: dict[str, Any] | None = None) -> Iterator[Record]:
    """Parsed, verified records one at a time: header, size, data/zero..., end."""
    return iter(StreamReader(fileobj, resume))


def verify_stream(fileobj: BinaryIO) -> StreamSummary:
    """Read a whole stream, verifying everything; return its summary or raise StreamError."""
    reader = StreamReader(fileobj)
    for _ in reader:
        pass
    return reader.summary()
