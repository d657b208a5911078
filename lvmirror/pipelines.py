"""lvmirror's pipelines: init, sync (with its compare fallback), check, repair, apply, discard.

Every pipeline ends in the same place: a :class:`~lvdeltafs.delta.Delta`
handed to the receiver, which stages it, verifies it, applies it and records
the destination's new state.  So an initial copy, an incremental sync, a
compare resync and a repair differ only in how their extents are found (see
:mod:`lvmirror.deltas` and :mod:`lvdeltafs.pairs`).

The functions here take plain objects (a VolumeConfig, a receiver client)
and return plain results; the command line prints them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lvdeltafs import lvm, pairs
from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import BadInput, CommandFailed, LvError, Mismatch, Refused, SnapshotUnusable
from lvdeltafs.extents import DATA, Extents, format_ranges
from lvdeltafs.formats import codecs, files
from lvdeltafs.formats.verify import verify_path
from lvmirror import deltas, snapshots, spool
from lvmirror.client import FileSource, Hello, ReceiverClient, StreamSource, stream_header
from lvmirror.compression import policy_for, sample_ratio
from lvmirror.config import ConfigError, VolumeConfig
from lvmirror.encoder import DeltaStream
from lvmirror.progress import Progress, human
from lvmirror.transports import SshOptions, receiver_for

log = logging.getLogger(__name__)


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
    generation: int | None = None  # the destination's generation after it (None: not applied, or unknown)
    # A classic base's COW use as the sync found it, before replacing it: how full it got between runs.
    base_cow_percent: float | None = None
    # exact = true: bytes the source marked changed but found equal to the base, so not sent (None: not on).
    unchanged_bytes: int | None = None
    bwlimit: int | None = None  # the cap it ran (or would run) under, bytes per second
    stream_bytes: int = 0  # the bytes of the delta stream (a dry run under a cap: for its time estimate)
    # A dry run that would compress: compressed size over raw size of a sample of the data.
    compress_ratio: float | None = None
    # Several destinations: bytes of the new snapshot the run read to send its deltas, each shared one once.
    source_bytes_read: int | None = None
    # What a sent delta saved (None: not known, e.g. the stream was resumed or never sent):
    marked_bytes: int | None = None  # data bytes the snapshot's metadata marked changed (before exact)
    differed_bytes: int | None = None  # of those, what differed from the base and was sent as data
    wire_bytes: int | None = None  # what those data bytes took in the stream, after compression
    # Stream bytes the far side already held verified from an interrupted run, so not sent again (of this
    # run's delta, or of the one it resumed first).
    resumed_bytes: int = 0

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        text = (f"{self.volume}: {self.action} {verb} {human(self.data_bytes)} of data in "
                f"{self.ranges} ranges and {human(self.zero_bytes)} of zeros")
        if self.unchanged_bytes is not None:
            text += (f" (exact: {human(self.unchanged_bytes)} unchanged "
                     f"{'would not be' if self.dry_run else 'not'} sent)")
        if self.target and not self.dry_run:
            text += f"; the destination now holds {self.target}"
        if self.dry_run and self.compress_ratio is not None:
            text += (f"; compressed (estimated from a sample) the data would be about "
                     f"{human(int(self.data_bytes * self.compress_ratio))}")
        if self.dry_run and self.bwlimit:
            from lvmirror.bwlimit import estimate
            text += f"; {estimate(self.link_bytes(), self.bwlimit)}"
        return text

    def link_bytes(self) -> int:
        """The stream's bytes as they would cross the link: its data compressed as the sample says."""
        if self.compress_ratio is None:
            return self.stream_bytes
        return self.stream_bytes - self.data_bytes + int(self.data_bytes * self.compress_ratio)


@dataclass
class CheckResult:
    volume: str
    snapshot: str
    mismatched: Extents
    checked_bytes: int

    @property
    def ok(self) -> bool:
        return len(self.mismatched) == 0


