#!/usr/bin/env python3
"""Benchmark: `cat chunks > /dev/null` through lvdeltafs, against bindfs (C FUSE) and a direct read.

Builds a file pair whose `chunks` is --chunks-mib MiB (runs of changed data
scattered over a target image twice that size), mounts it with lvdeltafs,
copies `chunks` to a plain file and mounts that directory with bindfs, then,
alternating in one run, times `cat` of the same bytes:

- lvdeltafs: through the mount (data read from the target image by pread);
- lvdeltafs-ra128: the same with the kernel's default 128 KiB read-ahead (no tuning);
- bindfs: a C FUSE filesystem over the plain file, as it comes;
- bindfs-ra: bindfs with the same read-ahead lvdeltafs sets on its own mount;
- direct: the plain file itself (page cache).

and, each beside its own anchor, the pair's other big files:

- lvdeltafs data: `data` through the mount (the target at full size, zeros
  outside the changed runs), against bindfs over a plain file of the same
  bytes (a hard link of the target image, whose unchanged half is a hole too);
- lvdeltafs delta: the `delta` stream through the mount, against `chunks`.

The page cache is warm for every underlying file (each is read once first);
neither FUSE filesystem keeps its own page cache between opens, so every run
goes through the FUSE daemon.  Target: lvdeltafs >= 50% of bindfs (issue 12:
`chunks` and `data` at least 1.0x bindfs, `delta` at least 0.9x `chunks`).
Reports medians, ratios and the peak RSS of the lvdeltafs process.  Needs
root (the read-ahead knob), /dev/fuse and bindfs.

    .venv/bin/python scripts/bench/bench_fuse.py [--chunks-mib 512] [--reps 5] [--dir /tmp] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
RUN = 8 * MiB  # one changed run; they are spread one per 2 runs of the target
LVDELTAFS = str(Path(sys.executable).parent / "lvdeltafs")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402


def build_pair(d: Path, chunks_mib: int) -> tuple[Path, Path]:
    runs = max(1, chunks_mib * MiB // RUN)
    size = 2 * runs * RUN
    base, target = d / "base.img", d / "target.img"
    with open(base, "wb") as f:
        f.truncate(size)
    with open(target, "wb") as f:
        f.truncate(size)
        for i in range(runs):
            f.seek(2 * i * RUN)
            f.write(os.urandom(RUN))
    return base, target


def wait_mounted(mnt: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mount at {mnt} did not come up ({proc.poll()})")
        time.sleep(0.05)


def set_read_ahead(mnt: Path, kb: int) -> None:
    st = os.stat(mnt)
    Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").write_text(str(kb))


def time_cat(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unmount(mnt: Path, proc: subprocess.Popen) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    ap.add_argument("--read-ahead-kb", type=int, default=4096, help="what lvdeltafs is given")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    if shutil.which("bindfs") is None:
        raise SystemExit("bindfs is not installed (apt-get install bindfs)")

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-fuse-") as tmp:
        d = Path(tmp)
        base, target = build_pair(d, args.chunks_mib)
        mounts: list[tuple[Path, subprocess.Popen]] = []
        try:
            def mount(name: str, argv: list[str]) -> Path:
                mnt = d / name
                mnt.mkdir()
                proc = subprocess.Popen([*argv, str(mnt)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
                mounts.append((mnt, proc))
                wait_mounted(mnt, proc)
                return mnt

            lv = mount("lv", [LVDELTAFS, "-q", "mount", "-f", "--read-ahead-kb", str(args.read_ahead_kb),
                              "--pair", str(base), str(target)])
            lvproc = mounts[-1][1]
            lv128 = mount("lv128", [LVDELTAFS, "-q", "mount", "-f", "--read-ahead-kb", "0",
                                    "--pair", str(base), str(target)])
            pair = "@pairs/base.img..target.img/chunks"
            t0 = time.perf_counter()
            size = (lv / pair).stat().st_size  # opens the delta: a compare of the two images
            opened = time.perf_counter() - t0
            (lv128 / pair).stat()
            plain = d / "plain"
            plain.mkdir()
            shutil.copyfile(lv / pair, plain / "chunks")
            os.link(target, plain / "data")  # the same bytes as `data`, and the same hole
            pair_dir = (lv / pair).parent
            bind = mount("bind", ["bindfs", "-f", "--no-allow-other", str(plain)])
            bind_ra = mount("bindra", ["bindfs", "-f", "--no-allow-other", str(plain)])
            set_read_ahead(bind_ra, args.read_ahead_kb)
            subjects = {"lvdeltafs": lv / pair, "lvdeltafs-ra128": lv128 / pair, "bindfs": bind / "chunks",
                        "bindfs-ra": bind_ra / "chunks", "direct": plain / "chunks",
                        "lvdeltafs data": pair_dir / "data", "bindfs data": bind / "data",
                        "lvdeltafs delta": pair_dir / "delta"}
            sizes = {k: path.stat().st_size for k, path in subjects.items()}
            for path in subjects.values():  # warm every page cache underneath
                time_cat(path)
            times: dict[str, list[float]] = {k: [] for k in subjects}
            for rep in range(args.reps):
                order = list(subjects.items())
                order = order[rep % len(order):] + order[:rep % len(order)]  # rotate: no fixed position
                for name, path in order:
                    times[name].append(time_cat(path))
            peak = peak_rss_mib(lvproc.pid)
        finally:
            for mnt, proc in reversed(mounts):
                unmount(mnt, proc)

    rate = {k: sizes[k] / statistics.median(v) / MiB for k, v in times.items()}
    others = ("lvdeltafs data", "bindfs data", "lvdeltafs delta")
    print(f"chunks: {size / MiB:.0f} MiB; median of {args.reps} runs of `cat FILE > /dev/null`; "
          f"delta opened (image compare) in {opened:.1f} s")
    for k, r in rate.items():
        if k in others:
            continue
        print(f"  {k:16s} {r:8.0f} MiB/s   runs: {' '.join(f'{t:.3f}' for t in times[k])} s")
    print(f"lvdeltafs / bindfs           = {rate['lvdeltafs'] / rate['bindfs']:.2f}  (target >= 0.50)")
    print(f"lvdeltafs / bindfs-ra        = {rate['lvdeltafs'] / rate['bindfs-ra']:.2f}  (same read-ahead)")
    print(f"lvdeltafs-ra128 / bindfs     = {rate['lvdeltafs-ra128'] / rate['bindfs']:.2f}  (no tuning)")
    print(f"lvdeltafs / direct           = {rate['lvdeltafs'] / rate['direct']:.2f}")
    for k in others:
        print(f"  {k:16s} {rate[k]:8.0f} MiB/s   runs: {' '.join(f'{t:.3f}' for t in times[k])} s   "
              f"({sizes[k] / MiB:.0f} MiB)")
    print(f"lvdeltafs data / bindfs data = {rate['lvdeltafs data'] / rate['bindfs data']:.2f}  "
          "(target >= 1.0)")
    print(f"lvdeltafs delta / chunks     = {rate['lvdeltafs delta'] / rate['lvdeltafs']:.2f}  "
          "(target >= 0.9)")
    print(f"peak RSS of the lvdeltafs process: {peak:.0f} MiB")
    print(f"tuning: read_ahead_kb={args.read_ahead_kb} on the mount's bdi (1 MiB FUSE requests), "
          "st_blksize 1 MiB, reads the page cache holds on the FUSE thread, others in worker threads")
    bindfs = "bindfs over a plain file"
    benchjson.write(args.json, "fuse", [
        benchjson.Figure("cat chunks", rate["lvdeltafs"], "MiB/s", bindfs, rate["bindfs"],
                         (">=", 1.0, "ratio"), "issue 12"),
        benchjson.Figure("cat data", rate["lvdeltafs data"], "MiB/s", bindfs, rate["bindfs data"],
                         (">=", 1.0, "ratio"), "issue 12"),
        benchjson.Figure("cat delta", rate["lvdeltafs delta"], "MiB/s", "cat chunks (the mount)",
                         rate["lvdeltafs"], (">=", 0.9, "ratio"), "issue 12"),
        benchjson.Figure("cat chunks, same read-ahead as bindfs-ra", rate["lvdeltafs"], "MiB/s",
                         f"{bindfs}, read-ahead {args.read_ahead_kb} KiB", rate["bindfs-ra"]),
    ], peak_rss_mib=peak, peak_rss_of="the lvdeltafs mount process",
        command=benchjson.reproduce("bench_fuse.py"),
        size=f"chunks {size / MiB:.0f} MiB, data {sizes['lvdeltafs data'] / MiB:.0f} MiB, {args.reps} reps")


if __name__ == "__main__":
    main()
