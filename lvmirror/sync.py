"""lvmirror's pipelines: init, sync (with its compare fallback), check, repair, apply, status.

Every pipeline ends in the same place: a :class:`~lvdeltafs.delta.Delta`
handed to the receiver, which stages it, verifies it, applies it and records
the destination's new state.  So an initial copy, an incremental sync, a
compare resync and a repair differ only in how their extents are found:

- init:    base "" and the snapshot's non-zero blocks (thin: mapped blocks);
- sync:    the base snapshot's COW table or thin_delta (lvdeltafs.pairs);
- resync:  block digests of the destination against the new snapshot;
- repair:  the blocks ``check`` found different, re-sent from the snapshot.

The functions here take plain objects (a VolumeConfig, a receiver client)
and return plain results; the command line prints them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lvdeltafs import lvm, pairs
from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import BadInput, CommandFailed, LvError, Mismatch, Refused, SnapshotUnusable
from lvdeltafs.extents import DATA, ZERO, Extents, format_ranges, parse_ranges
from lvdeltafs.formats import files
from lvdeltafs.sources import compare
from lvmirror import snapshots
from lvmirror.config import ConfigError, VolumeConfig
from lvmirror.progress import Progress, human
from lvmirror.transports import (
    FileSource,
    LayoutSource,
    LocalTransport,
    ReceiverClient,
    SshTransport,
    stream_header,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = compare.DEFAULT_BLOCK_SIZE


# ---- results ----------------------------------------------------------------

@dataclass
class Outcome:
    """What a pipeline did (or, with dry_run, would do)."""

    volume: str
    action: str  # init | sync | resync | repair | apply | check
    target: str = ""
    data_bytes: int = 0
    zero_bytes: int = 0
    ranges: int = 0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        text = (f"{self.volume}: {self.action} {verb} {human(self.data_bytes)} of data in "
                f"{self.ranges} ranges and {human(self.zero_bytes)} of zeros")
        if self.target and not self.dry_run:
            text += f"; the destination now holds {self.target}"
        return text


@dataclass
class CheckResult:
    volume: str
    snapshot: str
    mismatched: Extents
    checked_bytes: int

    @property
    def ok(self) -> bool:
        return len(self.mismatched) == 0


# ---- the receiver -----------------------------------------------------------

@dataclass(frozen=True)
class SshOptions:
    """How to reach an ssh:// destination: the private key and the known_hosts file."""

    key: str | None = None
    known_hosts: str | None = None


@contextmanager
def receiver_for(dest: str, state_dir: str | None, ssh: SshOptions | None = None) -> Iterator[ReceiverClient]:
    """A receiver for ``dest`` for the length of the block: a local subprocess, or shipped over ssh."""
    transport: LocalTransport | SshTransport
    if dest.startswith("ssh://"):
        ssh = ssh or SshOptions()
        transport = SshTransport(dest, ssh.key, ssh.known_hosts, state_dir=state_dir)
    else:
        transport = LocalTransport(dest, state_dir)
    with transport as client:
        yield client


@contextmanager
def volume_receiver(vol: VolumeConfig) -> Iterator[ReceiverClient]:
    """The volume's receiver, reached the way its destination says."""
    dest = vol.destination.raw if vol.destination.is_ssh else vol.destination.path
    with receiver_for(dest, vol.state_dir, SshOptions(vol.ssh_key, vol.known_hosts)) as client:
        yield client


def check_destination_not_on_source(vol: VolumeConfig, source: lvm.LogicalVolume) -> None:
    """Refuse a destination that lives on the source volume: each write would change what is mirrored."""
    if vol.destination.is_ssh:
        return  # on another host: its devices are not this host's to stat
    try:
        src_dev = os.stat(source.path).st_rdev
    except OSError as e:
        raise SnapshotUnusable(f"{vol.vg_lv}: cannot stat its device {source.path}: {e.strerror}") from None
    path = vol.destination.path
    probe = path
    while not os.path.exists(probe) and probe != "/":
        probe = os.path.dirname(probe)
    st = os.stat(probe)
    on_source = (st.st_rdev == src_dev) if stat.S_ISBLK(st.st_mode) else (st.st_dev == src_dev)
    if on_source:
        raise Refused(f"{vol.where('destination')}: {path} is on the source volume {vol.vg_lv} "
                      "itself; a mirror must live on another device")


