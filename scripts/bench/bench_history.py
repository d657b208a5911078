#!/usr/bin/env python3
"""What mirror history costs (issue 10): a sync that keeps an undo delta, and reading an earlier point.

Side by side in one run, medians over --reps:

1. sync: bench_sync.py's workload (a sparse SIZE GiB volume, CHANGE percent of its 64 KiB chunks
   rewritten, the COW image listing them; its own builder, imported), the delta read from the target
   image (COW table -> extents -> `delta` stream) and applied through the real receiver
   (LocalTransport, as bench_sync.py does) to a mirror whose state it chains from, once keeping
   history (`Keep(7)`: before the apply the receiver reads from the mirror the ranges it is about
   to overwrite and writes them as an undo delta, fsynced) and once not (`Keep(0)`); alternating,
   each from a cold page cache (root only).  Unlike bench_sync.py's base, the mirror holds data
   (other bytes) in the changed chunks, as a real mirror does: over holes the undo delta would be
   zero records, with nothing to read.  The apply is not forced (a forced apply keeps no history),
   so the mirror is first made by an init through the receiver (base "", untimed), which gives
   it the state the sync chains from.  Target: with / without <= 1.3x (issue 10).  Also: the undo
   delta's size against the changed data.
2. read: a mirror of READ MiB of random data with POINTS kept points (an init, then POINTS syncs
   with `Keep(7)`, each rewriting CHANGE percent of the chunks), mounted with `lvdeltafs mount
   --mirror m=IMAGE`; `cat @mirrors/m/G/image > /dev/null` of the oldest point G (composed
   through every undo delta) against `cat` of a plain file holding the same bytes through bindfs
   (as it comes, and with the mount's read-ahead, as bench_fuse.py compares them), and the plain
   file itself; rotated, each from a cold page cache.  The point is checked byte for byte against
   the plain file first; its first open (which reads and checks every undo delta whole) is timed
   on its own.  Target: mount >= 0.5x bindfs (issue 10).  Needs root (the read-ahead knob),
   /dev/fuse, bindfs and fusermount3; without them part 2 is reported as not run.

Peak memory: this process (the sender) and its largest child (a receiver) in part 1; the mount process.

    .venv/bin/python scripts/bench/bench_history.py [--size-gib 8] [--change 2] [--reps 3] [--read-mib 1024]
                                                    [--points 3] [--dir /var/tmp] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory; before the project's modules)
import numpy as np  # noqa: E402
from bench_fuse import LVDELTAFS, set_read_ahead, time_cat, unmount, wait_mounted  # noqa: E402
from bench_sync import CHUNK, DeltaStream, GiB, check_equal, drop_caches, make_volume  # noqa: E402

from lvdeltafs.delta import Delta, FileReader, Identity  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvdeltafs.pairs import cow_image_delta  # noqa: E402
from lvmirror.deltas import full_copy_delta  # noqa: E402
from lvmirror.remote.history import Keep  # noqa: E402
from lvmirror.transports import LocalTransport  # noqa: E402

MiB = 1 << 20
VOLUME = "bench-history"
KEEP = Keep(7)  # history_points' default
NONE = Keep(0)  # history_points = 0


def state(mirror: Path) -> dict:
    return json.loads(Path(f"{mirror}.lvmirror-state").read_text())


def apply(delta: Delta, mirror: Path, keep: Keep) -> None:
    """One sync through the real receiver, not forced: the base must be what the mirror's state says."""
    with LocalTransport(str(mirror)) as client:
        client.keep = keep
        client.send_delta(DeltaStream(delta), delta.identity.delta_id)
        client.apply()
    delta.close()


def remove_mirror(mirror: Path) -> None:
    for p in mirror.parent.glob(mirror.name + ".lvmirror-*"):
        p.unlink()
    mirror.unlink(missing_ok=True)


# ---------------------------------------------------------------- 1. sync with history against without


