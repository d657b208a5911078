"""`lvmirror status`: what each mirror holds and how its snapshots stand (problems reported, not raised).

Also the monitoring side of it: the last runs this host recorded
(:mod:`lvmirror.runlog`), the age of each mirror's last good sync against
``--max-age``, and the JSON document of ``--json`` (schema: docs/status-json.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from lvdeltafs import lvm
from lvdeltafs.clisupport import format_duration
from lvdeltafs.errors import LvError
from lvmirror import runlog, snapshots
from lvmirror.config import VolumeConfig
from lvmirror.pipelines import hello, volume_receiver
from lvmirror.progress import human

SCHEMA = "lvmirror-status/1"  # docs/status-json.md: additive changes keep it, any other change bumps it


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
    runs: runlog.RunLog = field(default_factory=runlog.RunLog)
    # A volume with several destinations: each one's status (this object then shows the one most behind).
    dests: list[VolumeStatus] = field(default_factory=list)

    @property
    def last_good_sync(self) -> float | None:
        """When the mirror was last brought up to a snapshot: the last good init or sync recorded here;
        failing that (none recorded yet, e.g. synced by an older lvmirror), when its state says so."""
        if self.runs.last_success is not None:
            return self.runs.last_success.finished
        return _number(self.state.get("synced_epoch"))

    def age(self, now: float) -> float | None:
        last = self.last_good_sync
        return None if last is None else max(0.0, now - last)

    def stale(self, now: float, max_age: float) -> bool:
        """Older than ``max_age``, or never synced at all."""
        age = self.age(now)
        return age is None or age > max_age


def status(vol: VolumeConfig) -> VolumeStatus:
    """What the volume's destination holds and how its snapshots stand; with several, each destination's."""
    if vol.several and not vol.dest_key:  # the volume, not one destination's view of it
        return _several(vol)
    st = VolumeStatus(vol.name, vol.vg_lv, vol.destination.raw)
    add_runs(st, vol)
    try:
        with volume_receiver(vol) as client:
            greeting = hello(client)
        st.state = greeting.state
        st.base_id = greeting.holds
        for problem in (greeting.problem, greeting.unknown):
            if problem:
                st.problems.append(problem)
        unreadable = greeting.history_problem or _points_problem(greeting.state, client.where)
        if unreadable:
            st.problems.append(f"its history cannot be read: {unreadable}")
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


def _several(vol: VolumeConfig) -> VolumeStatus:
    """Each destination's status, and the volume's: that of the destination most behind, so that
    ``--max-age`` and a check of the volume's fields alert as soon as any destination is stale;
    its problems are every destination's, each naming its destination."""
    parts = [status(v) for v in vol.views()]
    worst = min(parts, key=lambda p: (p.last_good_sync is not None, p.last_good_sync or 0.0))
    return replace(worst, destination=", ".join(p.destination for p in parts), dests=parts,
                   problems=[f"{p.destination}: {problem}" for p in parts for problem in p.problems])


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


def add_runs(st: VolumeStatus, vol: VolumeConfig) -> None:
    """The volume's record of runs; a damaged record, and a last run that failed, are problems."""
    st.runs = runlog.read(vol.record_name, vol.work_dir)
    if st.runs.problem:
        st.problems.append(st.runs.problem)
    last = st.runs.last_run
    if last is not None and not last.ok:
        st.problems.append(f"the last run failed: {last.command} at {when(last.finished)}, exit code "
                           f"{last.exit_code}: {last.error}")


def local_space(vol: VolumeConfig, base_id: str) -> VolumeStatus:
    """The room of the snapshot ``base_id`` by LVM alone, without asking the receiver (for the metrics)."""
    st = VolumeStatus(vol.name, vol.vg_lv, vol.destination.raw, base_id=base_id)
    snap = snapshots.find(snapshots.owned_snapshots(vol), base_id)
    if snap is not None:
        st.base = snap.vg_lv
        _space(st, snap)
    return st


# ---- what is shown --------------------------------------------------------------------


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def run_lines(st: VolumeStatus) -> list[str]:
    """The status lines of the last good sync and of an earlier failure recorded on this host."""
    lines = []
    good = st.runs.last_success
    if good is not None:
        gen = "" if good.generation is None else f", generation {good.generation}"
        held = (f" (and {human(good.resumed_bytes)} of a delta the destination held from an interrupted run)"
                if good.resumed_bytes else "")
        lines.append(f"  last success:  {good.action or good.command} at {when(good.finished)}, took "
                     f"{format_duration(good.duration)}, sent {human(good.bytes_sent)}{held}{gen}")
        saved = savings(good)
        if saved:
            lines.append(f"  its data:      {saved}")
    bad = st.runs.last_failure
    if bad is not None and bad != st.runs.last_run:  # the last run's own failure is listed as a problem
        lines.append(f"  last failure:  {bad.command} at {when(bad.finished)}, exit code {bad.exit_code}: "
                     f"{bad.error}")
    return lines