def hello(client: ReceiverClient) -> dict[str, Any]:
    """The receiver's greeting; a destination it cannot vouch for is reported, not ignored."""
    doc = client.hello()
    if doc.get("replayed"):
        log.warning("%s: finished applying delta %s that an interrupted run had left staged",
                    doc.get("dest"), doc["replayed"])
    return doc


def state_of(greeting: dict[str, Any]) -> dict[str, Any]:
    """The destination's state (empty for a destination that holds nothing yet)."""
    return greeting.get("state") or {}


def holds(state: dict[str, Any]) -> str:
    """The snapshot identity the destination holds ("" when it holds nothing yet)."""
    return state.get("snapshot") or ""


def staged_target(greeting: dict[str, Any]) -> str:
    """The target of a delta the receiver holds staged (part or all of it), or ""."""
    staged = greeting.get("staged") or {}
    return (staged.get("identity") or {}).get("target", "")


def send(client: ReceiverClient, delta: Delta, label: str, *, force: bool = False,
         spool: str | None = None) -> dict[str, Any]:
    """Stream the delta to the receiver (resuming what it holds), then have it apply.

    ``spool``: a folder where the delta's ranges are saved while it is in
    flight, so a run that breaks off can be resumed byte for byte (a classic
    base's COW table keeps growing, so recomputing it would give another stream).
    """
    layout = files.stream_layout(delta)
    saved = save_ranges(spool, delta) if spool else None
    with Progress(label, layout.size) as bar:
        client.send_delta(LayoutSource(layout, delta.read), delta.identity.delta_id, force=force,
                          progress=bar.update)
    reply = client.apply()
    if saved:
        _unlink(saved)
    return reply


def _spool_path(spool: str, delta_id: str) -> str:
    return os.path.join(spool, f"{delta_id}.ranges")


