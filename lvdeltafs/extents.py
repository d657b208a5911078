"""Sorted, coalesced byte ranges of a volume, each either changed data or zeros.

A delta of a multi-TiB volume can have tens of millions of ranges, so they
live in three parallel numpy arrays (uint64 offsets and lengths, uint8 kinds)
and every constructor is vectorised: no Python object per extent.

Invariants of an :class:`Extents` (every constructor establishes them):
offsets ascending, every length > 0, ranges never overlap, and two ranges
that touch always differ in kind (adjacent same-kind ranges are coalesced).

Speed and memory choices: ``from_chunks`` takes uint32 chunk numbers as they
are and finds runs block by block, so its only full-size arrays are the
results (16 bytes a range; an all-DATA kinds array is calloc'd zero pages);
the `ranges` text is formatted by :mod:`lvdeltafs.rangetext`, in numpy
blocks, and written block by block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lvdeltafs import rangetext
from lvdeltafs.errors import BadInput

DATA = 0
ZERO = 1
KIND_NAMES = {DATA: "data", ZERO: "zero"}
_KIND_BY_NAME = {v: k for k, v in KIND_NAMES.items()}

_U64 = np.uint64
# Iterating in batches keeps tolist() conversions bounded for huge extent lists.
_ITER_BATCH = 65536


def _u64(a: Iterable[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != _U64:
        if arr.size and arr.dtype.kind in "if" and (arr < 0).any():
            raise ValueError("negative offset or length")
        arr = arr.astype(_U64)
    return arr.ravel()


class Extents:
    """Immutable list of (offset, length, kind) byte ranges; see the module doc for invariants."""

    __slots__ = ("offsets", "lengths", "kinds")

    def __init__(self, offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray):
        # Internal: callers outside this module use the from_* constructors,
        # which normalise; this one only freezes the arrays.
        self.offsets = np.ascontiguousarray(offsets, dtype=_U64)
        self.lengths = np.ascontiguousarray(lengths, dtype=_U64)
        self.kinds = np.ascontiguousarray(kinds, dtype=np.uint8)
        for a in (self.offsets, self.lengths, self.kinds):
            a.flags.writeable = False

    # ---- constructors -------------------------------------------------

    @classmethod
    def empty(cls) -> Extents:
        return cls(np.empty(0, _U64), np.empty(0, _U64), np.empty(0, np.uint8))

    @classmethod
    def from_chunks(cls, chunk_indices: np.ndarray, chunk_size: int, size: int, kind: int = DATA) -> Extents:
        """Ranges covering the given chunks: sorted, deduplicated, runs coalesced, clipped to ``size``.

        uint32 and uint64 indices are used as they are (no uint64 copy of a uint32 array).
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        idx = np.asarray(chunk_indices).ravel()
        if idx.dtype not in (np.uint32, _U64):
            idx = _u64(idx)
        # Sources usually hand chunks over in order; checking is far cheaper than sorting.
        # (np.unique is avoided: numpy 2.x hashes, which is ~100x slower than sort here.)
        if idx.size > 1 and not _strictly_ascending(idx):
            idx = np.sort(idx)
            dup = np.zeros(idx.size, dtype=bool)
            np.equal(idx[1:], idx[:-1], out=dup[1:])
            if dup.any():
                idx = idx[~dup]
        # Chunks starting at or past the end of the volume are not part of it.
        nchunks = -(-size // chunk_size)
        if idx.size and int(idx[-1]) >= nchunks:
            idx = idx[: np.searchsorted(idx, idx.dtype.type(nchunks))]  # nchunks <= idx[-1]: it fits
        if idx.size == 0:
            return cls.empty()
        offsets, lengths = _runs(idx)
        cs = _U64(chunk_size)
        offsets *= cs
        lengths *= cs
        # The last chunk may reach past a volume size that is not a multiple of the chunk.
        end = int(offsets[-1]) + int(lengths[-1])
        if end > size:
            lengths[-1] -= _U64(end - size)
        # np.zeros is calloc'd: an all-DATA kinds array stays unbacked zero pages (no resident memory).
        kinds = np.zeros(offsets.size, np.uint8) if kind == 0 else np.full(offsets.size, kind, np.uint8)
        return cls(offsets, lengths, kinds)

    @classmethod
    def from_ranges(
        cls,
        offsets: Iterable[int] | np.ndarray,
        lengths: Iterable[int] | np.ndarray,
        kinds: Iterable[int] | np.ndarray | int = DATA,
        size: int | None = None,
    ) -> Extents:
        """Normalise arbitrary ranges: sort, clip to ``size``, merge.

        Where a data range and a zero range overlap, data wins: the bytes were
        written after the discard as far as we can tell, and sending data is
        always safe while zeroing real data is not.
        """
        off = _u64(offsets)
        ln = _u64(lengths)
        if off.size != ln.size:
            raise ValueError("offsets and lengths differ in length")
        kd = np.asarray(kinds, dtype=np.uint8)
        kd = np.full(off.size, int(kd), np.uint8) if kd.ndim == 0 else kd.ravel()
        if kd.size != off.size:
            raise ValueError("kinds differ in length from offsets")
        if ((kd != DATA) & (kd != ZERO)).any():
            raise ValueError("unknown extent kind")
        end = off + ln
        if (end < off).any():
            raise ValueError("range end overflows 64 bits")
        if size is not None:
            end = np.minimum(end, _U64(size))
        keep = end > off
        off, end, kd = off[keep], end[keep], kd[keep]
        d_s, d_e = _union(off[kd == DATA], end[kd == DATA])
        z_s, z_e = _union(off[kd == ZERO], end[kd == ZERO])
        z_s, z_e = _subtract(z_s, z_e, d_s, d_e)
        # Both lists are sorted and disjoint from each other: merge by rank, not by a full argsort.
        n = d_s.size + z_s.size
        pos_d = np.arange(d_s.size) + np.searchsorted(z_s, d_s)
        pos_z = np.arange(z_s.size) + np.searchsorted(d_s, z_s, side="right")
        s, e, k = np.empty(n, _U64), np.empty(n, _U64), np.empty(n, np.uint8)
        s[pos_d], e[pos_d], k[pos_d] = d_s, d_e, DATA
        s[pos_z], e[pos_z], k[pos_z] = z_s, z_e, ZERO
        return cls._from_sorted_disjoint(s, e, k)

    @classmethod
    def _from_sorted_disjoint(cls, s: np.ndarray, e: np.ndarray, k: np.ndarray) -> Extents:
        """Coalesce touching same-kind ranges of an ascending, non-overlapping list."""
        if s.size == 0:
            return cls.empty()
        joins = np.zeros(s.size, dtype=bool)
        joins[1:] = (s[1:] == e[:-1]) & (k[1:] == k[:-1])
        first = np.flatnonzero(~joins)
        last = np.empty_like(first)
        last[:-1] = first[1:] - 1
        last[-1] = s.size - 1
        return cls(s[first], e[last] - s[first], k[first])

    # ---- operations ---------------------------------------------------

    def union(self, other: Extents) -> Extents:
        """Every byte in either; where one says data and the other zero, data wins."""
        return Extents.from_ranges(
            np.concatenate([self.offsets, other.offsets]),
            np.concatenate([self.lengths, other.lengths]),
            np.concatenate([self.kinds, other.kinds]),
        )

    def clip(self, size: int) -> Extents:
        """Drop what lies at or past ``size`` (a volume that shrank)."""
        if self.end <= size:
            return self  # immutable: nothing to copy (the usual case, a volume that did not shrink)
        n = int(np.searchsorted(self.offsets, _U64(size), side="left"))
        offsets, lengths = self.offsets[:n], self.lengths[:n].copy()
        if n:
            lengths[-1] = min(int(lengths[-1]), size - int(offsets[-1]))
        return Extents(offsets, lengths, self.kinds[:n])

    def with_tail(self, old_size: int, new_size: int) -> Extents:
        """Fit the extents to a volume resized from ``old_size`` to ``new_size``.

        A grown tail is new to the destination, so all of it is sent as data.
        """
        clipped = self.clip(new_size)
        if new_size <= old_size:
            return clipped
        end = clipped.end
        if end < old_size or (end == old_size and (not len(clipped) or clipped.kinds[-1] != DATA)):
            # The tail lies past every range and touches none of its kind: appended, not merged.
            return Extents(np.append(clipped.offsets, _U64(old_size)),
                           np.append(clipped.lengths, _U64(new_size - old_size)),
                           np.append(clipped.kinds, np.uint8(DATA)))
        tail = Extents(np.array([old_size], _U64), np.array([new_size - old_size], _U64),
                       np.array([DATA], np.uint8))
        return clipped.union(tail)

    # ---- queries ------------------------------------------------------

    def __len__(self) -> int:
        return int(self.offsets.size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for i in range(0, len(self), _ITER_BATCH):
            j = i + _ITER_BATCH
            yield from zip(self.offsets[i:j].tolist(), self.lengths[i:j].tolist(),
                           self.kinds[i:j].tolist(), strict=True)

    def pieces(self, max_len: int) -> Iterator[tuple[int, int, int]]:
        """Like iteration, but DATA ranges split into pieces of at most ``max_len`` bytes.

        Zero ranges cost nothing to send, so they are never split.
        """
        if max_len <= 0:
            raise ValueError("max_len must be positive")
        for off, ln, kind in self:
            if kind != DATA or ln <= max_len:
                yield off, ln, kind
                continue
            end = off + ln
            for p in range(off, end, max_len):
                yield p, min(max_len, end - p), DATA

    def _bytes(self, kind: int) -> int:
        return int(self.lengths[self.kinds == kind].sum(dtype=_U64))

    @property
    def data_bytes(self) -> int:
        return self._bytes(DATA)

    @property
    def zero_bytes(self) -> int:
        return self._bytes(ZERO)

    @property
    def data_count(self) -> int:
        return int(np.count_nonzero(self.kinds == DATA))

    @property
    def zero_count(self) -> int:
        return int(np.count_nonzero(self.kinds == ZERO))

    @property
    def end(self) -> int:
        """One past the last byte covered (0 when empty)."""
        return int(self.offsets[-1] + self.lengths[-1]) if len(self) else 0

    def data_only(self) -> Extents:
        m = self.kinds == DATA
        return Extents(self.offsets[m], self.lengths[m], self.kinds[m])

    def as_tuples(self) -> list[tuple[int, int, int]]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Extents):
            return NotImplemented
        return (np.array_equal(self.offsets, other.offsets) and np.array_equal(self.lengths, other.lengths)
                and np.array_equal(self.kinds, other.kinds))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Extents({len(self)} ranges: {self.data_count} data / {self.data_bytes} B, "
                f"{self.zero_count} zero / {self.zero_bytes} B)")

    # ---- the `ranges` text file --------------------------------------

    def line_lengths(self) -> np.ndarray:
        """Byte length of each line of the ranges text, computed without formatting it."""
        return rangetext.line_lengths(self.offsets, self.lengths)

    def format_bytes(self, start: int = 0, stop: int | None = None) -> bytes:
        """The ranges text of extents ``start`` to ``stop``, as ASCII bytes."""
        sl = slice(start, stop)
        return rangetext.format_text(self.offsets[sl], self.lengths[sl], self.kinds[sl])

    def format_lines(self, start: int = 0, stop: int | None = None) -> str:
        """The ranges text of extents ``start`` to ``stop``."""
        return self.format_bytes(start, stop).decode("ascii")

    def write_text(self, write: Callable[[memoryview], object]) -> None:
        """Hand the whole ranges text to ``write`` block by block (each block valid only during the call)."""
        rangetext.write_text(self.offsets, self.lengths, self.kinds, write)


# Chunks per block when finding runs: the block's temporaries stay in cache and, for tens of
# millions of chunks, need no memory beyond the result (the bound is ~20 bytes a chunk in all).
_RUN_BLOCK = 1 << 16


def _strictly_ascending(idx: np.ndarray) -> bool:
    for i in range(0, idx.size - 1, _RUN_BLOCK):
        blk = idx[i:i + _RUN_BLOCK + 1]
        if not (blk[1:] > blk[:-1]).all():
            return False
    return True


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths, in chunks (uint64), of the runs of consecutive values of ``idx``.

    ``idx`` is sorted and unique. The k-th run start and the k-th run end are
    found block by block (a run may cross blocks), so the only full-size
    arrays are the two results.  They are allocated for one run per chunk and
    filled as far as needed: the pages past the last run are never touched, so
    never resident.
    """
    n = idx.size
    offsets = np.empty(n, _U64)
    lengths = np.empty(n, _U64)
    n_starts = n_ends = 0
    step = np.empty(min(n, _RUN_BLOCK) + 1, bool)
    gap = np.empty(min(n, _RUN_BLOCK), idx.dtype)
    for i in range(0, n, _RUN_BLOCK):
        blk = idx[i:i + _RUN_BLOCK + 1]  # one past the block: whether its last chunk ends a run
        k = min(_RUN_BLOCK, n - i)
        # step[j]: a run starts at blk[j] (j < k); step[j + 1] also says blk[j] ends one.
        st = step[:blk.size + (1 if blk.size == k else 0)]
        st[0] = i == 0 or int(idx[i - 1]) + 1 != int(blk[0])
        np.subtract(blk[1:], blk[:-1], out=gap[:blk.size - 1])
        np.not_equal(gap[:blk.size - 1], 1, out=st[1:blk.size])
        if blk.size == k:  # the last block: its last chunk ends the last run
            st[k] = True
        starts = blk[:k][st[:k]]
        ends = blk[:k][st[1:k + 1]]
        offsets[n_starts:n_starts + starts.size] = starts
        lengths[n_ends:n_ends + ends.size] = ends
        n_starts += starts.size
        n_ends += ends.size
    offsets, lengths = offsets[:n_starts], lengths[:n_ends]
    # lengths held each run's last chunk: the run is last - first + 1 chunks.
    np.subtract(lengths, offsets, out=lengths)
    lengths += _U64(1)
    return offsets, lengths


def _union(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of ranges [s, e) as sorted, disjoint, non-touching ranges."""
    if s.size == 0:
        return s, e
    # Sorting starts and ends independently is enough (and much faster than argsort):
    # after the i-th start and i-th end nothing is open, so a gap follows end i
    # exactly when start i+1 lies beyond it.
    s, reach = np.sort(s), np.sort(e)
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = s.size - 1
    return s[first], reach[last]


def _subtract(zs: np.ndarray, ze: np.ndarray, ds: np.ndarray,
              de: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranges z minus ranges d; both sorted and disjoint."""
    if zs.size == 0 or ds.size == 0:
        return zs, ze
    # The gaps between data ranges, from 0 to infinity, as sorted disjoint ranges.
    top = np.array([np.iinfo(_U64).max], _U64)
    gs = np.concatenate([np.zeros(1, _U64), de])
    ge = np.concatenate([ds, top])
    keep = ge > gs
    gs, ge = gs[keep], ge[keep]
    # For each zero range, the gaps it overlaps are a contiguous index run [i0, i1).
    i0 = np.searchsorted(ge, zs, side="right")
    i1 = np.searchsorted(gs, ze, side="left")
    counts = np.maximum(i1.astype(np.int64) - i0.astype(np.int64), 0)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, _U64), np.empty(0, _U64)
    zi = np.repeat(np.arange(zs.size), counts)
    run_start = np.cumsum(counts) - counts
    gi = i0[zi] + (np.arange(total) - run_start[zi])
    s = np.maximum(zs[zi], gs[gi])
    e = np.minimum(ze[zi], ge[gi])
    keep = e > s
    return s[keep], e[keep]


# The grammar of one `ranges` line, compiled for text (parse_ranges) and for bytes: verify reads the file
# in blocks of bytes, and decoding a block would blame a stray byte on the block instead of its line.
# At most 20 digits: 2**64 has 20, and int() of a huge string would be slow or refused (4300-digit limit).
_LINE_RULE = r"(0|[1-9][0-9]{0,19}) ([1-9][0-9]{0,19}) (data|zero)"
_LINE = re.compile(_LINE_RULE)
_LINE_BYTES = re.compile(_LINE_RULE.encode())
_KIND_OF_WORD = {**_KIND_BY_NAME, **{n.encode(): k for n, k in _KIND_BY_NAME.items()}}
_MAX_END = 2**64 - 1
_PARSE_BATCH = 65536  # lines checked per call: keeps the per-batch Python int lists small


def format_ranges(extents: Extents) -> str:
    """The whole `ranges` text (for big lists prefer the streaming/paged access of the view)."""
    return extents.format_lines()


class RangeLines:
    """Checks `ranges` lines batch after batch against the format; the one home of its rules.

    Carries the line number and the previous range's end from batch to
    batch, so a file read in blocks is checked exactly as one parsed whole.
    """

    def __init__(self, size: int | None = None, *, u64: bool = True):
        # u64: refuse ranges ending past 64 bits first (parse_ranges stores them in uint64 arrays);
        # verify, which keeps Python ints, has always left those to its other checks and messages.
        self.size, self.u64 = size, u64
        self.line_no = 0
        self.prev_end = 0

    def feed(self, lines: list[str] | list[bytes]) -> tuple[list[int], list[int], list[int]]:
        """Offsets, lengths and kinds of the next ``lines`` (all str or all bytes, no newlines).

        Raises BadInput naming the first bad line; touching ranges are left to the caller to coalesce.
        """
        # Locals, not attributes, in the loop: it runs once per line of files with millions of them.
        fullmatch = (_LINE_BYTES if lines and isinstance(lines[0], bytes) else _LINE).fullmatch
        kind_of, size, u64, prev_end = _KIND_OF_WORD, self.size, self.u64, self.prev_end
        offsets: list[int] = []
        lengths: list[int] = []
        kinds: list[int] = []
        for no, line in enumerate(lines, self.line_no + 1):
            m = fullmatch(line)  # type: ignore[arg-type]  # the pattern matches the lines' type
            if not m:
                raise BadInput(f"ranges line {no} is malformed: {line[:80]!r} "
                               "(expected 'OFFSET LENGTH data|zero', decimal bytes, one space apart)")
            off, ln = int(m[1]), int(m[2])
            if u64 and off + ln > _MAX_END:
                raise BadInput(f"ranges line {no}: range {off}+{ln} is beyond 64-bit offsets")
            if off < prev_end:
                raise BadInput(f"ranges line {no}: offset {off} is before the end of the previous range "
                               f"({prev_end}); ranges must be ascending and must not overlap")
            if size is not None and off + ln > size:
                raise BadInput(f"ranges line {no}: range {off}+{ln} ends past the volume size {size}")
            offsets.append(off)
            lengths.append(ln)
            kinds.append(kind_of[m[3]])
            prev_end = off + ln
        self.line_no += len(lines)
        self.prev_end = prev_end
        return offsets, lengths, kinds


def parse_ranges(text: str | bytes, size: int | None = None) -> Extents:
    """Parse a `ranges` file strictly; anything malformed raises BadInput naming the line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as e:
            raise BadInput(f"ranges file is not ASCII text (byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    offsets = np.empty(len(lines), _U64)
    lengths = np.empty(len(lines), _U64)
    kinds = np.empty(len(lines), np.uint8)
    check = RangeLines(size)
    for i in range(0, len(lines), _PARSE_BATCH):
        o, n, k = check.feed(lines[i:i + _PARSE_BATCH])
        offsets[i:i + len(o)], lengths[i:i + len(o)], kinds[i:i + len(o)] = o, n, k
    # Touching ranges of one kind are legal input; coalescing restores the invariant.
    return Extents._from_sorted_disjoint(offsets, offsets + lengths, kinds)