def data_ranges(extents: Extents) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data range, in order."""
    for off, ln, kind in zip(extents.offsets.tolist(), extents.lengths.tolist(), extents.kinds.tolist(),
                             strict=True):
        if kind == DATA:
            yield off, ln


def _outcome(vol_name: str, action: str, delta: Delta, dry_run: bool) -> Outcome:
    e = delta.extents
    return Outcome(vol_name, action, delta.identity.target, e.data_bytes, e.zero_bytes, len(e), dry_run,
                   list(delta.notes), unchanged_bytes=delta.unchanged_bytes)


# ---- the receiver -----------------------------------------------------------

@contextmanager
def volume_receiver(vol: VolumeConfig) -> Iterator[ReceiverClient]:
    """The volume's receiver, reached the way its destination says."""
    dest = vol.destination.raw if vol.destination.is_ssh else vol.destination.path
    with receiver_for(dest, vol.state_dir, SshOptions(vol.ssh_key, vol.known_hosts, vol.ssh_transport),
                      vol.bwlimit) as client:
        client.keep = vol.history
        yield client


def hello(client: ReceiverClient) -> Hello:
    """The receiver's greeting; what it finished or distrusts is reported, not ignored."""
    greeting = client.hello()
    if greeting.replayed:
        log.warning("%s: finished applying delta %s that an interrupted run had left staged",
                    greeting.dest, greeting.replayed)
    return greeting


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


def send(client: ReceiverClient, delta: Delta, label: str, *, force: bool = False,
         spool_dir: str | None = None, compress: str = "off",
         wrap: Callable[[DeltaStream], StreamSource] | None = None, show_progress: bool = True,
         outcome: Outcome | None = None) -> dict:
    """Stream the delta to the receiver (resuming what it holds), then have it apply.

    ``spool_dir``: where the delta's ranges are kept while it is in flight (see :mod:`lvmirror.spool`);
    ``compress``: the configured mode, as :func:`lvmirror.compression.choose_mode` settles it for this link;
    ``wrap``: what the stream is sent through (:mod:`lvmirror.fanout`: one read for several destinations);
    ``show_progress``: False when several sends run at once (their lines would overwrite each other);
    ``outcome``: where to note what was saved (:func:`note_savings`).
    """
    delta_id = delta.identity.delta_id
    if spool_dir:
        spool.save(spool_dir, delta_id, delta.extents)
    # The far side's codecs are in the hello every pipeline begins with.
    policy = policy_for(compress, local=client.local, far_codecs=list(client.codecs))
    if policy.mode != compress and not (compress == "auto" and client.local):
        log.warning("%s: %s is not available at both ends (the receiver's python3 has %s, this one %s); "
                    "sending uncompressed", label, compress, ", ".join(client.codecs) or "none",
                    ", ".join(codecs.available()))
    source = DeltaStream(delta, policy)
    with Progress(label, source.total, cap=client.bwlimit, enabled=None if show_progress else False) as bar:
        source.progress = bar.update
        client.send_delta(wrap(source) if wrap else source, delta_id, force=force)
    if policy.compresses:
        same = f" ({human(source.unchanged)} unchanged since the base not sent)" if source.unchanged else ""
        log.info("%s: %s; %s sent for %s of data%s", label, policy.describe(), human(client.bytes_sent),
                 human(delta.extents.data_bytes), same)
    reply = client.apply()
    if spool_dir:
        spool.forget(spool_dir, delta_id)
    if outcome is not None:
        note_savings(outcome, delta, source)
        outcome.resumed_bytes = client.resumed_bytes  # this session's: a delta resumed before this one too
    return reply


def note_savings(out: Outcome, delta: Delta, stream: DeltaStream) -> None:
    """What the delta's data came to: marked changed, found different (exact, or the encoder's comparison
    while compressing), and on the wire (compressed).  The last two only for a stream sent whole in this
    run: a resumed one's counts cover only its tail."""
    out.marked_bytes = delta.extents.data_bytes + (delta.unchanged_bytes or 0)
    counts = stream.counts
    if counts is not None and stream.started == 0:
        out.differed_bytes, out.wire_bytes = counts.raw_data, counts.wire_data


def applied_generation(reply: dict) -> int | None:
    """The generation the receiver's apply reply records (None if it names none: it is only reported)."""
    state = reply.get("state") if isinstance(reply, dict) else None
    generation = state.get("generation") if isinstance(state, dict) else None
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else None


