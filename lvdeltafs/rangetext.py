"""The `ranges` text (``OFFSET LENGTH data|zero``, one line per extent), formatted with numpy.

A delta can have tens of millions of lines; formatting them one f-string at a
time costs ~400 ns a line. Here a block of lines is a byte matrix filled a
column at a time, so the cost is a few numpy passes per block, not Python work
per line (~15-25 ns a line).

Speed choices:

- Decimal digits come four at a time from a 10000-entry table of 4-byte
  strings (40 KB, cache resident), written as unaligned uint32 columns of the
  matrix; numbers are split into 8-digit uint32 pieces first, since 32-bit
  division is several times cheaper than 64-bit.
- Lines of one *layout* (digits of offset, digits of length) have one width, so
  a block of them is a plain (lines x width) matrix whose bytes are the text:
  nothing to compact.  Offsets ascend, so their digit count changes at most
  once per power of ten; lengths of a delta mostly share one digit count.
- A block whose lines do not all share a layout is formatted in the layout of
  the most common one; the few other lines are formatted by layout group and
  spliced in between runs of the matrix (``b"".join`` of slices).  Only when
  many lines differ are all groups scattered to their byte positions through
  a strided view with one ``void`` item per line (a memcpy a line, no per-byte
  work).
- The width of a field never needs a leading-zero pass: every field is
  written with exactly its digit count, and a partial top group is written
  first with its spare bytes spilling right, onto columns written after it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Lines per block: the matrix and its temporaries stay in the L2 cache.
BLOCK_LINES = 65536
# Above this share of lines outside the block's main layout, splicing costs more than scattering.
_SPLICE_MAX_SHARE = 1 / 32

_U32 = np.uint32
_U64 = np.uint64
_LUT4 = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), dtype="<u4")
_SCALE = [10 ** (4 - r) for r in range(5)]  # a top group of r digits, shifted to the left of its 4 bytes
_E8 = _U64(10**8)
_POW10 = [10**i for i in range(21)]
# " data\n" and " zero\n" (both kind words have 4 letters) as a uint32 and a uint16 column.
_KIND4 = np.frombuffer(b" dat zer", dtype="<u4")
_KIND2 = np.frombuffer(b"a\no\n", dtype="<u2")
_TAIL = 6  # space, kind word, newline
_FIXED = _TAIL + 1  # plus the space between offset and length
_MAX_WIDTH = 20 + 20 + _FIXED  # 2**64 - 1 has 20 digits


def _column(m: np.ndarray, col: int, dtype: str) -> np.ndarray:
    """Column ``col`` of byte matrix ``m`` seen as one (unaligned) ``dtype`` per row."""
    return np.ndarray(shape=(m.shape[0],), dtype=dtype, buffer=m, offset=col, strides=(m.shape[1],))


def _ndigits(x: np.ndarray) -> int | np.ndarray:
    """Decimal digits of each value: an int when they all have the same count (the usual case)."""
    lo, hi = len(str(int(x.min()))), len(str(int(x.max())))
    if lo == hi:
        return lo
    # One comparison per power of ten between the smallest and the largest: cheaper than a search.
    d = np.full(x.size, lo, np.uint8)
    for e in range(lo, hi):
        d += x >= _U64(_POW10[e])
    return d


class _Scratch:
    """Buffers reused from block to block.

    A fresh numpy temporary of a few hundred KB is a fresh mmap whose pages
    fault in on first write, and here that costs more than the formatting
    itself (~3x in the development VM); every step writes into these instead.
    """

    def __init__(self, lines: int):
        self.q64 = np.empty(lines, _U64)
        self.r64 = np.empty(lines, _U64)
        self.p32 = np.empty(lines, _U32)
        self.g32 = np.empty(lines, _U32)
        self.h32 = np.empty(lines, _U32)
        self.data4 = np.full(lines, _KIND4[0], _U32)
        self.data2 = np.full(lines, _KIND2[0], np.uint16)
        self.main = np.empty(lines * _MAX_WIDTH, np.uint8)
        self.group = np.empty(lines * _MAX_WIDTH, np.uint8)
        self.mixed = np.empty(lines * _MAX_WIDTH, np.uint8)
        self.spliced = np.empty(lines * _MAX_WIDTH, np.uint8)
        self.off = np.empty(lines, _U64)
        self.len = np.empty(lines, _U64)
        self.kind = np.empty(lines, np.uint8)

    def _put_group(self, m: np.ndarray, col: int, g: np.ndarray, digits: int) -> None:
        """Four digits of ``g`` (< 10000) at ``col``, or its ``digits`` < 4 digits followed by spill."""
        if digits < 4:  # the digits to the left of the 4 bytes; the zeros after them spill right
            np.multiply(g, _U32(_SCALE[digits]), out=g)
        # A gather into a contiguous array and one strided copy beat a gather into the unaligned column.
        t = self.h32[:g.size]
        np.take(_LUT4, g, out=t, mode="wrap")
        _column(m, col, "<u4")[...] = t

    def put_digits(self, m: np.ndarray, col: int, x: np.ndarray, width: int) -> None:
        """Write ``x`` (uint64, ``width`` decimal digits each) into columns ``col``..``col+width``.

        Values with more digits leave garbage (never an error): a block formatted
        in its main layout is cut around the lines that do not fit it.  Remainders
        are taken as ``a - (a // d) * d``: numpy's ``%`` is several times slower.
        """
        n = x.size
        q, r, p, g = self.q64[:n], self.r64[:n], self.p32[:n], self.g32[:n]
        top = (width - 1) % 8 + 1  # digits in the leftmost 8-digit piece
        for shift in range(width - top, -1, -8):  # pieces left to right: a spill lands on a later column
            w = top if shift == width - top else 8
            if width <= 8:
                src = x
            else:
                np.floor_divide(x, _U64(_POW10[shift]), out=q)
                if w == 8:  # not the leftmost piece: keep its 8 digits
                    np.floor_divide(q, _E8, out=r)
                    np.multiply(r, _E8, out=r)
                    np.subtract(q, r, out=q)
                src = q
            np.copyto(p, src, casting="unsafe")
            if w > 4:
                np.floor_divide(p, _U32(10000), out=g)
                np.multiply(g, _U32(10000), out=self.h32[:n])
                np.subtract(p, self.h32[:n], out=p)
                self._put_group(m, col, g, w - 4)
                self._put_group(m, col + w - 4, p, 4)
            else:
                self._put_group(m, col, p, w)
            col += w

    def uniform(self, buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
                do: int, dl: int) -> np.ndarray:
        """The lines as a (lines x width) matrix in ``buf``: offsets of ``do`` digits, lengths of ``dl``."""
        n = offsets.size
        width = do + dl + _FIXED
        m = buf[:n * width].reshape(n, width)
        self.put_digits(m, 0, offsets, do)
        m[:, do] = 32  # after the offset digits: their top group may spill onto it
        self.put_digits(m, do + 1, lengths, dl)
        tail4, tail2 = _column(m, width - _TAIL, "<u4"), _column(m, width - 2, "<u2")
        if kinds.any():
            np.take(_KIND4, kinds, out=self.h32[:n], mode="clip")
            tail4[...] = self.h32[:n]
            tail2[...] = np.take(_KIND2, kinds, mode="clip")
        else:  # all data, the usual case: copied from arrays filled once
            tail4[...] = self.data4[:n]
            tail2[...] = self.data2[:n]
        return m

    def mixed_layouts(self, out: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
                      layout: np.ndarray) -> np.ndarray:
        """Lines of mixed layouts into ``out``: each layout's lines formatted together, then put in place."""
        do, dl = np.divmod(layout, 32)
        widths = do + dl + _FIXED
        ends = np.cumsum(widths)
        out = out[:int(ends[-1])]
        starts = ends - widths
        for key in np.flatnonzero(np.bincount(layout)).tolist():
            sel = np.flatnonzero(layout == key)
            k = sel.size
            g_off, g_len, g_kind = self.off[:k], self.len[:k], self.kind[:k]
            np.take(offsets, sel, out=g_off)
            np.take(lengths, sel, out=g_len)
            np.take(kinds, sel, out=g_kind)
            m = self.uniform(self.group, g_off, g_len, g_kind, *divmod(key, 32))
            # One item per line of this width at every byte position: a scatter copies whole lines.
            item = np.dtype((np.void, m.shape[1]))
            slots = np.ndarray(shape=(out.size - m.shape[1] + 1,), dtype=item, buffer=out, strides=(1,))
            slots[starts[sel]] = m.view(item).ravel()
        return out

    def block(self, offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray) -> memoryview:
        """The text of up to ``lines`` lines, valid until the next call."""
        n = offsets.size
        do, dl = _ndigits(offsets), _ndigits(lengths)
        if isinstance(do, int) and isinstance(dl, int):
            return memoryview(self.uniform(self.main, offsets, lengths, kinds, do, dl)).cast("B")
        # A layout is do * 32 + dl.  Offsets ascend, so usually only the lengths' digits vary:
        # then the lengths' digit counts alone pick the main layout and the odd lines.
        varying = dl if isinstance(do, int) else do if isinstance(dl, int) else None
        if varying is None:
            layout = do.astype(np.intp) * 32 + dl  # widened first: 20 * 32 does not fit a uint8
            counts = np.bincount(layout)
            main = int(counts.argmax())
            odd = np.flatnonzero(layout != main)
        else:
            counts = np.bincount(varying)
            top = int(counts.argmax())
            main = do * 32 + top if varying is dl else top * 32 + dl
            odd = np.flatnonzero(varying != top)
        if odd.size > n * _SPLICE_MAX_SHARE:
            if varying is not None:
                layout = np.empty(n, np.intp)
                layout[...] = do
                layout *= 32
                layout += dl
            return memoryview(self.mixed_layouts(self.mixed, offsets, lengths, kinds, layout))
        # Most lines share one layout: format all of them in it, then splice the others in.
        m = self.uniform(self.main, offsets, lengths, kinds, *divmod(main, 32))
        flat = memoryview(m).cast("B")
        width = m.shape[1]
        odd_do = do if isinstance(do, int) else do[odd].astype(np.intp)
        odd_dl = dl if isinstance(dl, int) else dl[odd].astype(np.intp)
        odd_layout = np.broadcast_to(odd_do * 32 + odd_dl, odd.shape)
        odd_text = memoryview(self.mixed_layouts(self.mixed, offsets[odd], lengths[odd], kinds[odd],
                                                 odd_layout))
        out = memoryview(self.spliced)
        row = pos = at = 0
        for i, end in zip(odd.tolist(), np.cumsum(odd_layout // 32 + odd_layout % 32 + _FIXED).tolist(),
                          strict=True):
            seg = (i - row) * width
            out[at:at + seg] = flat[row * width:i * width]
            at += seg
            out[at:at + end - pos] = odd_text[pos:end]
            at += end - pos
            row, pos = i + 1, end
        seg = (n - row) * width
        out[at:at + seg] = flat[row * width:]
        return out[:at + seg]


def write_text(offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
               write: Callable[[memoryview], object], block: int = BLOCK_LINES) -> None:
    """Call ``write`` with the text of all lines, a block at a time (each only valid during the call)."""
    scratch = _Scratch(min(block, max(offsets.size, 1)))
    for i in range(0, offsets.size, block):
        j = i + block
        write(scratch.block(offsets[i:j], lengths[i:j], kinds[i:j]))


def format_text(offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray) -> bytes:
    """The text of all lines, as one bytes object."""
    out: list[bytes] = []
    write_text(offsets, lengths, kinds, lambda piece: out.append(bytes(piece)))
    return b"".join(out)


def line_lengths(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Byte length of each line (uint64), without formatting."""
    out = np.full(offsets.size, _FIXED, _U64)
    for x in (offsets, lengths):
        for i in range(0, x.size, BLOCK_LINES):
            out[i:i + BLOCK_LINES] += _ndigits(x[i:i + BLOCK_LINES])
    return out
