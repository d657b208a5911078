#!/usr/bin/env python3
"""The data path of a sync, side by side with a plain copy of the changed ranges and rsync.

A volume of SIZE GiB (a sparse image) has CHANGE percent of its 64 KiB chunks
rewritten at random places; the classic snapshot's exception store listing
those chunks is a COW image.  Measured, each from a cold page cache:

- lvmirror: the delta read from the target image (COW table -> extents ->
  `delta` stream), streamed to the receiver subprocess, staged, verified,
  applied, fsynced, state written;
- floor:    exactly the changed ranges copied with pread/pwrite and one fsync;
- rsync:    `rsync -I --inplace --no-whole-file` of the target image onto the mirror.

Then the same change on a volume four times larger: lvmirror's time must grow
with the change, not the volume (at most 1.25x).

    .venv/bin/python scripts/bench/bench_sync.py [--size-gib 8] [--change 2] [--reps 3] [--dir /var/tmp]
                                                 [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.pairs import cow_image_delta  # noqa: E402
from lvmirror.transports import LocalTransport  # noqa: E402
from tests.cowimage import write_cow_image  # noqa: E402

try:
    from lvmirror.encoder import DeltaStream  # noqa: E402
except ImportError:  # the code before lvmirror.encoder (scripts/bench/all --baseline): the same stream
    from lvdeltafs.formats.files import stream_layout  # noqa: E402
    from lvmirror.client import LayoutSource  # noqa: E402

    def DeltaStream(delta):  # noqa: N802  (stands in for the class)
        return LayoutSource(stream_layout(delta), delta.read)

CHUNK = 64 * 1024
GiB = 1 << 30


def drop_caches() -> None:
    os.sync()
    # Not root: runs are warm, and the report's header says so.
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_volume(workdir: Path, size: int, change: float, seed: int) -> tuple[Path, Path, list[int]]:
    """A sparse target image with scattered changed chunks, and the COW image naming them."""
    rng = random.Random(seed)
    nchunks = size // CHUNK
    changed = sorted(rng.sample(range(nchunks), int(nchunks * change / 100)))
    target = workdir / f"target-{size // GiB}g.img"
    with open(target, "wb") as f:
        f.truncate(size)
        block = rng.randbytes(CHUNK * 16)
        for i, c in enumerate(changed):
            j = (i * 7919) % 15
            os.pwrite(f.fileno(), block[j * CHUNK:(j + 1) * CHUNK], c * CHUNK)
    cow = workdir / f"cow-{size // GiB}g.img"
    write_cow_image(cow, CHUNK, changed)
    return target, cow, changed


def fresh_mirror(path: Path, size: int) -> None:
    """The mirror before the sync: the base, which here is all zeros (sparse)."""
    for p in Path(path.parent).glob(path.name + ".lvmirror-*"):
        p.unlink()
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def run_lvmirror(cow: Path, target: Path, mirror: Path) -> float:
    t0 = time.perf_counter()
    delta = cow_image_delta(str(cow), str(target))
    source = DeltaStream(delta)
    with LocalTransport(str(mirror)) as client:
        # The mirror holds the base by construction; the bench has no state
        # file to prove it, so the apply is forced (same work either way).
        client.send_delta(source, delta.identity.delta_id, force=True)
        client.apply()
    delta.close()
    return time.perf_counter() - t0


def run_floor(changed: list[int], target: Path, mirror: Path) -> float:
    t0 = time.perf_counter()
    src = os.open(target, os.O_RDONLY)
    dst = os.open(mirror, os.O_WRONLY)
    try:
        for c in changed:
            os.pwrite(dst, os.pread(src, CHUNK, c * CHUNK), c * CHUNK)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return time.perf_counter() - t0


def run_rsync(target: Path, mirror: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-I", "--inplace", "--no-whole-file", str(target), str(mirror)], check=True)
    subprocess.run(["sync", "-f", str(mirror)], check=True)
    return time.perf_counter() - t0


def check_equal(a: Path, b: Path, changed: list[int]) -> None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for c in changed:
            if os.pread(fa.fileno(), CHUNK, c * CHUNK) != os.pread(fb.fileno(), CHUNK, c * CHUNK):
                raise SystemExit(f"bench: mirror {b} differs from {a} at chunk {c}: the run is wrong")


def timed(label: str, reps: int, prepare, run) -> float:
    times = []
    for _ in range(reps):
        prepare()
        drop_caches()
        times.append(run())
    med = statistics.median(times)
    print(f"  {label:<34} median {med:7.3f} s   runs {' '.join(f'{t:.3f}' for t in times)}", flush=True)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=int, default=8)
    ap.add_argument("--change", type=float, default=2.0, help="percent of 64 KiB chunks changed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--no-rsync", action="store_true", help="skip rsync (it reads both images whole)")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.dir))
    try:
        size = args.size_gib * GiB
        target, cow, changed = make_volume(workdir, size, args.change, 1)
        mirror = workdir / "mirror.img"
        mb = len(changed) * CHUNK / 2**20
        print(f"volume {args.size_gib} GiB, {len(changed)} changed 64 KiB chunks ({mb:.0f} MiB, "
              f"{args.change}%), {args.reps} runs each, cold cache: "
              f"{'yes' if os.geteuid() == 0 else 'no (not root)'}")
        t_lvm = timed("lvmirror data path", args.reps, lambda: fresh_mirror(mirror, size),
                      lambda: run_lvmirror(cow, target, mirror))
        check_equal(target, mirror, changed)
        t_floor = timed("floor: pread/pwrite + fsync", args.reps, lambda: fresh_mirror(mirror, size),
                        lambda: run_floor(changed, target, mirror))
        t_rsync = None
        if not args.no_rsync:
            t_rsync = timed("rsync -I --inplace --no-whole-file", max(1, args.reps - 1),
                            lambda: fresh_mirror(mirror, size), lambda: run_rsync(target, mirror))
        # The same change on a volume four times larger.
        big_size = 4 * size
        target4, cow4, changed4 = make_volume(workdir, big_size, args.change / 4, 2)
        mirror4 = workdir / "mirror4.img"
        t_lvm4 = timed(f"lvmirror, {4 * args.size_gib} GiB volume", args.reps,
                       lambda: fresh_mirror(mirror4, big_size), lambda: run_lvmirror(cow4, target4, mirror4))
        check_equal(target4, mirror4, changed4)
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print()
        print(f"lvmirror / floor          : {t_lvm / t_floor:5.2f}x   (must be <= 2.5x)")
        if t_rsync:
            print(f"rsync / lvmirror          : {t_rsync / t_lvm:5.2f}x   (how much faster lvmirror is)")
        print(f"lvmirror {4 * args.size_gib} GiB / {args.size_gib} GiB  : {t_lvm4 / t_lvm:5.2f}x   "
              "(same change, 4x volume; must be <= 1.25x)")
        print(f"peak memory: sender {peak_self:.0f} MiB, "
              f"largest child (receiver or rsync) {peak_child:.0f} MiB")
        print(f"reproduce: .venv/bin/python scripts/bench/bench_sync.py --size-gib {args.size_gib} "
              f"--change {args.change} --reps {args.reps}")
        ok = t_lvm / t_floor <= 2.5 and t_lvm4 / t_lvm <= 1.25
        cold = "cold cache" if os.geteuid() == 0 else "warm cache (not root)"
        figures = [
            benchjson.Figure("data path", t_lvm, "s", "floor: pread/pwrite + fsync", t_floor,
                             ("<=", 1.5, "ratio"), "issue 12", cold),
            benchjson.Figure(f"data path, {4 * args.size_gib} GiB volume", t_lvm4, "s",
                             f"the same change, {args.size_gib} GiB volume", t_lvm, ("<=", 1.25, "ratio"),
                             "docstring"),
        ]
        if t_rsync:
            figures.append(benchjson.Figure("rsync -I --inplace --no-whole-file", t_rsync, "s",
                                            "lvmirror data path", t_lvm, note="how much slower rsync is"))
        benchjson.write(args.json, "sync", figures, peak_rss_mib=max(peak_self, peak_child),
                        peak_rss_of=f"sender {peak_self:.0f}, receiver/rsync {peak_child:.0f}",
                        command=benchjson.reproduce("bench_sync.py"),
                        size=f"{args.size_gib} GiB + {4 * args.size_gib} GiB, {args.change}% changed, "
                             f"{args.reps} reps")
        return 0 if ok else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
