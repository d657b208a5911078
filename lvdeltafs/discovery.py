"""LVM facts for the tree: volume groups, origins and their snapshots, from one ``lvs`` per refresh."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lvdeltafs import lvm
from lvdeltafs.errors import LvError

log = logging.getLogger(__name__)

LISTING_TTL = 2.0       # seconds an LVM listing is trusted: `ls -lR` must not run lvs per entry


@dataclass
class Volume:
    """An origin volume and its snapshots, oldest first."""

    origin: lvm.LogicalVolume
    snapshots: list[lvm.LogicalVolume]

    def snapshot(self, name: str) -> lvm.LogicalVolume | None:
        return next((s for s in self.snapshots if s.name == name), None)


def snapshot_order(lv: lvm.LogicalVolume) -> tuple:
    # The order lvm.snapshots_of documents (creation time, thin id, natural name), applied to
    # one listing of the whole VG: snapshots_of runs lvs once per origin.
    return (lv.creation or 0, lv.thin_id if lv.thin_id is not None else -1, lvm._natural_key(lv.name))


def group_volumes(lvs: Iterable[lvm.LogicalVolume]) -> dict[str, dict[str, Volume]]:
    """vg -> origin name -> Volume, for origins with at least one snapshot."""
    lvs = list(lvs)
    by_name = {(x.vg, x.name): x for x in lvs}
    out: dict[str, dict[str, Volume]] = {}
    for snap in sorted((x for x in lvs if x.is_snapshot), key=snapshot_order):
        origin = by_name.get((snap.vg, snap.origin))
        if origin is None:
            continue
        vols = out.setdefault(snap.vg, {})
        vols.setdefault(origin.name, Volume(origin, [])).snapshots.append(snap)
    return out


class Discovery:
    """LVM facts for the tree, from one ``lvs`` per refresh, trusted for ``ttl`` seconds."""

    def __init__(self, vgs: Iterable[str] = (), *, list_lvs: Callable[..., list] | None = None,
                 ttl: float = LISTING_TTL, clock: Callable[[], float] = time.monotonic):
        self.vgs = tuple(vgs)
        self._list_lvs = list_lvs or lvm.list_lvs
        self.ttl, self.clock = ttl, clock
        self._lock = threading.Lock()
        self._at = -1e18
        self._lvs: list[lvm.LogicalVolume] = []
        self._tree: dict[str, dict[str, Volume]] = {}

    def _fetch(self) -> list[lvm.LogicalVolume]:
        if not self.vgs:
            return list(self._list_lvs())
        found = []
        for vg in self.vgs:
            try:
                found.extend(self._list_lvs(vg))
            except LvError as e:
                # One missing VG must not hide the others; its directory just stays empty.
                log.warning("cannot list volume group %s: %s", vg, e)
        return found

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and self.clock() - self._at < self.ttl:
                return
            lvs = self._fetch()
            self._lvs, self._tree, self._at = lvs, group_volumes(lvs), self.clock()

    def tree(self) -> dict[str, dict[str, Volume]]:
        self.refresh()
        return self._tree

    def vg_names(self) -> list[str]:
        names = set(self.tree())
        names.update(self.vgs)  # a named VG shows even while it has no snapshots
        return sorted(names)

    def volume(self, vg: str, name: str) -> Volume | None:
        return self.tree().get(vg, {}).get(name)

    def by_uuid(self, uuid: str) -> lvm.LogicalVolume | None:
        self.refresh()
        return next((x for x in self._lvs if x.uuid == uuid), None)
