"""`lvmirror restore`: a mirror's kept point (or its present content) written back onto a logical volume.

Only what can differ is moved.  Onto the volume's own origin, while the
source still has the base snapshot the mirror holds, the blocks that can
differ are known without reading the volume: what changed on the origin
since that snapshot (its COW table, or ``thin_delta``) plus the ranges of the
undo deltas back to the point; those are read from the mirror (the far side
serves them) and only the 4 KiB blocks that differ are written.  Otherwise
(another LV, or no base) block digests are compared on both sides, as
``check --repair`` does in the other direction.

A restore is idempotent: killed half way, it is run again and finds what is
left to do the same way.  It never writes an LV that is open or mounted
(``lvs`` says open, and ``O_EXCL`` fails on a mounted or held device).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass

from lvdeltafs import lvm, pairs
from lvdeltafs.errors import BadInput, ConnectionProblem, Refused
from lvdeltafs.fsio import pread_into, pwrite_all
from lvmirror import snapshots
from lvmirror.client import ReceiverClient
from lvmirror.config import VolumeConfig
from lvmirror.deltas import compare_extents
from lvmirror.pipelines import volume_receiver
from lvmirror.points import find_point, known
from lvmirror.progress import Progress, human
from lvmirror.remote import faults, wire

log = logging.getLogger(__name__)
BLOCK = 4096
BATCH_BYTES = 32 << 20  # per read request (the receiver takes at most 64 MiB)
BATCH_RANGES = 4096
PAIR = struct.Struct("<QQ")


@dataclass
class Restored:
    volume: str
    target: str  # VG/LV
    point: int | None  # the generation restored; None: the mirror's present content
    size: int
    method: str
    candidate_bytes: int = 0  # read from the mirror (what can differ)
    written_bytes: int = 0  # written to the LV (what did differ)
    dry_run: bool = False

    def summary(self) -> str:
        what = f"point {self.point}" if self.point is not None else "the mirror's present content"
        verb = "would read" if self.dry_run else "read"
        text = (f"{self.volume}: restore of {what} onto {self.target} ({human(self.size)}): {verb} "
                f"{human(self.candidate_bytes)} from the mirror by {self.method}")
        return text if self.dry_run else text + f", wrote {human(self.written_bytes)} that differed"


def restore(vol: VolumeConfig, point: str | None, to: str, *, dry_run: bool = False) -> Restored:
    """Write ``point`` (a generation or snapshot name; None: the present content) onto the LV ``to``."""
    vg, name = _split(to)
    with volume_receiver(vol) as client:
        greeting, points = known(vol, client, "there is nothing to restore from")
        gen, size = None, int(greeting.state.get("size") or 0)
        if point is not None:
            found = find_point(points, point)
            gen, size = found.generation, found.size
        target = _target(vg, name, size)
        out = Restored(vol.name, target.vg_lv, gen, size, "")
        fd = _open_exclusive(target) if not dry_run else -1
        try:
            ranges, out.method = _candidates(vol, client, greeting.holds, gen, target, size)
            out.candidate_bytes = sum(n for _, n in ranges)
            out.dry_run = dry_run
            if not dry_run:
                out.written_bytes = _copy(client, gen, ranges, fd)
                os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
    return out


def _split(to: str) -> tuple[str, str]:
    if to.count("/") != 1:
        raise BadInput(f"--to {to}: give the logical volume as VG/LV")
    vg, name = to.split("/")
    return lvm.check_name(vg, "volume group"), lvm.check_name(name, "logical volume")


def _target(vg: str, name: str, size: int) -> lvm.LogicalVolume:
    found = next((x for x in lvm.list_lvs(vg) if x.name == name), None)
    if found is None:
        raise BadInput(f"there is no logical volume {vg}/{name}: restore onto the volume itself, or make a "
                       f"new one of the point's size first (lvcreate -L {size}b -n {name} {vg})")
    if found.is_snapshot or "lvmirror" in found.tags:
        raise Refused(f"{found.vg_lv} is a snapshot: restore onto a volume (the origin, or a new LV)")
    have = pairs.device_size(found.path)
    if have != size:
        raise Refused(f"{found.vg_lv} is {have} bytes but the point is {size} bytes: resize it to exactly "
                      f"that (lvresize -L {size}b {found.vg_lv}) or make a new LV of that size; nothing was "
                      "written")
    if found.attr[5:6] == "o":
        raise Refused(_busy(found))
    return found


def _busy(lv: lvm.LogicalVolume) -> str:
    return (f"{lv.vg_lv} is open (mounted, or used by a program or VM): unmount it (umount), stop what uses "
            f"it (fuser -vm {lv.path}), then run again; nothing was written")


def _open_exclusive(lv: lvm.LogicalVolume) -> int:
    # O_EXCL on a block device fails with EBUSY while it is mounted or held by device-mapper.
    try:
        return os.open(lv.path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Refused(_busy(lv)) from None
        raise


def _candidates(vol: VolumeConfig, client: ReceiverClient, holds: str, gen: int | None,
                target: lvm.LogicalVolume, size: int) -> tuple[list[tuple[int, int]], str]:
    """The ranges that can differ between the LV and the point, and how they were found."""
    origin = snapshots.origin(vol)
    if target.uuid == origin.uuid and holds:
        base = snapshots.check_base(vol, holds)
        if base.snapshot is not None and base.usable:
            delta = pairs.lvm_delta(base.snapshot.vg_lv, origin.vg_lv)
            try:
                since = [(int(o), int(n)) for o, n, _k in delta.extents]
            finally:
                delta.close()
            return _union(since + _point_ranges(client, gen)), "the changes since the base snapshot"
        log.info("%s: %s; comparing block digests of the volume and the mirror instead", vol.name,
                 base.problem or "the base snapshot is not usable")
    extents = compare_extents(client, target.path, size, point=gen)
    return [(int(o), int(n)) for o, n, _k in extents], "block digests of both sides"


def _point_ranges(client: ReceiverClient, gen: int | None) -> list[tuple[int, int]]:
    """Where the point differs from the mirror: the ranges of its undo deltas (none for the present)."""
    if gen is None:
        return []
    head = client.request("ranges", point=gen)
    try:
        count = wire.int_field(head, "count", hi=1 << 26, what=f"the {client.where}'s ranges")
    except wire.ProtocolError as e:
        raise ConnectionProblem(str(e)) from None
    raw = client.read_frames(count * PAIR.size, "the point's ranges")
    return [PAIR.unpack_from(raw, i) for i in range(0, len(raw), PAIR.size)]


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, ln in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], off + ln) - out[-1][0])
        elif ln > 0:
            out.append((off, ln))
    return out


def _batches(ranges: list[tuple[int, int]]):
    batch: list[tuple[int, int]] = []
    total = 0
    for off, ln in ranges:
        for p in range(off, off + ln, BATCH_BYTES):
            n = min(BATCH_BYTES, off + ln - p)
            if batch and (total + n > BATCH_BYTES or len(batch) >= BATCH_RANGES):
                yield batch
                batch, total = [], 0
            batch.append((p, n))
            total += n
    if batch:
        yield batch


def _copy(client: ReceiverClient, gen: int | None, ranges: list[tuple[int, int]], fd: int) -> int:
    """Read the ranges from the mirror and write the 4 KiB blocks that differ; the bytes written."""
    written = 0
    args = {"point": gen} if gen is not None else {}
    with Progress("restoring", sum(n for _, n in ranges)) as bar:
        for batch in _batches(ranges):
            total = sum(n for _, n in batch)
            head = client.request("read", ranges=[[o, n] for o, n in batch], **args)
            if head.get("bytes") != total:
                raise ConnectionProblem(f"the {client.where} announced {head.get('bytes')!r} bytes for a "
                                        f"read of {total}")
            try:
                # All of a read before any of it is written: a far side that sends more than it announced
                # (or goes away) is refused with nothing of that read on the LV.
                data = memoryview(client.read_frames(total, "the point's data"))
            except ConnectionProblem as e:
                raise ConnectionProblem(f"{e}; nothing of that read was written") from None
            pos = 0
            for off, n in batch:
                written += _write_differing(fd, off, data[pos:pos + n])
                pos += n
                faults.tick("restore")
            bar.update(total)
    return written


def _write_differing(fd: int, offset: int, new: memoryview) -> int:
    have = bytearray(len(new))
    pread_into(fd, memoryview(have), offset)
    written = 0
    for p in range(0, len(new), BLOCK):
        block = new[p:p + BLOCK]
        if block != have[p:p + BLOCK]:
            pwrite_all(fd, block, offset + p)
            written += len(block)
    return written