def save_ranges(spool: str, delta: Delta) -> str:
    """Keep the ranges of a delta in flight (written once, atomically)."""
    path = _spool_path(spool, delta.identity.delta_id)
    if os.path.exists(path):
        return path
    os.makedirs(spool, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(format_ranges(delta.extents))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_ranges(spool: str, delta_id: str, size: int) -> Extents | None:
    path = _spool_path(spool, delta_id)
    try:
        with open(path) as f:
            return parse_ranges(f.read(), size)
    except FileNotFoundError:
        return None


def clear_spool(spool: str) -> None:
    """Forget the ranges of deltas no longer in flight (the destination moved past them)."""
    if not os.path.isdir(spool):
        return
    for name in os.listdir(spool):
        if name.endswith(".ranges"):
            _unlink(os.path.join(spool, name))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _outcome(vol_name: str, action: str, delta: Delta, dry_run: bool) -> Outcome:
    e = delta.extents
    return Outcome(vol_name, action, delta.identity.target, e.data_bytes, e.zero_bytes, len(e), dry_run,
                   list(delta.notes))


# ---- building deltas ----------------------------------------------------------

def nonzero_extents(path: str, size: int, block_size: int = BLOCK_SIZE,
                    progress: Callable[[int], None] | None = None) -> Extents:
    """DATA where a block holds anything but zeros, ZERO elsewhere: a full copy that skips zero runs."""
    digests = compare.block_digests(path, block_size, size, progress=progress)
    data = Extents.from_chunks(np.flatnonzero(~digests["zero"]), block_size, size, DATA)
    return with_zero_rest(data, size)


def with_zero_rest(data: Extents, size: int) -> Extents:
    """Say ZERO for everything ``data`` does not cover.

    A fresh image file keeps those as holes; a destination that held older
    bytes there gets them zeroed, so an init is right whatever was there.
    """
    if size == 0:
        return Extents.empty()
    return data.data_only().union(Extents.from_ranges([0], [size], [ZERO], size))


def full_copy_delta(volume: str, target_id: str, path: str, size: int, *, source: str,
                    mapped: Extents | None = None, block_size: int = BLOCK_SIZE) -> Delta:
    """An init: base "" (an empty destination) to the target, data ranges only where data is."""
    if mapped is not None:
        extents = with_zero_rest(mapped, size)
    else:
        with Progress("scanning for data", size) as bar:
            extents = nonzero_extents(path, size, block_size, bar.update)
    ident = Identity(volume=volume, base="", target=target_id, base_size=0, target_size=size,
                     chunk_size=block_size, source=source)
    return Delta(ident, extents, FileReader(path, size))


def destination_digests(client: ReceiverClient, block_size: int = BLOCK_SIZE) -> tuple[int, np.ndarray]:
    """(size, block digests) of the destination, computed by the receiver where it lives."""
    size, raw = client.digests(block_size)
    return size, compare.digests_from_bytes(raw, block_size, size)


def source_digests(path: str, size: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    with Progress(f"reading {path}", size) as bar:
        return compare.block_digests(path, block_size, size, progress=bar.update)


def compare_delta(volume: str, base_id: str, dest_size: int, dest_digests: np.ndarray, target_id: str,
                  path: str, size: int, block_size: int = BLOCK_SIZE) -> Delta:
    """Only the blocks where the destination differs from the target, found by digests."""
    src = source_digests(path, size, block_size)
    extents = compare.diff_digests(dest_digests, src, block_size, dest_size, size)
    ident = Identity(volume=volume, base=base_id, target=target_id, base_size=dest_size, target_size=size,
                     chunk_size=block_size, source="compare")
    return Delta(ident, extents, FileReader(path, size))


# ---- init -------------------------------------------------------------------

def _thin_mapped(snap: lvm.LogicalVolume, size: int) -> Extents:
    from lvdeltafs.sources import thin
    devices = lvm.pool_devices(snap.vg, snap.pool)
    with thin.MetadataSnapshot(devices.tpool_name):
        return thin.thin_mapped_extents(devices.tmeta, snap.thin_id, size, metadata_snap=True)


def source_volume(vol: VolumeConfig) -> lvm.LogicalVolume:
    """The origin LV; a missing VG becomes an error naming the config key."""
    try:
        source = snapshots.origin(vol)
    except CommandFailed as e:
        raise ConfigError(f"{vol.where('vg')}: cannot read volume group {vol.vg}: {e}") from None
    check_destination_not_on_source(vol, source)
    return source


def init(vol: VolumeConfig, *, dry_run: bool = False) -> Outcome:
    """Snapshot, then a full copy skipping zero runs, to a destination that holds nothing yet."""
    source = source_volume(vol)
    with volume_receiver(vol) as client:
        state = state_of(hello(client))
        if holds(state):
            raise Refused(f"{vol.name}: the destination {vol.destination} already holds {holds(state)}; "
                          f"use `lvmirror sync {vol.name}` (or `lvmirror check {vol.name}`)")
        snap = snapshots.take(vol, source)
        return _send_new(vol, client, snap, lambda: _init_delta(source, snap), "init", dry_run)


def _init_delta(source: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Delta:
    size = snapshots.size_of(snap)
    if snap.is_thin:
        return full_copy_delta(source.uuid, snap.snapshot_id, snap.path, size, source="thin",
                               mapped=_thin_mapped(snap, size))
    return full_copy_delta(source.uuid, snap.snapshot_id, snap.path, size, source="compare")


def _send_new(vol: VolumeConfig, client: ReceiverClient, snap: lvm.LogicalVolume,
              make: Callable[[], Delta], action: str, dry_run: bool, notes: tuple[str, ...] = ()) -> Outcome:
    """Build the delta to a snapshot just taken, send it, rotate; clean up after a failure or dry run."""
    delta = None
    try:
        delta = make()
        out = _outcome(vol.name, action, delta, dry_run)
        out.notes.extend(notes)
        if not dry_run:
            send(client, delta, f"{vol.name}: {action}", spool=vol.spool)
    except BaseException:
        # Closed first: LVM will not remove a snapshot that is held open.
        if delta is not None:
            delta.close()
        _after_failure(snap, client, dry_run)
        raise
    delta.close()
    if dry_run:
        snapshots.remove(snap)
        return out
    clear_spool(vol.spool)
    snapshots.rotate(vol, snap.snapshot_id)
    return out


def _after_failure(snap: lvm.LogicalVolume, client: ReceiverClient, dry_run: bool) -> None:
    """Keep the new snapshot only if the receiver staged part of a delta to it (the next run resumes)."""
    if not dry_run:
        try:
            staged = staged_target(client.hello())
        except (LvError, OSError) as e:
            log.warning("could not ask the receiver what it staged (%s); keeping snapshot %s/%s so the "
                        "next run can resume", e, snap.vg, snap.name)
            return
        if staged == snap.snapshot_id:
            log.warning("keeping snapshot %s/%s: the receiver holds part of the delta to it and the next "
                        "run resumes it", snap.vg, snap.name)
            return
    try:
        snapshots.remove(snap)
    except LvError as e:
        log.warning("could not remove snapshot %s/%s after the failure: %s", snap.vg, snap.name, e)


# ---- sync -------------------------------------------------------------------

def sync(vol: VolumeConfig, *, dry_run: bool = False) -> Outcome:
    """New snapshot; delta from the base (or a compare resync); send; rotate."""
    source = source_volume(vol)
    with volume_receiver(vol) as client:
        greeting = hello(client)
        state = state_of(greeting)
        if not holds(state):
            raise Refused(f"{vol.name}: the destination {vol.destination} holds no copy yet; run "
                          f"`lvmirror init {vol.name}` first")
        _check_same_volume(vol, state, source)
        if not dry_run and _resume_staged(vol, client, greeting):
            state = state_of(hello(client))
        base = snapshots.check_base(vol, holds(state))
        if not base.usable:
            log.warning("%s: %s; falling back to a compare resync (block digests of both sides, "
                        "only differing blocks sent)", vol.name, base.problem)
        snap = snapshots.take(vol, source)
        action = "sync" if base.usable else "resync"
        return _send_new(vol, client, snap, lambda: _sync_delta(client, state, base, source, snap), action,
                         dry_run, () if base.usable else (base.problem,))


def _check_same_volume(vol: VolumeConfig, state: dict[str, Any], source: lvm.LogicalVolume) -> None:
    held = state.get("volume", "")
    if held and held != source.uuid:
        raise Refused(f"{vol.name}: the destination {vol.destination} is a mirror of volume {held}, not of "
                      f"{vol.vg_lv} ({source.uuid}); point the config at the right destination")


def _sync_delta(client: ReceiverClient, state: dict[str, Any], base: snapshots.BaseCheck,
                source: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Delta:
    if base.usable:
        assert base.snapshot is not None
        return pairs.lvm_delta(base.snapshot.vg_lv, snap.vg_lv)
    size, dest = destination_digests(client)
    return compare_delta(source.uuid, holds(state), size, dest, snap.snapshot_id, snap.path,
                         snapshots.size_of(snap))


def _resume_staged(vol: VolumeConfig, client: ReceiverClient, greeting: dict[str, Any]) -> bool:
    """Finish a delta a broken run left part-sent, if it can be rebuilt exactly; True if done.

    (A delta fully received but not applied is replayed by the receiver
    itself on hello; this covers one that stopped mid-stream.)
    """
    staged = greeting.get("staged") or {}
    ident = staged.get("identity") or {}
    state = state_of(greeting)
    if not ident or ident.get("base") != holds(state):
        return False
    target = snapshots.find(snapshots.owned_snapshots(vol), ident.get("target", ""))
    extents = load_ranges(vol.spool, staged.get("delta_id", ""), int(ident.get("target_size") or 0))
    if target is None or target.is_invalid or extents is None:
        log.info("%s: the receiver holds part of a delta to %s that cannot be rebuilt exactly; this run's "
                 "delta replaces it", vol.name, ident.get("target"))
        return False
    delta = Delta(Identity.from_dict(ident), extents, FileReader(target.path, snapshots.size_of(target)))
    if delta.identity.delta_id != staged.get("delta_id"):
        return False
    log.info("%s: resuming delta %s to %s that a previous run left unfinished", vol.name,
             staged.get("delta_id"), target.vg_lv)
    try:
        send(client, delta, f"{vol.name}: resume", spool=vol.spool)
    finally:
        delta.close()
    clear_spool(vol.spool)
    snapshots.rotate(vol, target.snapshot_id)
    return True


# ---- check and repair ---------------------------------------------------------

def check(vol: VolumeConfig, *, repair: bool = False) -> tuple[CheckResult, Outcome | None]:
    """Digests of the snapshot the destination holds against the destination's own."""
    with volume_receiver(vol) as client:
        held = holds(state_of(hello(client)))
        if not held:
            raise Refused(f"{vol.name}: the destination holds no copy yet; run `lvmirror init {vol.name}`")
        found = snapshots.check_base(vol, held)
        if not found.usable:
            raise SnapshotUnusable(f"{vol.name}: cannot check: {found.problem}; `lvmirror sync {vol.name}` "
                                   "resyncs by comparing block digests")
        assert found.snapshot is not None
        return check_against(client, vol.name, found.snapshot.path, snapshots.size_of(found.snapshot),
                             repair=repair)


def check_against(client: ReceiverClient, name: str, path: str, size: int, *, repair: bool = False,
                  block_size: int = BLOCK_SIZE) -> tuple[CheckResult, Outcome | None]:
    """Compare the destination with the image or device at ``path``; with ``repair``, send what differs."""
    state = state_of(client.hello())
    held = holds(state)
    dest_size, dest = destination_digests(client, block_size)
    src = source_digests(path, size, block_size)
    mismatched = compare.diff_digests(dest, src, block_size, dest_size, size)
    result = CheckResult(name, held, mismatched, size)
    if result.ok or not repair:
        return result, None
    # A repair is an ordinary delta from what the destination is recorded to hold to the same
    # snapshot, so the receiver's base check, staging and state apply to it as to any other.
    ident = Identity(volume=state.get("volume") or os.path.abspath(path), base=held, target=held or path,
                     base_size=int(state.get("size", dest_size)), target_size=size, chunk_size=block_size,
                     source="compare")
    delta = Delta(ident, mismatched, FileReader(path, size))
    try:
        send(client, delta, f"{name}: repair", force=not held)
    finally:
        delta.close()
    return result, _outcome(name, "repair", delta, False)


# ---- apply ------------------------------------------------------------------

def stream_path(delta_path: str) -> str:
    """A delta stream file, or the `delta` file inside a delta directory."""
    if os.path.isdir(delta_path):
        inner = os.path.join(delta_path, "delta")
        if not os.path.isfile(inner):
            raise BadInput(f"{delta_path}: a delta directory must hold a `delta` stream file")
        return inner
    if not os.path.isfile(delta_path):
        raise BadInput(f"{delta_path}: no such delta file or directory")
    return delta_path


def apply_file(delta_path: str, dest: str, state_dir: str | None = None, *, force: bool = False,
               ssh: SshOptions | None = None) -> Outcome:
    """Apply a delta stream (or directory) to a destination with the receiver's checks."""
    summary = files.verify_path(delta_path)  # a damaged copy is refused before the receiver is asked
    path = stream_path(delta_path)
    source = FileSource(path)
    header = stream_header(source)
    with receiver_for(dest, state_dir, ssh) as client:
        with Progress(f"{os.path.basename(dest)}: apply", source.size) as bar:
            client.send_delta(source, header["delta_id"], force=force, progress=bar.update)
        client.apply()
    ident = header.get("identity") or {}
    return Outcome(os.path.basename(dest), "apply", str(ident.get("target", "")),
                   int(summary.get("data_bytes", 0)), int(summary.get("zero_bytes", 0)),
                   int(summary.get("data_records", 0)) + int(summary.get("zero_records", 0)))


def check_after_force(outcome: Outcome, dest: str, state_dir: str | None,
                      ssh: SshOptions | None = None) -> CheckResult | None:
    """After a forced apply: a full check against the target snapshot, when it is on this host."""
    uuid = snapshots.uuid_of(outcome.target)
    try:
        snap = lvm.lv_by_uuid(uuid) if uuid else None
    except LvError as e:
        snap = None
        log.debug("looking up %s: %s", uuid, e)
    if snap is None or snap.snapshot_id != outcome.target:
        log.warning("%s: forced apply done; the target snapshot %s is not on this host, so run a full check "
                    "(`lvmirror check`) from the host that has it", dest, outcome.target)
        return None
    with receiver_for(dest, state_dir, ssh) as client:
        result, _ = check_against(client, os.path.basename(dest), snap.path, snapshots.size_of(snap))
    if not result.ok:
        raise Mismatch(f"{dest}: after the forced apply {len(result.mismatched)} ranges differ from "
                       f"{snap.vg_lv}: {format_ranges(result.mismatched)[:400]}")
    log.info("%s: full check after the forced apply: matches %s", dest, snap.vg_lv)
    return result


# ---- status -----------------------------------------------------------------

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
    """What a volume's mirror holds and how its snapshots stand; problems are reported, not raised."""
    st = VolumeStatus(vol.name, vol.vg_lv, vol.destination.raw)
    try:
        with volume_receiver(vol) as client:
            greeting = hello(client)
        st.state = state_of(greeting)
        if greeting.get("problem"):
            st.problems.append(greeting["problem"])
        if staged_target(greeting):
            st.problems.append(f"a delta to {staged_target(greeting)} is staged, "
                               f"{(greeting.get('staged') or {}).get('verified')} bytes verified; "
                               "the next sync resumes or replaces it")
    except LvError as e:
        st.problems.append(str(e))
    st.base_id = holds(st.state)
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
