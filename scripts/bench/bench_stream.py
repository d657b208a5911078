#!/usr/bin/env python3
"""Benchmark: producing the `delta` stream vs a bare read + crc32 loop over the same ranges.

Builds a sparse target image with a fraction of scattered chunks changed, then,
alternating in one run, times (a) lvdeltafs.formats.stream.StreamLayout (the
encoder lvdeltafs and lvmirror ship) into /dev/null and (b) a minimal loop of
1 MiB os.pread + zlib.crc32 over the same record pieces.  Target: (a) >= 80%
of (b).  The page cache is warm for both (the image is read once first) so
the comparison measures CPU overhead, not the disk.

    .venv/bin/python scripts/bench/bench_stream.py [--size-gib 2] [--changed 0.10] [--chunk-kib 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.extents import Extents  # noqa: E402
from lvdeltafs.formats.stream import MAX_DATA, StreamLayout  # noqa: E402


def build_image(path: str, size: int, chunk: int, frac: float, seed: int) -> Extents:
    rng = np.random.default_rng(seed)
    nchunks = size // chunk
    idx = np.sort(rng.choice(nchunks, int(nchunks * frac), replace=False)).astype(np.uint64)
    block = rng.bytes(chunk)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in idx.tolist():
            os.pwrite(f.fileno(), block, i * chunk)
    return Extents.from_chunks(idx, chunk, size)


def run_writer(fd: int, ident: dict, size: int, ext: Extents, out) -> int:
    def read(off: int, n: int) -> bytes:
        return os.pread(fd, n, off)

    total = 0
    layout = StreamLayout(ident, size, ext.offsets, ext.lengths, ext.kinds, delta_id="bench")
    for blk in layout.blocks(read):
        out.write(blk)
        total += len(blk)
    return total


def run_baseline(fd: int, ext: Extents) -> int:
    total = 0
    crc, pread = zlib.crc32, os.pread
    for off, ln, _kind in ext.pieces(MAX_DATA):
        data = pread(fd, ln, off)
        crc(data)
        total += len(data)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--changed", type=float, default=0.10, help="fraction of chunks changed")
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    chunk = args.chunk_kib << 10
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "target.img")
        ext = build_image(path, size, chunk, args.changed, 1)
        ident = {"volume": "bench", "base": "a", "target": "b", "base_size": size, "target_size": size,
                 "chunk_size": chunk, "source": "compare"}
        fd = os.open(path, os.O_RDONLY)
        data_bytes = ext.data_bytes
        run_baseline(fd, ext)  # warm the page cache for both
        tw, tb = [], []
        with open(os.devnull, "wb", buffering=0) as null:
            for _ in range(args.reps):
                t = time.perf_counter()
                nstream = run_writer(fd, ident, size, ext, null)
                tw.append(time.perf_counter() - t)
                t = time.perf_counter()
                run_baseline(fd, ext)
                tb.append(time.perf_counter() - t)
        os.close(fd)
    w, b = statistics.median(tw), statistics.median(tb)
    mib = data_bytes / (1 << 20)
    print(f"image {size / (1 << 30):.2f} GiB, {len(ext)} data extents, {mib:.0f} MiB changed "
          f"({args.changed:.0%} of {chunk >> 10} KiB chunks), stream {nstream} bytes, "
          f"{args.reps} reps (medians)")
    print(f"(a) StreamLayout -> /dev/null : {w:.3f} s  {mib / w:8.0f} MiB/s of data")
    print(f"(b) pread 1 MiB + crc32 loop  : {b:.3f} s  {mib / b:8.0f} MiB/s of data")
    ratio = b / w
    verdict = "PASS" if ratio >= 0.8 else "FAIL"
    print(f"ratio (a)/(b) throughput      : {ratio:.1%}  (target >= 80%: {verdict})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS                      : {rss:.0f} MiB")
    print("reproduce: .venv/bin/python scripts/bench/bench_stream.py " + " ".join(sys.argv[1:]))
    benchjson.write(args.json, "stream", [
        benchjson.Figure("`delta` stream -> /dev/null", mib / w, "MiB/s", "1 MiB pread + crc32 loop", mib / b,
                         (">=", 0.8, "ratio"), "docstring", "page cache warm"),
    ], peak_rss_mib=rss, peak_rss_of="this process", command=benchjson.reproduce("bench_stream.py"),
        size=f"{args.size_gib} GiB, {args.changed:.0%} of {chunk >> 10} KiB chunks, {args.reps} reps")


if __name__ == "__main__":
    main()
