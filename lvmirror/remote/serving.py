"""Serving a destination's bytes, now or at a kept point, for `lvmirror restore`.  Stdlib only.

The far side of a restore is the mirror: it answers with the digests of a
point's blocks, the ranges where the point differs from the mirror (the
union of the undo deltas back to it), and the bytes of ranges asked for.
Every request is bounded before anything is read or allocated.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

from lvdeltafs.fsio import pread_into
from lvmirror.remote import history
from lvmirror.remote.state import Files
from lvmirror.remote.wire import ProtocolError, RefusedError, int_field

MAX_READ_RANGES = 4096
MAX_READ_BYTES = 64 << 20  # per request: the sender asks again for more
FRAME = 1 << 20
PAIR = struct.Struct("<QQ")


class PointSource:
    """The destination's content now (``generation`` None) or at a kept point: size and reads."""

    def __init__(self, files: Files, state: dict[str, Any] | None, generation: int | None):
        self.files, self.fds = files, []
        self.composed = None
        if generation is None and not files.dest.exists():
            self.base_fd, self.size = -1, 0  # an image file not made yet: no bytes (a compare sends all)
            return
        self.base_fd = files.dest.open_read()
        try:
            if generation is None:
                self.size = os.lseek(self.base_fd, 0, os.SEEK_END)
            else:
                if not state or not state.get("snapshot"):
                    raise RefusedError(f"{files.dest.path} holds nothing lvmirror knows of, so it keeps no "
                                       "points")
                entries = history.rewind_layers(files, state, generation)
                self.composed, self.fds = history.compose(files, self.base_fd, entries)
                self.size = self.composed.size
        except BaseException:
            self.close()
            raise

    def read(self, offset: int, length: int) -> bytes:
        if self.composed is not None:
            return self.composed.read(offset, length)
        n = max(0, min(length, self.size - offset))
        buf = bytearray(n)
        if n:
            pread_into(self.base_fd, memoryview(buf), offset)
        return bytes(buf)

    def changed(self) -> list[tuple[int, int, int]]:
        """Where the point may differ from the destination as it is now (nothing, for the present)."""
        return self.composed.changed() if self.composed is not None else []

    def close(self) -> None:
        for fd in self.fds + ([self.base_fd] if self.base_fd >= 0 else []):
            os.close(fd)
        self.fds, self.base_fd = [], -1

    def __enter__(self) -> PointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def point_of(req: dict[str, Any]) -> int | None:
    return None if req.get("point") is None else int_field(req, "point")


def changed_frames(source: PointSource) -> Iterator[Any]:
    """(count of ranges), then frames of (offset, length) pairs: what a restore must at least send."""
    pairs = [(off, ln) for off, ln, _kind in source.changed()]
    yield len(pairs)
    for i in range(0, len(pairs), FRAME // PAIR.size):
        yield b"".join(PAIR.pack(o, n) for o, n in pairs[i:i + FRAME // PAIR.size])


def read_ranges(req: dict[str, Any], size: int) -> list[tuple[int, int]]:
    """The ranges of a read request, each within the source, in order, bounded in number and bytes."""
    raw = req.get("ranges")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_READ_RANGES:
        raise ProtocolError(f"read: ranges must be a list of 1 to {MAX_READ_RANGES} [offset, length] pairs")
    out, total, prev_end = [], 0, 0
    for pair in raw:
        if not isinstance(pair, list) or len(pair) != 2 or any(type(v) is not int for v in pair):
            raise ProtocolError("read: each range must be [offset, length] (two integers)")
        off, ln = pair
        if off < prev_end or ln <= 0 or off + ln > size:
            raise ProtocolError(f"read: range {off}+{ln} is out of order, empty or past the end ({size})")
        total += ln
        prev_end = off + ln
        out.append((off, ln))
    if total > MAX_READ_BYTES:
        raise ProtocolError(f"read: at most {MAX_READ_BYTES} bytes per request, not {total}")
    return out


def read_frames(source: PointSource, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
    for off, ln in ranges:
        for p in range(off, off + ln, FRAME):
            yield source.read(p, min(FRAME, off + ln - p))
