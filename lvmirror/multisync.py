"""init and sync of a volume with several destinations: one snapshot, each delta read once, each its own base.

Each destination is worked on through its own view of the volume
(:meth:`~lvmirror.config.VolumeConfig.views`: its own spool, its own record
of runs), so what a single destination gets (resume of a staged delta,
compare resync, the receiver's checks) each of several gets unchanged.

What differs is around it:

- one snapshot per run, taken once the destinations have been reached;
- destinations holding the same base share one delta (its COW table or
  thin_delta, and its ``exact`` refinement, computed once) and one read of
  the snapshot (:mod:`lvmirror.fanout`), sent to each in its own thread;
  a destination whose base is gone gets its own compare resync;
- a destination that fails (cannot be reached, link cut, refused) fails
  alone: the others go on and are recorded; the run then exits with the
  failure's exit code;
- the snapshots rotated away are only those no destination still holds or
  has staged a delta to.  A destination that could not be asked is taken to
  hold what its record of runs last says it held; when nothing says so,
  no snapshot is removed this run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from lvdeltafs import lvm
from lvdeltafs.delta import Delta
from lvdeltafs.errors import CommandFailed, LvError, Refused
from lvmirror import deltas, pipelines, runlog, snapshots, spool
from lvmirror.client import Hello, ReceiverClient
from lvmirror.config import ConfigError, VolumeConfig
from lvmirror.encoder import DeltaStream
from lvmirror.fanout import Consumer, ConsumerStream, SharedRead
from lvmirror.pipelines import Outcome, label
from lvmirror.progress import human

log = logging.getLogger(__name__)

FAILURES = (LvError, OSError)  # what fails one destination; anything else is a bug and stops the run


@dataclass
class DestRun:
    """One destination's part in a run."""

    view: VolumeConfig
    client: ReceiverClient | None = None
    greeting: Hello | None = None
    base: snapshots.BaseCheck | None = None
    problem: str = ""  # why it gets a compare resync ("" if its base is usable)
    base_cow: float | None = None
    skipped: str = ""  # init: why it was left alone
    outcome: Outcome | None = None
    error: BaseException | None = None
    holds: str = ""  # the snapshot it holds after the run, as far as known
    keep: set[str] = field(default_factory=set)  # snapshots it still needs (held, staged to)
    known: bool = False  # whether the receiver was asked what it holds

    @property
    def name(self) -> str:
        return label(self.view)

    @property
    def usable(self) -> bool:
        return self.base is not None and self.base.usable


@dataclass
class MultiOutcome:
    """What a run did for each destination, and how much of the new snapshot it read to do it."""

    volume: str
    command: str  # init | sync
    runs: list[DestRun]
    dry_run: bool = False
    source_bytes_read: int = 0  # of the new snapshot, to send the deltas (each shared delta once)
    snapshot: str = ""

    @property
    def failed(self) -> list[DestRun]:
        return [r for r in self.runs if r.error is not None]

    def summary(self) -> str:
        sent = [r for r in self.runs if r.outcome is not None]
        return (f"{self.volume}: {self.command} {'would read' if self.dry_run else 'read'} "
                f"{human(self.source_bytes_read)} of the new snapshot for {len(sent)} of {len(self.runs)} "
                f"destinations ({len(self.failed)} failed)")


def _guard(run: DestRun, job: Callable[[], None]) -> None:
    """Run one destination's step; a failure is that destination's, logged and kept, never raised."""
    try:
        job()
    except FAILURES as e:
        run.error = e
        log.error("%s: %s", run.name, e)


def _origin(vol: VolumeConfig) -> lvm.LogicalVolume:
    try:
        return snapshots.origin(vol)
    except CommandFailed as e:
        raise ConfigError(f"{vol.where('vg')}: cannot read volume group {vol.vg}: {e}") from None


