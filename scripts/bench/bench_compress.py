#!/usr/bin/env python3
"""Benchmark: compress = auto against off, over a shaped 50 MB/s link and over the loopback.

The volume is a real filesystem image: an ext4 made by ``mkfs.ext4 -d
/usr/share`` (text, documentation, icons: it compresses about 2:1 with zlib
level 1).  The change is 2% of the volume in 64 KiB chunks spread over its
used blocks, each overwritten with 64 KiB copied from elsewhere in the image,
so the changed data compresses as the filesystem's data does.  The mirror
starts as a copy of the base.  Each run is a whole sync's send, timed from
a connected session (ssh and the receiver's start, the same either way, are
left out) to the receiver's reply to apply: the stream made by lvmirror's
encoder (lvmirror.encoder), sent over a real ssh session to a real sshd,
staged, verified and applied by the shipped receiver.  The changed chunks of
the mirror are compared with the target's after each run.

Two links, in one run, with off, auto, zlib and zstd (always) in turn, medians of ``--reps``.
The far side runs ``--remote-python`` (default Debian's /usr/bin/python3, which has
python3-zstandard), so auto compresses with zstd, the faster codec both ends have:

- a network namespace behind a veth pair shaped by tbf to 400 Mbit/s (50 MB/s)
  each way, with a real sshd inside (tests.harness.ShapedLink, as the
  shaped-link tests use);
- the loopback, to an sshd on 127.0.0.1 (here CPU, not the link, is the limit).

Goals (issue 13): over the shaped link auto is at least 1.6x faster than off;
on the loopback auto is never more than 5% slower than off.  Also printed: the
bytes that crossed (the stream, as sent), the share of data that went through
the compressor, zlib's ratio on the changed data, and peak RSS of this (the
sending) process.  Needs root (the namespace and tc).

    .venv/bin/python scripts/bench/bench_compress.py [--size-mib 8192] [--change 2] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.delta import Delta, FileReader, Identity  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvdeltafs.formats import codecs  # noqa: E402
from lvmirror.compression import Policy  # noqa: E402
from lvmirror.pipelines import send  # noqa: E402
from lvmirror.transports import SshTransport  # noqa: E402
from tests.harness import ShapedLink, start_sshd  # noqa: E402

MiB = 1 << 20
# zlib and zstd (always compress) beside them: how fast compressing everything is here, which says
# whether a miss is auto's choice or the CPU's limit (on this host both ends and the link share its cores).
MODES = ("off", "auto", "zlib", "zstd")
CHUNK = 64 << 10


def build(workdir: Path, size_mib: int, change: float) -> tuple[Path, Path, list[int]]:
    """(base image, target image, changed chunk offsets)."""
    base, target = workdir / "base.img", workdir / "target.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", "/usr/share", str(base), f"{size_mib}M"],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.copyfile(base, target)
    rng = random.Random(13)
    chunks = size_mib * MiB // CHUNK
    want = int(chunks * change / 100)
    changed: set[int] = set()
    fd = os.open(target, os.O_RDWR)
    try:
        while len(changed) < want:
            c = rng.randrange(chunks)
            if c in changed or not any(os.pread(fd, CHUNK, c * CHUNK)):
                continue  # a used chunk: a filesystem changes where its files are
            donor = os.pread(fd, CHUNK, rng.randrange(chunks) * CHUNK)
            if not any(donor) or donor == os.pread(fd, CHUNK, c * CHUNK):
                continue
            os.pwrite(fd, donor, c * CHUNK)
            changed.add(c)
        os.fsync(fd)
    finally:
        os.close(fd)
    return base, target, sorted(c * CHUNK for c in changed)


def zlib_ratio(target: Path, offsets: list[int]) -> float:
    raw = packed = 0
    with open(target, "rb") as f:
        for off in offsets[:2000]:
            data = os.pread(f.fileno(), CHUNK, off)
            out = codecs.compress(data)
            raw += len(data)
            packed += len(out) if out else len(data)
    return packed / raw


def one_run(server, base: Path, target: Path, offsets: list[int], mirror: Path,
            mode: str, remote_python: str) -> tuple[float, int, str]:
    """(seconds, bytes sent, how the policy sent them) of one sync's send, stage and apply."""
    for p in mirror.parent.glob(mirror.name + ".lvmirror-*"):
        p.unlink()
    subprocess.run(["cp", "--sparse=always", str(base), str(mirror)], check=True)
    size = target.stat().st_size
    ident = Identity("bench", "bench@1", f"bench@{time.monotonic_ns()}", size, size, CHUNK, "cow")
    extents = Extents.from_ranges(offsets, [CHUNK] * len(offsets), DATA, size)
    delta = Delta(ident, extents, FileReader(str(target), size))
    url = f"ssh://{server.user}@{server.host}:{server.port}{mirror}"
    with SshTransport(url, key=str(server.client_key), known_hosts=str(server.known_hosts),
                      remote_python=remote_python) as rc:
        far = rc.hello().codecs  # also what send() chooses the codec by
        if mode not in ("off", "auto") and mode not in far:
            raise SystemExit(f"{remote_python} on the far side has no {mode} (it has {far})")
        t0 = time.perf_counter()  # connected: what follows is the sync's send, stage and apply
        policies: list[Policy] = []
        real = Policy.__init__

        def keep(self, *a, **kw):  # the policy send() makes, to report how it sent
            real(self, *a, **kw)
            policies.append(self)
        Policy.__init__ = keep  # type: ignore[method-assign]
        try:
            send(rc, delta, "bench", force=True, compress=mode)
        finally:
            Policy.__init__ = real  # type: ignore[method-assign]
        seconds = time.perf_counter() - t0
        sent = rc.bytes_sent
    delta.close()
    check_mirror(mirror, target, offsets)
    return seconds, sent, policies[-1].describe() if policies else ""


