"""Earlier points of a mirror, composed from the mirror and its undo deltas.  Stdlib only.

An undo delta (docs/history.md) is a version-1 stream file.  Once a whole
file has been verified by the stream reader, its DATA records' bytes are
read straight from the file with pread: the mount reads a point at the
speed of the files under it, and nothing is held in memory but the index.

The composed point is the *base* (the mirror as it is now) with a list of
*layers* (undo deltas, the point's own first, then each newer one) laid over
it, the earliest layer winning: each byte comes from the first layer whose
ranges cover it, else from the base; past the base's end, zeros.

Invariants of :class:`Composed`: ``segments`` is sorted by offset, disjoint,
and lies within ``[0, size)``; each segment is (offset, length, kind, layer,
file offset of its bytes in that layer's file; 0 for zero ranges).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

from lvdeltafs.formats import reader as _reader
from lvdeltafs.formats.stream import HEAD_SIZE, KIND_DATA, KIND_ZERO, StreamError, corrupt
from lvdeltafs.fsio import pread_into

Segment = tuple[int, int, int, int, int]  # offset, length, kind, layer, file offset


class UndoIndex:
    """One verified undo delta: its header, the size it restores and its ranges with their file offsets."""

    def __init__(self, header: dict[str, Any], target_size: int, ranges: list[tuple[int, int, int, int]],
                 data_bytes: int):
        self.header, self.target_size, self.ranges, self.data_bytes = header, target_size, ranges, data_bytes


def index_undo(fd: int) -> UndoIndex:
    """Read and verify a whole undo delta from ``fd``; StreamError if it is damaged or compressed."""
    ranges: list[tuple[int, int, int, int]] = []
    header: dict[str, Any] = {}
    target_size = data_bytes = 0
    with os.fdopen(os.dup(fd), "rb", buffering=1 << 20) as f:
        f.seek(0)
        for rec in _reader.iter_records(f):
            if rec.type == "header":
                header = rec.header or {}
            elif rec.type == "size":
                target_size = rec.offset
            elif rec.type == "data":
                if rec.end - rec.start != HEAD_SIZE + rec.length:
                    raise corrupt(rec.start, "an undo delta holds its bytes raw; this record is compressed")
                _extend(ranges, rec.offset, rec.length, KIND_DATA, rec.start + HEAD_SIZE)
                data_bytes += rec.length
            elif rec.type == "zero":
                _extend(ranges, rec.offset, rec.length, KIND_ZERO, 0)
    return UndoIndex(header, target_size, ranges, data_bytes)


def _extend(ranges: list[tuple[int, int, int, int]], off: int, ln: int, kind: int, src: int) -> None:
    # Touching zero ranges become one entry; DATA stays one entry per record (heads lie between their bytes).
    if kind == KIND_ZERO and ranges:
        p_off, p_ln, p_kind, _ = ranges[-1]
        if p_kind == KIND_ZERO and p_off + p_ln == off:
            ranges[-1] = (p_off, p_ln + ln, KIND_ZERO, 0)
            return
    ranges.append((off, ln, kind, src))


def overlay(layers: list[list[tuple[int, int, int, int]]], size: int) -> list[Segment]:
    """The segments of the composition: each layer's ranges minus what earlier layers cover, within size."""
    covered: list[tuple[int, int]] = []  # merged, sorted
    out: list[Segment] = []
    for layer, ranges in enumerate(layers):
        fresh: list[Segment] = []
        for off, ln, kind, src in ranges:
            end = min(off + ln, size)
            for a, b in _uncovered(covered, off, end):
                fresh.append((a, b - a, kind, layer, src + (a - off) if kind == KIND_DATA else 0))
        out.extend(fresh)
        covered = _merge(covered, [(s[0], s[0] + s[1]) for s in fresh])
    out.sort()
    return out


def _uncovered(covered: list[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    i = max(bisect_right(covered, (start, start)) - 1, 0)
    pos = start
    while pos < end and i < len(covered):
        a, b = covered[i]
        if b <= pos:
            i += 1
            continue
        if a >= end:
            break
        if a > pos:
            yield pos, a
        pos = max(pos, b)
        i += 1
    if pos < end:
        yield pos, end


def _merge(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class Composed:
    """A point's bytes: reads of the base and the layers' files, as the segments say."""

    def __init__(self, base_fd: int, base_size: int, layer_fds: list[int], segments: list[Segment],
                 size: int):
        self.base_fd, self.base_size, self.layer_fds = base_fd, base_size, layer_fds
        self.segments, self.size = segments, size
        self._starts = [s[0] for s in segments]

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end), as a file read gives."""
        end = min(offset + n, self.size)
        if offset >= end:
            return b""
        buf = bytearray(end - offset)
        view = memoryview(buf)
        pos = offset
        i = max(bisect_right(self._starts, offset) - 1, 0)
        while pos < end:
            seg = self.segments[i] if i < len(self.segments) else None
            if seg is not None and seg[0] + seg[1] <= pos:
                i += 1
                continue
            if seg is None or seg[0] > pos:  # a gap: the base's bytes
                stop = end if seg is None else min(end, seg[0])
                self._read_base(view[pos - offset:stop - offset], pos)
                pos = stop
                continue
            stop = min(end, seg[0] + seg[1])
            if seg[2] == KIND_DATA:
                pread_into(self.layer_fds[seg[3]], view[pos - offset:stop - offset], seg[4] + pos - seg[0])
            pos = stop  # zero ranges: the buffer is zeros already
            i += 1
        return bytes(buf)

    def _read_base(self, view: memoryview, pos: int) -> None:
        n = max(0, min(len(view), self.base_size - pos))
        if n:
            pread_into(self.base_fd, view[:n], pos)

    def changed(self) -> list[tuple[int, int, int]]:
        """(offset, length, kind) of every range where the point may differ from the base, in order."""
        out = [(off, ln, kind) for off, ln, kind, _layer, _src in self.segments]
        if self.size > self.base_size:
            # Past the base's end, bytes no layer covers are zeros; a squash must say so.
            covered = [(s[0], s[0] + s[1]) for s in self.segments]
            out += [(a, b - a, KIND_ZERO) for a, b in _uncovered(covered, self.base_size, self.size)]
            out.sort()
        return out


def check_chain(indexes: list[UndoIndex]) -> None:
    """Each layer must restore the snapshot the next (older) one applies to; StreamError otherwise."""
    for older, newer in zip(indexes, indexes[1:], strict=False):
        want = older.header.get("identity", {}).get("base")
        got = newer.header.get("identity", {}).get("target")
        if want != got:
            raise StreamError(f"the undo deltas do not form a chain: one leads back to {got}, but the "
                              f"next older one applies to {want}")