def _connect(run: DestRun, stack: ExitStack, source: lvm.LogicalVolume) -> Hello:
    pipelines.check_destination_not_on_source(run.view, source)
    run.client = stack.enter_context(pipelines.volume_receiver(run.view))
    greeting = pipelines.hello(run.client)
    _note_holdings(run, greeting)
    return greeting


def _note_holdings(run: DestRun, greeting: Hello) -> None:
    run.greeting, run.known, run.holds = greeting, True, greeting.holds
    run.keep = {s for s in (greeting.holds, greeting.staged.target if greeting.staged else "") if s}


class DestinationsFailed(LvError):
    """Some destinations of a volume failed (the others were done): the exit code is the first failure's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---- sync -------------------------------------------------------------------------------------


def sync(vol: VolumeConfig, *, dry_run: bool = False) -> MultiOutcome:
    """Bring every destination of ``vol`` up to one new snapshot, each from the base it holds."""
    source = _origin(vol)
    out = MultiOutcome(vol.name, "sync", [DestRun(v) for v in vol.views()], dry_run)
    with ExitStack() as stack:
        for run in out.runs:
            _guard(run, lambda run=run: _prepare_sync(run, stack, source, dry_run))
        ready = [r for r in out.runs if r.error is None]
        if not ready:
            _from_records(out.runs)
            return out  # nothing changed: no snapshot taken, none removed
        snap = snapshots.take(vol, source)
        out.snapshot = snap.snapshot_id
        jobs: list[Job] = []
        shared: list[SharedRead] = []
        opened: list[Delta] = []
        groups: dict[str, list[DestRun]] = {}  # base snapshot -> the destinations that hold it
        for r in ready:
            if r.usable:
                assert r.base is not None and r.base.snapshot is not None
                groups.setdefault(r.base.snapshot.snapshot_id, []).append(r)
        try:
            for base_id, members in groups.items():
                try:
                    delta = _incremental(vol, members[0], snap)
                except FAILURES as e:
                    for r in members:
                        r.error = e
                    log.error("%s: the delta from %s: %s", vol.name, base_id, e)
                    continue
                opened.append(delta)
                jobs += _share(delta, members, "sync", shared)
            for r in ready:
                if not r.usable:
                    jobs.append((r, "resync", _compare_maker(r, source, snap), None))
            _run_all(vol, jobs, snap, dry_run, shared)
        finally:
            for delta in opened:
                delta.close()
        out.source_bytes_read = sum(s.source_bytes for s in shared)
        _after(vol, out, snap, dry_run)
    return out


def _prepare_sync(run: DestRun, stack: ExitStack, source: lvm.LogicalVolume, dry_run: bool) -> None:
    vol, name = run.view, run.name
    greeting = _connect(run, stack, source)
    if greeting.problem:
        raise Refused(f"{name}: {greeting.problem}")
    if not greeting.holds and not greeting.unknown:
        raise Refused(f"{name}: the destination holds no copy yet; run `lvmirror init {vol.name}` (it "
                      "initialises the destinations that hold nothing and leaves the others alone)")
    pipelines._check_same_volume(vol, greeting, source)
    assert run.client is not None
    if not dry_run and pipelines._resume_staged(vol, run.client, greeting, rotate=False, show_progress=False):
        greeting = pipelines.hello(run.client)
        _note_holdings(run, greeting)
    if greeting.holds:
        run.base = snapshots.check_base(vol, greeting.holds)
        run.problem = run.base.problem
        if run.base.snapshot is not None and not run.base.snapshot.is_thin:
            run.base_cow = run.base.snapshot.snap_percent
    else:
        run.problem = greeting.unknown
    if run.problem:
        log.warning("%s: %s; falling back to a compare resync (block digests of both sides, only "
                    "differing blocks sent)", name, run.problem)


def _incremental(vol: VolumeConfig, run: DestRun, snap: lvm.LogicalVolume) -> Delta:
    """The delta from a base some destinations hold: computed (and refined) once for all of them."""
    assert run.base is not None and run.base.snapshot is not None
    return pipelines.incremental_delta(vol, run.base.snapshot, snap)


# A destination, its action, its delta (or how to make it: a compare resync's) and its share of the read.
Job = tuple[DestRun, str, "Delta | Callable[[], Delta]", "Consumer | None"]


def _share(delta: Delta, members: list[DestRun], action: str, shared: list[SharedRead]) -> list[Job]:
    """One read of ``delta``'s target for every member: each gets a consumer of the same SharedRead."""
    reader = SharedRead.for_stream(delta.target, DeltaStream(delta))
    shared.append(reader)
    if len(members) > 1:
        log.info("%s: one delta (%s of data) for %s: read once", members[0].view.name,
                 human(delta.extents.data_bytes), ", ".join(r.view.destination.raw for r in members))
    return [(r, action, delta, reader.consumer(r.name)) for r in members]


