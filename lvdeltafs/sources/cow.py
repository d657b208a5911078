"""The changed-chunk list of a classic LVM snapshot, read from its exception store.

The exception store (the snapshot's ``-cow`` device) is laid out by the
kernel's ``drivers/md/dm-snap-persistent.c``:

- chunk 0 is a header: magic, valid, version, chunk size in sectors (LE u32 each);
- metadata area ``a`` is chunk ``1 + a*(E+1)``, E = chunk_size / 16; it holds E
  records ``(old_chunk u64, new_chunk u64)``, and the E chunks after it hold
  the saved origin data;
- the table ends at the first record whose ``new_chunk`` is 0; an area whose E
  records are all set is full and the table goes on in the next area.

Tables run to tens of millions of records, so everything here works on numpy
arrays a batch of areas at a time: no Python object per record.

Speed and memory choices (the `ranges` of 10 M exceptions in ~20 bytes each):

- Origin chunk numbers are kept as uint32 whenever they fit (any origin under
  16 TiB in 4 KiB chunks): half the memory of uint64, and numpy sorts 32-bit
  keys 1.7x (AVX-512) to 4x (AVX2) faster than 64-bit ones.  ``old_chunks``
  still hands out uint64; ``cow_extents`` works on the compact keys.
- The per-batch copies are the only copy until the sort, which is in place;
  duplicates (never written by the kernel) cost a pass only when present.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from lvdeltafs.errors import BadInput, NotACowStore, SnapshotUnusable, UnsupportedFormat
from lvdeltafs.extents import DATA, Extents

SNAP_MAGIC = 0x70416E53
DISK_VERSION = 1
SECTOR = 512
RECORD_BYTES = 16
# LVM allows 4 KiB .. 512 KiB; anything else in a header means it is not a COW store.
MIN_CHUNK_SECTORS = 8
MAX_CHUNK_SECTORS = 1024
HEADER = struct.Struct("<IIII")
# The header is read before the chunk size is known; one page is aligned for
# O_DIRECT on every logical block size Linux supports and fits the smallest chunk.
HEADER_READ = 4096

# The first batch is small so a near-empty table costs one small read; batches
# then double, up to a bounded buffer, so a huge table needs few round trips.
FIRST_BATCH_AREAS = 8
MAX_BATCH_BYTES = 16 << 20
# Concurrent reads per batch: metadata areas are ~1 MiB apart (4 KiB chunks),
# so each is its own I/O; several in flight hide the device latency.
READ_THREADS = 16

_U64 = np.uint64
_U32_MAX = 2**32 - 1
_DUP_BLOCK = 1 << 16


@dataclass(frozen=True)
class CowHeader:
    """The four fields of chunk 0, as stored."""

    magic: int
    valid: int
    version: int
    chunk_sectors: int


@dataclass(frozen=True)
class CowTable:
    """What a snapshot's exception store says changed in its origin.

    ``chunk_size`` is in bytes (0 if the store was never initialised);
    ``chunks`` holds the origin chunk indices written since the snapshot was
    taken, sorted and unique, as uint32 when they all fit, else uint64 (see
    ``old_chunks`` for them as uint64); ``new_chunks`` is how many records the
    table holds (COW data chunks in use); ``areas`` how many metadata areas
    were read.
    """

    header: CowHeader
    chunk_size: int
    chunks: np.ndarray
    new_chunks: int
    areas: int
    device_size: int

    @property
    def old_chunks(self) -> np.ndarray:
        """The origin chunk indices written, sorted and unique, as uint64 (a copy if stored as uint32)."""
        return self.chunks.astype(_U64, copy=False)

    @property
    def exceptions_per_area(self) -> int:
        return self.chunk_size // RECORD_BYTES

    @property
    def initialised(self) -> bool:
        return self.header.magic == SNAP_MAGIC


# ---- header ----------------------------------------------------------------


def parse_header(buf: bytes | memoryview, *, name: str = "the snapshot") -> CowHeader:
    """Decode and check chunk 0; raise the named error for each state a tool must refuse."""
    if len(buf) < HEADER.size:
        raise NotACowStore(f"{name}: the exception store is only {len(buf)} bytes long; "
                           "it is not a classic snapshot's COW device")
    header = CowHeader(*HEADER.unpack_from(buf, 0))
    if header.magic == 0:
        return header  # never initialised: a valid, empty table
    if header.magic != SNAP_MAGIC:
        raise NotACowStore(f"{name}: bad magic 0x{header.magic:08x} in the exception store header "
                           f"(expected 0x{SNAP_MAGIC:08x}); this is not a classic snapshot's COW device "
                           "or it is corrupt: check the device path")
    if header.version != DISK_VERSION:
        raise UnsupportedFormat(f"{name}: exception store version {header.version} is not supported "
                                f"(only version {DISK_VERSION}); resync with a compare")
    if header.valid == 0:
        raise SnapshotUnusable(f"snapshot {name} was invalidated (its COW filled up or hit an I/O error); "
                               "its change list is incomplete: resync with a compare, and give the next "
                               "snapshot more space")
    if header.valid != 1:
        raise NotACowStore(f"{name}: exception store header has valid={header.valid} (expected 0 or 1); "
                           "it is corrupt: resync with a compare")
    cs = header.chunk_sectors
    if cs & (cs - 1) or not MIN_CHUNK_SECTORS <= cs <= MAX_CHUNK_SECTORS:
        raise NotACowStore(f"{name}: exception store header has chunk size {cs} sectors; LVM uses a power "
                           f"of two from {MIN_CHUNK_SECTORS} to {MAX_CHUNK_SECTORS}: the store is corrupt "
                           "or foreign: resync with a compare")
    return header


# ---- the walk over metadata areas, shared by the pure and the device reader ----

# Given the batch plan [(first_area, count), ...], yields for each batch in turn a
# uint64 array of shape (count, 2*E): the records of those areas.  The array may
# be reused once the next batch is asked for.
AreaSource = Callable[[list[tuple[int, int]]], Generator[np.ndarray, None, None]]


def area_chunk(area: int, exceptions_per_area: int) -> int:
    """The COW chunk holding metadata area ``area``."""
    return 1 + area * (exceptions_per_area + 1)


def _areas_on_device(device_size: int, chunk_size: int, epa: int) -> int:
    """How many metadata areas lie wholly inside the device (later ones cannot exist)."""
    device_chunks = device_size // chunk_size
    return max(0, (device_chunks - 1 + epa) // (epa + 1))


def _batches(total_areas: int, chunk_size: int) -> list[tuple[int, int]]:
    cap = max(1, MAX_BATCH_BYTES // chunk_size)
    plan = []
    first, count = 0, FIRST_BATCH_AREAS
    while first < total_areas:
        n = min(count, cap, total_areas - first)
        plan.append((first, n))
        first += n
        count *= 2
    return plan


def _check_records(new: np.ndarray, first_record: int, epa: int, device_chunks: int,
                   name: str) -> None:
    """Refuse records that cannot come from the kernel: the table would lie about what changed."""
    # A set top byte is out of range too, so one range test covers both.
    bad = new >= _U64(device_chunks)
    bad |= (new % _U64(epa + 1)) == _U64(1)
    if not bad.any():
        return
    i = int(bad.argmax())
    value = int(new[i])
    index = first_record + i
    where = f"{name}: exception record {index} (metadata area {index // epa}, slot {index % epa})"
    if value >> 56:
        why = f"has new_chunk 0x{value:016x} with its top byte set"
    elif value >= device_chunks:
        why = f"points at COW chunk {value}, past the end of the device ({device_chunks} chunks)"
    else:
        why = f"points at COW chunk {value}, which is a metadata area"
    raise NotACowStore(f"{where} {why}: the exception store is corrupt; resync with a compare")


def _check_origin(old: np.ndarray, first_record: int, origin_chunks: int, name: str) -> None:
    bad = old >= _U64(origin_chunks)
    if bad.any():
        i = int(bad.argmax())
        raise BadInput(f"{name}: exception record {first_record + i} names origin chunk {int(old[i])}, "
                       f"past the end of the origin ({origin_chunks} chunks): the store does not belong "
                       "to this origin or is corrupt; resync with a compare")


def _walk(source: AreaSource, header: CowHeader, device_size: int, name: str,
          origin_size: int | None) -> CowTable:
    chunk_size = header.chunk_sectors * SECTOR
    epa = chunk_size // RECORD_BYTES
    device_chunks = device_size // chunk_size
    origin_chunks = None if origin_size is None else -(-origin_size // chunk_size)
    parts: list[np.ndarray] = []
    records = areas = 0
    plan = _batches(_areas_on_device(device_size, chunk_size, epa), chunk_size)
    batches = source(plan)
    try:
        for (_, count), recs in zip(plan, batches, strict=False):
            flat = recs.reshape(-1)  # a view unless the areas are strided in place
            new = flat[1::2]
            # Records before the first new_chunk == 0 are the table; old_chunk 0 is a
            # real chunk, so only new_chunk can terminate it.
            ends = new == 0
            end = int(ends.argmax()) if ends.any() else new.size
            del ends
            _check_records(new[:end], records, epa, device_chunks, name)
            old = flat[0:2 * end:2]
            if origin_chunks is not None:
                _check_origin(old, records, origin_chunks, name)
            # A copy (the batch buffer is reused for the next batch), as uint32 when it fits.
            parts.append(old.astype(np.uint32) if end and int(old.max()) <= _U32_MAX else old.copy())
            records += end
            if end < new.size:
                areas += end // epa + 1  # up to the area holding the terminator
                break
            areas += count
    finally:
        batches.close()  # waits for reads still in flight before the buffer or fd goes
    return CowTable(header, chunk_size, _sorted_unique(parts), records, areas, device_size)


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    # uint32 if every part is (a uint64 part makes the whole uint64).
    old = np.concatenate(parts) if parts else np.empty(0, np.uint32)
    del parts[:]  # free the per-batch copies before sorting
    old.sort()  # in place: no second copy of a possibly huge array
    # Duplicates never come from the kernel (a corrupt or hand-made store): looked for block by
    # block, so the usual case allocates nothing the size of the table.
    for i in range(0, max(old.size - 1, 0), _DUP_BLOCK):
        blk = old[i:i + _DUP_BLOCK + 1]
        if (blk[1:] == blk[:-1]).any():
            keep = np.ones(old.size, dtype=bool)
            np.not_equal(old[1:], old[:-1], out=keep[1:])
            return old[keep]
    return old


def _empty_table(header: CowHeader, device_size: int) -> CowTable:
    return CowTable(header, header.chunk_sectors * SECTOR, np.empty(0, np.uint32), 0, 0, device_size)


# ---- from bytes ------------------------------------------------------------


def parse_exception_table(buf: bytes | bytearray | memoryview | np.ndarray, device_size: int, *,
                          name: str = "the snapshot", origin_size: int | None = None) -> CowTable:
    """Parse an exception store held in memory (``buf`` = the COW device from byte 0).

    ``device_size`` is the COW device's size; areas past it do not exist. With
    ``origin_size`` records naming chunks outside the origin are refused here,
    with their record index.
    """
    mv = memoryview(buf).cast("B")
    header = parse_header(mv[:HEADER.size], name=name)
    if header.magic == 0:
        return _empty_table(header, device_size)
    chunk_size = header.chunk_sectors * SECTOR
    whole = np.frombuffer(mv, dtype=np.uint8)

    def areas(plan: list[tuple[int, int]]) -> Generator[np.ndarray, None, None]:
        for first, count in plan:
            yield read_areas(first, count)

    def read_areas(first: int, count: int) -> np.ndarray:
        start = area_chunk(first, chunk_size // RECORD_BYTES) * chunk_size
        stride = (chunk_size // RECORD_BYTES + 1) * chunk_size
        stop = start + (count - 1) * stride + chunk_size
        if stop > len(whole):
            raise BadInput(f"{name}: the buffer holds {len(whole)} bytes of the exception store but its "
                           f"table goes on past them (to byte {stop}); pass the whole device")
        # A strided view: the areas in place, no copy of the buffer.
        view = whole[start:stop].view("<u8")
        return np.lib.stride_tricks.as_strided(view, shape=(count, chunk_size // 8),
                                               strides=(stride, 8), writeable=False)

    return _walk(areas, header, device_size, name, origin_size)


# ---- from a device ---------------------------------------------------------


class _CowDevice:
    """An open COW device read past the page cache."""

    def __init__(self, path: str):
        self.path = path
        self.direct = True
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._open_buffered()
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def _open_buffered(self) -> None:
        # O_DIRECT refused (tmpfs, some overlay and network filesystems): the
        # kernel writes the COW around the page cache, so drop any cached pages
        # first or a buffered read could return stale records.  Real COW block
        # devices always take O_DIRECT; this path is for image files.
        self.direct = False
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        got = os.preadv(self.fd, [buf], offset)
        if got != len(buf):
            raise NotACowStore(f"{self.path}: short read at byte {offset} ({got} of {len(buf)} bytes): "
                               "the exception store is truncated")

    def read_header(self) -> bytes:
        buf = _aligned(HEADER_READ)
        try:
            got = os.preadv(self.fd, [buf], 0)
        except OSError as exc:
            # Some filesystems accept O_DIRECT at open and refuse it at read.
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            os.close(self.fd)
            self._open_buffered()
            got = os.preadv(self.fd, [buf], 0)
        return bytes(buf[:got])

    def close(self) -> None:
        os.close(self.fd)


def _aligned(size: int) -> memoryview:
    """A page-aligned buffer (anonymous mmap), as O_DIRECT needs.

    Not closed explicitly: numpy views of it may outlive the call, and the
    mapping is unmapped when the last of them goes.
    """
    return memoryview(mmap.mmap(-1, size))


def read_exception_table(path: str, *, name: str | None = None,
                         origin_size: int | None = None) -> CowTable:
    """Read the exception table of the COW device (or image file) at ``path``.

    Only the header and the metadata areas the table occupies are read (plus
    the tail of the last batch), with O_DIRECT.
    """
    name = name or path
    dev = _CowDevice(path)
    try:
        header = parse_header(dev.read_header(), name=name)
        if header.magic == 0:
            return _empty_table(header, dev.size)
        chunk_size = header.chunk_sectors * SECTOR
        with ThreadPoolExecutor(READ_THREADS) as pool:
            source = _device_source(dev, chunk_size, pool)
            return _walk(source, header, dev.size, name, origin_size)
    finally:
        dev.close()


def _device_source(dev: _CowDevice, chunk_size: int, pool: ThreadPoolExecutor) -> AreaSource:
    """Read batches of areas with many reads in flight, one batch ahead of the parser.

    The device is IOPS bound (each area is its own small I/O, ~1 MiB apart),
    so reads go out from many threads, and the next batch is already being
    read while the current one is parsed.  Reading ahead wastes at most one
    batch past the end of the table.
    """
    epa = chunk_size // RECORD_BYTES
    cap = max(1, MAX_BATCH_BYTES // chunk_size)
    bufs = [_aligned(cap * chunk_size), _aligned(cap * chunk_size)]
    arrays = [np.frombuffer(b, dtype="<u8") for b in bufs]

    def read_span(buf: memoryview, first: int, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            offset = area_chunk(first + i, epa) * chunk_size
            dev.pread_into(buf[i * chunk_size:(i + 1) * chunk_size], offset)

    def submit(buf: memoryview, first: int, count: int) -> list[Future]:
        # One task per thread, each a contiguous run of areas: the Python
        # overhead per I/O stays one preadv call.
        step = -(-count // READ_THREADS)
        return [pool.submit(read_span, buf, first, lo, min(lo + step, count)) for lo in range(0, count, step)]

    def areas(plan: list[tuple[int, int]]) -> Generator[np.ndarray, None, None]:
        pending: list[list[Future]] = []
        try:
            if plan:
                pending.append(submit(bufs[0], *plan[0]))
            for k, (_, count) in enumerate(plan):
                # The consumer is done with batch k-1, whose buffer batch k+1 now takes.
                if k + 1 < len(plan):
                    pending.append(submit(bufs[(k + 1) % 2], *plan[k + 1]))
                for job in pending.pop(0):
                    job.result()
                yield arrays[k % 2][:count * chunk_size // 8].reshape(count, chunk_size // 8)
        finally:
            for jobs in pending:
                wait(jobs)

    return areas


# ---- to extents ------------------------------------------------------------


def cow_extents(table: CowTable, origin_size: int) -> Extents:
    """The origin byte ranges the table says were written: every one is DATA."""
    old = table.chunks
    if old.size == 0:
        return Extents.empty()
    if int(old[-1]) * table.chunk_size >= origin_size:
        # Chunk c starts past the origin when c * chunk_size >= origin_size, i.e. c >= this:
        first_beyond = -(-origin_size // table.chunk_size)
        beyond = old.size - int(np.searchsorted(old, old.dtype.type(first_beyond)))  # <= old[-1]: fits
        raise BadInput(f"the exception store names {beyond} chunk(s) past the end of the origin "
                       f"({origin_size} bytes), the highest being chunk {int(old[-1])} of "
                       f"{table.chunk_size} bytes: it does not belong to this origin or is corrupt; "
                       "resync with a compare")
    return Extents.from_chunks(old, table.chunk_size, origin_size, DATA)
