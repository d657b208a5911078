"""A second encoder of the `delta` stream, for tests and benchmarks only.

:class:`lvdeltafs.formats.stream.StreamLayout` is the encoder the project
ships; this one is written the obvious way, one pass over the pieces, so the
two can be checked against each other byte for byte, and tests can build
streams (also for other identities) without a Delta.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from lvdeltafs.formats.stream import (
    END_SIZE,
    HEAD_SIZE,
    KIND_ZERO,
    MAX_DATA,
    T_DATA,
    T_ZERO,
    ReadFn,
    _read_piece,
    canonical,
    data_records,
    encode_header,
    end_record,
    record_head,
    stream_prefix,
)

__all__ = ["write_stream"]


def write_stream(identity: dict[str, Any], target_size: int, pieces: Iterable[tuple[int, int, int]],
                 read: ReadFn, *, delta_id: str | None = None, start: int = 0) -> Iterator[bytes]:
    """Generate the stream as bytes blocks, starting at stream byte ``start``.

    ``start`` must be a record boundary (0, or a ``Record.end`` a reader
    reported); records before it are counted for END but never read.
    Needs no random access to ``pieces``, only one pass.
    """
    header = encode_header(identity, target_size, delta_id)
    prefix, seed = stream_prefix(header, target_size)
    pos = 0
    for blk in prefix:
        if pos >= start:
            yield blk
        elif pos + len(blk) > start:
            raise ValueError(f"stream offset {start} is not a record boundary")
        pos += len(blk)
    ndata = nzero = dbytes = zbytes = 0
    crc32, head, rp = zlib.crc32, record_head, _read_piece
    for off, ln, kind in canonical(pieces):
        if off + ln > target_size:
            raise ValueError(f"range {off}+{ln} is past the target size {target_size}")
        if kind == KIND_ZERO:
            if pos >= start:
                yield head(T_ZERO, 0, off, ln, 0, seed)
            elif pos + HEAD_SIZE > start:
                raise ValueError(f"stream offset {start} is not a record boundary")
            pos += HEAD_SIZE
            nzero += 1
            zbytes += ln
            continue
        end = off + ln
        for p in range(off, end, MAX_DATA):
            n = min(MAX_DATA, end - p)
            if pos >= start:
                data = rp(read, p, n)
                yield head(T_DATA, n, p, n, crc32(data), seed)
                yield data
            elif pos + HEAD_SIZE + n > start:
                raise ValueError(f"stream offset {start} is not a record boundary")
            pos += HEAD_SIZE + n
        ndata += data_records(ln)
        dbytes += ln
    if start > pos:
        if start == pos + END_SIZE:
            return  # the receiver already has everything
        raise ValueError(f"stream offset {start} is not a record boundary")
    yield end_record(pos, 2 + ndata + nzero, ndata, nzero, dbytes, zbytes, seed)
