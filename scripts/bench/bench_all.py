#!/usr/bin/env python3
"""Every benchmark at a size that takes a few minutes, in one table: each figure beside its anchor and target.

Run it as ``scripts/bench/all`` (the project's .venv python).  Each benchmark runs as a subprocess,
one after the other (they would disturb each other's timings), at the reduced size listed in BENCHES
below, and writes its key figures with --json; this prints one Markdown table of them, the table
README's Performance section shows.  A benchmark that cannot run here (not root, no bindfs, no network
namespace) is listed as "not run: why", never as met; one that fails shows its exit status and the
last line it wrote to stderr.

--baseline REV runs the same benchmark scripts (these, the current ones) a second time, with the code
of git revision REV (its tree extracted with git archive into a temporary directory), alternating with
the current code bench by bench, and adds before/after columns: before and after on one machine, in
one run.  A benchmark whose script needs something REV's code does not have shows why in that column.

bench_sync_lvm.py and bench_restore_lvm.py are left out: they need the VM (the lines at the end of the
table say how to run them).

    scripts/bench/all [--only sync,fuse,...] [--baseline REV] [--logs DIR] [--json PATH] [--args NAME=ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT = 1200  # seconds: a benchmark past this is stuck, not slow

VM_LINE = ("sync_lvm (a whole `lvmirror sync` on real LVM) and restore_lvm (`lvmirror restore` against the "
           "floor of reading and writing just the differing blocks) are not in this run: they need the VM. "
           "Run them with `scripts/lvm-vm --mem 3072 -- .venv/bin/python scripts/bench/bench_sync_lvm.py` "
           "and `... scripts/bench/bench_restore_lvm.py`.")


def missing_tools(*tools: str) -> str | None:
    gone = [t for t in tools if shutil.which(t) is None]
    return f"no {', '.join(gone)}" if gone else None


def need_root(why: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if os.geteuid() == 0 else f"needs root ({why})"
    return check


def fuse_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the mount's read-ahead knob in /sys)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return missing_tools("bindfs", "fusermount3")


def netns_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a network namespace and tc)"
    return missing_tools("ip", "tc", "sshd", "ssh", "mkfs.ext4")


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]  # the reduced size: a few minutes for the whole run on a 2-core machine
    ready: Callable[[], str | None] = lambda: None  # why it cannot run here, or None


BENCHES = [
    # 4 GiB and 16 GiB sparse volumes, 2% changed (82 MiB); rsync reads the 4 GiB image whole.
    Bench("sync", "bench_sync.py", ["--size-gib", "4", "--change", "2", "--reps", "3"],
          lambda: missing_tools("rsync")),
    # A run is ~0.1 s here: more of them, so one scheduling hiccup does not move the median.
    Bench("stream", "bench_stream.py", ["--size-gib", "2", "--reps", "9", "--dir", "/var/tmp"]),
    Bench("ranges", "bench_ranges.py", ["--exceptions", "5000000", "--runs", "3"]),
    Bench("cow", "bench_cow.py", ["--exceptions", "5000000", "--runs", "3"]),
    Bench("exact", "bench_exact.py", ["--size-gib", "1", "--reps", "3", "--dir", "/var/tmp"]),
    Bench("thin_parse", "bench_thin_parse.py", ["--elements", "300000", "--reps", "3", "--seed", "1"]),
    Bench("fuse", "bench_fuse.py", ["--chunks-mib", "256", "--reps", "5", "--dir", "/var/tmp"], fuse_ready),
    Bench("ssh", "bench_ssh.py", ["--size-mib", "128", "--reps", "3"], lambda: missing_tools("sshd", "ssh")),
    # 82 MiB changed: with less, auto's first probes (8 MiB, measured after 4) are a large share of the send.
    # mkfs.ext4 -d /usr/share takes most of this benchmark's time, whatever the size.
    Bench("compress", "bench_compress.py", ["--size-mib", "4096", "--change", "2", "--reps", "3"],
          netns_ready),
    Bench("fanout", "bench_fanout.py", ["--size-mib", "2048", "--change", "2", "--reps", "3"]),
    # bench_sync's 4 GiB volume, with history and without; a 512 MiB mirror with 3 points read through the
    # mount and bindfs. Its second part needs root, /dev/fuse and bindfs: without them the script says
    # "not run" for it (in the sizes line) and still measures the sync.
    Bench("history", "bench_history.py",
          ["--size-gib", "4", "--change", "2", "--reps", "3", "--read-mib", "512", "--points", "3",
           "--dir", "/var/tmp"]),
]


@dataclass
class Outcome:
    record: dict | None  # the benchmark's --json record
    why: str = ""  # why there is no record (not run, failed)
    seconds: float = 0.0


def run_bench(bench: Bench, code_root: Path, logs: Path, label: str) -> Outcome:
    """One benchmark, with the code under code_root first on the path, its output kept in logs."""
    out = logs / f"{bench.name}-{label}.json"
    out.unlink(missing_ok=True)
    script = code_root / "scripts" / "bench" / bench.script
    argv = [sys.executable, str(script), *bench.args, "--json", str(out)]
    # PYTHONPATH as well as the scripts' own sys.path: the lvdeltafs command bench_fuse mounts with is the
    # venv's entry point, which would otherwise import whatever package the venv has installed.
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    t0 = time.perf_counter()
    with open(logs / f"{bench.name}-{label}.out", "w") as stdout, \
            open(logs / f"{bench.name}-{label}.err", "w") as stderr:
        try:
            proc = subprocess.run(argv, cwd=code_root, env=env, stdout=stdout, stderr=stderr, timeout=TIMEOUT,
                                  stdin=subprocess.DEVNULL)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {TIMEOUT} s"
    seconds = time.perf_counter() - t0
    if out.exists():  # a benchmark exits 1 when a target of its own is missed: the record still stands
        return Outcome(json.loads(out.read_text()), seconds=seconds)
    err = [line for line in (logs / f"{bench.name}-{label}.err").read_text().splitlines() if line.strip()]
    last = err[-1].strip() if err else "no error output"
    status = code if isinstance(code, str) else f"exit {code}"
    return Outcome(None, f"failed ({status}): {last[:160]}", seconds)


def extract(rev: str, into: Path) -> Path:
    """REV's tree (git archive), with the current benchmark scripts over its own: the same measurements."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    bench_dir = into / "scripts" / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    for script in HERE.glob("*.py"):
        shutil.copy2(script, bench_dir / script.name)
    return into


