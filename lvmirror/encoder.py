"""The stream a sync sends, built as it goes: records made by worker threads, compressed when it pays.

:class:`~lvdeltafs.formats.stream.StreamLayout` defines a delta's version-1
stream as a pure function of its ranges (what the mount's `delta` file
serves).  :class:`DeltaStream` sends the same records, made ahead by worker
threads (``pread``, CRC-32 and zlib release the GIL, so reading and
compressing overlap with the link), and in a version-2 stream replaces a
DATA record by a COMPRESSED one whenever its :class:`~lvmirror.compression.Policy`
says compression pays and the bytes shrink (``docs/stream-format.md``).

Invariants:

- Records go out in ascending target order, each range split at 1 MiB from
  its start, exactly as StreamLayout splits it; a version-1 stream is byte
  for byte StreamLayout's.
- At most ``DEPTH`` batches (each at most 1 MiB of data) are in flight, so
  memory is bounded whatever the delta's size.
- A resumed stream continues from the receiver's own verifier state (the
  ZFS rule: the receiver owns the resume point): from the end of the last
  range it holds, in the version it holds, with its counts carried on, so
  the END record it ends with covers the whole stream.  A version-2 stream
  is not a pure function of its ranges (what compresses depends on the
  link), so this is the only way to resume one; it works for version 1 too.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvdeltafs.delta import Delta
from lvdeltafs.exact import BLOCK
from lvdeltafs.formats import codecs, files
from lvdeltafs.formats.stream import (
    HEAD_SIZE,
    KIND_ZERO,
    MAX_DATA,
    T_COMPRESSED,
    T_DATA,
    T_ZERO,
    crc32,
    end_record,
    record_head,
    stream_prefix,
)
from lvmirror.compression import Policy

DEPTH = 4  # batches in flight: enough to keep the workers and the link busy (compression.SKIP_BYTES)
# The target's data ranges are asked of the disk this far ahead of the workers' reads
# (Delta.advise): scattered reads then wait for the disk together, not one after another.
ADVISE_AHEAD = 32 << 20
BATCH_BYTES = MAX_DATA  # small ranges are grouped so a worker's hand-off costs little per range
BATCH_RECORDS = 4096  # and zero ranges (no data) at most so many to a batch
_MAX = 2**63 - 1


@dataclass(frozen=True)
class Resume:
    """Where a receiver holds a stream verified: its verifier's state at a record end."""

    position: int  # stream bytes held
    version: int
    prev_end: int  # the end of the last range held (target offset)
    nrec: int  # records held (HEADER and SIZE included)
    ndata: int
    nzero: int
    dbytes: int
    zbytes: int

    @classmethod
    def from_reply(cls, doc: Any) -> Resume:
        """From the receiver's ``resume`` object; ValueError if any field is missing or out of bounds."""
        if not isinstance(doc, dict):
            raise ValueError("no resume state")
        values = {}
        for name in cls.__dataclass_fields__:
            value = doc.get(name)
            if type(value) is not int or not 0 <= value <= _MAX:
                raise ValueError(f"resume field {name} is {str(value)[:40]!r}")
            values[name] = value
        if values["version"] not in (1, 2):
            raise ValueError(f"resume version {values['version']}")
        return cls(**values)


@dataclass
class Counts:
    """What the records so far add up to (the END record's fields)."""

    pos: int
    nrec: int
    ndata: int = 0
    nzero: int = 0
    dbytes: int = 0
    zbytes: int = 0
    wire_data: int = 0  # bytes of DATA and COMPRESSED payloads as sent (this run)
    raw_data: int = 0  # the data those payloads stand for (this run)


Batch = list[tuple[int, int, int]]  # (offset, length, kind)
Records = list[tuple[int, int, int, list[bytes]]]  # (type, offset, length, blocks) per record
Built = tuple[Records, int]  # a batch's records, and the data bytes left out as the base's own
Way = tuple[bool, int, int]  # compressed?, the policy's run, the place in it (Policy.choose)
InFlight = tuple[Future[Built], Way, int]  # a batch being built, how, and its data bytes