def check_mirror(mirror: Path, target: Path, offsets: list[int]) -> None:
    """The changed chunks, and the size: the rest is the base's copy, which the sync does not write."""
    if mirror.stat().st_size != target.stat().st_size:
        raise SystemExit("the mirror's size is not the target's")
    with open(mirror, "rb") as m, open(target, "rb") as t:
        for off in offsets:
            if os.pread(m.fileno(), CHUNK, off) != os.pread(t.fileno(), CHUNK, off):
                raise SystemExit(f"the mirror differs from the target at {off}")


def compare(name: str, server, base: Path, target: Path, offsets: list[int], mirror: Path,
            reps: int, remote_python: str) -> dict[str, tuple[float, int, str]]:
    runs: dict[str, list[tuple[float, int, str]]] = {mode: [] for mode in MODES}
    for _ in range(reps):
        for mode in MODES:
            runs[mode].append(one_run(server, base, target, offsets, mirror, mode, remote_python))
    out = {}
    for mode, rs in runs.items():
        secs = [r[0] for r in rs]
        out[mode] = (statistics.median(secs), rs[-1][1], rs[-1][2])
        print(f"  {name:9} {mode:4}  median {out[mode][0]:7.3f} s  runs "
              f"{' '.join(f'{s:.3f}' for s in secs)}  sent {out[mode][1] / MiB:7.1f} MiB  {out[mode][2]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=8192)
    ap.add_argument("--change", type=float, default=2.0, help="percent of the volume changed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", default="400mbit", help="the shaped link's rate (tc units)")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--remote-python", default="/usr/bin/python3", help="the far side's python3")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-compress-") as tmp:
        work = Path(tmp)
        base, target, offsets = build(work, args.size_mib, args.change)
        changed = len(offsets) * CHUNK
        print(f"ext4 of /usr/share, {args.size_mib} MiB; {args.change}% changed: {changed / MiB:.0f} MiB in "
              f"{len(offsets)} chunks of 64 KiB; zlib level 1 on the changed data: "
              f"{zlib_ratio(target, offsets):.2f} of its size")
        link = ShapedLink.create(rate=args.rate, burst="1mb", latency="50ms")
        shaped = loop = None
        try:
            for d in ("sshd-shaped", "sshd-loop"):
                (work / d).mkdir()
            shaped = start_sshd(work / "sshd-shaped", link.ns_ip, link.exec_prefix())
            loop = start_sshd(work / "sshd-loop")
            mirror = work / "mirror.img"
            slow = compare(args.rate, shaped, base, target, offsets, mirror, args.reps, args.remote_python)
            fast = compare("loopback", loop, base, target, offsets, mirror, args.reps, args.remote_python)
        finally:
            for server in (shaped, loop):
                if server is not None:
                    server.stop()
            link.destroy()
    gain = slow["off"][0] / slow["auto"][0]
    loss = fast["auto"][0] / fast["off"][0]
    print()
    print(f"shaped {args.rate}: auto is {gain:.2f}x faster than off (goal >= 1.6x)")
    print(f"loopback: auto takes {loss:.2f}x off's time (goal <= 1.05x)")
    for codec in ("zlib", "zstd"):
        print(f"compressing everything ({codec}): {slow['off'][0] / slow[codec][0]:.2f}x off over the link, "
              f"{fast[codec][0] / fast['off'][0]:.2f}x off's time on the loopback")
    print(f"peak RSS of the sender (this process): {benchjson.self_peak_mib():.0f} MiB")
    print(f"reproduce: .venv/bin/python scripts/bench/bench_compress.py --size-mib {args.size_mib} "
          f"--change {args.change} --reps {args.reps}")
    mb = changed / 1e6
    benchjson.write(args.json, "compress", [
        # As rates of the changed data, so that "auto at least 1.6x off" is a ratio of at least 1.6.
        benchjson.Figure(f"auto over a {args.rate} link", mb / slow["auto"][0], "MB/s of changes",
                         "compress = off", mb / slow["off"][0], (">=", 1.6, "ratio"), "issue 12"),
        benchjson.Figure("auto over the loopback", fast["auto"][0], "s", "compress = off", fast["off"][0],
                         ("<=", 1.05, "ratio"), "issue 12"),
        benchjson.Figure(f"zlib (always) over a {args.rate} link", mb / slow["zlib"][0], "MB/s of changes",
                         "compress = off", mb / slow["off"][0]),
        benchjson.Figure(f"zstd (always) over a {args.rate} link", mb / slow["zstd"][0], "MB/s of changes",
                         "compress = off", mb / slow["off"][0]),
    ], peak_rss_mib=benchjson.self_peak_mib(), peak_rss_of="the sender",
        command=benchjson.reproduce("bench_compress.py"),
        size=f"{args.size_mib} MiB ext4, {args.change}% changed, {args.reps} reps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