def num(v: float | None) -> str:
    if v is None:
        return ""
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"


def target_text(fig: dict) -> str:
    if not fig["target"]:
        return "—"
    op, limit, on = fig["target"]
    sign = {">=": "≥", "<=": "≤"}[op]
    lim = f"{limit:.1f}" if on == "ratio" and float(limit).is_integer() else f"{limit:g}"
    what = f"{sign} {lim}x" if on == "ratio" else f"{sign} {lim} {fig['unit']}"
    return f"{what} ({fig['target_source']})" if fig["target_source"] else what


def met_text(fig: dict) -> str:
    if fig["met"] is None:
        return "—"
    return "yes" if fig["met"] else "**no**"


def figure_text(fig: dict) -> str:
    text = f"{fig['name']}: **{num(fig['value'])} {fig['unit']}**"
    return f"{text} ({fig['note']})" if fig["note"] else text


def cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table(results: dict[str, tuple[Outcome, Outcome | None]], baseline: str | None) -> list[str]:
    head = ["benchmark", "figure", "anchor", "ratio", "target", "met?"]
    if baseline:
        head += [f"before ({baseline})", "after / before"]
    head += ["peak RSS", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (now, before) in results.items():
        if now.record is None:
            row = [name, f"not run: {now.why}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
            continue
        rec = now.record
        old = {f["name"]: f for f in before.record["figures"]} if before and before.record else {}
        for i, fig in enumerate(rec["figures"]):
            anchor = f"{fig['anchor_name']}: {num(fig['anchor_value'])} {fig['unit']}" if fig["anchor_name"] \
                and fig["anchor_value"] is not None else (fig["anchor_name"] or "")
            ratio = f"{fig['ratio']:.2f}x" if fig["ratio"] is not None else ""
            row = [name if i == 0 else "", figure_text(fig), anchor, ratio, target_text(fig), met_text(fig)]
            if baseline:
                if before is None or before.record is None:
                    row += [f"not run: {before.why}" if before and i == 0 else "", ""]
                elif fig["name"] in old:
                    was = old[fig["name"]]["value"]
                    row += [f"{num(was)} {fig['unit']}", f"{fig['value'] / was:.2f}x" if was else ""]
                else:
                    row += ["", ""]
            if i == 0:
                row += [f"{num(rec['peak_rss_mib'])} MiB ({rec['peak_rss_of']})", f"`{rec['command']}`"]
            else:
                row += ["", ""]
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated, of: {', '.join(b.name for b in BENCHES)}")
    ap.add_argument("--baseline", metavar="REV", help="also run the benchmarks with this revision's code")
    ap.add_argument("--logs", metavar="DIR", help="keep each benchmark's output and JSON there")
    ap.add_argument("--json", metavar="PATH", help="also write every record there")
    ap.add_argument("--args", metavar="NAME=ARGS", action="append", default=[],
                    help="run NAME with these arguments instead (e.g. sync='--size-gib 1 --reps 1')")
    args = ap.parse_args()
    benches = BENCHES
    for spec in args.args:
        name, _eq, rest = spec.partition("=")
        match = [b for b in BENCHES if b.name == name]
        if not match:
            ap.error(f"--args {spec}: no benchmark {name!r}")
        match[0].args = shlex.split(rest)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {b.name for b in BENCHES}]
        if unknown:
            ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
        benches = [b for b in BENCHES if b.name in names]
    if args.baseline:  # resolved now, so the table names the commit, and a bad name fails before any run
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{args.baseline}^{{commit}}"],
                             capture_output=True, text=True)
        if rev.returncode:
            ap.error(f"--baseline {args.baseline}: not a revision of this repository")
        args.baseline = rev.stdout.strip()

    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-all-", dir="/var/tmp") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        old_root = extract(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        results: dict[str, tuple[Outcome, Outcome | None]] = {}
        for bench in benches:
            why = bench.ready()
            if why:
                results[bench.name] = (Outcome(None, why), Outcome(None, why) if old_root else None)
                print(f"{bench.name}: not run: {why}", file=sys.stderr, flush=True)
                continue
            now = run_bench(bench, ROOT, logs, "now")
            print(f"{bench.name}: {now.seconds:.0f} s{'' if now.record else ' ' + now.why}",
                  file=sys.stderr, flush=True)
            before = None
            if old_root is not None:
                before = run_bench(bench, old_root, logs, "baseline")
                print(f"{bench.name} at {args.baseline}: {before.seconds:.0f} s"
                      f"{'' if before.record else ' ' + before.why}", file=sys.stderr, flush=True)
            results[bench.name] = (now, before)
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()

    cpus = os.cpu_count()
    print(f"scripts/bench/all{' ' + shlex.join(sys.argv[1:]) if sys.argv[1:] else ''}: "
          f"{elapsed / 60:.1f} min on {cpus} CPUs; load average (1, 5, 15 min) "
          f"{' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_end)} at the end")
    print()
    print("\n".join(table(results, args.baseline)))
    print()
    sizes = [f"{name}: {o.record['size']}" for name, (o, _b) in results.items() if o.record]
    print("sizes: " + "; ".join(sizes))
    print(VM_LINE)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {name: {"now": now.record or now.why,
                    "baseline": None if before is None else before.record or before.why}
             for name, (now, before) in results.items()}, indent=1))
    ran = [o for o, _b in results.values() if o.record]
    return 0 if len(ran) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
