"""The small JSON record each benchmark writes with --json PATH, for scripts/bench/all.

One object per run: the benchmark's name, its key figures, its peak RSS and the command that
reproduces it.  A figure is a value with its unit, optionally beside an anchor (what it is
compared with: a floor, another tool, the code it replaced) and a target on the value or on the
ratio value / anchor.  `met` is decided here, from the numbers, so no script words it its own way.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def _own_tree_only() -> None:
    """Drop the finders of editable installs (setuptools' __editable__ hooks) from the import system.

    A benchmark measures the code of the tree it sits in (each puts that tree first on sys.path).  When
    that tree lacks a module, as an older revision run by `scripts/bench/all --baseline` may, the import
    must fail there and then, not quietly load the module from whichever checkout the venv was installed
    from: that would measure a mix of two revisions.  Every benchmark imports this module before the
    project's own.
    """
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]


_own_tree_only()


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    anchor_name: str | None = None
    anchor_value: float | None = None
    # A target as (operator, limit, what it applies to: "ratio" = value / anchor, or "value").
    target: tuple[str, float, str] | None = None
    target_source: str = ""  # where the target comes from (the issue, the script's docstring)
    note: str = ""
    ratio: float | None = field(init=False, default=None)
    met: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.anchor_value:
            self.ratio = self.value / self.anchor_value
        if self.target is not None:
            op, limit, on = self.target
            subject = self.ratio if on == "ratio" else self.value
            self.met = None if subject is None else bool(OPS[op](subject, limit))


def vm_hwm_mib(pid: int | str = "self") -> float:
    """The resident-set high-water mark of a process (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def self_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reproduce(script: str, argv: list[str] | None = None) -> str:
    """The command line that reruns a benchmark from the repository root, --json left out."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:
        i = args.index("--json")
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--json=")]
    return shlex.join([".venv/bin/python", f"scripts/bench/{script}", *args])


def write(path: str | None, bench: str, figures: list[Figure], *, peak_rss_mib: float, peak_rss_of: str,
          command: str, size: str, extra: dict[str, Any] | None = None) -> None:
    """Write the record to ``path`` (nothing if None): written whole then renamed, never half a file."""
    if not path:
        return
    record = {"bench": bench, "size": size, "figures": [asdict(f) for f in figures],
              "peak_rss_mib": round(peak_rss_mib, 1), "peak_rss_of": peak_rss_of, "command": command,
              "load": os.getloadavg(), **(extra or {})}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
