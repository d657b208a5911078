"""The demo's body; runs inside the VM (scripts/demo boots it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def sh(*argv: str) -> str:
    print("$ " + " ".join(argv), flush=True)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    if out.strip():
        print(out.rstrip(), flush=True)
    return out


def main() -> int:
    if os.environ.get("LVMIRROR_IN_VM") != "1":
        print("demo: run me through scripts/demo (I need the VM's device-mapper)", file=sys.stderr)
        return 2
    step("a volume group on a loop device")
    backing = tempfile.mkstemp(prefix="demo-pv-", dir="/tmp")[1]
    os.truncate(backing, 512 << 20)
    pv = sh("losetup", "-f", "--show", backing).strip()
    sh("pvcreate", "-q", pv)
    sh("vgcreate", "-q", "demo", pv)
    sh("lvcreate", "-q", "-L", "64M", "-n", "data", "demo")
    step("a classic snapshot, then writes to the origin")
    sh("lvcreate", "-q", "-s", "-L", "16M", "-n", "data-snap1", "demo/data")
    with open("/dev/demo/data", "r+b", buffering=0) as f:
        for offset in (0, 5 << 20, 40 << 20):
            f.seek(offset)
            f.write(os.urandom(256 << 10))
        os.fsync(f.fileno())
    sh("lvs", "-o", "lv_name,origin,lv_size,snap_percent", "demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
