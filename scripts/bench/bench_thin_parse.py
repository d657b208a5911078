#!/usr/bin/env python3
"""Benchmark: the expat parser of thin_delta / thin_dump output vs the line scanner it replaced.

Writes large synthetic outputs (plain thin_delta, 0.9.0 ``thin_delta
--verbose`` with <range>s nested in <same>/<different>/<right_only>/<left_only>,
``thin_dump --dev-id``, and a plain delta of two close snapshots, nearly all
<same>), then times, alternating in one run, (a) the old regex line scanner
(kept below, verbatim, only for this comparison) and (b)
lvdeltafs.sources.thin's expat parser, each fed the way production feeds it:
from a subprocess pipe (``cat FILE``), the scanner by lines, expat by 64 KiB
reads.  Every measurement runs in a fresh forked child, so its peak RSS
(resource.getrusage in the child) is its own; "pipe only" is the same child
draining the pipe without parsing: the floor for time and memory.  Both
parsers must produce identical extents.

    .venv/bin/python scripts/bench/bench_thin_parse.py [--elements 1500000] [--reps 5] \
        [--forms plain,verbose,dump,mostly-same] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO
from xml.parsers import expat

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)

from lvdeltafs.errors import BadInput  # noqa: E402
from lvdeltafs.extents import DATA, ZERO, Extents  # noqa: E402
from lvdeltafs.sources import thin  # noqa: E402
from lvdeltafs.sources.thin import SECTOR, _Ranges  # noqa: E402

THIN1, THIN2, DEV_ID = 1, 2, 2
BLOCK_SECTORS = 128  # 64 KiB pool blocks
TARGET_SIZE = 1 << 60  # large enough that nothing is clipped


# ---- the line scanner, as lvdeltafs.sources.thin had it before expat -------

_ELEMENT = re.compile(r"<(/?)([A-Za-z_]+)((?:\s+[A-Za-z_]+=\"[^\"]*\")*)\s*(/?)>")
_ATTR = re.compile(r"([A-Za-z_]+)=\"([^\"]*)\"")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")
_KIND_OF = {"different": DATA, "right_only": DATA, "left_only": ZERO, "same": None}


def _number(attrs: dict[str, str], key: str, where: str) -> int:
    value = attrs.get(key)
    if value is None:
        raise BadInput(f"{where}: attribute {key!r} is missing")
    if not _NUMBER.fullmatch(value):
        raise BadInput(f"{where}: attribute {key}={value!r} is not a decimal block number")
    return int(value)


_Element = tuple[int, str, bool, bool, dict[str, str]]


def _elements(lines: Iterable[str | bytes], what: str) -> Iterator[_Element]:
    """(line number, tag, is_closing, is_self_closing, attributes) per line; blank lines skipped."""
    for no, raw in enumerate(lines, 1):
        line = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).strip()
        if not line:
            continue
        m = _ELEMENT.fullmatch(line)
        if not m:
            raise BadInput(f"{what} line {no} is not understood: {line[:120]!r}")
        closing, tag, attrs, selfclose = m.group(1) == "/", m.group(2), m.group(3), m.group(4) == "/"
        yield no, tag, closing, selfclose, dict(_ATTR.findall(attrs))


def _block_bytes(attrs: dict[str, str], where: str) -> int:
    sectors = _number(attrs, "data_block_size", where)
    if sectors == 0:
        raise BadInput(f"{where}: data_block_size is 0")
    return sectors * SECTOR


def old_parse_thin_delta(lines: Iterable[str | bytes], target_size: int, *, thin1: int,
                         thin2: int) -> Extents:
    """Parse ``thin_delta`` output (plain or ``--verbose``) into byte extents of the newer device.

    ``different``/``right_only`` become DATA, ``left_only`` ZERO (unmapped in
    the newer device, so it reads as zeros), ``same`` is dropped; clipped to
    ``target_size``.  The diff must be between ``thin1`` and ``thin2``.
    """
    what = "thin_delta output"
    ranges = _Ranges()
    block_bytes = 0
    in_diff = seen_diff = done = False
    group: str | None = None  # the enclosing <different> etc. in --verbose output
    for no, tag, closing, selfclose, attrs in _elements(lines, what):
        where = f"{what} line {no}"
        if done:
            raise BadInput(f"{where}: <{tag}> after </superblock>")
        if tag == "superblock":
            if closing:
                done = True
            elif block_bytes:
                raise BadInput(f"{where}: a second <superblock>")
            else:
                block_bytes = _block_bytes(attrs, where)
        elif tag == "diff":
            if closing:
                in_diff = False
                continue
            if not block_bytes or seen_diff:
                raise BadInput(f"{where}: unexpected <diff>")
            left, right = _number(attrs, "left", where), _number(attrs, "right", where)
            if (left, right) != (thin1, thin2):
                raise BadInput(f"{where}: the diff is between thin devices {left} and {right}, "
                               f"but {thin1} and {thin2} were asked for")
            in_diff = seen_diff = True
        elif tag in _KIND_OF and in_diff:
            if selfclose:  # plain output: <different begin= length=/>
                if group is not None:
                    raise BadInput(f"{where}: <{tag}/> inside <{group}>")
                _add(ranges, tag, attrs, where)
            elif closing:
                if group != tag:
                    raise BadInput(f"{where}: </{tag}> does not close <{group}>")
                group = None
            elif group is None:
                group = tag  # --verbose: <different> <range .../> ... </different>
            else:
                raise BadInput(f"{where}: <{tag}> inside <{group}>")
        elif tag == "range" and selfclose and group is not None:
            _add(ranges, group, attrs, where)
        else:
            raise BadInput(f"{where}: unknown or misplaced element <{'/' if closing else ''}{tag}>; "
                           "refusing to guess what it means for the delta")
    if not done or not seen_diff or in_diff or group is not None:
        raise BadInput(f"{what} ended early (no complete <diff left=\"{thin1}\" right=\"{thin2}\"> "
                       "inside a closed <superblock>)")
    return ranges.extents(block_bytes, target_size)


def _add(ranges: _Ranges, tag: str, attrs: dict[str, str], where: str) -> None:
    begin, length = _number(attrs, "begin", where), _number(attrs, "length", where)
    if length == 0:
        raise BadInput(f"{where}: a range of length 0")
    kind = _KIND_OF[tag]
    if kind is not None:
        ranges.add(begin, length, kind)


def old_parse_thin_dump(lines: Iterable[str | bytes], dev_id: int, size: int) -> Extents:
    """The mapped blocks of one device in ``thin_dump --dev-id`` output, as DATA extents."""
    what = "thin_dump output"
    ranges = _Ranges()
    block_bytes = 0
    device: int | None = None
    seen = done = False
    for no, tag, closing, _selfclose, attrs in _elements(lines, what):
        where = f"{what} line {no}"
        if done:
            raise BadInput(f"{where}: <{tag}> after </superblock>")
        if tag == "superblock":
            if closing:
                done = True
            else:
                block_bytes = _block_bytes(attrs, where)
        elif tag == "device":
            if closing:
                device = None
                continue
            device = _number(attrs, "dev_id", where)
            if device != dev_id:
                raise BadInput(f"{where}: thin device {device} listed, but only {dev_id} was asked for")
            seen = True
        elif tag == "range_mapping" and device is not None:
            ranges.add(_number(attrs, "origin_begin", where), _number(attrs, "length", where), DATA)
        elif tag == "single_mapping" and device is not None:
            ranges.add(_number(attrs, "origin_block", where), 1, DATA)
        else:
            raise BadInput(f"{where}: unknown or misplaced element <{'/' if closing else ''}{tag}>")
    if not done:
        raise BadInput(f"{what} ended early (no </superblock>)")
    if not seen:
        raise BadInput(f"thin device {dev_id} is not in the pool's metadata: check its thin_id "
                       "(lvs -o lv_name,thin_id)")
    return ranges.extents(block_bytes, size)


# ---- synthetic outputs ------------------------------------------------------

KINDS = ("same", "different", "right_only", "left_only")


def _write(path: str, lines: Iterable[str]) -> None:
    """Write in batches, so this process stays small: forked children start from its size."""
    with open(path, "w", encoding="ascii") as f:
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) >= 10_000:
                f.write("".join(batch))
                batch.clear()
        f.write("".join(batch))


def _superblock(extra: str = "") -> str:
    return (f'<superblock uuid="" time="1" transaction="2"{extra} data_block_size="{BLOCK_SECTORS}" '
            f'nr_data_blocks="{1 << 32}">\n')


def plain_delta(n: int, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> Iterator[str]:
    yield _superblock()
    yield f'  <diff left="{THIN1}" right="{THIN2}">\n'
    begin = 0
    for _ in range(n):
        length = rng.randint(1, 64)
        yield f'    <{rng.choice(kinds)} begin="{begin}" length="{length}"/>\n'
        begin += length + rng.randint(0, 64)
    yield "  </diff>\n</superblock>\n"


def mostly_same(n: int, rng: random.Random) -> Iterator[str]:
    """Two close snapshots: 99 ranges in 100 <same>, dropped, so the peak RSS is mostly the parser's own."""
    return plain_delta(n, rng, ("same",) * 99 + ("different",))


