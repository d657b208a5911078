"""A stand-in for LVM on the host: an origin image file, snapshots as copies, a COW-like list of writes.

lvmirror's pipelines reach LVM only through :mod:`lvdeltafs.lvm` (``list_lvs``,
``create_snapshot``, ``remove_lv``) and :func:`lvdeltafs.pairs.lvm_delta`;
:func:`install` replaces those four with this module's, so that ``init``,
``sync`` (one destination or several), ``status`` and the metrics run
unchanged on image files, and the real receiver (local, or over a real sshd)
does the rest.  Everything else is lvmirror's own code.

What is faked, and how:

- The origin ``vg/lv`` is ``ROOT/origin.img``; write to it with
  :meth:`FakeLvm.write`, which also notes the write (offset, length) the way
  a classic snapshot's COW table would: by 64 KiB chunk, whatever the bytes.
  So a write that puts back the bytes already there is *marked* changed,
  which is what ``exact`` is for.
- A snapshot is a copy of the origin at the time it is taken
  (``ROOT/snaps/NAME.img``), tagged as asked, with a fresh UUID; its delta
  from an older one marks every chunk written between the two.
- The state lives in ``ROOT/lvm.json``, so a ``lvmirror`` run in a
  subprocess (``python -m tests.fakelvm ROOT [lvmirror arguments]``) and the
  test share it.

The subprocess form also takes test hooks in the environment (used by the
fault tests; without them it is plain ``lvmirror``):

- ``FAKELVM_SEND_LOG=PATH``: one JSON line per delta sent (``pipelines.send``):
  its label, delta id, the stream bytes this call sent and whether it finished;
- ``FAKELVM_KILL_AT=sent:N``: SIGKILL this process once the streams of the
  run (all destinations) have yielded N bytes; ``applied:N``: once the N-th
  ``pipelines.send`` of the run has returned (that destination applied).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lvdeltafs import lvm, pairs
from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import BadInput
from lvdeltafs.extents import DATA, Extents

CHUNK = 64 << 10  # the COW chunk a write marks
VG = "vgfake"
EPOCH = 1_700_000_000  # creation times: one second apart, from here, in the order taken


class FakeLvm:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.db = self.root / "lvm.json"

    # ---- the state file

    @contextmanager
    def _state(self, write: bool = False):
        with open(self.root / "lvm.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = json.loads(self.db.read_text())
            yield doc
            if write:
                tmp = self.db.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc))
                os.replace(tmp, self.db)

    @classmethod
    def create(cls, root: str | Path, lv: str, size: int) -> FakeLvm:
        fake = cls(root)
        (fake.root / "snaps").mkdir(parents=True, exist_ok=True)
        with open(fake.root / "origin.img", "wb") as f:
            f.truncate(size)
        fake.db.write_text(json.dumps({"lv": lv, "uuid": f"ORIGIN-{uuid.uuid4().hex[:12]}", "seq": 0,
                                       "writes": [], "snaps": [], "clock": EPOCH}))
        return fake

    @property
    def origin_path(self) -> Path:
        return self.root / "origin.img"

    def write(self, offset: int, data: bytes) -> None:
        """Write to the origin; the chunks it touches are marked changed, whatever the bytes."""
        fd = os.open(self.origin_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        with self._state(write=True) as doc:
            doc["writes"].append([offset, len(data), doc["seq"]])
            doc["seq"] += 1

    def read(self) -> bytes:
        return self.origin_path.read_bytes()

    # ---- lvdeltafs.lvm's calls

    def _lvs(self, doc: dict) -> list[lvm.LogicalVolume]:
        size = os.path.getsize(self.origin_path)
        opened = set(doc.get("open", ()))
        attr = "owi-a" + ("o" if doc["lv"] in opened else "-") + "----"
        origin = _lv(doc["uuid"], doc["lv"], attr, "", size, str(self.origin_path), (), None)
        plain = [_lv(x["uuid"], x["name"], "-wi-a" + ("o" if x["name"] in opened else "-") + "----", "",
                     os.path.getsize(x["path"]), x["path"], (), None) for x in doc.get("plain", ())]
        return [origin] + plain + [_lv(s["uuid"], s["name"], "swi-a-s---", doc["lv"], size, s["path"],
                                       tuple(s["tags"]), s["creation"]) for s in doc["snaps"]]

    def add_lv(self, name: str, size: int) -> Path:
        """A plain LV (not the origin, not a snapshot): an image file of ``size`` zero bytes."""
        path = self.root / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        with self._state(write=True) as doc:
            doc.setdefault("plain", []).append({"uuid": f"LV-{uuid.uuid4().hex[:12]}", "name": name,
                                                "path": str(path)})
        return path

    def set_open(self, name: str, is_open: bool = True) -> None:
        """What ``lvs`` shows as the LV's open flag (a mounted filesystem, a VM using it)."""
        with self._state(write=True) as doc:
            doc["open"] = sorted((set(doc.get("open", ())) | {name}) if is_open
                                 else set(doc.get("open", ())) - {name})

    def list_lvs(self, vg: str | None = None, *, hidden: bool = False) -> list[lvm.LogicalVolume]:
        if vg not in (None, VG):
            from lvdeltafs.errors import CommandFailed
            raise CommandFailed(["lvs", vg], 5, f"Volume group \"{vg}\" not found")
        with self._state() as doc:
            return self._lvs(doc)

    def create_snapshot(self, vg: str, origin: str, name: str, *, size=None, chunk_size=None, tags=(),
                        thin=None) -> lvm.LogicalVolume:
        path = self.root / "snaps" / f"{name}.img"
        with self._state(write=True) as doc:
            if origin != doc["lv"] or any(s["name"] == name for s in doc["snaps"]):
                raise BadInput(f"cannot snapshot {vg}/{origin} as {name}")
            shutil.copyfile(self.origin_path, path)
            doc["clock"] += 1
            doc["snaps"].append({"uuid": f"SNAP-{uuid.uuid4().hex[:12]}", "name": name, "path": str(path),
                                 "tags": sorted(tags), "creation": doc["clock"], "seq": doc["seq"]})
            return self._lvs(doc)[-1]

    def remove_lv(self, vg: str, lv: str, *, allow_non_snapshot: bool = False) -> bool:
        with self._state(write=True) as doc:
            found = [s for s in doc["snaps"] if s["name"] == lv]
            if not found:
                return False
            doc["snaps"] = [s for s in doc["snaps"] if s["name"] != lv]
        os.unlink(found[0]["path"])
        return True

    # ---- lvdeltafs.pairs.lvm_delta

    def lvm_delta(self, base_name: str, target_name: str) -> Delta:
        """Every chunk written between the two snapshots (or since the base, for the live origin), as a COW
        table lists it."""
        with self._state() as doc:
            snaps = {f"{VG}/{s['name']}": s for s in doc["snaps"]}
            snaps[f"{VG}/{doc['lv']}"] = {"seq": doc["seq"], "path": str(self.origin_path)}
            base, target = snaps[base_name], snaps[target_name]
            size = os.path.getsize(self.origin_path)
            marked = np.zeros(-(-size // CHUNK), bool)
            for off, n, seq in doc["writes"]:
                if base["seq"] <= seq < target["seq"]:
                    marked[off // CHUNK:-(-(off + n) // CHUNK)] = True
            origin_uuid = doc["uuid"]
        starts = np.flatnonzero(marked) * CHUNK
        extents = Extents.from_ranges(starts, np.full(starts.size, CHUNK), DATA, size)
        lvs = {lv.vg_lv: lv for lv in self.list_lvs()}
        target_id = lvs[target_name].snapshot_id if lvs[target_name].is_snapshot else f"{origin_uuid}@origin"
        ident = Identity(origin_uuid, lvs[base_name].snapshot_id, target_id, size, size, CHUNK, "cow")
        return Delta(ident, extents, FileReader(target["path"], size))

    def snapshot_paths(self) -> dict[str, str]:
        """snapshot_id -> image path of each snapshot there is."""
        return {lv.snapshot_id: lv.path for lv in self.list_lvs() if lv.is_snapshot}


def _lv(uid: str, name: str, attr: str, origin: str, size: int, path: str, tags: tuple[str, ...],
        creation: int | None) -> lvm.LogicalVolume:
    return lvm.LogicalVolume(
        uuid=uid, name=name, vg=VG, attr=attr, origin=origin, origin_uuid="", pool="", thin_id=None,
        size=size, chunk_size=CHUNK if origin else 0, snap_percent=1.0 if origin else None, data_percent=None,
        time=lvm._utc(creation), creation=creation, dm_path=path, path=path, tags=tags, active=True)


def install(fake: FakeLvm, setattr_=setattr) -> None:
    """Route lvmirror's LVM calls to ``fake`` (``setattr_``: pytest's monkeypatch.setattr to undo it)."""
    setattr_(lvm, "list_lvs", fake.list_lvs)
    setattr_(lvm, "create_snapshot", fake.create_snapshot)
    setattr_(lvm, "remove_lv", fake.remove_lv)
    setattr_(pairs, "lvm_delta", fake.lvm_delta)


def configured(tmp: Path, monkeypatch, destination: str | Path, *, size: int, defaults: str = "",
               volume: str = "") -> tuple[FakeLvm, Path]:
    """An installed FakeLvm (origin ``data`` of ``size`` bytes of text) and a config with the one volume
    ``data`` to ``destination``; ``defaults`` and ``volume`` are more TOML lines for each table."""
    from tests.harness import text
    fake = FakeLvm.create(tmp / "lvm", "data", size)
    install(fake, monkeypatch.setattr)
    fake.write(0, text(size, 1))
    cfg = tmp / "lvmirror.toml"
    cfg.write_text(f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\n{defaults}'
                   f'[volume.data]\nvg = "{VG}"\nlv = "data"\nsnapshot_size = "1G"\n'
                   f'destination = "{destination}"\n{volume}')
    cfg.chmod(0o600)
    return fake, cfg


def lvmirror(cfg: Path, *args: str, expect: int = 0, timeout: float = 180) -> str:
    """``lvmirror -c CFG ARGS`` in this process (over the installed fake); its output (stdout and log)."""
    from lvmirror import cli
    from tests.harness import run_cli
    result = run_cli(cli.main, ["-c", str(cfg), *args], timeout=timeout)
    assert result.code == expect, result.output
    return result.output


# ---- the subprocess form, with its hooks ---------------------------------------------------------


def _hooks() -> None:
    from lvmirror import multisync, pipelines
    log_path = os.environ.get("FAKELVM_SEND_LOG")
    what, _, n = (os.environ.get("FAKELVM_KILL_AT") or "").partition(":")
    at = int(n or 1)
    lock = threading.Lock()
    totals = {"sent": 0, "applied": 0}

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    real_send = pipelines.send

    def send(client, delta, label, **kw):
        done = False
        try:
            reply = real_send(client, delta, label, **kw)
            done = True
            return reply
        finally:
            if log_path:
                with lock, open(log_path, "a") as f:
                    f.write(json.dumps({"label": label, "delta_id": delta.identity.delta_id,
                                        "bytes_sent": client.bytes_sent, "done": done}) + "\n")
            if done and what == "applied":
                with lock:
                    totals["applied"] += 1
                    if totals["applied"] >= at:
                        kill()

    pipelines.send = send
    if what == "sent":
        class Counted(multisync.ConsumerStream):
            def read_from(self, offset, resume=None):
                for block in super().read_from(offset, resume):
                    with lock:
                        totals["sent"] += len(block)
                        over = totals["sent"] >= at
                    if over:
                        time.sleep(0.2)  # what was written reaches the receivers first
                        kill()
                    yield block

        multisync.ConsumerStream = Counted


def main(argv: list[str]) -> None:
    fake = FakeLvm(argv[0])
    install(fake)
    _hooks()
    from lvmirror.cli import main as lvmirror_main
    lvmirror_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