def make_base(workdir: Path, size: int, changed: list[int]) -> Path:
    """What the mirror holds before the sync: other bytes in every changed chunk, holes elsewhere."""
    rng = random.Random(99)
    base = workdir / "base.img"
    with open(base, "wb") as f:
        f.truncate(size)
        block = rng.randbytes(CHUNK * 16)
        for i, c in enumerate(changed):
            j = (i * 104729) % 15
            os.pwrite(f.fileno(), block[j * CHUNK:(j + 1) * CHUNK], c * CHUNK)
    return base


def init_mirror(base: Path, mirror: Path, size: int, changed: list[int]) -> None:
    """The mirror made by an init through the receiver (untimed): it then holds snapshot bench@1."""
    remove_mirror(mirror)
    mapped = Extents.from_chunks(np.asarray(changed, dtype=np.uint64), CHUNK, size)
    apply(full_copy_delta(VOLUME, "bench@1", str(base), size, source="cow", mapped=mapped, block_size=CHUNK),
          mirror, NONE)


def run_sync(cow: Path, target: Path, mirror: Path, keep: Keep) -> float:
    """bench_sync.py's run_lvmirror, the delta named as the sync from bench@1 to bench@2, not forced."""
    t0 = time.perf_counter()
    delta = cow_image_delta(str(cow), str(target))
    ident = delta.identity
    delta.identity = Identity(VOLUME, "bench@1", "bench@2", ident.base_size, ident.target_size,
                              ident.chunk_size, ident.source)
    apply(delta, mirror, keep)
    return time.perf_counter() - t0


def bench_sync(args: argparse.Namespace, workdir: Path) -> dict:
    size = int(args.size_gib * GiB) // CHUNK * CHUNK
    target, cow, changed = make_volume(workdir, size, args.change, 1)
    base = make_base(workdir, size, changed)
    mirror = workdir / "mirror.img"
    changed_bytes = len(changed) * CHUNK
    print(f"1. sync: volume {args.size_gib:g} GiB, {len(changed)} changed 64 KiB chunks "
          f"({changed_bytes / MiB:.0f} MiB, {args.change:g}%), {args.reps} runs each, alternating, "
          f"cold cache: {'yes' if os.geteuid() == 0 else 'no (not root)'}", flush=True)
    times: dict[str, list[float]] = {"kept": [], "none": []}
    undo_bytes: list[int] = []
    for rep in range(args.reps):
        order = [("kept", KEEP), ("none", NONE)]
        for name, keep in order if rep % 2 == 0 else order[::-1]:
            init_mirror(base, mirror, size, changed)
            drop_caches()
            times[name].append(run_sync(cow, target, mirror, keep))
            check_equal(target, mirror, changed)
            st = state(mirror)
            if st.get("snapshot") != "bench@2" or len(st.get("history", [])) != (1 if name == "kept" else 0):
                raise SystemExit(f"bench: the mirror's state after the sync ({name}) is not the one "
                                 f"expected: snapshot {st.get('snapshot')}, history {st.get('history')}")
            if name == "kept":
                undo_bytes.append(st["history"][0]["undo_bytes"])
    remove_mirror(mirror)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, label in (("kept", "history kept, Keep(7)"), ("none", "no history, Keep(0)")):
        print(f"  {label:<26} median {med[k]:7.3f} s   runs {' '.join(f'{t:.3f}' for t in times[k])}")
    undo = max(undo_bytes)
    print(f"  kept / none: {med['kept'] / med['none']:.2f}x (target <= 1.3x); "
          f"undo delta {undo / MiB:.1f} MiB, {undo / changed_bytes:.3f}x the changed data "
          f"({changed_bytes / MiB:.1f} MiB)", flush=True)
    return {"kept": med["kept"], "none": med["none"], "undo": undo, "changed": changed_bytes}


# ---------------------------------------------------------------- 2. reading the oldest point


