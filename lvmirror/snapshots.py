"""The snapshots lvmirror owns: naming, tagging, finding them by identity, rotating them.

A snapshot is lvmirror's only if it carries both the tag ``lvmirror`` and the
volume's tag ``lvmirror_vol_NAME``; anything else (a snapshot an admin made
by hand, another tool's) is never touched.  The destination's state names its
base as ``LVUUID@creation-time``, and the base is found by that identity,
never by name: a snapshot removed and re-made under the same name is a
different snapshot whose data the destination does not hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from lvdeltafs import lvm, pairs
from lvdeltafs.errors import BadInput, SnapshotUnusable
from lvdeltafs.lvm import LogicalVolume
from lvmirror.config import VolumeConfig

log = logging.getLogger(__name__)

TAG = "lvmirror"
NAME_INFIX = "-lvm-"


def volume_tag(name: str) -> str:
    return f"lvmirror_vol_{name}"


def tags_for(vol: VolumeConfig) -> tuple[str, str]:
    return (TAG, volume_tag(vol.name))


def snapshot_name(lv: str, now: datetime | None = None, taken: set[str] | frozenset = frozenset()) -> str:
    """``LV-lvm-YYYYmmddHHMMSS`` (UTC), with ``-2``, ``-3``... if that name is taken."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    base = f"{lv}{NAME_INFIX}{stamp}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def owned(snaps: list[LogicalVolume], vol: VolumeConfig) -> list[LogicalVolume]:
    """The snapshots among ``snaps`` that lvmirror made for this volume (order kept)."""
    tags = set(tags_for(vol))
    return [s for s in snaps if tags <= set(s.tags)]


def owned_snapshots(vol: VolumeConfig) -> list[LogicalVolume]:
    """lvmirror's snapshots of the volume, oldest first."""
    return owned(lvm.snapshots_of(vol.vg, vol.lv), vol)


def origin(vol: VolumeConfig) -> LogicalVolume:
    """The source LV, or a clear error naming the config key when it is not there."""
    lv = lvm.get_lv(vol.vg, vol.lv)
    if lv is None:
        raise BadInput(f"{vol.where('lv')}: volume group {vol.vg} has no logical volume {vol.lv}")
    if lv.is_snapshot:
        raise BadInput(f"{vol.where('lv')}: {vol.vg_lv} is itself a snapshot; mirror its origin instead")
    return lv


def take(vol: VolumeConfig, source: LogicalVolume) -> LogicalVolume:
    """A new tagged snapshot of the source: thin for a thin volume, else classic with snapshot_size."""
    taken = {s.name for s in lvm.list_lvs(vol.vg)}
    name = snapshot_name(vol.lv, taken=taken)
    if source.is_thin:
        snap = lvm.create_snapshot(vol.vg, vol.lv, name, tags=tags_for(vol), thin=True)
    else:
        if not vol.snapshot_size:
            raise BadInput(f"{vol.where('snapshot_size')}: {vol.vg_lv} is a classic (thick) volume, "
                           "so its snapshots need COW space: set snapshot_size (e.g. \"1G\")")
        snap = lvm.create_snapshot(vol.vg, vol.lv, name, size=vol.snapshot_size, tags=tags_for(vol))
    log.info("took snapshot %s/%s (%s)", snap.vg, snap.name, snap.snapshot_id)
    return snap


def size_of(lv: LogicalVolume) -> int:
    """The bytes a snapshot shows: lvs reports a classic snapshot's COW size as its lv_size."""
    return pairs.device_size(lv.path)


def uuid_of(snapshot_id: str) -> str:
    return snapshot_id.split("@", 1)[0]


def find(snaps: list[LogicalVolume], snapshot_id: str) -> LogicalVolume | None:
    """The snapshot whose identity (UUID and creation time) is ``snapshot_id``."""
    return next((s for s in snaps if s.snapshot_id == snapshot_id), None)


@dataclass(frozen=True)
class BaseCheck:
    """What became of the snapshot the destination was last synced to."""

    snapshot: LogicalVolume | None
    problem: str  # "" when usable

    @property
    def usable(self) -> bool:
        return not self.problem


def check_base(vol: VolumeConfig, snapshot_id: str, snaps: list[LogicalVolume] | None = None) -> BaseCheck:
    """Is the base snapshot (by identity) still there and readable?"""
    snaps = owned_snapshots(vol) if snaps is None else snaps
    found = find(snaps, snapshot_id)
    if found is None:
        by_uuid = lvm.lv_by_uuid(uuid_of(snapshot_id))
        why = ("is gone (removed outside lvmirror)" if by_uuid is None else
               f"is no longer lvmirror's snapshot of {vol.vg_lv} (now {by_uuid.vg_lv}, tags "
               f"{','.join(by_uuid.tags) or 'none'})")
        return BaseCheck(None, f"base snapshot {snapshot_id} {why}")
    try:
        lvm.require_usable(found, "base snapshot")
    except SnapshotUnusable as e:
        return BaseCheck(found, str(e))
    return BaseCheck(found, "")


def rotate(vol: VolumeConfig, base_id: str, also_keep: tuple[str, ...] = ()) -> list[str]:
    """Remove lvmirror's snapshots of the volume beyond ``keep``; return the names removed.

    The base (what the destination holds) is always kept, and so is any
    snapshot in ``also_keep`` (the target of a delta the receiver has staged,
    so the next run can resume it).  ``keep - 1`` more are kept, newest first.
    """
    snaps = owned_snapshots(vol)
    protected = {base_id, *also_keep}
    others = [s for s in snaps if s.snapshot_id not in protected]
    spare = max(0, vol.keep - 1)
    keep_extra = {s.uuid for s in others[len(others) - spare:]} if spare else set()
    removed = []
    for s in others:
        if s.uuid in keep_extra and not s.is_invalid:
            continue
        lvm.remove_lv(s.vg, s.name)
        log.info("removed snapshot %s/%s", s.vg, s.name)
        removed.append(s.name)
    return removed


def remove(snap: LogicalVolume) -> None:
    lvm.remove_lv(snap.vg, snap.name)
    log.info("removed snapshot %s/%s", snap.vg, snap.name)
