"""`lvmirror status`: what each mirror holds and how its snapshots stand (problems reported, not raised)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lvdeltafs import lvm
from lvdeltafs.errors import LvError
from lvmirror import snapshots
from lvmirror.config import VolumeConfig
from lvmirror.pipelines import hello, volume_receiver


@dataclass
class VolumeStatus:
    name: str
    source: str
    destination: str
    base: str = ""  # vg/lv of the base snapshot
    base_id: str = ""
    cow_percent: float | None = None  # classic: how much of the base snapshot's COW space is used
    pool: str = ""  # thin: the pool, and how full its data and metadata are
    pool_data_percent: float | None = None
    pool_metadata_percent: float | None = None
    snapshots: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def status(vol: VolumeConfig) -> VolumeStatus:
    st = VolumeStatus(vol.name, vol.vg_lv, vol.destination.raw)
    try:
        with volume_receiver(vol) as client:
            greeting = hello(client)
        st.state = greeting.state
        st.base_id = greeting.holds
        for problem in (greeting.problem, greeting.unknown):
            if problem:
                st.problems.append(problem)
        if greeting.staged is not None:
            staged = greeting.staged
            st.problems.append(f"a delta to {staged.target} is staged, {staged.verified} bytes verified; "
                               "the next sync resumes or replaces it")
    except LvError as e:
        st.problems.append(str(e))
    try:
        owned = snapshots.owned_snapshots(vol)
    except LvError as e:
        st.problems.append(f"cannot list snapshots of {vol.vg_lv}: {e}")
        return st
    st.snapshots = [s.name for s in owned]
    if st.base_id:
        base = snapshots.check_base(vol, st.base_id, owned)
        if base.snapshot is not None:
            st.base = base.snapshot.vg_lv
            _space(st, base.snapshot)
        if not base.usable:
            st.problems.append(f"{base.problem} (the next sync falls back to a compare resync)")
    return st


# Above this, say so: a classic snapshot that fills is dropped by the kernel (the next sync then
# resyncs by comparing), and a thin pool that fills stops writes to every volume in it.
WARN_PERCENT = 80.0


def _space(st: VolumeStatus, snap: lvm.LogicalVolume) -> None:
    """How much room the base snapshot has left: its COW space, or its thin pool's data and metadata."""
    if not snap.is_thin:
        st.cow_percent = snap.snap_percent
        if (st.cow_percent or 0) >= WARN_PERCENT:
            st.problems.append(f"the base snapshot {snap.vg_lv} has used {st.cow_percent:.1f}% of its COW "
                               "space; when it is full the kernel drops it and the next sync resyncs by "
                               "comparing: raise snapshot_size, or sync more often")
        return
    try:
        pool = lvm.get_lv(snap.vg, snap.pool)
    except LvError as e:
        st.problems.append(f"cannot read thin pool {snap.vg}/{snap.pool}: {e}")
        return
    if pool is None:
        return
    st.pool = pool.vg_lv
    st.pool_data_percent, st.pool_metadata_percent = pool.data_percent, pool.metadata_percent
    for what, used in (("data", pool.data_percent), ("metadata", pool.metadata_percent)):
        if (used or 0) >= WARN_PERCENT:
            st.problems.append(f"thin pool {pool.vg_lv} has used {used:.1f}% of its {what} space; when it "
                               "is full, writes to every thin volume in it fail: extend it (lvextend) or "
                               "free space")
