"""A CPU on which numpy's fastest-looking sort is its slowest: chosen against before numpy loads.

numpy 2.4 sorts 32- and 64-bit integers with x86-simd-sort's AVX-512 code
wherever the CPU has AVX-512.  On AMD Zen 4 that code is 5-7x slower than
numpy's AVX2 one (it leans on VPCOMPRESS, which Zen 4 runs in microcode):
5 M random uint32 in 0.20 s against 0.029 s, measured on this project's
2-core EPYC (Zen 4, family 25 with avx512f); the sort is most of a
`lvdeltafs ranges` of a classic snapshot.  numpy reads
``NPY_DISABLE_CPU_FEATURES`` once, when it is imported, so the package's
``__init__`` calls :func:`avoid_slow_avx512_sort` before anything imports it.

Left alone: a variable the user set (even empty: their choice wins), a
process that imported numpy already, every other CPU (Intel's AVX-512 sort is
fast, Zen 3 has no AVX-512, Zen 5 runs VPCOMPRESS in hardware), and numpy
before 2.4, whose dispatch names differ (a name numpy does not know costs a
warning on every start; Debian 12's numpy 1.24 measured no faster without
AVX-512).  Reading the numpy version costs a file read, not an import.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import MutableMapping

VARIABLE = "NPY_DISABLE_CPU_FEATURES"
DISABLE = "X86_V4 AVX512_ICL AVX512_SPR"  # numpy 2.4's AVX-512 dispatch targets
FIRST_NUMPY = (2, 4)


def is_zen4(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's first processor is an AMD family 25 (0x19) with AVX-512: Zen 4."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())


def numpy_version() -> tuple[int, int] | None:
    """numpy's (major, minor) from its version.py, without importing it; None if unknown."""
    try:
        spec = importlib.util.find_spec("numpy")
        where = list(spec.submodule_search_locations or []) if spec else []
        with open(os.path.join(where[0], "version.py"), encoding="utf-8") as f:
            found = re.search(r'^version\s*(?::\s*str\s*)?=\s*"(\d+)\.(\d+)', f.read(), re.MULTILINE)
    except (OSError, IndexError, ImportError, ValueError):
        return None
    return (int(found.group(1)), int(found.group(2))) if found else None


def avoid_slow_avx512_sort(environ: MutableMapping[str, str] = os.environ,
                           cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Set NPY_DISABLE_CPU_FEATURES on a Zen 4 with numpy 2.4 or newer (2.x); whether it did."""
    if VARIABLE in environ or "numpy" in sys.modules:
        return False
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            cpuinfo = f.read(64 * 1024)
    except OSError:
        return False
    if not is_zen4(cpuinfo):
        return False
    version = numpy_version()
    if version is None or not FIRST_NUMPY <= version < (3, 0):
        return False
    environ[VARIABLE] = DISABLE
    return True