def _compare_maker(run: DestRun, source: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Callable[[], Delta]:
    def make() -> Delta:
        assert run.client is not None and run.greeting is not None
        return deltas.compare_delta(run.client, run.greeting, source.uuid, snap.snapshot_id, snap.path,
                                    snapshots.size_of(snap))
    return make


def _run_all(vol: VolumeConfig, jobs: list[Job], snap: lvm.LogicalVolume, dry_run: bool,
             shared: list[SharedRead]) -> None:
    """Each destination's send in its own thread (a slow link holds up no other but through the reader)."""
    several = len(jobs) > 1
    lock = threading.Lock()

    def one(run: DestRun, action: str, made: Delta | Callable[[], Delta], consumer: Consumer | None) -> None:
        own: Delta | None = None
        try:
            if callable(made):  # a compare resync: its own delta, its own read (a SharedRead of one)
                own = made()
                reader = SharedRead.for_stream(own.target, DeltaStream(own))
                with lock:
                    shared.append(reader)
                consumer = reader.consumer(run.name)
                delta = own
            else:
                delta = made
            _send_one(run, action, delta, consumer, snap, dry_run, several)
        except FAILURES as e:
            run.error = e
            log.error("%s: %s", run.name, e)
        except BaseException as e:  # a bug: kept, and raised in the main thread below
            run.error = e
        finally:
            if consumer is not None:
                consumer.close()
            if own is not None:
                own.close()

    threads = [threading.Thread(target=one, args=job, name=f"send-{job[0].view.dest_key}") for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in shared:
        s.close()
    for run, *_ in jobs:
        if run.error is not None and not isinstance(run.error, FAILURES):
            raise run.error


def _send_one(run: DestRun, action: str, delta: Delta, consumer: Consumer | None, snap: lvm.LogicalVolume,
              dry_run: bool, several: bool) -> None:
    vol = run.view
    out = pipelines._outcome(run.name, action, delta, dry_run)
    if run.problem:
        out.notes.append(run.problem)
    out.bwlimit, out.base_cow_percent = vol.bwlimit, run.base_cow
    assert run.client is not None
    if dry_run:
        pipelines.estimate(vol, run.client, delta, out)
    else:
        assert consumer is not None
        mine = dataclasses.replace(delta, target=consumer)
        reply = pipelines.send(run.client, mine, f"{run.name}: {action}", spool_dir=vol.spool,
                               compress=vol.compress, wrap=lambda s: ConsumerStream(s, consumer),
                               show_progress=not several, outcome=out)
        out.generation = pipelines.applied_generation(reply)
        spool.clear(vol.spool)
        run.holds = snap.snapshot_id
        run.keep = {snap.snapshot_id}
    run.outcome = out


# ---- after the sends ----------------------------------------------------------------------------


def _after(vol: VolumeConfig, out: MultiOutcome, snap: lvm.LogicalVolume, dry_run: bool) -> None:
    """Learn what each failed destination holds now, then rotate (a dry run: drop the snapshot)."""
    if dry_run:
        snapshots.remove(snap)
        return
    _from_records(out.runs)
    for run in out.runs:
        if run.error is None or run.client is None:
            continue
        try:
            _note_holdings(run, run.client.hello())
        except FAILURES as e:
            # It may hold part of a delta to the new snapshot: kept, so the next run can resume.
            log.warning("%s: could not ask the receiver what it staged (%s); keeping snapshot %s/%s so "
                        "the next run can resume", run.name, e, snap.vg, snap.name)
            run.keep.add(snap.snapshot_id)
    if any(snap.snapshot_id in r.keep for r in out.runs):
        for r in out.runs:
            if r.error is not None and snap.snapshot_id in r.keep and r.holds != snap.snapshot_id:
                log.warning("%s: keeping snapshot %s/%s: the receiver holds part of the delta to it and the "
                            "next run resumes it", r.name, snap.vg, snap.name)
        _rotate(vol, out.runs, snap.snapshot_id)
    else:
        # No destination took it nor holds part of a delta to it; older snapshots wait for the next run.
        try:
            snapshots.remove(snap)
        except LvError as e:
            log.warning("could not remove snapshot %s/%s after the failure: %s", snap.vg, snap.name, e)


def recorded_holdings(view: VolumeConfig) -> list[str]:
    """What a destination held as its record of runs on this host last says, latest first."""
    runs = runlog.read(view.record_name, view.work_dir)
    return list(dict.fromkeys(r.snapshot for r in (runs.last_run, runs.last_success)
                              if r is not None and r.snapshot))


def _from_records(runs: list[DestRun]) -> None:
    """A destination not reached: taken to hold what its record says (recorded again for the next run)."""
    for run in runs:
        if not run.known:
            held = recorded_holdings(run.view)
            run.keep = set(held)
            run.holds = held[0] if held else ""


def _rotate(vol: VolumeConfig, runs: list[DestRun], new: str) -> None:
    """Remove lvmirror's snapshots of the volume that no destination needs any more."""
    keep: set[str] = set()
    for run in runs:
        keep |= run.keep
        if not run.known and not run.keep:
            log.warning("%s: what this destination holds is not known (it was not reached, and no run on "
                        "this host recorded it); no snapshot is removed this run", run.name)
            return
    try:
        snapshots.rotate(vol, new, also_keep=tuple(sorted(keep)))
    except LvError as e:
        # The mirrors are right whatever happens here: the next run tries again.
        log.warning("%s: could not remove an old snapshot: %s", vol.name, e)


# ---- init -------------------------------------------------------------------------------------


def init(vol: VolumeConfig, *, dry_run: bool = False) -> MultiOutcome:
    """A first copy to each destination that holds nothing yet, from one snapshot read once."""
    source = _origin(vol)
    out = MultiOutcome(vol.name, "init", [DestRun(v) for v in vol.views()], dry_run)
    with ExitStack() as stack:
        for run in out.runs:
            _guard(run, lambda run=run: _connect(run, stack, source))
        reached = [r for r in out.runs if r.error is None]
        for r in reached:
            if r.holds:
                r.skipped = (f"already holds {r.holds}; left alone (`lvmirror sync {vol.name}` keeps it "
                             "in step)")
                log.info("%s: %s", r.name, r.skipped)
        empty = [r for r in reached if not r.skipped]
        if not empty:
            if reached and len(reached) == len(out.runs):
                raise Refused(f"{vol.name}: every destination already holds a copy ("
                              + "; ".join(f"{r.view.destination.raw}: {r.holds}" for r in reached)
                              + f"); use `lvmirror sync {vol.name}` (or `lvmirror check {vol.name}`)")
            return out
        snap = snapshots.take(vol, source)
        out.snapshot = snap.snapshot_id
        shared: list[SharedRead] = []
        try:
            delta = pipelines._init_delta(source, snap)
        except BaseException:
            snapshots.remove(snap)
            raise
        try:
            _run_all(vol, _share(delta, empty, "init", shared), snap, dry_run, shared)
        finally:
            delta.close()
        out.source_bytes_read = sum(s.source_bytes for s in shared)
        _after(vol, out, snap, dry_run)
    return out
