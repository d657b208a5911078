#!/usr/bin/env python3
"""`lvmirror restore` on real LVM (inside the VM), beside the floor of reading and writing just the blocks.

A classic volume is mirrored with history; one sync later (CHANGE percent of
its 64 KiB chunks rewritten), the origin is damaged (another CHANGE percent),
and the point before that sync is restored onto the origin.  Timed, each from
a cold page cache:

- `lvmirror restore --point G --to bench/data`: the base's COW table, the undo
  ranges from the receiver, the point's bytes read from the mirror and only
  the differing 4 KiB blocks written, fsync — the whole command;
- floor: exactly the 4 KiB blocks where the origin differs from the point
  (found beforehand, not timed) read from a plain file holding the point and
  written onto the origin with pread/pwrite, and one fsync.

The VM emulates its CPU (no KVM here), so only the ratio means anything.  It
also prints what the restore read and wrote against the volume size.

    scripts/lvm-vm --mem 3072 -- .venv/bin/python scripts/bench/bench_restore_lvm.py \
        [--size-mib 512] [--change 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync_lvm import BIN, CHUNK, bench_vg, sh, sha, timed  # noqa: E402

BLOCK = 4096


def rewrite(origin: str, rng: random.Random, nchunks: int, change: float) -> None:
    fd = os.open(origin, os.O_WRONLY)
    try:
        for c in sorted(rng.sample(range(nchunks), int(nchunks * change / 100))):
            os.pwrite(fd, rng.randbytes(CHUNK), c * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def differing_blocks(a: str, b: str, size: int) -> list[int]:
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, size, 1 << 20):
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            out += [off + p for p in range(0, len(x), BLOCK) if x[p:p + BLOCK] != y[p:p + BLOCK]]
    return out


out: list[str] = []


def said_by(argv: list[str], lines: list[str]) -> None:
    """Run the restore; keep its summary line (what it read and wrote)."""
    lines.append(sh(*argv).strip().splitlines()[-1])


def floor_copy(src: Path, dst: str, blocks: list[int]) -> None:
    s, d = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        for off in blocks:
            os.pwrite(d, os.pread(s, BLOCK, off), off)
        os.fsync(d)
    finally:
        os.close(s)
        os.close(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--change", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("LVMIRROR_IN_VM") != "1":
        print("bench_restore_lvm: run me inside the VM (see the usage line in my docstring)", file=sys.stderr)
        return 2
    with bench_vg(args.size_mib * 2 + 256) as work:
        return run(args, work)


def run(args, work: Path) -> int:
    size = args.size_mib << 20
    sh("lvcreate", "-q", "-L", f"{args.size_mib}M", "-n", "data", "bench")
    origin = "/dev/bench/data"
    mirror = work / "data.img"
    cfg = work / "lvmirror.toml"
    cfg.write_text(f'[defaults]\nlock_dir = "{work}/lock"\nwork_dir = "{work}/work"\n'
                   f'[volume.data]\nvg = "bench"\nlv = "data"\ndestination = "{mirror}"\n'
                   f'snapshot_size = "{max(64, args.size_mib // 4)}M"\nhistory_points = 100\n')
    cfg.chmod(0o600)
    lvmirror = [str(BIN / "lvmirror"), "-c", str(cfg)]
    rng = random.Random(1)
    nchunks = size // CHUNK
    rewrite(origin, rng, nchunks, 50)  # a volume half full of data
    sh(*lvmirror, "init", "data")
    times: dict[str, list[float]] = {"lvmirror restore": [], "floor": []}
    differed, said = 0, ""
    for _ in range(args.rounds):
        point_img = work / "point.img"
        sh("cp", "--sparse=always", str(mirror), str(point_img))  # what the point will hold
        rewrite(origin, rng, nchunks, args.change)
        sh(*lvmirror, "sync", "data")
        gen = json.loads(sh(*lvmirror, "history", "data", "--json"))["points"][-1]["generation"]
        rewrite(origin, rng, nchunks, args.change)  # today's damage
        damaged = work / "damaged.img"
        sh("dd", f"if={origin}", f"of={damaged}", "bs=1M", "status=none")
        blocks = differing_blocks(str(point_img), origin, size)
        restore = [*lvmirror, "restore", "data", "--point", str(gen), "--to", "bench/data"]
        times["lvmirror restore"].append(timed(lambda r=restore: said_by(r, out)))
        if sha(origin) != sha(point_img):
            print(f"bench_restore_lvm: the restored origin differs from point {gen}", file=sys.stderr)
            return 1
        sh("dd", f"if={damaged}", f"of={origin}", "bs=1M", "conv=fsync", "status=none")
        times["floor"].append(timed(lambda b=blocks, p=point_img: floor_copy(p, origin, b)))
        if sha(origin) != sha(point_img):
            print("bench_restore_lvm: the floor copy is wrong", file=sys.stderr)
            return 1
        differed, said = len(blocks) * BLOCK, out[-1]
        sh(*lvmirror, "sync", "data")  # the mirror follows the restored origin before the next round
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"real LVM in the VM (emulated CPU): {args.size_mib} MiB classic volume; a point one sync of "
          f"{args.change}% back restored over {args.change}% damage; {args.rounds} rounds, cold cache, "
          "medians:")
    for k, v in times.items():
        print(f"  {k:<17} {med[k]:7.2f} s   runs {' '.join(f'{t:.2f}' for t in v)}")
    print(f"lvmirror restore / floor: {med['lvmirror restore'] / med['floor']:.2f}x")
    print(f"blocks that differed: {differed / 2**20:.1f} MiB of {args.size_mib} MiB; the restore said: "
          f"{said}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory of the largest child: {peak:.0f} MiB")
    print("reproduce: scripts/lvm-vm --mem 3072 -- .venv/bin/python scripts/bench/bench_restore_lvm.py "
          f"--size-mib {args.size_mib} --change {args.change} --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
