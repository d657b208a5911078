#!/usr/bin/env python3
"""Benchmark: one delta sent to two destinations, the snapshot read once (lvmirror.fanout) or twice.

A target image of ``--size-mib`` with ``--change`` percent of its 64 KiB
chunks changed (half text, half random bytes) is the "snapshot"; two mirror
images start as its base (zeros).  Each run sends the delta to both through
the real receiver (LocalTransport: the shipped bundle in a subprocess),
staged, verified and applied, from a cold page cache:

- two reads: one destination after the other, each stream reading the
  target itself (what two volumes configured for one LV each would do);
- one read: both at once, each its own DeltaStream over one SharedRead of
  the target (what `destinations = [...]` does).

Printed: the bytes read from the target (counted where they are read),
against the delta's data bytes; the time of each; peak RSS of this process.
Both mirrors are compared with the target's changed chunks after each run.

    .venv/bin/python scripts/bench/bench_fanout.py [--size-mib 2048] [--change 2] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.delta import Delta, FileReader, Identity  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvmirror.encoder import DeltaStream  # noqa: E402
from lvmirror.fanout import ConsumerStream, SharedRead  # noqa: E402
from lvmirror.pipelines import send  # noqa: E402
from lvmirror.transports import LocalTransport  # noqa: E402
from tests.harness import text  # noqa: E402

MiB = 1 << 20
CHUNK = 64 << 10


class CountingReader(FileReader):
    """A FileReader that counts the bytes it reads (thread-safe: one lock per read)."""

    def __init__(self, path: str, size: int):
        super().__init__(path, size)
        self.read_bytes = 0
        self._lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        data = super().pread(offset, length)
        with self._lock:
            self.read_bytes += len(data)
        return data


def build(work: Path, size_mib: int, change: float) -> tuple[Path, list[int]]:
    target = work / "target.img"
    rng = random.Random(5)
    chunks = size_mib * MiB // CHUNK
    offsets = sorted(c * CHUNK for c in rng.sample(range(chunks), int(chunks * change / 100)))
    words = text(4 * MiB, 6)
    with open(target, "wb") as f:
        f.truncate(size_mib * MiB)
        for i, off in enumerate(offsets):
            data = words[(i * CHUNK) % (3 * MiB):][:CHUNK] if i % 2 else rng.randbytes(CHUNK)
            os.pwrite(f.fileno(), data, off)
    return target, offsets


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):  # not root: a warm cache
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fresh(mirror: Path, size: int) -> None:
    for p in mirror.parent.glob(mirror.name + ".lvmirror-*"):
        p.unlink()
    mirror.unlink(missing_ok=True)
    with open(mirror, "wb") as f:
        f.truncate(size)


def delta_of(target: Path, offsets: list[int], reader) -> Delta:
    size = target.stat().st_size
    ident = Identity("bench", "bench@1", f"bench@{time.monotonic_ns()}", size, size, CHUNK, "cow")
    return Delta(ident, Extents.from_ranges(offsets, [CHUNK] * len(offsets), DATA, size), reader)


def send_to(mirror: Path, delta: Delta, wrap=None) -> None:
    with LocalTransport(str(mirror)) as rc:
        rc.hello()
        # Forced: the mirror holds the base by construction, but has no state file to say so.
        send(rc, delta, "bench", force=True, wrap=wrap, show_progress=False)


def two_reads(target: Path, offsets: list[int], mirrors: list[Path]) -> tuple[float, int]:
    size = target.stat().st_size
    total = 0
    t0 = time.perf_counter()
    for mirror in mirrors:
        reader = CountingReader(str(target), size)
        send_to(mirror, delta_of(target, offsets, reader))
        total += reader.read_bytes
        reader.close()
    return time.perf_counter() - t0, total


def one_read(target: Path, offsets: list[int], mirrors: list[Path]) -> tuple[float, int]:
    size = target.stat().st_size
    reader = CountingReader(str(target), size)
    delta = delta_of(target, offsets, reader)
    shared = SharedRead.for_stream(reader, DeltaStream(delta))
    consumers = [shared.consumer(str(m)) for m in mirrors]
    errors: list[BaseException] = []

    def one(mirror: Path, consumer) -> None:
        try:  # as multisync does: this destination's delta reads through its consumer of the shared read
            mine = dataclasses.replace(delta, target=consumer)
            send_to(mirror, mine, wrap=lambda stream: ConsumerStream(stream, consumer))
        except BaseException as e:
            errors.append(e)
        finally:
            consumer.close()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(m, c)) for m, c in zip(mirrors, consumers, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    shared.close()
    reader.close()
    if errors:
        raise errors[0]
    return seconds, reader.read_bytes


def check(mirrors: list[Path], target: Path, offsets: list[int]) -> None:
    with open(target, "rb") as t:
        for mirror in mirrors:
            with open(mirror, "rb") as m:
                for off in offsets:
                    if os.pread(m.fileno(), CHUNK, off) != os.pread(t.fileno(), CHUNK, off):
                        raise SystemExit(f"{mirror} differs from the target at {off}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--change", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-fanout-") as tmp:
        work = Path(tmp)
        target, offsets = build(work, args.size_mib, args.change)
        data = len(offsets) * CHUNK
        mirrors = [work / "a.img", work / "b.img"]
        runs: dict[str, list[tuple[float, int]]] = {"two reads": [], "one read": []}
        for _ in range(args.reps):
            for name, job in (("two reads", two_reads), ("one read", one_read)):
                for m in mirrors:
                    fresh(m, target.stat().st_size)
                drop_caches()
                runs[name].append(job(target, offsets, mirrors))
                check(mirrors, target, offsets)
    print(f"{args.size_mib} MiB image, {args.change}% changed: {data / MiB:.0f} MiB of data to each of 2 "
          "local destinations, cold cache")
    med = {}
    for name, rs in runs.items():
        med[name] = (statistics.median(r[0] for r in rs), rs[-1][1])
        print(f"  {name:9}  median {med[name][0]:6.3f} s  runs {' '.join(f'{r[0]:.3f}' for r in rs)}  "
              f"read {med[name][1] / MiB:7.1f} MiB ({med[name][1] / data:.2f}x the delta's data)")
    print(f"peak RSS of the sender (this process): {benchjson.self_peak_mib():.0f} MiB")
    print(f"reproduce: .venv/bin/python scripts/bench/bench_fanout.py --size-mib {args.size_mib} "
          f"--change {args.change} --reps {args.reps}")
    benchjson.write(args.json, "fanout", [
        benchjson.Figure("bytes read for 2 destinations", med["one read"][1] / MiB, "MiB",
                         "the delta's data", data / MiB, ("<=", 1.0, "ratio"), "issue 13"),
        benchjson.Figure("time for 2 destinations, one read", med["one read"][0], "s",
                         "one after the other, two reads", med["two reads"][0]),
    ], peak_rss_mib=benchjson.self_peak_mib(), peak_rss_of="the sender",
        command=benchjson.reproduce("bench_fanout.py"),
        size=f"{args.size_mib} MiB, {args.change}% changed, {args.reps} reps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
