"""The demo's body: lvmirror's main job on real LVM; runs inside the VM (scripts/demo boots it).

Makes a volume group on a loop device and a classic volume, writes a config,
then: `lvmirror init`, writes to the volume, a look at the change through
lvdeltafs, `lvmirror sync`, `lvmirror check`, a change made behind lvmirror's
back found by `check` and mended by `check --repair`, and `lvmirror status`.
Every step prints what it ran and what it did; the demo exits non-zero the
moment the mirror's sha256 differs from its snapshot's or a step fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
VG, LV = "demo", "data"
MiB = 1 << 20


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*argv: str, expect: int = 0) -> str:
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    for text in (proc.stdout, proc.stderr):
        if text.strip():
            print(text.rstrip(), flush=True)
    if proc.returncode != expect:
        raise DemoFailed(f"{argv[0]} exited {proc.returncode}, expected {expect}")
    return proc.stdout


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Demo:
    def __init__(self, work: Path):
        self.work = work
        self.cfg = work / "lvmirror.toml"
        self.image = work / "mirror" / f"{LV}.img"

    def lvmirror(self, *args: str, expect: int = 0) -> str:
        return run(str(BIN / "lvmirror"), "-c", str(self.cfg), *args, expect=expect)

    def base(self) -> str:
        """The device of the snapshot the mirror's state names (found by UUID, as lvmirror does)."""
        state = json.loads(Path(f"{self.image}.lvmirror-state").read_text())
        uuid = state["snapshot"].split("@")[0]
        out = subprocess.run(["lvs", "--noheadings", "-o", "lv_uuid,lv_path", VG], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            u, path = line.split()
            if u == uuid:
                return path
        raise DemoFailed(f"the snapshot the mirror holds ({state['snapshot']}) is not in {VG}")

    def verify(self) -> None:
        snap = self.base()
        a, b = sha256_of(snap), sha256_of(self.image)
        print(f"sha256 {snap}: {a}\nsha256 {self.image}: {b}")
        if a != b:
            raise DemoFailed("the mirror differs from the snapshot it says it holds")
        print("the mirror equals its snapshot byte for byte")

    def setup(self) -> None:
        step("a volume group on a loop device, a 64 MiB volume with some data")
        backing = self.work / "pv.img"
        backing.touch()
        os.truncate(backing, 512 * MiB)
        pv = run("losetup", "-f", "--show", str(backing)).strip()
        self.pv = pv
        run("pvcreate", "-q", pv)
        run("vgcreate", "-q", VG, pv)
        run("lvcreate", "-q", "-L", "64M", "-n", LV, VG)
        rng = random.Random(1)
        for offset in (0, 9 * MiB, 40 * MiB):
            write(f"/dev/{VG}/{LV}", offset, rng.randbytes(2 * MiB))
        step("the configuration")
        self.image.parent.mkdir()
        self.metrics = self.work / "metrics" / "lvmirror.prom"
        self.metrics.parent.mkdir(mode=0o755)
        self.cfg.write_text(f'[defaults]\nlock_dir = "{self.work}/lock"\nwork_dir = "{self.work}/state"\n'
                            f'metrics_file = "{self.metrics}"\n\n'
                            f'[volume.{LV}]\nvg = "{VG}"\nlv = "{LV}"\ndestination = "{self.image}"\n'
                            'snapshot_size = "16M"\n')
        self.cfg.chmod(0o600)
        print(self.cfg.read_text())

    def main_job(self) -> None:
        step("lvmirror init: a snapshot, then a full copy that skips zero runs")
        self.lvmirror("init", LV)
        run("ls", "-ls", str(self.image))
        print("(the first column is the blocks the image uses: 6 MiB of data, the rest holes)")
        self.verify()

        step("writes to the live volume")
        rng = random.Random(2)
        for offset in (1 * MiB + 4096, 30 * MiB, 63 * MiB):
            write(f"/dev/{VG}/{LV}", offset, rng.randbytes(256 * 1024))
        print("wrote 3 x 256 KiB at 1 MiB + 4 KiB, 30 MiB and 63 MiB")

        self.show_delta()

        step("lvmirror sync --dry-run: what would be sent (no snapshot kept, nothing written)")
        self.lvmirror("sync", "--dry-run", LV)

        step("lvmirror sync: new snapshot, delta from the base, staged, verified, applied; old base removed")
        before = sha256_of(self.image)
        self.lvmirror("sync", LV)
        run("lvs", "-o", "lv_name,origin,lv_size,snap_percent,lv_tags", VG)
        self.verify()
        self.history(before)

        step("lvmirror check: block digests of the snapshot and of the mirror")
        self.lvmirror("check", LV)

        step("someone writes to the mirror behind lvmirror's back")
        write(str(self.image), 20 * MiB, b"not the snapshot's data")
        self.lvmirror("check", LV, expect=6)
        print("check exits 6 and prints the range that differs")
        self.lvmirror("check", "--repair", LV)
        self.lvmirror("check", LV)
        self.verify()

        step("lvmirror status")
        self.lvmirror("status")
        self.monitoring()

    def history(self, before: str) -> None:
        step("history: the sync kept the bytes it overwrote (an undo delta); the point before it, browsed "
             "and restored")
        self.lvmirror("history", LV)
        mnt = self.work / "points"
        mnt.mkdir()
        run(str(BIN / "lvdeltafs"), "mount", "--mirror", f"{LV}={self.image}", str(mnt))
        try:
            point = mnt / "@mirrors" / LV / "1" / "image"
            run("ls", "-l", str(point))
            got = sha256_of(point)
        finally:
            run(str(BIN / "lvdeltafs"), "umount", str(mnt))
        print(f"sha256 of point 1, composed by the mount: {got}\n"
              f"sha256 of the mirror before the sync:     {before}")
        if got != before:
            raise DemoFailed("the kept point is not what the mirror held before the sync")
        run("lvcreate", "-q", "-L", "64M", "-n", f"{LV}-restored", VG)
        self.lvmirror("restore", LV, "--point", "1", "--to", f"{VG}/{LV}-restored")
        if sha256_of(f"/dev/{VG}/{LV}-restored") != before:
            raise DemoFailed("the restored volume is not the point")
        print("the new LV holds point 1 byte for byte")
        run("lvremove", "-q", "-y", f"{VG}/{LV}-restored")

    def monitoring(self) -> None:
        step("monitoring: status --json --max-age (a Nagios/Icinga check), the Prometheus textfile")
        doc = json.loads(self.lvmirror("status", "--json", "--max-age", "26h"))
        vol = doc["volumes"][0]
        print(f"schema {doc['schema']}: {vol['name']} generation {vol['generation']}, stale {vol['stale']}, "
              f"last success sent {vol['last_success']['bytes_sent']} bytes")
        if vol["stale"] or vol["last_success"]["command"] != "sync":
            raise DemoFailed("status --json does not show the sync that just succeeded")
        self.lvmirror("status", "--max-age", "1s", expect=2)
        print("a limit of 1 s: exit 2 (CRITICAL), naming the volume")
        text = self.metrics.read_text()
        print(text)
        if f'lvmirror_snapshot_cow_ratio{{volume="{LV}"}}' not in text:
            raise DemoFailed("the metrics file has no COW series for the volume")

    def show_delta(self) -> None:
        step("the change as files: lvdeltafs")
        mnt = self.work / "mnt"
        mnt.mkdir()
        help_text = subprocess.run([str(BIN / "lvdeltafs"), "--help"], capture_output=True, text=True).stdout
        if "mount" in help_text:
            run(str(BIN / "lvdeltafs"), "mount", "--vg", VG, str(mnt))
            try:
                pair = next(p for p in sorted((mnt / VG / LV).iterdir()) if p.name.endswith("..@origin"))
                run("ls", "-ls", str(pair))
                run("cat", str(pair / "ranges"))
                run("du", "-h", str(pair / "data"))
                print("(the base snapshot against the live volume: what the next sync sends)")
            finally:
                run(str(BIN / "lvdeltafs"), "umount", str(mnt))
            return
        snap = self.base()
        peek = f"{LV}-peek"
        run("lvcreate", "-q", "-s", "-L", "8M", "-n", peek, f"{VG}/{LV}")
        try:
            base = f"{VG}/{Path(snap).name}"
            run(str(BIN / "lvdeltafs"), "ranges", base, f"{VG}/{peek}")
            run(str(BIN / "lvdeltafs"), "export", base, f"{VG}/{peek}", str(self.work / "delta"))
            run("ls", "-ls", str(self.work / "delta"))
        finally:
            run("lvremove", "-q", "-y", f"{VG}/{peek}")

    def teardown(self) -> None:
        subprocess.run(["vgremove", "-q", "-ff", "-y", VG], capture_output=True)
        if getattr(self, "pv", None):
            subprocess.run(["losetup", "-d", self.pv], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    if os.environ.get("LVMIRROR_IN_VM") != "1":
        print("demo: run me through scripts/demo (I need the VM's device-mapper)", file=sys.stderr)
        return 2
    started = time.monotonic()
    demo = Demo(Path(tempfile.mkdtemp(prefix="lvmirror-demo-", dir="/tmp")))
    try:
        demo.setup()
        demo.main_job()
    except DemoFailed as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        demo.teardown()
    print(f"\ndemo OK ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