# ---- init -------------------------------------------------------------------

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
        greeting = hello(client)
        if greeting.holds:
            raise Refused(f"{vol.name}: the destination {vol.destination} already holds {greeting.holds}; "
                          f"use `lvmirror sync {vol.name}` (or `lvmirror check {vol.name}`)")
        snap = snapshots.take(vol, source)
        return _send_new(vol, client, snap, lambda: _init_delta(source, snap), "init", dry_run)


def _init_delta(source: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Delta:
    size = snapshots.size_of(snap)
    if snap.is_thin:
        return deltas.full_copy_delta(source.uuid, snap.snapshot_id, snap.path, size, source="thin",
                                      mapped=deltas.thin_mapped(snap, size))
    return deltas.full_copy_delta(source.uuid, snap.snapshot_id, snap.path, size, source="compare")


def _send_new(vol: VolumeConfig, client: ReceiverClient, snap: lvm.LogicalVolume,
              make: Callable[[], Delta], action: str, dry_run: bool, notes: tuple[str, ...] = ()) -> Outcome:
    """Build the delta to a snapshot just taken, send it, rotate; clean up after a failure or dry run."""
    delta = None
    try:
        delta = make()
        out = _outcome(vol.name, action, delta, dry_run)
        out.notes.extend(notes)
        out.bwlimit = vol.bwlimit
        if dry_run:
            estimate(vol, client, delta, out)
        if not dry_run:
            out.generation = applied_generation(send(client, delta, f"{vol.name}: {action}",
                                                     spool_dir=vol.spool, compress=vol.compress,
                                                     outcome=out))
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
    spool.clear(vol.spool)
    snapshots.rotate(vol, snap.snapshot_id)
    return out


def estimate(vol: VolumeConfig, client: ReceiverClient, delta: Delta, out: Outcome) -> None:
    """A dry run's figures: the stream's size, and what compression would make of a sample of the data."""
    out.stream_bytes = files.stream_layout(delta).size
    policy = policy_for(vol.compress, local=client.local, far_codecs=list(client.codecs))
    if policy.compresses:
        out.compress_ratio = sample_ratio(data_ranges(delta.extents), delta.extents.data_bytes, delta.read,
                                          codec=policy.codec)


def _after_failure(snap: lvm.LogicalVolume, client: ReceiverClient, dry_run: bool) -> None:
    """Keep the new snapshot only if the receiver staged part of a delta to it (the next run resumes)."""
    if not dry_run:
        try:
            staged = client.hello().staged
        except (LvError, OSError) as e:
            log.warning("could not ask the receiver what it staged (%s); keeping snapshot %s/%s so the "
                        "next run can resume", e, snap.vg, snap.name)
            return
        if staged is not None and staged.target == snap.snapshot_id:
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
        if greeting.problem:
            raise Refused(f"{vol.name}: {greeting.problem}")
        if not greeting.holds and not greeting.unknown:
            raise Refused(f"{vol.name}: the destination {vol.destination} holds no copy yet; run "
                          f"`lvmirror init {vol.name}` first")
        _check_same_volume(vol, greeting, source)
        base_cow: float | None = None
        if not dry_run and _resume_staged(vol, client, greeting):
            greeting = hello(client)
        if greeting.holds:
            base = snapshots.check_base(vol, greeting.holds)
            problem = base.problem
            if base.snapshot is not None and not base.snapshot.is_thin:
                base_cow = base.snapshot.snap_percent
        else:
            base, problem = None, greeting.unknown
        if problem:
            log.warning("%s: %s; falling back to a compare resync (block digests of both sides, only "
                        "differing blocks sent)", vol.name, problem)
        snap = snapshots.take(vol, source)
        usable = base is not None and base.usable
        out = _send_new(vol, client, snap, lambda: _sync_delta(vol, client, greeting, base, source, snap),
                        "sync" if usable else "resync", dry_run, () if usable else (problem,))
        out.base_cow_percent = base_cow
        return out


def _check_same_volume(vol: VolumeConfig, greeting: Hello, source: lvm.LogicalVolume) -> None:
    # The recorded state too: a destination changed since still names the volume it was a mirror of.
    held = greeting.state.get("volume") or greeting.recorded.get("volume") or ""
    if held and held != source.uuid:
        raise Refused(f"{vol.name}: the destination {vol.destination} is a mirror of volume {held}, not of "
                      f"{vol.vg_lv} ({source.uuid}); point the config at the right destination")


def incremental_delta(vol: VolumeConfig, base: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Delta:
    """The delta from the base snapshot to the new one (its COW table or thin_delta), as configured."""
    delta = pairs.lvm_delta(base.vg_lv, snap.vg_lv)
    if vol.exact:
        # Refined before send() builds the stream and spools its ranges: a resume rebuilds from those.
        return deltas.exact_delta(delta, base.path, vol.name)
    if vol.compress != "off":
        # While compression pays the link is the bottleneck: the encoder then compares with the base.
        delta.base = FileReader(base.path, snapshots.size_of(base))
    return delta


def _sync_delta(vol: VolumeConfig, client: ReceiverClient, greeting: Hello, base: snapshots.BaseCheck | None,
                source: lvm.LogicalVolume, snap: lvm.LogicalVolume) -> Delta:
    if base is not None and base.usable:
        assert base.snapshot is not None
        return incremental_delta(vol, base.snapshot, snap)
    return deltas.compare_delta(client, greeting, source.uuid, snap.snapshot_id, snap.path,
                                snapshots.size_of(snap))


def _resume_staged(vol: VolumeConfig, client: ReceiverClient, greeting: Hello, *, rotate: bool = True,
                   show_progress: bool = True) -> bool:
    """Finish a delta a broken run left part-sent, if it can be rebuilt exactly; True if done.

    (A delta fully received but not applied is replayed by the receiver
    itself on hello; this covers one that stopped mid-stream.)  ``rotate``:
    False when other destinations' snapshots are at stake (lvmirror.multisync rotates once, at the end).
    """
    staged = greeting.staged
    if staged is None or staged.identity["base"] not in (greeting.holds, greeting.token):
        return False
    target = snapshots.find(snapshots.owned_snapshots(vol), staged.target)
    # The ranges as they were sent (an exact delta's refined ones): never found, or compared, again.
    extents = spool.load(vol.spool, staged.delta_id, staged.identity["target_size"])
    if target is None or target.is_invalid or extents is None:
        log.info("%s: the receiver holds part of a delta to %s that cannot be rebuilt exactly; this run's "
                 "delta replaces it", vol.name, staged.target)
        return False
    reader = FileReader(target.path, snapshots.size_of(target))
    delta = Delta(Identity.from_dict(staged.identity), extents, reader)
    if delta.identity.delta_id != staged.delta_id:
        delta.close()
        return False
    log.info("%s: resuming delta %s to %s that a previous run left unfinished", vol.name, staged.delta_id,
             target.vg_lv)
    try:
        send(client, delta, f"{label(vol)}: resume", spool_dir=vol.spool, compress=vol.compress,
             show_progress=show_progress)
    finally:
        delta.close()
    spool.clear(vol.spool)
    if rotate:
        snapshots.rotate(vol, target.snapshot_id)
    return True


def label(vol: VolumeConfig) -> str:
    """How messages name the volume: its name, and which destination when it has several."""
    return f"{vol.name} -> {vol.destination.raw}" if vol.dest_key else vol.name


# ---- check and repair ---------------------------------------------------------

def check(vol: VolumeConfig, *, repair: bool = False) -> tuple[CheckResult, Outcome | None]:
    """Digests of the snapshot the destination holds against the destination's own."""
    with volume_receiver(vol) as client:
        greeting = hello(client)
        # What it was last recorded to hold, even if changed since: that is what it should match.
        held = greeting.holds or str(greeting.recorded.get("snapshot") or "")
        if not held:
            raise Refused(f"{vol.name}: cannot check: the destination holds no copy yet; run "
                          f"`lvmirror init {vol.name}`")
        if greeting.unknown:
            log.warning("%s: %s", vol.name, greeting.unknown)
        found = snapshots.check_base(vol, held)
        if not found.usable:
            raise SnapshotUnusable(f"{vol.name}: cannot check: {found.problem}; `lvmirror sync {vol.name}` "
                                   "resyncs by comparing block digests")
        assert found.snapshot is not None
        return check_against(client, vol.name, found.snapshot.path, snapshots.size_of(found.snapshot),
                             repair=repair, compress=vol.compress)


def check_against(client: ReceiverClient, name: str, path: str, size: int, *, repair: bool = False,
                  block_size: int = deltas.BLOCK_SIZE,
                  compress: str = "off") -> tuple[CheckResult, Outcome | None]:
    """Compare the destination with the image or device at ``path``; with ``repair``, send what differs."""
    greeting = hello(client)
    held = greeting.holds or str(greeting.recorded.get("snapshot") or "")
    if not held:
        raise Refused(f"{name}: cannot check: the destination holds no copy that lvmirror recorded")
    mismatched = deltas.compare_extents(client, path, size, block_size)
    result = CheckResult(name, held, mismatched, size)
    if result.ok or not repair:
        return result, None
    # A repair is an ordinary compare delta from the destination as it is to what it should hold,
    # so the receiver's base check, staging and state apply to it as to any other.
    volume = str(greeting.recorded.get("volume") or pairs.IMAGE_VOLUME)
    delta = deltas.delta_over(greeting, mismatched, volume, held, path, size, block_size)
    out = _outcome(name, "repair", delta, False)
    try:
        reply = send(client, delta, f"{name}: repair", compress=compress, outcome=out)
    finally:
        delta.close()
    out.generation = applied_generation(reply)
    return result, out


# ---- apply and discard ----------------------------------------------------------

def stream_path(delta_path: str) -> str:
    """A delta stream file, or the `delta` file inside a delta directory."""
    if os.path.isdir(delta_path):
        inner = os.path.join(delta_path, "delta")
        if not os.path.isfile(inner):
            raise BadInput(f"{delta_path}: a delta directory must hold a `delta` stream file")
        return inner
    if not os.path.isfile(delta_path):
        raise BadInput(f"{delta_path}: no such delta file or directory (or not a regular file)")
    return delta_path


def apply_file(delta_path: str, dest: str, state_dir: str | None = None, *, force: bool = False,
               ssh: SshOptions | None = None, bwlimit: int | None = None) -> Outcome:
    """Apply a delta stream (or directory) to a destination with the receiver's checks.

    ``bwlimit``: a cap on the bytes sent per second (None: none).
    """
    path = stream_path(delta_path)
    summary = verify_path(delta_path)  # a damaged copy is refused before the receiver is asked
    source = FileSource(path)
    header = stream_header(source)
    with receiver_for(dest, state_dir, ssh, bwlimit) as client:
        with Progress(f"{os.path.basename(dest)}: apply", source.size, cap=bwlimit) as bar:
            client.send_delta(source, header["delta_id"], force=force, progress=bar.update)
        client.apply()
    ident = header.get("identity") or {}
    # A directory's summary counts its ranges; a stream's, its records.
    ranges = summary.get("extents", int(summary.get("data_records", 0)) + int(summary.get("zero_records", 0)))
    return Outcome(os.path.basename(dest), "apply", str(ident.get("target", "")),
                   int(summary.get("data_bytes", 0)), int(summary.get("zero_bytes", 0)), int(ranges))


def discard(dest: str, state_dir: str | None = None, ssh: SshOptions | None = None) -> None:
    """The way out of a stuck mirror: drop what is staged and what the state claims (next sync compares)."""
    with receiver_for(dest, state_dir, ssh) as client:
        client.discard()


def discard_volume(vol: VolumeConfig) -> None:
    """``discard`` for a configured volume's destination."""
    with volume_receiver(vol) as client:
        client.discard()


def check_after_force(outcome: Outcome, dest: str, state_dir: str | None,
                      ssh: SshOptions | None = None) -> CheckResult | None:
    """After a forced apply: a full check against the target snapshot, when it is on this host."""
    if outcome.target.startswith(("image:", "cow:")):
        # An image side is no LVM snapshot: there is nothing on this host to look up.
        log.warning("%s: forced apply done; its target is an image file, not a snapshot: compare the "
                    "mirror with that image (cmp) to be sure", dest)
        return None
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