def verbose_delta(n: int, rng: random.Random) -> Iterator[str]:
    """thin_delta 0.9.0 --verbose: runs of <range>s, each run inside its kind's element."""
    yield _superblock()
    yield f'  <diff left="{THIN1}" right="{THIN2}">\n'
    begin, done = 0, 0
    while done < n:
        kind = rng.choice(KINDS)
        yield f"    <{kind}>\n"
        for _ in range(min(rng.randint(1, 8), n - done)):
            length = rng.randint(1, 64)
            data = rng.randrange(1 << 32)
            if kind == "different":
                yield (f'      <range begin="{begin}" left_data_begin="{data}" '
                       f'right_data_begin="{rng.randrange(1 << 32)}" length="{length}"/>\n')
            else:
                yield f'      <range begin="{begin}" data_begin="{data}" length="{length}"/>\n'
            begin += length + rng.randint(0, 64)
            done += 1
        yield f"    </{kind}>\n"
    yield "  </diff>\n</superblock>\n"


def dump(n: int, rng: random.Random) -> Iterator[str]:
    """thin_dump --dev-id: one device's range and single mappings."""
    yield _superblock(' flags="0" version="1"')
    yield (f'  <device dev_id="{DEV_ID}" mapped_blocks="{n}" transaction="0" creation_time="0" '
           'snap_time="1">\n')
    origin = 0
    for _ in range(n):
        data, when = rng.randrange(1 << 32), rng.randint(0, 5)
        if rng.random() < 0.5:
            length = rng.randint(2, 64)
            yield (f'    <range_mapping origin_begin="{origin}" data_begin="{data}" length="{length}" '
                   f'time="{when}"/>\n')
        else:
            length = 1
            yield f'    <single_mapping origin_block="{origin}" data_block="{data}" time="{when}"/>\n'
        origin += length + rng.randint(0, 64)
    yield "  </device>\n</superblock>\n"


