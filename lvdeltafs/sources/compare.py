"""The delta between two images or block devices, found by reading both: no LVM needed.

Used for plain image files, as lvmirror's fallback resync when no usable base
snapshot exists, and by ``lvmirror check``.  Changes are found at the
granularity of fixed blocks (1 MiB by default): block ``i`` covers bytes
``[i*B, (i+1)*B)`` clipped to each side's size, and it differs when the bytes
the two sides hold there differ, lengths included.  So a partial last block
differs whenever the sizes put it at different lengths, which keeps the direct
comparison and the digest comparison in exact agreement.

The remote side of ``check`` computes the same digests with the Python
standard library only, so :func:`digest_block` is nothing but hashlib:
SHA-256 truncated to 16 bytes.  SHA-256 was measured faster than BLAKE2b
wherever the CPU has SHA extensions (about 1.8 GB/s against 1.0 GB/s per core
here, and every current x86 and arm64 server has them), and 128 bits is ample
for telling blocks of one volume apart.  hashlib and ``os.preadv`` both release
the GIL on large buffers, so a few threads overlap reading with hashing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lvdeltafs.errors import BadInput
from lvdeltafs.extents import DATA, ZERO, Extents

DEFAULT_BLOCK_SIZE = 1 << 20
DIGEST_SIZE = 16
# One row per block: the digest as two little-endian u64 (cheap to compare in
# numpy) and whether the block is all zeros.
DIGEST_DTYPE = np.dtype([("digest", "<u8", (2,)), ("zero", "?")])
# Two cores: one thread hashing while another waits on the disk, and a spare
# so a slow read never idles the CPU.
DEFAULT_WORKERS = min(4, (os.cpu_count() or 1) + 1)

Progress = Callable[[int], None]


def digest_block(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one block: the first 16 bytes of its SHA-256 (the receiver uses the same)."""
    return hashlib.sha256(data).digest()[:DIGEST_SIZE]


@functools.lru_cache(maxsize=8)
def _zero_digest(length: int) -> bytes:
    return digest_block(bytes(length))


def block_count(size: int, block_size: int, start: int = 0) -> int:
    """How many blocks cover ``[start, size)``."""
    return max(0, -(-(size - start) // block_size))


def _check_geometry(block_size: int, size: int, start: int) -> None:
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if start < 0 or start % block_size:
        # Unaligned starts would give block indices that mean different bytes on each side.
        raise ValueError(f"start {start} is not a multiple of the block size {block_size}")
    if size < 0:
        raise ValueError("size must not be negative")


def digests_from_bytes(raw: bytes, block_size: int, size: int, start: int = 0) -> np.ndarray:
    """The digest array for concatenated 16-byte digests of the blocks of ``[start, size)``.

    This is how digests computed elsewhere (the stdlib-only receiver) come in.
    A block is flagged zero when its digest is that of zeros of its length, so
    both sides decide "all zero" by the same rule.
    """
    _check_geometry(block_size, size, start)
    n = block_count(size, block_size, start)
    if len(raw) != n * DIGEST_SIZE:
        raise BadInput(f"expected {n} block digests ({n * DIGEST_SIZE} bytes) for {size - start} bytes "
                       f"in {block_size}-byte blocks, got {len(raw)} bytes")
    out = np.zeros(n, DIGEST_DTYPE)
    if n == 0:
        return out
    out["digest"] = np.frombuffer(raw, "<u8").reshape(n, 2)
    full = np.frombuffer(_zero_digest(block_size), "<u8")
    out["zero"] = (out["digest"] == full).all(axis=1)
    last_len = size - (start + (n - 1) * block_size)
    if last_len != block_size:
        out["zero"][-1] = raw[-DIGEST_SIZE:] == _zero_digest(last_len)
    return out


def _file_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``offset``; a short file is an error, not zeros."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(5, f"short read of {path} at offset {offset + done}: the file or device "
                             "ended early (did it shrink or go away while being read?)")
        done += got


def _run_blocks(count: int, make_task: Callable[[], Callable[[int], None]], workers: int) -> None:
    """Run a task on every block index in ``range(count)`` on a few threads.

    Each thread makes its own task (so it owns its buffers) and claims the next
    index from a shared counter: reads stay roughly sequential on the device,
    and a slow block never holds up the others.  The first error stops all.
    """
    if count == 0:
        return
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(count))

    def loop() -> None:
        task = make_task()
        while not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                task(i)
            except BaseException:
                stop.set()  # the other threads finish their current block and give up
                raise

    with ThreadPoolExecutor(max(1, min(workers, count)), thread_name_prefix="blocks") as pool:
        futures = [pool.submit(loop) for _ in range(max(1, min(workers, count)))]
        try:
            for f in futures:
                f.result()
        finally:
            stop.set()


