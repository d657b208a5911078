#!/usr/bin/env python3
"""Benchmark: read a classic snapshot's exception table and turn it into extents.

Writes a synthetic COW store (sparse file: header and metadata areas only)
with N exceptions of 4 KiB chunks at random origin chunks, then times
read_exception_table + cow_extents (O_DIRECT read of the metadata areas,
parse, sort, dedupe, coalesce) several times, then the same parse, sort and
coalesce over the file's pages in the page cache, and reports both medians.
The O_DIRECT figure is bound by the device's rate of 4 KiB reads (one per
metadata area, 1 MiB apart); the target applies to the CPU work.
Peak memory is measured in a fresh subprocess as the growth of VmHWM (the
resident-set high-water mark of /proc/self/status: numpy arrays, the read
buffers, thread stacks, everything) across one read + cow_extents, divided
by N.  VmHWM rather than getrusage's ru_maxrss: a child inherits its
parent's ru_maxrss through fork+exec, and the parent is big after writing
the image, so ru_maxrss would hide the child's own peak.

    .venv/bin/python scripts/bench/bench_cow.py [--exceptions 10000000] [--runs 5] [--dir /var/tmp] \
        [--json PATH]

Targets: >= 10 million exceptions/s, <= 40 bytes of peak memory per exception.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)
import numpy as np  # noqa: E402

from lvdeltafs.sources.cow import cow_extents, parse_exception_table, read_exception_table  # noqa: E402
from tests.cowimage import write_cow_image  # noqa: E402

CHUNK = 4096
TARGET_RATE = 10_000_000
TARGET_BYTES = 40


def make_image(path: Path, count: int, origin_chunks: int, seed: int = 1) -> int:
    """Random distinct origin chunks, in random (write) order."""
    rng = np.random.default_rng(seed)
    old = np.unique(rng.integers(0, origin_chunks, int(count * 1.05), dtype=np.uint64))
    old = rng.permutation(old)[:count]
    return write_cow_image(path, CHUNK, old)


def one_run(path: str, origin_size: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    table = read_exception_table(path)
    extents = cow_extents(table, origin_size)
    return time.perf_counter() - t0, table.new_chunks, len(extents)


def one_parse(path: str, origin_size: int) -> float:
    """Parse, sort and coalesce from the page cache: the CPU work, without the device's IOPS."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        t0 = time.perf_counter()
        table = parse_exception_table(buf, len(buf))
        cow_extents(table, origin_size)
        dt = time.perf_counter() - t0
        del table
    return dt


def measure_memory(path: str, origin_size: int) -> dict:
    """Run one read in a fresh interpreter so the high-water mark is this read's alone."""
    code = (
        "import json, re\n"
        "from lvdeltafs.sources.cow import read_exception_table, cow_extents\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "before = hwm()\n"
        f"t = read_exception_table({path!r}); e = cow_extents(t, {origin_size})\n"
        "after = hwm()\n"
        "print(json.dumps({'kib': after - before, 'n': t.new_chunks, 'extents': len(e)}))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root})
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exceptions", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--origin-gib", type=int, default=1024, help="origin size the chunks are drawn from")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse COW file goes (O_DIRECT capable)")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    origin_size = args.origin_gib << 30
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-cow-") as tmp:
        path = Path(tmp) / "cow.img"
        t0 = time.perf_counter()
        size = make_image(path, args.exceptions, origin_size // CHUNK)
        print(f"wrote {path}: {args.exceptions} exceptions, {CHUNK} B chunks, device {size / 2**30:.1f} GiB "
              f"(sparse), in {time.perf_counter() - t0:.1f} s")
        times = []
        for i in range(args.runs):
            dt, n, ext = one_run(str(path), origin_size)
            times.append(dt)
            print(f"run {i + 1}: {dt:.3f} s, {n / dt / 1e6:.1f} M exceptions/s ({ext} extents)")
        med = statistics.median(times)
        one_parse(str(path), origin_size)  # brings the metadata pages into the page cache
        parse_times = [one_parse(str(path), origin_size) for _ in range(args.runs)]
        parse_med = statistics.median(parse_times)
        rate = args.exceptions / parse_med
        mem = measure_memory(str(path), origin_size)
        per = mem["kib"] * 1024 / args.exceptions
    print(f"from the device, O_DIRECT (bound by its 4 KiB read rate): median {med:.3f} s = "
          f"{args.exceptions / med / 1e6:.1f} M exceptions/s")
    print(f"parse, sort, coalesce from the page cache: median {parse_med:.3f} s = {rate / 1e6:.1f} M "
          f"exceptions/s (target >= {TARGET_RATE / 1e6:.0f} M/s)")
    print(f"peak memory {mem['kib'] / 1024:.0f} MiB = {per:.1f} B/exception "
          f"(VmHWM growth in a fresh process; target <= {TARGET_BYTES})")
    print("reproduce: .venv/bin/python scripts/bench/bench_cow.py "
          f"--exceptions {args.exceptions} --runs {args.runs} --dir {args.dir}")
    benchjson.write(args.json, "cow", [
        benchjson.Figure("table + extents, page cache", rate / 1e6, "M exceptions/s",
                         target=(">=", TARGET_RATE / 1e6, "value"), target_source="docstring"),
        benchjson.Figure("table + extents, O_DIRECT", args.exceptions / med / 1e6, "M exceptions/s",
                         note="bound by the disk's 4 KiB read rate"),
        benchjson.Figure("peak memory per exception", per, "B", target=("<=", TARGET_BYTES, "value"),
                         target_source="docstring"),
    ], peak_rss_mib=mem["kib"] / 1024, peak_rss_of="VmHWM growth of one read",
        command=benchjson.reproduce("bench_cow.py"), size=f"{args.exceptions} exceptions, {args.runs} runs")
    return 0 if rate >= TARGET_RATE and per <= TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