class DeltaStream:
    """A delta's stream for :meth:`~lvmirror.client.ReceiverClient.send_delta`, generated on the fly.

    ``size`` is known in advance for a version-1 stream only; ``total`` is
    the uncompressed stream's size, what :attr:`progress` (if set) is told
    of, a record's worth at a time.
    """

    def __init__(self, delta: Delta, policy: Policy | None = None, workers: int | None = None):
        self.delta = delta
        self.layout = files.stream_layout(delta)
        self.policy = policy or Policy.off()
        self.version = 2 if self.policy.compresses else 1
        self.size: int | None = self.layout.size if self.version == 1 else None
        self.total = self.layout.size
        self.workers = workers or min(4, max(2, os.cpu_count() or 2))
        self.progress: Callable[[int], None] | None = None
        self.counts: Counts | None = None  # of the last read_from, for what it reports
        self.started: int | None = None  # the stream offset the last read_from started at (0: whole)
        self.unchanged = 0  # data bytes left out as the base's own (while compressing, with a base)
        self._timing: tuple[Way, int, float] | None = None  # the batch on the line, and since when

    def header(self) -> dict[str, Any]:
        return json.loads(self.layout.header)

    # -- the stream

    def read_from(self, offset: int, resume: Resume | None = None) -> Iterator[bytes]:
        """The stream from byte ``offset``: 0, or where ``resume`` says the receiver holds it up to."""
        layout = self.layout
        if offset == 0:
            version = self.version
            prefix, seed = stream_prefix(layout.header, layout.target_size, version)
            counts = Counts(pos=sum(map(len, prefix)), nrec=2)
            start = 0
        else:
            if resume is None or resume.position != offset or resume.prev_end > layout.target_size:
                raise ValueError(f"cannot continue the stream at byte {offset} without the receiver's "
                                 "state there")
            version, seed = resume.version, crc32(layout.header)
            counts = Counts(resume.position, resume.nrec, resume.ndata, resume.nzero, resume.dbytes,
                            resume.zbytes)
            start = resume.prev_end
            prefix = []
        self.counts, self.started = counts, offset
        yield from prefix
        compressing = version >= 2 and self.policy.compresses
        with ThreadPoolExecutor(self.workers, thread_name_prefix="encode") as pool:
            pending: deque[InFlight] = deque()
            try:
                for batch in self._advised(self._batches(start)):
                    raw = _data_bytes(batch)
                    way = self.policy.choose(raw) if compressing else (False, 0, 0)
                    pending.append((pool.submit(self._build, batch, seed, way[0]), way, raw))
                    if len(pending) >= DEPTH:
                        yield from self._emit(pending.popleft(), counts)
                while pending:
                    yield from self._emit(pending.popleft(), counts)
                self._observe(time.monotonic())
            finally:
                for fut, _, _ in pending:
                    fut.cancel()
        yield end_record(counts.pos, counts.nrec, counts.ndata, counts.nzero, counts.dbytes, counts.zbytes,
                         seed)

    def _advised(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """``batches``, each one's data ranges advised to the target ADVISE_AHEAD bytes before it is read."""
        ahead: deque[Batch] = deque()
        advised = 0  # data bytes advised and not yet handed out
        for batch in batches:
            for off, n in _coalesced(batch):
                self.delta.advise(off, n)
            ahead.append(batch)
            advised += _data_bytes(batch)
            while advised >= ADVISE_AHEAD:
                out = ahead.popleft()
                advised -= _data_bytes(out)
                yield out
        yield from ahead

    def data_pieces(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(offset, length) of each read the stream makes of the target from ``start``, in stream order."""
        for batch in self._batches(start):
            for off, n, kind in batch:
                if kind != KIND_ZERO:
                    yield off, n

    def _batches(self, start: int) -> Iterator[Batch]:
        """The ranges from target offset ``start`` on, as records (1 MiB pieces), grouped up to 1 MiB."""
        layout = self.layout
        offsets, lengths, kinds = layout.offsets, layout.lengths, layout.kinds
        i = max(0, bisect_right(offsets, start) - 1)
        batch: Batch = []
        room = BATCH_BYTES
        for j in range(i, layout.count):
            off, ln, kind = int(offsets[j]), int(lengths[j]), int(kinds[j])
            end = off + ln
            if end <= start:
                continue
            if kind == KIND_ZERO:
                batch.append((max(off, start), end - max(off, start), kind))
                if len(batch) >= BATCH_RECORDS:
                    yield batch
                    batch, room = [], BATCH_BYTES
                continue
            # Pieces at 1 MiB from the range's start, as StreamLayout cuts them, from the first not held
            # (a resume point inside a piece is never given by lvmirror's receiver; the format allows it).
            p = max(off, start)
            k = (p - off) // MAX_DATA
            while p < end:
                n = min(off + (k + 1) * MAX_DATA, end) - p
                if batch and (n > room or len(batch) >= BATCH_RECORDS):
                    yield batch
                    batch, room = [], BATCH_BYTES
                batch.append((p, n, kind))
                room -= n
                p, k = p + n, k + 1
        if batch:
            yield batch

    def _build(self, batch: Batch, seed: int, compress: bool) -> Built:
        """A batch's records (runs in a worker thread).

        While compressing (the link is the bottleneck) and the base can be read, only the 4 KiB
        blocks that differ from the base are sent: a local read saves link time (lvdeltafs.exact).
        """
        out: Records = []
        skipped = 0
        read, base = self.delta.read, self.delta.base if compress else None
        for off, n, kind in batch:
            if kind == KIND_ZERO:
                out.append((T_ZERO, off, n, [record_head(T_ZERO, 0, off, n, 0, seed)]))
                continue
            data = _read(read, off, n, "target")
            runs = [(0, n)]
            if base is not None and off + n <= base.size:
                runs = changed_runs(data, _read(base.pread, off, n, "base"))
                skipped += n - sum(ln for _, ln in runs)
            for rel, ln in runs:
                piece = data if ln == n else data[rel:rel + ln]
                out.append(_data_record(off + rel, piece, seed, self.policy.codec if compress else None))
        return out, skipped

    def _emit(self, item: InFlight, counts: Counts) -> Iterator[bytes]:
        fut, way, raw = item
        began = time.monotonic()
        self._observe(began)
        records, skipped = fut.result()
        self.unchanged += skipped
        if self.progress and skipped:
            self.progress(skipped)
        for rtype, _off, n, blocks in records:
            size = sum(map(len, blocks))
            counts.pos += size
            counts.nrec += 1
            if rtype == T_ZERO:
                counts.nzero += 1
                counts.zbytes += n
                shown = HEAD_SIZE
            else:
                counts.ndata += 1
                counts.dbytes += n
                counts.raw_data += n
                counts.wire_data += size - HEAD_SIZE
                shown = HEAD_SIZE + n
            yield from blocks
            if self.progress:
                self.progress(shown)
        self._timing = (way, raw, began)

    def _observe(self, now: float) -> None:
        """Tell the policy how long the batch before held the line: from when it was waited for until
        the next one was (its last block's write included), so waiting for workers and for the link
        both count."""
        if self._timing is not None:
            (compressed, run, place), raw, began = self._timing
            self.policy.observe(compressed, run, place, raw, now - began)
        self._timing = None


def _read(read: Callable[[int, int], bytes], off: int, n: int, side: str) -> bytes:
    data = read(off, n)
    if len(data) != n:
        raise OSError(5, f"short read of the {side} at {off}: {len(data)} of {n} bytes")
    return data


def _data_record(off: int, data: bytes, seed: int, codec: int | None) -> tuple[int, int, int, list[bytes]]:
    """A DATA record, or a COMPRESSED one by ``codec`` when one is given and the bytes shrink."""
    n = len(data)
    payload = codecs.compress(data, codec) if codec else None
    if payload is None:
        return T_DATA, off, n, [record_head(T_DATA, n, off, n, crc32(data), seed), data]
    return T_COMPRESSED, off, n, [record_head(T_COMPRESSED, len(payload), off, n, crc32(payload), seed),
                                  payload]


def changed_runs(data: bytes, base: bytes) -> list[tuple[int, int]]:
    """(offset, length) within ``data`` of the runs of 4 KiB blocks whose bytes differ from ``base``."""
    n = len(data)
    full = n // BLOCK
    words = full * BLOCK // 8
    differ = (np.frombuffer(data, np.uint64, words).reshape(full, BLOCK // 8)
              != np.frombuffer(base, np.uint64, words).reshape(full, BLOCK // 8)).any(axis=1)
    if n % BLOCK:
        differ = np.append(differ, data[full * BLOCK:] != base[full * BLOCK:])
    edges = np.flatnonzero(np.diff(np.concatenate(([0], differ.view(np.int8), [0]))))
    return [(int(s) * BLOCK, min(int(e) * BLOCK, n) - int(s) * BLOCK) for s, e in zip(edges[::2], edges[1::2],
                                                                                       strict=True)]


def _coalesced(batch: Batch) -> Iterator[tuple[int, int]]:
    """The batch's data ranges, adjacent ones joined (one hint for a range cut into 1 MiB records)."""
    start = end = -1
    for off, n, kind in batch:
        if kind == KIND_ZERO:
            continue
        if off != end:
            if end > start >= 0:
                yield start, end - start
            start = off
        end = off + n
    if end > start >= 0:
        yield start, end - start


def _data_bytes(batch: Batch) -> int:
    return sum(n for _, n, kind in batch if kind != KIND_ZERO)
