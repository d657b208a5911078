"""Write a synthetic classic-snapshot exception store, laid out as the kernel does.

For tests and benchmarks only (it ships in no package): the same bytes
dm-snap-persistent.c would leave on the COW device after the given origin
chunks were first written, in that order.  The kernel hands out data chunks from 2 up, skipping each
metadata area, and commits records to area after area; the area after the
last full one is zeroed, which is what ends the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lvdeltafs.sources.cow import HEADER, RECORD_BYTES, SECTOR, SNAP_MAGIC, area_chunk

# Areas per write batch: bounds memory for tables of tens of millions of records.
_WRITE_BATCH_AREAS = 1024


def kernel_new_chunks(count: int, chunk_size_bytes: int) -> np.ndarray:
    """The COW chunk the kernel gives the i-th exception: next_free from 2, skipping metadata."""
    epa = chunk_size_bytes // RECORD_BYTES
    i = np.arange(count, dtype=np.uint64)
    return i + np.uint64(2) + i // np.uint64(epa)


def write_cow_image(path: str | os.PathLike, chunk_size_bytes: int,
                    old_chunks: Sequence[int] | np.ndarray, *, valid: int = 1,
                    data: bytes | None = None, magic: int = SNAP_MAGIC, version: int = 1,
                    header_chunk_sectors: int | None = None,
                    new_chunks: Sequence[int] | np.ndarray | None = None,
                    device_size: int | None = None) -> int:
    """Write a COW store holding ``old_chunks`` (in commit order); return its size in bytes.

    ``data``, if given, is ``len(old_chunks) * chunk_size_bytes`` bytes: the
    saved origin data, written to each record's data chunk.  ``magic``,
    ``version``, ``header_chunk_sectors`` and ``new_chunks`` exist to craft
    damaged stores; ``device_size`` defaults to just large enough for the
    data and the area holding the terminator.
    """
    epa = chunk_size_bytes // RECORD_BYTES
    old = np.asarray(old_chunks, dtype=np.uint64).ravel()
    n = old.size
    new = kernel_new_chunks(n, chunk_size_bytes) if new_chunks is None \
        else np.asarray(new_chunks, dtype=np.uint64).ravel()
    if new.size != n:
        raise ValueError("new_chunks and old_chunks differ in length")
    if data is not None and len(data) != n * chunk_size_bytes:
        raise ValueError("data must be len(old_chunks) * chunk_size_bytes bytes")
    if device_size is None:
        # The area with the terminator (area n // E, zeroed) must exist on the device.
        chunks = area_chunk(n // epa, epa) + 1
        if n:
            chunks = max(chunks, int(new.max()) + 1)
        device_size = chunks * chunk_size_bytes
    sectors = chunk_size_bytes // SECTOR if header_chunk_sectors is None else header_chunk_sectors

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        # A sparse file reads as zeros: the header chunk's tail, unused areas, holes.
        os.ftruncate(fd, device_size)
        os.pwrite(fd, HEADER.pack(magic, valid, version, sectors), 0)
        _write_areas(fd, old, new, chunk_size_bytes, device_size)
        if data is not None:
            view = memoryview(data)
            for i, chunk in enumerate(new.tolist()):
                os.pwrite(fd, view[i * chunk_size_bytes:(i + 1) * chunk_size_bytes], chunk * chunk_size_bytes)
    finally:
        os.close(fd)
    return device_size


def _write_areas(fd: int, old: np.ndarray, new: np.ndarray, chunk_size: int, device_size: int) -> None:
    epa = chunk_size // RECORD_BYTES
    n = old.size
    areas = -(-n // epa)
    for first in range(0, areas, _WRITE_BATCH_AREAS):
        count = min(_WRITE_BATCH_AREAS, areas - first)
        lo, hi = first * epa, min(n, (first + count) * epa)
        recs = np.zeros((count * epa, 2), dtype="<u8")
        recs[:hi - lo, 0] = old[lo:hi]
        recs[:hi - lo, 1] = new[lo:hi]
        raw = memoryview(recs).cast("B")
        for a in range(count):
            offset = area_chunk(first + a, epa) * chunk_size
            if offset + chunk_size > device_size:
                raise ValueError(f"metadata area {first + a} lies past the device size {device_size}")
            os.pwrite(fd, raw[a * chunk_size:(a + 1) * chunk_size], offset)
