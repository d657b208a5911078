#!/usr/bin/env python3
"""A sync end to end on real LVM (inside the VM), beside a plain copy of the changes and rsync.

Each round rewrites CHANGE percent of a classic volume's 64 KiB chunks at
random places, then times, from a cold page cache:

- `lvmirror sync`: snapshot, COW table, delta stream, receiver (stage,
  verify, apply, fsync, state), rotation — the whole command;
- floor: exactly the changed ranges copied from the new snapshot onto a copy
  of the old mirror with pread/pwrite, and one fsync;
- rsync: `rsync -I --inplace --no-whole-file` of an image of the new
  snapshot onto another copy of the old mirror.

The VM emulates its CPU (no KVM here), so only the ratios mean anything.

    scripts/lvm-vm --mem 3072 -- .venv/bin/python scripts/bench/bench_sync_lvm.py \
        [--size-mib 512] [--change 2] [--rounds 3]
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

CHUNK = 64 * 1024
BIN = Path(sys.executable).parent


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn) -> float:
    drop_caches()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floor_copy(src: str, dst: Path, chunks: list[int]) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY)
    try:
        for c in chunks:
            os.pwrite(d, os.pread(s, CHUNK, c * CHUNK), c * CHUNK)
        os.fsync(d)
    finally:
        os.close(s)
        os.close(d)


def sha(path: str | Path) -> str:
    return sh("sha256sum", str(path)).split()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--change", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("LVMIRROR_IN_VM") != "1":
        print("bench_sync_lvm: run me inside the VM (see the usage line in my docstring)", file=sys.stderr)
        return 2
    with bench_vg(args.size_mib * 2 + 256) as work:
        return run(args, work)


@contextlib.contextmanager
def bench_vg(size_mib: int):
    """A work folder and a VG "bench" on a loop device of ``size_mib``, all removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="bench-lvm-", dir="/tmp"))
    pv_file = work / "pv.img"
    with open(pv_file, "wb") as f:
        f.truncate(size_mib << 20)
    loop = sh("losetup", "-f", "--show", str(pv_file)).strip()
    sh("pvcreate", "-q", loop)
    sh("vgcreate", "-q", "bench", loop)
    try:
        yield work
    finally:
        subprocess.run(["vgremove", "-ff", "-y", "bench"], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    size = args.size_mib << 20
    sh("lvcreate", "-q", "-L", f"{args.size_mib}M", "-n", "data", "bench")
    origin = "/dev/bench/data"
    mirror = work / "data.img"
    cfg = work / "lvmirror.toml"
    cfg.write_text(f'[defaults]\nlock_dir = "{work}/lock"\nwork_dir = "{work}/work"\n'
                   f'[volume.data]\nvg = "bench"\nlv = "data"\ndestination = "{mirror}"\n'
                   f'snapshot_size = "{max(64, args.size_mib // 4)}M"\n')
    cfg.chmod(0o600)
    lvmirror = [str(BIN / "lvmirror"), "-q", "-c", str(cfg)]
    sh(*lvmirror, "init", "data")
    rng = random.Random(1)
    nchunks = size // CHUNK
    results: dict[str, list[float]] = {"lvmirror sync": [], "floor": [], "rsync": []}
    for rnd in range(args.rounds):
        chunks = sorted(rng.sample(range(nchunks), int(nchunks * args.change / 100)))
        fd = os.open(origin, os.O_WRONLY)
        for c in chunks:
            os.pwrite(fd, rng.randbytes(CHUNK), c * CHUNK)
        os.fsync(fd)
        os.close(fd)
        floor_img, rsync_img = work / "floor.img", work / "rsync.img"
        for copy in (floor_img, rsync_img):
            sh("cp", "--sparse=always", str(mirror), str(copy))
        results["lvmirror sync"].append(timed(lambda: sh(*lvmirror, "sync", "data")))
        base = sh("lvs", "--noheadings", "-o", "lv_path", "-S", "lv_tags=lvmirror", "bench").split()[0]
        results["floor"].append(timed(lambda b=base, f=floor_img, c=chunks: floor_copy(b, f, c)))
        snap_img = work / "snap.img"
        sh("dd", f"if={base}", f"of={snap_img}", "bs=1M", "conv=sparse", "status=none")
        results["rsync"].append(timed(lambda s=snap_img, r=rsync_img: (
            sh("rsync", "-I", "--inplace", "--no-whole-file", str(s), str(r)), sh("sync", "-f", str(r)))))
        want = sha(base)
        for img in (mirror, floor_img, rsync_img):
            if sha(img) != want:
                print(f"bench_sync_lvm: {img} differs from {base} after round {rnd}", file=sys.stderr)
                return 1
        snap_img.unlink()
    med = {k: statistics.median(v) for k, v in results.items()}
    mib = len(chunks) * CHUNK / 2**20
    print(f"real LVM in the VM (emulated CPU): {args.size_mib} MiB classic volume, {args.change}% of 64 KiB "
          f"chunks changed per round ({mib:.1f} MiB), {args.rounds} rounds, cold cache, medians:")
    for k, v in results.items():
        print(f"  {k:<14} {med[k]:7.2f} s   runs {' '.join(f'{t:.2f}' for t in v)}")
    print(f"lvmirror sync / floor: {med['lvmirror sync'] / med['floor']:.2f}x   "
          f"rsync / lvmirror sync: {med['rsync'] / med['lvmirror sync']:.2f}x")
    print(f"peak memory of the largest child (lvmirror, its receiver, rsync): "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    print("reproduce: scripts/lvm-vm --mem 3072 -- .venv/bin/python scripts/bench/bench_sync_lvm.py "
          f"--size-mib {args.size_mib} --change {args.change} --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
