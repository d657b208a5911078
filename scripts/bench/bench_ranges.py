#!/usr/bin/env python3
"""Benchmark: the whole `lvdeltafs ranges` job of a classic snapshot, table to printed lines.

Writes a synthetic COW store (sparse file: header and metadata areas only)
with N exceptions of 4 KiB chunks at random origin chunks of a 1 TiB origin
(~0.96 N lines of text, ~23 bytes each), then times what `ranges` does:
parse the exception table, sort and dedupe it, coalesce it into extents and
write the text (to /dev/null unless --out), over the file's pages in the page
cache (an mmap), in a fresh interpreter per code version, several runs each;
medians.  Each stage's median is shown too.

Peak memory is measured in another fresh interpreter as the growth of VmHWM
(the resident-set high-water mark: numpy arrays, read buffers, thread stacks,
everything) across one whole job reading the table as the command does
(read_exception_table: O_DIRECT, so no file pages are counted), divided by N.

--baseline REV runs the same job with the code of git revision REV (its
lvdeltafs package extracted with git archive into a temporary directory), side
by side in the same run: before/after on the same machine and the same file.

    .venv/bin/python scripts/bench/bench_ranges.py [--exceptions 10000000] [--runs 5] \\
        [--baseline fbc6e87 --baseline-runs 2] [--dir /var/tmp] [--out /dev/null] [--json PATH]

Targets: >= 20 million exceptions/s from the page cache, <= 20 bytes of peak memory per exception.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import benchjson  # noqa: E402
from bench_cow import CHUNK, make_image  # noqa: E402

from lvdeltafs.sources.cow import parse_exception_table  # noqa: E402

TARGET_RATE = 20_000_000
TARGET_BYTES = 20

# Runs in a fresh interpreter with PYTHONPATH at the code under test; works with the code before
# the block writer (it then prints the way `ranges` did: format_ranges, one string).
JOB = r"""
import json, mmap, os, re, stat, sys, time
from lvdeltafs import extents as ex
from lvdeltafs.sources.cow import cow_extents, parse_exception_table, read_exception_table

path, origin, out, runs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]

def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

def extents(read):
    table = read()
    t = time.perf_counter()
    return table.new_chunks, t, cow_extents(table, origin)  # the table goes, as in pairs.py

def job(read, fd):
    t0 = time.perf_counter()
    n, t1, ext = extents(read)
    t2 = time.perf_counter()
    if hasattr(ext, "write_text"):
        ext.write_text(lambda block: write_all(fd, block))
    else:
        write_all(fd, ex.format_ranges(ext).encode())
    t3 = time.perf_counter()
    return {"table": t1 - t0, "extents": t2 - t1, "text": t3 - t2, "total": t3 - t0, "n": n,
            "lines": len(ext)}

def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1])

fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
if mode == "memory":
    before = hwm()
    r = job(lambda: read_exception_table(path), fd)
    r["kib"] = hwm() - before
    print(json.dumps(r))
else:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        results = []
        for _ in range(runs):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            results.append(job(lambda: parse_exception_table(buf, len(buf)), fd))
    print(json.dumps(results))
"""


def run_job(code_root: str, path: str, origin_size: int, out: str, runs: int, mode: str):
    env = {**os.environ, "PYTHONPATH": code_root}
    proc = subprocess.run([sys.executable, "-c", JOB, path, str(origin_size), out, str(runs), mode],
                          capture_output=True, text=True, cwd=code_root, env=env)
    if proc.returncode:
        sys.exit(f"the job failed with the code in {code_root}:\n{proc.stderr}")
    return json.loads(proc.stdout)


def extract(rev: str, into: str) -> str:
    """The lvdeltafs package of git revision ``rev``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lvdeltafs"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def report(label: str, results: list[dict], mem: dict, n: int) -> tuple[float, float]:
    med = {k: statistics.median(r[k] for r in results) for k in ("table", "extents", "text", "total")}
    runs = ", ".join(f"{r['total']:.3f}" for r in results)
    rate = n / med["total"]
    per = mem["kib"] * 1024 / n
    print(f"{label}: median {med['total']:.3f} s = {rate / 1e6:.1f} M exceptions/s "
          f"(table {med['table']:.3f} s, extents {med['extents']:.3f} s, text {med['text']:.3f} s; "
          f"{len(results)} runs: {runs}); "
          f"peak memory {mem['kib'] / 1024:.0f} MiB = {per:.1f} B/exception")
    return rate, per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exceptions", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", metavar="REV", help="also run the code of this git revision")
    ap.add_argument("--baseline-runs", type=int, default=2)
    ap.add_argument("--origin-gib", type=int, default=1024, help="origin size the chunks are drawn from")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse COW file goes (O_DIRECT capable)")
    ap.add_argument("--out", default="/dev/null", help="where the text goes")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    origin_size = args.origin_gib << 30
    n = args.exceptions
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-ranges-") as tmp:
        path = str(Path(tmp) / "cow.img")
        t0 = time.perf_counter()
        size = make_image(path, n, origin_size // CHUNK)
        print(f"wrote {path}: {n} exceptions, {CHUNK} B chunks, device {size / 2**30:.1f} GiB (sparse), "
              f"in {time.perf_counter() - t0:.1f} s")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            parse_exception_table(buf, len(buf))  # brings the metadata pages into the page cache
        new = run_job(str(ROOT), path, origin_size, args.out, args.runs, "time")
        new_mem = run_job(str(ROOT), path, origin_size, args.out, 1, "memory")
        base = None
        if args.baseline:
            code = extract(args.baseline, tempfile.mkdtemp(dir=tmp))
            base = (run_job(code, path, origin_size, args.out, args.baseline_runs, "time"),
                    run_job(code, path, origin_size, args.out, 1, "memory"))
    print(f"{n} exceptions -> {new[0]['lines']} lines, from the page cache (mmap), text to {args.out}:")
    rate, per = report("this code", new, new_mem, n)
    old_rate = old_per = None
    if base:
        old_rate, old_per = report(f"baseline {args.baseline}", *base, n)
        print(f"speed-up {rate / old_rate:.1f}x, memory {old_per / per:.1f}x less")
    print(f"targets: >= {TARGET_RATE / 1e6:.0f} M exceptions/s, <= {TARGET_BYTES} B/exception")
    print(f"reproduce: .venv/bin/python scripts/bench/bench_ranges.py --exceptions {n} --runs {args.runs}"
          + (f" --baseline {args.baseline} --baseline-runs {args.baseline_runs}" if args.baseline else "")
          + f" --dir {args.dir} --out {args.out}")
    old = f"baseline {args.baseline}" if base else None
    benchjson.write(args.json, "ranges", [
        benchjson.Figure("whole job, page cache", rate / 1e6, "M exceptions/s", old,
                         None if old_rate is None else old_rate / 1e6,
                         (">=", TARGET_RATE / 1e6, "value"), "issue 12"),
        benchjson.Figure("peak memory per exception", per, "B", old, old_per, ("<=", TARGET_BYTES, "value"),
                         "issue 12", "VmHWM growth in a fresh process"),
    ], peak_rss_mib=new_mem["kib"] / 1024, peak_rss_of="VmHWM growth of the job",
        command=benchjson.reproduce("bench_ranges.py"), size=f"{n} exceptions, {args.runs} runs")
    return 0 if rate >= TARGET_RATE and per <= TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