FORMS: dict[str, Callable[[int, random.Random], Iterator[str]]] = {
    "plain": plain_delta, "verbose": verbose_delta, "dump": dump, "mostly-same": mostly_same}


# ---- the parsers, fed as production feeds them -----------------------------

def old_scanner(form: str, pipe: IO[bytes]) -> Extents | None:
    # The old _stream handed the pipe's file object over: the scanner iterated its lines.
    if form == "dump":
        return old_parse_thin_dump(pipe, DEV_ID, TARGET_SIZE)
    return old_parse_thin_delta(pipe, TARGET_SIZE, thin1=THIN1, thin2=THIN2)


def expat_parser(form: str, pipe: IO[bytes]) -> Extents | None:
    # What thin._stream does now: os.read() chunks straight off the pipe.
    chunks = thin._pipe_chunks(pipe)
    if form == "dump":
        return thin._mapped_from_chunks(chunks, DEV_ID, TARGET_SIZE)
    return thin._delta_from_chunks(chunks, TARGET_SIZE, THIN1, THIN2)


def pipe_only(form: str, pipe: IO[bytes]) -> Extents | None:
    for _ in thin._pipe_chunks(pipe):
        pass
    return None


PARSERS: dict[str, Callable[[str, IO[bytes]], Extents | None]] = {
    "line scanner (old)": old_scanner, "expat (new)": expat_parser, "pipe only": pipe_only}


def _digest(ext: Extents | None) -> str:
    if ext is None:
        return "-"
    h = hashlib.sha256()
    for part in (ext.offsets, ext.lengths, ext.kinds):
        h.update(part.tobytes())
    return h.hexdigest()[:16]