def savings(run: runlog.Run) -> str:
    """What a run's delta data came to: marked changed, differed from the base, on the wire ("" unknown)."""
    parts = [f"{human(n)} {what}" for n, what in ((run.marked_bytes, "marked changed"),
                                                  (run.differed_bytes, "differed (sent as data)"),
                                                  (run.wire_bytes, "on the wire"))
             if n is not None]
    return ", ".join(parts)


def stale_lines(statuses: list[VolumeStatus], now: float, max_age: float) -> list[str]:
    """``--max-age`` in text: one line per stale volume, else one saying all are fresh (first: Nagios)."""
    lines = []
    for st in statuses:
        if not st.stale(now, max_age):
            continue
        last = st.last_good_sync
        lines.append(f"stale: {st.name}: " + ("no good sync recorded" if last is None else
                     f"last good sync {format_duration(now - last)} ago, at {when(last)}")
                     + f" (allowed: {format_duration(max_age)})")
    if not lines:
        problems = sum(bool(st.problems) for st in statuses)
        lines.append(f"fresh: {len(statuses)} volumes, each synced within {format_duration(max_age)}"
                     + (f"; {problems} with problems (below)" if problems else ""))
    return lines


def as_json(statuses: list[VolumeStatus], now: float, max_age: float | None = None) -> dict[str, Any]:
    """The ``--json`` document, field for field as docs/status-json.md describes it."""
    return {"schema": SCHEMA, "generated": now, "max_age": max_age,
            "volumes": [_volume_json(st, now, max_age) for st in statuses]}


def _volume_json(st: VolumeStatus, now: float, max_age: float | None) -> dict[str, Any]:
    doc = _status_json(st, now, max_age)
    # Each destination as a volume object of its own; a volume with one lists it alone.
    doc["destinations"] = [_status_json(p, now, max_age) for p in st.dests] if st.dests else [dict(doc)]
    return doc


def _status_json(st: VolumeStatus, now: float, max_age: float | None) -> dict[str, Any]:
    state = st.state
    return {
        "name": st.name,
        "source": st.source,
        "destination": st.destination,
        "base_snapshot": st.base or None,
        "base_snapshot_id": st.base_id or None,
        "cow_percent": st.cow_percent,
        "pool": st.pool or None,
        "pool_data_percent": st.pool_data_percent,
        "pool_metadata_percent": st.pool_metadata_percent,
        "snapshots": list(st.snapshots),
        "generation": _count(state.get("generation")),
        "size": _count(state.get("size")),
        "points": points_summary(state),
        "synced": _number(state.get("synced_epoch")),
        "needs_check": state.get("needs_check") is True,
        "last_run": _run_json(st.runs.last_run),
        "last_success": _run_json(st.runs.last_success),
        "last_failure": _run_json(st.runs.last_failure),
        "last_good_sync": st.last_good_sync,
        "age": st.age(now),
        "stale": None if max_age is None else st.stale(now, max_age),
        "problems": list(st.problems),
    }


def points_summary(state: dict[str, Any]) -> dict[str, Any] | None:
    """The kept points as the far side lists them: how many, the oldest, the space (None if unreadable)."""
    from lvdeltafs.errors import BadInput
    from lvmirror.points import parse_points
    try:
        points = parse_points(state, "receiver")
    except BadInput:
        return None
    return {"count": len(points), "oldest_generation": points[0].generation if points else None,
            "undo_bytes": sum(p.undo_bytes for p in points)}


def _points_problem(state: dict[str, Any], where: str) -> str:
    """Why the points the far side reports cannot be read here ("" if they can)."""
    from lvdeltafs.errors import BadInput
    from lvmirror.points import parse_points
    try:
        parse_points(state, where)
    except BadInput as e:
        return str(e)
    return ""


def _run_json(run: runlog.Run | None) -> dict[str, Any] | None:
    return None if run is None else run.as_dict()


def _count(value: Any) -> int | None:
    # The receiver's state is shown, not trusted: what is not a count is shown as unknown.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