def read_unready() -> str | None:
    """Why part 2 cannot run here (None: it can); bench_all.py's fuse_ready, for one part of this bench."""
    if os.geteuid() != 0:
        return "needs root (the mount's read-ahead knob in /sys)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (apt-get install bindfs)"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def make_history(d: Path, size: int, change: float, npoints: int) -> tuple[Path, Path, int]:
    """A mirror of random data with npoints kept points, and a plain file holding its oldest point."""
    plain_dir = d / "plain"
    plain_dir.mkdir()
    plain = plain_dir / "point.img"
    with open(plain, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
        f.write(os.urandom(size % (8 * MiB)))
    mirror = d / "hist.img"
    whole = Extents.from_ranges([0], [size], DATA, size)
    apply(full_copy_delta(VOLUME, "pt@1", str(plain), size, source="cow", mapped=whole, block_size=CHUNK),
          mirror, KEEP)
    work = d / "work.img"  # the source volume, one sync ahead of the mirror each time
    shutil.copyfile(plain, work)
    rng = random.Random(3)
    nchunks = size // CHUNK
    for k in range(1, npoints + 1):
        changed = sorted(rng.sample(range(nchunks), max(1, int(nchunks * change / 100))))
        with open(work, "r+b") as f:
            for c in changed:
                os.pwrite(f.fileno(), rng.randbytes(CHUNK), c * CHUNK)
        ident = Identity(VOLUME, f"pt@{k}", f"pt@{k + 1}", size, size, CHUNK, "cow")
        delta = Delta(ident, Extents.from_chunks(np.asarray(changed, dtype=np.uint64), CHUNK, size),
                      FileReader(str(work), size))
        apply(delta, mirror, KEEP)
    work.unlink()
    history = state(mirror)["history"]
    if len(history) != npoints:  # the init's content is the oldest (an init itself adds no point)
        raise SystemExit(f"bench: the mirror keeps {len(history)} points, not {npoints}: {history}")
    return mirror, plain, history[0]["generation"]


def bench_read(args: argparse.Namespace, workdir: Path) -> dict:
    d = workdir / "read"
    d.mkdir()
    size = args.read_mib * MiB
    mirror, plain, oldest = make_history(d, size, args.change, args.points)
    undo_total = sum(e["undo_bytes"] for e in state(mirror)["history"])
    mounts: list[tuple[Path, subprocess.Popen]] = []

    def mount(name: str, argv: list[str]) -> Path:
        mnt = d / name
        mnt.mkdir()
        proc = subprocess.Popen([*argv, str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        mounts.append((mnt, proc))
        wait_mounted(mnt, proc)
        return mnt

    try:
        lv = mount("lv", [LVDELTAFS, "-q", "mount", "-f", "--read-ahead-kb", str(args.read_ahead_kb),
                          "--mirror", f"m={mirror}"])
        lvproc = mounts[-1][1]
        point = lv / "@mirrors" / "m" / str(oldest) / "image"
        drop_caches()
        t0 = time.perf_counter()
        fd = os.open(point, os.O_RDONLY)  # the first open reads and checks every undo delta it needs
        try:
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        first_open = time.perf_counter() - t0
        if point.stat().st_size != size or sha256(point) != sha256(plain):
            raise SystemExit(f"bench: {point} does not hold the oldest point's bytes: the run is wrong")
        bind = mount("bind", ["bindfs", "-f", "--no-allow-other", str(plain.parent)])
        bind_ra = mount("bindra", ["bindfs", "-f", "--no-allow-other", str(plain.parent)])
        set_read_ahead(bind_ra, args.read_ahead_kb)
        subjects = {"mount": point, "bindfs": bind / plain.name, "bindfs-ra": bind_ra / plain.name,
                    "direct": plain}
        times: dict[str, list[float]] = {k: [] for k in subjects}
        for rep in range(args.reps):
            order = list(subjects.items())
            order = order[rep % len(order):] + order[:rep % len(order)]  # rotate: no fixed position
            for name, path in order:
                drop_caches()
                times[name].append(time_cat(path))
        peak = benchjson.vm_hwm_mib(lvproc.pid)
    finally:
        for mnt, proc in reversed(mounts):
            unmount(mnt, proc)
    rate = {k: size / statistics.median(v) / MiB for k, v in times.items()}
    print(f"2. read: the oldest of {args.points} points (generation {oldest}, composed through "
          f"{args.points} undo deltas, {undo_total / MiB:.1f} MiB in all) of a {args.read_mib} MiB mirror, "
          f"{args.change:g}% rewritten per sync; median of {args.reps} runs of `cat FILE > /dev/null`, "
          "rotated, cold cache each")
    for k, r in rate.items():
        print(f"  {k:10s} {r:8.0f} MiB/s   runs: {' '.join(f'{t:.3f}' for t in times[k])} s")
    print(f"  mount / bindfs    = {rate['mount'] / rate['bindfs']:.2f}  (target >= 0.50)")
    print(f"  mount / bindfs-ra = {rate['mount'] / rate['bindfs-ra']:.2f}  (the same read-ahead, "
          f"{args.read_ahead_kb} KiB)")
    print(f"  mount / direct    = {rate['mount'] / rate['direct']:.2f}")
    print(f"  first open of the point (reads and checks its undo deltas): {first_open:.3f} s")
    print(f"  peak RSS of the lvdeltafs mount process: {peak:.0f} MiB", flush=True)
    return {"rate": rate, "first_open": first_open, "peak": peak, "undo_total": undo_total,
            "oldest": oldest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=8, help="the sync's volume")
    ap.add_argument("--change", type=float, default=2.0, help="percent of 64 KiB chunks changed per sync")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--read-mib", type=int, default=1024, help="the mirror whose oldest point is read")
    ap.add_argument("--points", type=int, default=3, help="syncs applied to it after its init: its points")
    ap.add_argument("--read-ahead-kb", type=int, default=4096, help="what the mount is given")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-history-", dir=args.dir))
    try:
        sync = bench_sync(args, workdir)
        # Taken now: the mount, bindfs and cat of part 2 are children too.
        peak_self = benchjson.self_peak_mib()
        peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        why = read_unready()
        read = None
        if why:
            print(f"2. read through the mount: not run: {why}")
        else:
            read = bench_read(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    peak_mount = read["peak"] if read else 0.0
    print(f"peak memory: sender {peak_self:.0f} MiB, largest receiver {peak_child:.0f} MiB"
          + (f", mount {peak_mount:.0f} MiB" if read else ""))
    command = benchjson.reproduce("bench_history.py")
    print(f"reproduce: {command}")
    cold = "cold cache" if os.geteuid() == 0 else "warm cache (not root)"
    figures = [
        benchjson.Figure("sync, history kept (Keep(7))", sync["kept"], "s",
                         "the same sync, no history (Keep(0))", sync["none"], ("<=", 1.3, "ratio"),
                         "issue 10", cold),
        benchjson.Figure("undo delta of that sync", sync["undo"] / MiB, "MiB", "the data the sync changed",
                         sync["changed"] / MiB, note="a point's cost on disk"),
    ]
    if read:
        r = read["rate"]
        what = f"cat of the oldest point ({args.points} undo deltas)"
        figures += [
            benchjson.Figure(what, r["mount"], "MiB/s", "bindfs over a plain file of the same bytes",
                             r["bindfs"], (">=", 0.5, "ratio"), "issue 10", "cold cache"),
            benchjson.Figure(f"{what}, same read-ahead as bindfs-ra", r["mount"], "MiB/s",
                             f"bindfs, read-ahead {args.read_ahead_kb} KiB", r["bindfs-ra"]),
            benchjson.Figure("first open of that point", read["first_open"], "s",
                             note=f"reads and checks its undo deltas, {read['undo_total'] / MiB:.1f} MiB"),
        ]
    size = f"sync: {args.size_gib:g} GiB, {args.change:g}% changed, {args.reps} reps; " + (
        f"read: {args.read_mib} MiB mirror, {args.points} points" if read else f"read: not run: {why}")
    benchjson.write(args.json, "history", figures, peak_rss_mib=max(peak_self, peak_child, peak_mount),
                    peak_rss_of=f"sender {peak_self:.0f}, receiver {peak_child:.0f}"
                                + (f", mount {peak_mount:.0f}" if read else ""),
                    command=command, size=size)
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