def measure(parser: str, form: str, path: str) -> dict:
    """One parse in a forked child: wall and CPU seconds, the child's own peak RSS, a digest of the result."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(rfd)
            t0 = time.perf_counter()
            proc = subprocess.Popen(["cat", path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            ext = PARSERS[parser](form, proc.stdout)
            proc.stdout.close()
            if proc.wait() != 0:
                raise RuntimeError(f"cat {path} failed")
            wall = time.perf_counter() - t0
            usage = resource.getrusage(resource.RUSAGE_SELF)
            result = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                      "maxrss_kib": usage.ru_maxrss, "digest": _digest(ext),
                      "ranges": 0 if ext is None else len(ext.offsets)}
            os.write(wfd, json.dumps(result).encode())
            code = 0
        except BaseException as exc:  # report, never return into the parent's code
            os.write(wfd, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        answer = json.loads(f.read() or b'{"error": "no answer"}')
    os.waitpid(pid, 0)
    if "error" in answer:
        raise SystemExit(f"{parser} on {form}: {answer['error']}")
    return answer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=1_500_000,
                    help="range (or mapping) elements per output (default 1500000)")
    ap.add_argument("--reps", type=int, default=5,
                    help="measurements per parser and form; the median is shown")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of: {', '.join(FORMS)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to write the outputs (default: a temporary directory)")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        ap.error(f"unknown form(s): {', '.join(unknown)}")

    cmd = [".venv/bin/python", "scripts/bench/bench_thin_parse.py", "--elements", str(args.elements),
           "--reps", str(args.reps), "--forms", ",".join(forms), "--seed", str(args.seed)]
    print("reproduce:", shlex.join(cmd))
    print(f"python {sys.version.split()[0]}, {expat.EXPAT_VERSION}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f} at start")

    failed = False
    figures: list[benchjson.Figure] = []
    peak = 0.0
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_thin_parse.") as tmp:
        for form in forms:
            path = os.path.join(tmp, f"{form}.xml")
            t0 = time.perf_counter()
            _write(path, FORMS[form](args.elements, random.Random(args.seed)))
            size = os.path.getsize(path)
            print(f"\n{form}: {args.elements} elements, {size / 2**20:.1f} MiB, written in "
                  f"{time.perf_counter() - t0:.1f} s")
            results: dict[str, list[dict]] = {p: [] for p in PARSERS}
            order = list(PARSERS)
            for rep in range(args.reps):
                # Alternate who goes first, so drift in the machine's load falls on both.
                for parser in order if rep % 2 == 0 else reversed(order):
                    results[parser].append(measure(parser, form, path))
            print(f"  {'parser':<20} {'median s':>9} {'CPU s':>7} {'elements/s':>11} {'MiB/s':>7} "
                  f"{'peak RSS MiB':>13}  digest")
            for parser, runs in results.items():
                wall = statistics.median(r["wall"] for r in runs)
                cpu = statistics.median(r["cpu"] for r in runs)
                rss = max(r["maxrss_kib"] for r in runs) / 1024
                digests = {r["digest"] for r in runs}
                print(f"  {parser:<20} {wall:9.2f} {cpu:7.2f} {args.elements / wall:11,.0f} "
                      f"{size / 2**20 / wall:7.1f} {rss:13.1f}  {','.join(sorted(digests))}")
                if parser == "expat (new)":
                    peak = max(peak, rss)
            old = {r["digest"] for r in results["line scanner (old)"]}
            new = {r["digest"] for r in results["expat (new)"]}
            if len(old | new) != 1:
                print(f"  MISMATCH: the two parsers disagree on {form}", file=sys.stderr)
                failed = True
            else:
                old_runs, new_runs = results["line scanner (old)"], results["expat (new)"]
                by_wall = (statistics.median(r["wall"] for r in old_runs)
                           / statistics.median(r["wall"] for r in new_runs))
                by_cpu = (statistics.median(r["cpu"] for r in old_runs)
                          / statistics.median(r["cpu"] for r in new_runs))
                print(f"  same extents ({new_runs[0]['ranges']} kept); expat is {by_wall:.2f}x the scanner's "
                      f"speed by wall clock, {by_cpu:.2f}x by CPU time")
                # By CPU time, as the README states it: on a shared machine wall time moves with the load.
                # The docstring states no target: the scanner expat replaced is the anchor.
                new_cpu = statistics.median(r["cpu"] for r in new_runs)
                old_cpu = statistics.median(r["cpu"] for r in old_runs)
                figures.append(benchjson.Figure(f"expat, {form}, by CPU time", args.elements / new_cpu / 1e3,
                                                "k elements/s", "the line scanner it replaced",
                                                args.elements / old_cpu / 1e3))
    # On a shared machine wall time moves with the others' load; CPU time much less.
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    benchjson.write(args.json, "thin_parse", figures, peak_rss_mib=peak,
                    peak_rss_of="expat's child, largest form", command=shlex.join(cmd),
                    size=f"{args.elements} elements, {len(forms)} forms, {args.reps} reps")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