def block_digests(path: str, block_size: int = DEFAULT_BLOCK_SIZE, size: int | None = None, *,
                  start: int = 0, workers: int = DEFAULT_WORKERS,
                  progress: Progress | None = None) -> np.ndarray:
    """Digests of the blocks of ``[start, size)`` of a file or block device.

    ``size`` defaults to the whole file or device; ``start`` must be a multiple
    of ``block_size``.  Returns an array of :data:`DIGEST_DTYPE`, one row per
    block.  ``progress`` is called from worker threads with each block's byte count.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if size is None:
            size = _file_size(fd)
        _check_geometry(block_size, size, start)
        n = block_count(size, block_size, start)
        raw = bytearray(n * DIGEST_SIZE)

        def make_task() -> Callable[[int], None]:
            buf = memoryview(bytearray(block_size))

            def task(i: int) -> None:
                offset = start + i * block_size
                view = buf[:min(block_size, size - offset)]
                _read_exact(fd, view, offset, path)
                raw[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = digest_block(view)
                if progress:
                    progress(len(view))
            return task

        _run_blocks(n, make_task, workers)
    finally:
        os.close(fd)
    return digests_from_bytes(bytes(raw), block_size, size, start)


def _status_to_extents(status: np.ndarray, block_size: int, size: int, start: int) -> Extents:
    """Per-block status (0 same, DATA+1, ZERO+1) to extents clipped to ``size``."""
    first = start // block_size
    data = Extents.from_chunks(np.flatnonzero(status == DATA + 1) + first, block_size, size, DATA)
    zero = Extents.from_chunks(np.flatnonzero(status == ZERO + 1) + first, block_size, size, ZERO)
    return data.union(zero)


def diff_digests(base_digests: np.ndarray, target_digests: np.ndarray, block_size: int,
                 base_size: int, target_size: int, *, start: int = 0) -> Extents:
    """What to write over the base to make it the target, from the two sides' block digests.

    Both arrays must cover ``[start, their size)`` in ``block_size`` blocks.
    Differing blocks the target holds as all zeros become ZERO extents, the
    others DATA; target blocks past the base's end (a grown target) always
    differ; a shrunk target's extents stop at ``target_size``.
    """
    for name, arr, sz in (("base", base_digests, base_size), ("target", target_digests, target_size)):
        _check_geometry(block_size, sz, start)
        if arr.dtype != DIGEST_DTYPE or len(arr) != block_count(sz, block_size, start):
            raise BadInput(f"{name} digests do not cover {sz - start} bytes in {block_size}-byte blocks "
                           f"({len(arr)} rows of {arr.dtype})")
    nt = len(target_digests)
    common = min(len(base_digests), nt)
    differ = np.ones(nt, bool)
    differ[:common] = (base_digests["digest"][:common] != target_digests["digest"][:common]).any(axis=1)
    status = np.where(differ, np.where(target_digests["zero"], ZERO + 1, DATA + 1), 0)
    return _status_to_extents(status, block_size, target_size, start)


def compare_extents(base_path: str, target_path: str, block_size: int = DEFAULT_BLOCK_SIZE, *,
                    base_size: int | None = None, target_size: int | None = None,
                    workers: int = DEFAULT_WORKERS, progress: Progress | None = None) -> Extents:
    """What to write over the base to make it the target, by reading both sides locally.

    Gives exactly what :func:`diff_digests` gives for the two sides' digests,
    but compares the bytes themselves.  Sizes default to each side's whole
    file or device; the caller records the target's size.  ``progress`` gets
    the target bytes of each block compared.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    bfd = os.open(base_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tfd = os.open(target_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            bsize = _file_size(bfd) if base_size is None else base_size
            tsize = _file_size(tfd) if target_size is None else target_size
            status = np.zeros(block_count(tsize, block_size), np.uint8)

            def make_task() -> Callable[[int], None]:
                tbuf, bbuf = bytearray(block_size), bytearray(block_size)
                tview, bview = memoryview(tbuf), memoryview(bbuf)

                def task(i: int) -> None:
                    offset = i * block_size
                    lt = min(block_size, tsize - offset)
                    lb = max(0, min(block_size, bsize - offset))
                    _read_exact(tfd, tview[:lt], offset, target_path)
                    _read_exact(bfd, bview[:lb], offset, base_path)
                    if lt == lb == block_size:
                        same = tbuf == bbuf  # memcmp; slicing would copy a MiB
                    else:
                        same = lt == lb and tview[:lt].tobytes() == bview[:lb].tobytes()
                    if not same:
                        zero = not np.frombuffer(tbuf, np.uint8, count=lt).any()
                        status[i] = (ZERO if zero else DATA) + 1
                    if progress:
                        progress(lt)
                return task

            _run_blocks(len(status), make_task, workers)
        finally:
            os.close(tfd)
    finally:
        os.close(bfd)
    return _status_to_extents(status, block_size, tsize, 0)
