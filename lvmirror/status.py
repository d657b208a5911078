"""`lvmirror status`: what each mirror holds and how its snapshots stand (problems reported, not raised)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    cow_percent: float | None = None
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
            st.cow_percent = base.snapshot.snap_percent
        if not base.usable:
            st.problems.append(f"{base.problem} (the next sync falls back to a compare resync)")
    return st
