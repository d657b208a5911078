"""Reading a `delta` stream: every record verified before it is yielded, resumable at any record end.

Standard library only, like :mod:`.stream` (its constants and errors) and
:mod:`.codecs` (COMPRESSED payloads): the receiver carries all three.  The
checks are listed in docs/stream-format.md ("Verification by a reader").
A COMPRESSED record is yielded as the DATA record it stands for (type
``data``, its bytes decompressed and checked), so nothing that consumes
records needs to know how they travelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from lvdeltafs.formats import codecs
from lvdeltafs.formats.stream import (
    END_PAYLOAD,
    HEAD,
    HEAD_SIZE,
    MAGIC,
    MAX_DATA,
    MAX_HEADER,
    PREAMBLE,
    PREAMBLE_SIZE,
    TYPE_NAMES,
    VERSIONS,
    StreamError,
    StreamTruncated,
    StreamUnsupported,
    corrupt,
    crc32,
    truncated,
)

# Shipped with this module wherever it goes (lvmirror.remote.SHIPPED), and standard-library only too.
from lvdeltafs.fsio import ShortRead, read_exactly


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
        self.version = 1
        self.done = False
        if resume:
            if resume.get("target_size") is None:
                raise ValueError("can only resume after the size record")
            self.pos = resume["position"]
            for k in self._STATE:
                setattr(self, k, resume[k])
            self.version = resume.get("version", 1)  # a state saved before version 2 existed is version 1

    _STATE = ("header", "seed", "target_size", "prev_end", "nrec", "ndata", "nzero", "dbytes", "zbytes")

    def state(self) -> dict[str, Any]:
        """Everything needed to continue verifying at ``state()["position"]``."""
        return {"position": self.pos, "version": self.version, **{k: getattr(self, k) for k in self._STATE}}

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
            raise truncated(len(raw), "inside the 16-byte preamble")
        _magic, version, flags, crc = PREAMBLE.unpack(raw)
        if crc32(raw[:12]) != crc:
            raise corrupt(0, "preamble checksum mismatch")
        if version not in VERSIONS:
            raise StreamUnsupported(f"delta stream at byte 8 has format version {version}; this release "
                                    f"reads versions {' and '.join(map(str, VERSIONS))} only (upgrade "
                                    "lvdeltafs/lvmirror)", 8)
        if flags:
            raise StreamUnsupported(f"delta stream at byte 10 uses flags 0x{flags:04x} this release does not "
                                    "know (upgrade lvdeltafs/lvmirror)", 10)
        self.version = version
        self.pos = PREAMBLE_SIZE

    def _record(self) -> Record:
        at = self.pos
        raw = self._read(HEAD_SIZE)
        if len(raw) < HEAD_SIZE:
            if not raw:
                raise truncated(at, f"after {self.nrec} records with no end record")
            raise truncated(at + len(raw), f"inside the head of the record starting at byte {at}")
        rtype, flags, reserved, plen, a, b, pcrc = HEAD.unpack_from(raw)
        seed = self.seed if self.header is not None else 0
        stored = int.from_bytes(raw[28:], "little")
        if crc32(memoryview(raw)[:28], seed) != stored:
            raise corrupt(at, "checksum mismatch in the head of the record starting there "
                           f"(stored 0x{stored:08x})")
        name = TYPE_NAMES.get(rtype)
        if name is None:
            raise StreamUnsupported(f"delta stream has an unknown record type 0x{rtype:02x} at byte {at} "
                                    "(written by a newer release?)", at)
        if flags or reserved:
            raise StreamUnsupported(f"delta stream record at byte {at} uses flags this release does not know",
                                    at)
        if name == "compressed" and self.version < 2:
            raise corrupt(at, "a compressed record in a version 1 stream")
        self._check_order(name, at)
        check = getattr(self, f"_check_{name}")
        check(at, plen, a, b)
        payload = b""
        if plen:
            payload = self._read(plen)
            if len(payload) < plen:
                ranged = name in ("data", "compressed")
                desc = f"(offset {a}, length {b})" if ranged else f"({plen}-byte payload)"
                article = "an" if name == "end" else "a"
                raise truncated(at + HEAD_SIZE + len(payload), f"inside {article} {name} record {desc} "
                                 f"starting at byte {at}")
            if crc32(payload) != pcrc:
                raise corrupt(at + HEAD_SIZE, f"checksum mismatch in the payload of the {name} record "
                               f"starting at byte {at}")
        elif pcrc:
            raise corrupt(at, "a record without payload has a payload checksum")
        self.pos = at + HEAD_SIZE + plen
        rec = Record(name, a, b, None, at, self.pos)
        getattr(self, f"_apply_{name}")(rec, payload)
        if name != "end":
            self.nrec += 1
        return rec

    def _check_order(self, name: str, at: int) -> None:
        expected = "header" if self.header is None else "size" if self.target_size is None else None
        if expected and name != expected:
            raise corrupt(at, f"found a {name} record where the {expected} record must be")
        if not expected and name in ("header", "size"):
            raise corrupt(at, f"found a second {name} record")

    def _check_header(self, at: int, plen: int, a: int, b: int) -> None:
        if not 0 < plen <= MAX_HEADER or a or b:
            raise corrupt(at, f"header record of {plen} bytes is malformed (limit {MAX_HEADER})")

    def _apply_header(self, rec: Record, payload: bytes) -> None:
        at = rec.start + HEAD_SIZE
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):  # deeply nested JSON exhausts the parser's recursion
            doc = None
        if (not isinstance(doc, dict) or not isinstance(doc.get("identity"), dict)
                or type(doc.get("target_size")) is not int or doc["target_size"] < 0):
            raise corrupt(at, "the header is not the expected JSON object")
        named = doc["identity"].get("target_size", doc["target_size"])
        if type(named) is not int or named != doc["target_size"]:
            # The receiver takes sizes from the identity and writes by the header: they must agree.
            raise corrupt(at, f"the header's identity says the target is {named!r} bytes but the header "
                           f"says {doc['target_size']}")
        self.header = doc
        self.seed = crc32(payload)
        rec.header = doc

    def _check_size(self, at: int, plen: int, a: int, b: int) -> None:
        assert self.header is not None
        if plen or b or a != self.header["target_size"]:
            raise corrupt(at, f"size record says {a} bytes but the header says {self.header['target_size']}")

    def _apply_size(self, rec: Record, payload: bytes) -> None:
        self.target_size = rec.offset

    def _check_range(self, at: int, name: str, a: int, b: int) -> None:
        assert self.target_size is not None
        if b == 0:
            raise corrupt(at, f"{name} record at offset {a} has length 0")
        if a < self.prev_end:
            raise corrupt(at, f"{name} record (offset {a}, length {b}) starts before the end of the "
                           f"previous record's range ({self.prev_end}); records must be ascending and "
                           "must not overlap")
        if a + b > self.target_size:
            raise corrupt(at, f"{name} record (offset {a}, length {b}) reaches past the target size "
                           f"{self.target_size}")

    def _check_data(self, at: int, plen: int, a: int, b: int) -> None:
        if b > MAX_DATA or plen != b:
            raise corrupt(at, f"data record (offset {a}, length {b}, payload {plen}) is malformed or larger "
                           f"than the {MAX_DATA}-byte limit")
        self._check_range(at, "data", a, b)

    def _apply_data(self, rec: Record, payload: bytes) -> None:
        rec.data = payload
        self.prev_end = rec.offset + rec.length
        self.ndata += 1
        self.dbytes += rec.length

    def _check_compressed(self, at: int, plen: int, a: int, b: int) -> None:
        # Compressed only when smaller: the payload (prefix + bytes) is shorter than the data plus prefix.
        if b > MAX_DATA or not codecs.PREFIX_SIZE < plen < b + codecs.PREFIX_SIZE:
            raise corrupt(at, f"compressed record (offset {a}, length {b}, payload {plen}) is malformed or "
                          f"larger than the {MAX_DATA}-byte limit")
        self._check_range(at, "compressed", a, b)

    def _apply_compressed(self, rec: Record, payload: bytes) -> None:
        try:
            data = codecs.decompress(payload, rec.length)
        except codecs.CodecError as e:
            if e.unsupported:
                raise StreamUnsupported(f"delta stream record at byte {rec.start}: {e} (upgrade "
                                        "lvdeltafs/lvmirror)", rec.start) from None
            raise corrupt(rec.start + HEAD_SIZE, f"the compressed record (offset {rec.offset}, length "
                          f"{rec.length}) starting at byte {rec.start}: {e}") from None
        rec.type = "data"  # consumers see the data it stands for, whatever way it travelled
        self._apply_data(rec, data)

    def _check_zero(self, at: int, plen: int, a: int, b: int) -> None:
        if plen:
            raise corrupt(at, "zero record carries a payload")
        self._check_range(at, "zero", a, b)

    def _apply_zero(self, rec: Record, payload: bytes) -> None:
        self.prev_end = rec.offset + rec.length
        self.nzero += 1
        self.zbytes += rec.length

    def _check_end(self, at: int, plen: int, a: int, b: int) -> None:
        if plen != END_PAYLOAD.size:
            raise corrupt(at, f"end record has a {plen}-byte payload (expected {END_PAYLOAD.size})")
        if a != at or b != self.nrec:
            raise corrupt(at, f"end record says it starts at byte {a} after {b} records, but it starts at "
                           f"byte {at} after {self.nrec}; records are missing or duplicated")

    def _apply_end(self, rec: Record, payload: bytes) -> None:
        got = END_PAYLOAD.unpack(payload)
        have = (self.ndata, self.nzero, self.dbytes, self.zbytes)
        if got != have:
            raise corrupt(rec.start, "end record totals (data records, zero records, data bytes, "
                           f"zero bytes) {got} do not match the stream's {have}")

    def _trailing(self) -> None:
        extra = self._read(1)
        if extra:
            raise corrupt(self.pos, "unexpected bytes after the end record (trailing garbage)")


def iter_records(fileobj: BinaryIO, resume: dict[str, Any] | None = None) -> Iterator[Record]:
    """Parsed, verified records one at a time: header, size, data/zero..., end."""
    return iter(StreamReader(fileobj, resume))


def verify_stream(fileobj: BinaryIO) -> StreamSummary:
    """Read a whole stream, verifying everything; return its summary or raise StreamError."""
    reader = StreamReader(fileobj)
    for _ in reader:
        pass
    return reader.summary()


class BlocksFile:
    """A read-only file over an iterator of bytes blocks: a stream as it is made, read by a StreamReader."""

    def __init__(self, blocks: Iterable[bytes]):
        self.blocks = iter(blocks)
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < max(n, 1):
            blk = next(self.blocks, None)
            if blk is None:
                break
            self.buf += blk
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out
