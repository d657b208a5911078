#!/usr/bin/env python3
"""Benchmark: `exact = true`'s comparison (lvdeltafs.exact.refine) against a bare read of the same bytes.

Builds a base image and a target that differs from it in a small fraction of
its 4 KiB blocks, both in the page cache (each read once first), then,
alternating in one run, times:

(a) refine() over extents that mark much more than changed, in two shapes:
    `large`: every 64 KiB chunk of the image (a thin pool's blocks, or a
    whole rewrite), `small`: a scattered fraction of the 4 KiB chunks (a
    classic COW table's default chunk); and
(b) the floor: the same ranges read from both sides with pread_into into the
    same buffers, nothing compared.

It prints GiB/s of bytes compared (per side), (a)'s share of (b)'s speed, the
bytes kept, and the peak RSS.

    .venv/bin/python scripts/bench/bench_exact.py [--size-gib 2] [--changed 0.01] [--small 0.10] [--reps 3]
                                                  [--piece-kib 8192] [--dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.exact import BLOCK, PIECE, fd_reader, refine  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvdeltafs.fsio import pread_into  # noqa: E402

GiB = 1 << 30
WRITE = 8 << 20  # images are written in pieces, so building them does not set the peak RSS


def build(base: str, target: str, size: int, changed: float, seed: int) -> int:
    """Random base; target = base with ``changed`` of its 4 KiB blocks given one flipped byte."""
    rng = np.random.default_rng(seed)
    blocks = size // BLOCK
    flip = np.sort(rng.choice(blocks, int(blocks * changed), replace=False))
    with open(base, "wb") as fa, open(target, "wb") as fb:
        for off in range(0, size, WRITE):
            piece = np.frombuffer(rng.bytes(min(WRITE, size - off)), np.uint8)
            fa.write(piece.tobytes())
            lo, hi = np.searchsorted(flip, [off // BLOCK, (off + len(piece)) // BLOCK])
            piece = piece.copy()
            piece[flip[lo:hi] * BLOCK - off + 17] ^= 0xFF
            fb.write(piece.tobytes())
    return int(flip.size)


def floor(fa: int, fb: int, extents: Extents, piece: int) -> None:
    """Both sides read in the same pieces as refine reads them, into two reused buffers; no comparison."""
    a, b = bytearray(piece), bytearray(piece)
    va, vb = memoryview(a), memoryview(b)
    fill = 0
    for off, ln, _kind in extents.pieces(piece):
        if fill + ln > piece:
            fill = 0
        pread_into(fa, va[fill:fill + ln], off)
        pread_into(fb, vb[fill:fill + ln], off)
        fill += -(-ln // BLOCK) * BLOCK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of 4 KiB blocks really changed")
    ap.add_argument("--small", type=float, default=0.10, help="`small`: fraction of 4 KiB chunks marked")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--piece-kib", type=int, default=PIECE >> 10, help="bytes read from each side at a time")
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    piece = args.piece_kib << 10
    rng = np.random.default_rng(2)
    blocks = size // BLOCK
    shapes = {
        "large": Extents.from_ranges([0], [size], DATA, size),
        "small": Extents.from_chunks(np.sort(rng.choice(blocks, int(blocks * args.small), replace=False)),
                                     BLOCK, size),
    }
    figures: list[benchjson.Figure] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pa, pb = os.path.join(tmp, "base.img"), os.path.join(tmp, "target.img")
        nflip = build(pa, pb, size, args.changed, 1)
        fa, fb = os.open(pa, os.O_RDONLY), os.open(pb, os.O_RDONLY)
        print(f"images {size / GiB:.2f} GiB each, {nflip} of {blocks} 4 KiB blocks changed "
              f"({args.changed:.1%}), pieces of {piece >> 10} KiB, page cache warm, "
              f"{args.reps} reps (medians)")
        floor(fa, fb, shapes["large"], piece)  # warm the page cache for both
        for name, ext in shapes.items():
            ta, tb = [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                kept = refine(ext, fd_reader(fa), fd_reader(fb), size, piece=piece)
                ta.append(time.perf_counter() - t)
                t = time.perf_counter()
                floor(fa, fb, ext, piece)
                tb.append(time.perf_counter() - t)
            a, b = statistics.median(ta), statistics.median(tb)
            gib = ext.data_bytes / GiB
            print(f"{name}: {len(ext)} ranges, {gib:.2f} GiB marked -> {kept.data_bytes / (1 << 20):.1f} MiB "
                  f"kept in {len(kept)} ranges")
            print(f"  (a) refine            : {a:.3f} s  {gib / a:6.2f} GiB/s per side  "
                  f"{len(ext) / a / 1e6:6.2f} M ranges/s")
            print(f"  (b) read both, no cmp : {b:.3f} s  {gib / b:6.2f} GiB/s per side")
            print(f"  (a)/(b) throughput    : {b / a:.0%}")
            # No target is stated for refine: the bare read of both sides is the anchor it is shown beside.
            figures.append(benchjson.Figure(f"refine, {name}: {len(ext)} ranges", gib / a, "GiB/s per side",
                                            "read both sides, no compare", gib / b))
        os.close(fa)
        os.close(fb)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS                : {rss:.0f} MiB")
    print("reproduce: .venv/bin/python scripts/bench/bench_exact.py " + " ".join(sys.argv[1:]))
    benchjson.write(args.json, "exact", figures, peak_rss_mib=rss, peak_rss_of="this process",
                    command=benchjson.reproduce("bench_exact.py"),
                    size=f"{args.size_gib} GiB, {args.changed:.0%} of blocks changed, {args.reps} reps")


if __name__ == "__main__":
    main()
