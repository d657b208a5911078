"""The tree lvdeltafs shows: volume groups, volumes, snapshots and pairs, with no FUSE in it.

Plain Python objects a test can drive directly; :mod:`lvdeltafs.fuse` is a
thin adapter that turns these calls into FUSE replies.  Every method here is
synchronous and thread-safe: the adapter runs them in worker threads because
opening a delta (reading a COW table, running thin_delta, comparing images)
and reading the target block on I/O.

The tree::

    MOUNT/
      VG/                      a volume group (all, or those named with --vg)
        LV/                    an origin volume that has at least one snapshot
          snapshots/           one file per snapshot, listed in creation order; each holds a
                               JSON line of facts (name, uuid, time, size, kind); mtime = creation
          S1..S2/              one directory per consecutive pair, in creation order,
          S2..S3/                and the newest snapshot against the live origin:
          S3..@origin/         not point in time (its manifest says so)
          (any A..B of two snapshots of this origin, older first, resolves by name
           even though only consecutive pairs are listed)
      @pairs/                  explicit pairs given with --pair, by name BASE..TARGET
        base.img..target.img/  (basenames; a repeated name gets -2, -3, ...)

``@`` cannot start an LVM name, so ``@pairs`` and ``@origin`` never collide
with a volume group or a snapshot.  Every pair directory holds the five delta
files (:data:`lvdeltafs.formats.files.NAMES`), served by the same
:class:`~lvdeltafs.formats.files.DeltaFiles` views as ``lvdeltafs export``.

Deltas are opened on first need (a lookup or listing inside a pair
directory) and kept in a bounded cache.  The target device is held open only
while some file of the pair is open, so ``lvremove`` of an idle snapshot
works while mounted; before reopening it, and on every lookup, the pair's
snapshots are checked against a fresh LVM listing (by UUID): a snapshot that
is gone gives ENOENT, an invalidated one EIO, and the rest of the tree goes on.

Image files named with ``--pair`` can change in place (or be replaced); a
delta of what they held before would then be served as theirs.  See
:class:`Stamp` for how that is noticed and what is done about it.

Who may read what (:class:`Access`): by default the mounting user alone
(0400/0500).  With ``--allow-other`` each entry carries the owner and group
of the volume or image it shows, and at most its read bits, so nobody reads
through the mount what they could not read at the source.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from lvdeltafs import lvm
from lvdeltafs.delta import Delta, FileReader
from lvdeltafs.errors import LvError
from lvdeltafs.formats.files import NAMES, DeltaFiles

log = logging.getLogger(__name__)

ROOT_INO = 1
PAIRS_DIR = "@pairs"
ORIGIN = "@origin"
SNAPSHOTS_DIR = "snapshots"
XATTR_PREFIX = "user.lvdeltafs."
XATTR_FIELDS = ("delta_id", "volume", "base", "target", "source", "point_in_time")
LISTING_TTL = 2.0       # seconds an LVM listing is trusted: `ls -lR` must not run lvs per entry
FAILURE_TTL = 2.0       # seconds a failed delta open is remembered, so a loop of stats cannot hammer LVM
LIVE_TTL = 2.0          # seconds an idle delta against the live origin is reused before it is recomputed
DEFAULT_CACHE = 16


class VfsError(Exception):
    """An error with the errno a filesystem call should return.

    ``quiet``: already said once in the log (or ordinary), so the adapter logs it at debug level only.
    """

    def __init__(self, err: int, message: str = "", *, quiet: bool = False):
        super().__init__(message or os.strerror(err))
        self.errno = err
        self.quiet = quiet


def errno_of(exc: BaseException) -> int:
    """The errno a failed call returns: its own, or EIO for anything that could not produce data."""
    if isinstance(exc, VfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ValueError | OverflowError):
        return errno.EINVAL
    return errno.EIO


@dataclass(frozen=True)
class Attr:
    """What stat shows for one entry."""

    ino: int
    is_dir: bool
    size: int
    blocks: int          # 512-byte units
    mtime_ns: int
    mode: int            # permission bits only
    uid: int
    gid: int


# ---- who may read what --------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """Owner, group and read bits (a subset of 0o444) of an entry; nothing is ever writable."""

    uid: int
    gid: int
    read: int

    @property
    def file_mode(self) -> int:
        return self.read

    @property
    def dir_mode(self) -> int:
        return self.read | (self.read >> 2)  # x wherever r: a listable directory is enterable


NOBODY_BUT_ROOT = Access(0, 0, 0)


def shared_access(sources: Sequence[str]) -> Access:
    """With --allow-other: the owner, group and read bits of the newest of ``sources`` (the newer
    side of a pair: a snapshot's device node or an image), narrowed to the readers each older
    source lets in too, since a delta also shows where the newer side differs from the older.

    A source that cannot be looked at (an inactive LV, a removed image) leaves the entry to root.
    """
    try:
        stats = [os.stat(p) for p in sources]
    except (OSError, ValueError):
        return NOBODY_BUT_ROOT
    if not stats:
        return NOBODY_BUT_ROOT
    newer = stats[-1]
    read = newer.st_mode & 0o444
    for older in stats[:-1]:
        read &= _readers(older, newer.st_uid, newer.st_gid)
    return Access(newer.st_uid, newer.st_gid, read)


def _readers(st: os.stat_result, uid: int, gid: int) -> int:
    """Which classes of a file owned by uid:gid (0o400 owner, 0o040 group, 0o004 others) ``st`` lets read.

    Conservative: the owner counts only as the owner, never as a member of some group.
    """
    if st.st_mode & 0o004:
        return 0o444
    return ((0o400 if st.st_uid == uid and st.st_mode & 0o400 else 0)
            | (0o040 if st.st_gid == gid and st.st_mode & 0o040 else 0))


# ---- images that change under the mount -----------------------------------------

class Stamp(NamedTuple):
    """What stat says of one side of an explicit pair, taken before its delta is computed.

    A write in place moves the size, mtime or ctime; a replacement (rename over
    it, delete and recreate) the inode.  Any difference means the delta no longer
    describes the file.  What is done then (chosen over failing everything with EIO,
    and over serving the old ranges):

    - lookups, stats, listings and opens compute the delta again, so ``ls`` and
      a new ``cat`` show the new state;
    - a file opened before the change fails its reads with EIO: its size and
      content would change under the reader, and a copy mixing two states must
      not look like success.  One warning line in the log says which image changed;
    - an open whose attributes (size) the kernel got from the old delta is
      answered ESTALE, on which the kernel looks the name up again and retries
      the open once, so the reader sees the new size, not the old one;
    - an image that changes while its delta is computed gives EIO (remembered
      for FAILURE_TTL), rather than computing again and again while it is written.

    Limits: a block device written in place keeps its stat (only its replacement
    shows), and a write in the same clock tick as the stat before it may keep
    mtime and ctime (coarse timestamps); pair snapshots or copies, not live images.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    rdev: int


def stamp_of(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None  # gone: differs from any stamp taken while it was there
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev)


def stamps_of(spec: PairSpec) -> tuple[Stamp | None, ...]:
    return tuple(stamp_of(p) for p in spec.sources) if spec.watch else ()


def changed_side(spec: PairSpec, before: tuple[Stamp | None, ...],
                 now: tuple[Stamp | None, ...]) -> str | None:
    """The first source whose stamp moved, or None."""
    return next((p for p, a, b in zip(spec.sources, before, now, strict=False) if a != b), None)


# ---- LVM discovery ----------------------------------------------------------

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


# ---- deltas: opened lazily, cached, target held open only while in use ------

@dataclass
class PairSpec:
    """How to open one pair's delta; ``key`` names it in the cache and in inode numbers."""

    key: tuple
    base: str
    target: str
    opener: Callable[[], Delta]
    live: bool = False          # the target is the live origin: the delta goes stale
    mtime_ns: int = 0           # when the newer side was taken
    sources: tuple[str, ...] = ()  # base, target: device nodes or images, for ownership and stamps
    watch: bool = False         # image files of --pair: may change in place (see Stamp)


@dataclass
class CacheEntry:
    spec: PairSpec
    delta: Delta
    files: DeltaFiles
    opened_at: float
    stamps: tuple[Stamp | None, ...] = ()  # of spec.sources, before the delta was computed
    refs: int = 0
    evicted: bool = False
    changed: bool = False       # a source moved since: said once in the log
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mtime_ns(self) -> int:
        """The newer side's mtime as the delta saw it (for images), else when it was taken."""
        newest = self.stamps[-1] if self.stamps else None
        return newest.mtime_ns if newest else self.spec.mtime_ns


class DeltaCache:
    """At most ``capacity`` idle deltas; an entry with open files is never closed under a reader."""

    def __init__(self, capacity: int = DEFAULT_CACHE, *, check: Callable[[Delta], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = max(1, capacity)
        self.check = check or (lambda d: None)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, CacheEntry] = OrderedDict()
        self._opening: dict[tuple, threading.Lock] = {}
        self._failures: dict[tuple, tuple[float, BaseException]] = {}

    def get(self, spec: PairSpec) -> CacheEntry:
        """The entry for ``spec``, opening its delta if needed (one thread opens, others wait)."""
        with self._lock:
            entry = self._fresh(spec.key)
            if entry is not None:
                return entry
            gate = self._opening.setdefault(spec.key, threading.Lock())
        with gate:
            with self._lock:
                entry = self._fresh(spec.key)
                if entry is not None:
                    return entry
                failed = self._failures.get(spec.key)
                if failed and self.clock() - failed[0] < FAILURE_TTL:
                    raise failed[1]
            return self._open(spec)

    def _fresh(self, key: tuple) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stale = entry.spec.live and entry.refs == 0 and self.clock() - entry.opened_at > LIVE_TTL
        if stale or self.changed(entry):
            self._evict(key)  # readers of the old entry keep it until they close
            return None
        self._entries.move_to_end(key)
        return entry

    def changed(self, entry: CacheEntry) -> bool:
        """Has an image of the pair changed since its delta was computed?  Logs it once."""
        if not entry.spec.watch:
            return False
        now = stamps_of(entry.spec)
        if now == entry.stamps:
            return False
        with entry.lock:
            first, entry.changed = not entry.changed, True
        if first:
            log.warning("%s changed since the delta from %s to %s was computed (its size, times or "
                        "inode differ): the delta is computed again at the next lookup; files of the "
                        "pair opened before now fail reads with EIO: close and reopen them",
                        changed_side(entry.spec, entry.stamps, now), entry.spec.base, entry.spec.target)
        return True

    def _open(self, spec: PairSpec) -> CacheEntry:
        log.info("opening delta %s..%s", spec.base, spec.target)
        try:
            before = stamps_of(spec)
            delta = spec.opener()
            _check_unchanged_while_opening(spec, before, delta)
        except BaseException as e:
            with self._lock:
                self._failures[spec.key] = (self.clock(), e)
            raise
        # Let go of the target until a file is opened: an idle mount must not keep
        # snapshots busy (lvremove refuses an open device).
        delta.target.close()
        entry = CacheEntry(spec, delta, DeltaFiles(delta), self.clock(), stamps=before)
        with self._lock:
            self._failures.pop(spec.key, None)
            self._entries[spec.key] = entry
            while len(self._entries) > self.capacity:
                idle = next((k for k, e in self._entries.items() if e.refs == 0 and k != spec.key), None)
                if idle is None:
                    break
                self._evict(idle)
        return entry

    def _evict(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        with entry.lock:  # not while a file is being opened on it
            entry.evicted = True
            if entry.refs == 0:
                entry.delta.close()

    def acquire(self, entry: CacheEntry) -> None:
        """A file of the pair is being opened: make sure the target is open and still the same."""
        with entry.lock:
            if entry.refs == 0:
                self.check(entry.delta)
                _reopen_target(entry.delta)
            entry.refs += 1

    def release(self, entry: CacheEntry) -> None:
        with entry.lock:
            entry.refs -= 1
            if entry.refs == 0:
                entry.delta.target.close()

    def drop(self, key: tuple) -> None:
        """Forget a pair whose snapshots are gone (its open files keep their target until closed)."""
        with self._lock:
            if key in self._entries:
                self._evict(key)
            self._failures.pop(key, None)

    def close(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._evict(key)


def _check_unchanged_while_opening(spec: PairSpec, before: tuple[Stamp | None, ...], delta: Delta) -> None:
    side = changed_side(spec, before, stamps_of(spec))
    if side is not None:
        delta.close()
        raise VfsError(errno.EIO, f"{side} changed while the delta from {spec.base} to {spec.target} "
                       "was computed: an image must not be written while it is paired (pair a copy or a "
                       "snapshot of it)")


def _reopen_target(delta: Delta) -> None:
    reader = delta.target
    if isinstance(reader, FileReader) and reader.fd < 0:
        delta.target = FileReader(reader.path, reader.size)


# ---- nodes ------------------------------------------------------------------

class Node:
    """One entry of the tree.  ``key`` is unique and stable: the inode table maps it to a number."""

    is_dir = False
    key: tuple = ()
    ino = 0

    def attr(self, fs: Vfs) -> Attr:
        raise NotImplementedError

    def xattrs(self, fs: Vfs) -> dict[str, bytes]:
        return {}

    def validate(self, fs: Vfs) -> None:
        """Raise VfsError if this entry no longer exists."""


class Dir(Node):
    is_dir = True

    def names(self, fs: Vfs) -> list[str]:
        """The names readdir lists, in order."""
        raise NotImplementedError

    def child(self, fs: Vfs, name: str) -> Node | None:
        """Any name that resolves here (a superset of names())."""
        raise NotImplementedError

    def attr(self, fs: Vfs) -> Attr:
        acc = self.access(fs)
        return Attr(self.ino, True, 0, 0, self.mtime_ns(fs), acc.dir_mode, acc.uid, acc.gid)

    def mtime_ns(self, fs: Vfs) -> int:
        return fs.started_ns

    def access(self, fs: Vfs) -> Access:
        """The root, @pairs and volume groups: names anyone may list (as in /dev)."""
        return fs.common


class Root(Dir):
    key = ("root",)

    def names(self, fs: Vfs) -> list[str]:
        names = []
        if fs.discovery is not None:
            try:
                names = fs.discovery.vg_names()
            except LvError as e:
                # Explicit pairs must stay reachable when LVM cannot be listed.
                log.warning("cannot list LVM volumes: %s", e)
        return names + ([PAIRS_DIR] if fs.explicit else [])

    def child(self, fs: Vfs, name: str) -> Node | None:
        if name == PAIRS_DIR:
            return PairsDir() if fs.explicit else None
        if fs.discovery is None or (fs.discovery.vgs and name not in fs.discovery.vgs):
            return None
        return VgDir(name) if name in fs.discovery.vg_names() else None


class PairsDir(Dir):
    key = ("pairs",)

    def names(self, fs: Vfs) -> list[str]:
        return list(fs.explicit)

    def child(self, fs: Vfs, name: str) -> Node | None:
        spec = fs.explicit.get(name)
        return PairDir(spec) if spec else None


class VgDir(Dir):
    def __init__(self, vg: str):
        self.vg = vg
        self.key = ("vg", vg)

    def validate(self, fs: Vfs) -> None:
        if fs.discovery is None or self.vg not in fs.discovery.vg_names():
            raise VfsError(errno.ENOENT, f"volume group {self.vg} is gone")

    def names(self, fs: Vfs) -> list[str]:
        return sorted(fs.discovery.tree().get(self.vg, {}))

    def child(self, fs: Vfs, name: str) -> Node | None:
        vol = fs.discovery.volume(self.vg, name)
        return LvDir(self.vg, vol.origin) if vol else None


class LvDir(Dir):
    def __init__(self, vg: str, origin: lvm.LogicalVolume):
        self.vg, self.name, self.uuid, self.path = vg, origin.name, origin.uuid, origin.path
        self.key = ("lv", origin.uuid)

    def access(self, fs: Vfs) -> Access:
        return fs.access((self.path,))

    def volume(self, fs: Vfs) -> Volume:
        vol = fs.discovery.volume(self.vg, self.name)
        if vol is None or vol.origin.uuid != self.uuid:
            raise VfsError(errno.ENOENT, f"{self.vg}/{self.name} has no snapshots any more")
        return vol

    def validate(self, fs: Vfs) -> None:
        self.volume(fs)

    def mtime_ns(self, fs: Vfs) -> int:
        return _lv_time_ns(self.volume(fs).snapshots[-1], fs)

    def names(self, fs: Vfs) -> list[str]:
        snaps = [s.name for s in self.volume(fs).snapshots]
        return [SNAPSHOTS_DIR] + [f"{a}..{b}" for a, b in zip(snaps, snaps[1:] + [ORIGIN], strict=True)]

    def child(self, fs: Vfs, name: str) -> Node | None:
        vol = self.volume(fs)
        if name == SNAPSHOTS_DIR:
            return SnapshotsDir(self.vg, vol.origin)
        for base, target in split_pair_name(name):
            pair = lvm_pair(fs, self.vg, vol, base, target)
            if pair is not None:
                return PairDir(pair)
        return None


class SnapshotsDir(LvDir):
    def __init__(self, vg: str, origin: lvm.LogicalVolume):
        super().__init__(vg, origin)
        self.key = ("snapshots", origin.uuid)

    def names(self, fs: Vfs) -> list[str]:
        return [s.name for s in self.volume(fs).snapshots]

    def child(self, fs: Vfs, name: str) -> Node | None:
        snap = self.volume(fs).snapshot(name)
        return SnapshotFile(self.vg, self.name, snap) if snap else None


class SnapshotFile(Node):
    """Facts about one snapshot, as a line of JSON."""

    def __init__(self, vg: str, origin: str, snap: lvm.LogicalVolume):
        self.vg, self.origin, self.snap = vg, origin, snap
        self.key = ("snapshot", snap.uuid)
        self.content = (json.dumps({
            "name": snap.name, "vg": vg, "origin": origin, "uuid": snap.uuid, "time": snap.time,
            "size": snap.size, "kind": "thin" if snap.is_thin else "classic",
            "snapshot_id": snap.snapshot_id}, sort_keys=True) + "\n").encode()

    def validate(self, fs: Vfs) -> None:
        if fs.discovery is None or fs.discovery.by_uuid(self.snap.uuid) is None:
            raise VfsError(errno.ENOENT, f"snapshot {self.vg}/{self.snap.name} is gone")

    def attr(self, fs: Vfs) -> Attr:
        n = len(self.content)
        acc = fs.access((self.snap.path,))
        return Attr(self.ino, False, n, _blocks(n), _lv_time_ns(self.snap, fs), acc.file_mode,
                    acc.uid, acc.gid)

    def open(self, fs: Vfs) -> Handle:
        return Handle(_bytes_reader(self.content), size=len(self.content))


class PairDir(Dir):
    def __init__(self, spec: PairSpec):
        self.spec = spec
        self.key = ("pair", *spec.key)

    def validate(self, fs: Vfs) -> None:
        fs.validate_pair(self.spec)

    def mtime_ns(self, fs: Vfs) -> int:
        return fs.pair_mtime_ns(self.spec)

    def access(self, fs: Vfs) -> Access:
        return fs.access(self.spec.sources)

    def names(self, fs: Vfs) -> list[str]:
        return list(NAMES)

    def child(self, fs: Vfs, name: str) -> Node | None:
        return DeltaFile(self.spec, name) if name in NAMES else None

    def xattrs(self, fs: Vfs) -> dict[str, bytes]:
        return identity_xattrs(fs.entry(self.spec).delta)


class DeltaFile(Node):
    def __init__(self, spec: PairSpec, name: str):
        self.spec, self.name = spec, name
        self.key = ("file", *spec.key, name)

    def validate(self, fs: Vfs) -> None:
        fs.validate_pair(self.spec)

    def attr(self, fs: Vfs) -> Attr:
        entry = fs.entry(self.spec)
        view = entry.files[self.name]
        # `data` is sparse: only its changed bytes count, so `du` shows the delta's size.
        used = getattr(view, "changed_bytes", view.size)
        acc = fs.access(self.spec.sources)
        fs.shown(self.ino, entry)
        return Attr(self.ino, False, view.size, _blocks(used), entry.mtime_ns or fs.started_ns,
                    acc.file_mode, acc.uid, acc.gid)

    def xattrs(self, fs: Vfs) -> dict[str, bytes]:
        return identity_xattrs(fs.entry(self.spec).delta)

    def open(self, fs: Vfs) -> Handle:
        entry = fs.entry(self.spec)
        fs.require_shown(self.ino, entry)
        fs.cache.acquire(entry)
        try:
            view = entry.files[self.name]
        except BaseException:
            fs.cache.release(entry)
            raise
        pread = _checked_pread(fs.cache, entry, view.pread) if self.spec.watch else view.pread
        return Handle(pread, lambda: fs.cache.release(entry), view.size)


def _checked_pread(cache: DeltaCache, entry: CacheEntry,
                   pread: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    """``pread`` of a file of an image pair, failing with EIO once an image changed (see Stamp).

    Checked after the read, so a change during it is caught too.
    """
    def read(offset: int, length: int) -> bytes:
        data = pread(offset, length)
        if cache.changed(entry):
            raise VfsError(errno.EIO, f"an image of {entry.spec.base}..{entry.spec.target} changed since "
                           "this file was opened: close and reopen it", quiet=True)
        return data

    return read


@dataclass
class Handle:
    """An open file: the view's bound pread, so a read costs one dict lookup and one call."""

    pread: Callable[[int, int], bytes]
    on_close: Callable[[], None] = lambda: None
    size: int = 0


def _bytes_reader(content: bytes) -> Callable[[int, int], bytes]:
    return lambda off, n: content[off:off + n]


def _blocks(nbytes: int) -> int:
    return -(-nbytes // 512)


def _lv_time_ns(lv: lvm.LogicalVolume, fs: Vfs) -> int:
    return lv.creation * 10**9 if lv.creation else fs.started_ns


def identity_xattrs(delta: Delta) -> dict[str, bytes]:
    ident = delta.identity.to_dict()
    values = {**ident, "delta_id": delta.identity.delta_id,
              "point_in_time": "true" if delta.point_in_time else "false"}
    return {XATTR_PREFIX + k: str(values[k]).encode() for k in XATTR_FIELDS}


# ---- pair names ---------------------------------------------------------------

def split_pair_name(name: str) -> list[tuple[str, str]]:
    """Every way to read ``name`` as BASE..TARGET (LVM names may themselves hold '..')."""
    out = []
    i = name.find("..")
    while i != -1:
        base, target = name[:i], name[i + 2:]
        if base and target:
            out.append((base, target))
        i = name.find("..", i + 1)
    return out


def lvm_pair(fs: Vfs, vg: str, vol: Volume, base: str, target: str) -> PairSpec | None:
    """The spec of BASE..TARGET among this volume's snapshots, or None if it names no valid pair."""
    b = vol.snapshot(base)
    if b is None:
        return None
    if target == ORIGIN:
        t, live = vol.origin, True
    else:
        t, live = vol.snapshot(target), False
        if t is None or t.uuid == b.uuid or vol.snapshots.index(t) < vol.snapshots.index(b):
            return None
    origin = vol.origin.name
    base_arg, target_arg = f"{vg}/{b.name}", f"{vg}/{t.name}"

    def opener() -> Delta:
        return fs.lvm_opener(base_arg, target_arg)

    mtime = time.time_ns() if live else _lv_time_ns(t, fs)
    return PairSpec(("lvm", b.uuid, t.uuid), f"{vg}/{b.name}", f"{vg}/{origin if live else t.name}",
                    opener, live=live, mtime_ns=mtime, sources=(b.path, t.path))


def _lvm_delta(base: str, target: str) -> Delta:
    from lvdeltafs.pairs import lvm_delta
    return lvm_delta(base, target)


def explicit_pairs(pairs: Iterable[tuple[str, str]], source: str | None = None) -> dict[str, PairSpec]:
    """name -> spec for --pair BASE TARGET arguments (files or vg/lv snapshots)."""
    from lvdeltafs.pairs import looks_like_lv, pair_label
    out: dict[str, PairSpec] = {}
    for i, (base, target) in enumerate(pairs):
        label = pair_label(base, target)
        name, n = label, 1
        while name in out:
            n += 1
            name = f"{label}-{n}"

        def opener(base: str = base, target: str = target) -> Delta:
            from lvdeltafs.pairs import open_delta
            return open_delta(base, target, source=source)

        images = not (looks_like_lv(base) and looks_like_lv(target))
        # An LV's device node is /dev/VG/LV: what --allow-other takes its owner and mode from.
        sources = (base, target) if images else (f"/dev/{base}", f"/dev/{target}")
        stamp = stamp_of(sources[-1])
        out[name] = PairSpec(("explicit", i), base, target, opener, mtime_ns=stamp.mtime_ns if stamp else 0,
                             sources=sources, watch=images)
    return out


# ---- the filesystem -----------------------------------------------------------

class Vfs:
    """Inodes, handles and the operations a filesystem needs, over the tree above."""

    def __init__(self, *, discovery: Discovery | None = None,
                 pairs: dict[str, PairSpec] | None = None, cache_size: int = DEFAULT_CACHE,
                 uid: int | None = None, gid: int | None = None, allow_other: bool = False,
                 lvm_opener: Callable[[str, str], Delta] | None = None):
        self.discovery = discovery
        # pairs.lvm_delta, not open_delta: "vg/lv" must never be taken for a relative path.
        self.lvm_opener = lvm_opener or _lvm_delta
        # Explicit vg/lv pairs are checked by UUID too, even when the tree shows no LVM.
        self.lvm_facts = discovery or Discovery()
        self.explicit = dict(pairs or {})
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        # Private by default: the mounting user alone.  --allow-other is for sharing, so each
        # entry follows what it shows (shared_access); only names are common to all.
        self.allow_other = allow_other
        self.private = Access(self.uid, self.gid, 0o400)
        self.common = Access(self.uid, self.gid, 0o444) if allow_other else self.private
        self.started_ns = time.time_ns()
        self._shown: dict[int, tuple[Stamp | None, ...]] = {}
        self.cache = DeltaCache(cache_size, check=self._check_sides)
        self._lock = threading.Lock()
        self._inos: dict[tuple, int] = {}
        self._nodes: dict[int, Node] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._register(Root())

    # -- inodes

    def _register(self, node: Node) -> Node:
        with self._lock:
            ino = self._inos.get(node.key)
            if ino is None:
                ino = ROOT_INO if node.key == ("root",) else len(self._inos) + ROOT_INO
                self._inos[node.key] = ino
            node.ino = ino
            # The newest object wins: it carries the freshest facts (spec, snapshot times).
            self._nodes[ino] = node
            return node

    def node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise VfsError(errno.ENOENT, f"no inode {ino}")
        return node

    def _dir(self, ino: int) -> Dir:
        node = self.node(ino)
        if not isinstance(node, Dir):
            raise VfsError(errno.ENOTDIR)
        return node

    # -- pairs

    def entry(self, spec: PairSpec) -> CacheEntry:
        return self.cache.get(spec)

    def access(self, sources: Sequence[str]) -> Access:
        return shared_access(sources) if self.allow_other else self.private

    def pair_mtime_ns(self, spec: PairSpec) -> int:
        newest = stamp_of(spec.sources[-1]) if spec.watch else None
        return (newest.mtime_ns if newest else spec.mtime_ns) or self.started_ns

    def shown(self, ino: int, entry: CacheEntry) -> None:
        """The kernel now holds ``ino``'s attributes (its size) from ``entry``'s delta."""
        if entry.spec.watch:
            with self._lock:
                self._shown[ino] = entry.stamps

    def require_shown(self, ino: int, entry: CacheEntry) -> None:
        """ESTALE for an open whose size the kernel took from a delta computed before: it then
        looks the name up again (getting the new size) and retries the open once."""
        if entry.spec.watch and self._shown.get(ino) != entry.stamps:
            raise VfsError(errno.ESTALE, f"{entry.spec.base}..{entry.spec.target} was computed again since "
                           "this file was looked up: look it up again", quiet=True)

    def validate_pair(self, spec: PairSpec) -> None:
        """A pair of LVM snapshots whose sides are gone or invalid is ENOENT or EIO."""
        if spec.key[0] != "lvm" or self.discovery is None:
            return
        for uuid in spec.key[1:]:
            lv = self.discovery.by_uuid(uuid)
            if lv is None:
                self.cache.drop(spec.key)
                raise VfsError(errno.ENOENT, f"a snapshot of {spec.base}..{spec.target} is gone")
            if lv.is_invalid:
                self.cache.drop(spec.key)
                raise VfsError(errno.EIO, f"snapshot {lv.vg_lv} is invalid (its COW space filled up)")

    def _check_sides(self, delta: Delta) -> None:
        """Before the target is reopened: are the snapshots in the identity still there, still valid?"""
        for side in (delta.identity.base, delta.identity.target):
            uuid, _, rest = side.partition("@")
            if side.startswith("image:") or not rest:
                continue
            lv = self.lvm_facts.by_uuid(uuid)
            if lv is None:
                raise VfsError(errno.ENOENT, f"snapshot {uuid} is gone")
            if lv.is_invalid:
                raise VfsError(errno.EIO, f"snapshot {lv.vg_lv} is invalid (its COW space filled up)")

    # -- operations

    def lookup(self, parent: int, name: str) -> Attr:
        d = self._dir(parent)
        d.validate(self)
        if name in (".", ".."):
            raise VfsError(errno.ENOENT)
        child = d.child(self, name)
        if child is None:
            raise VfsError(errno.ENOENT, f"no entry {name!r}")
        return self._register(child).attr(self)

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        node.validate(self)
        return node.attr(self)

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        d = self._dir(ino)
        d.validate(self)
        out = []
        for name in d.names(self):
            child = d.child(self, name)
            if child is not None:
                out.append((name, self._register(child).attr(self)))
        return out

    def open(self, ino: int, flags: int = os.O_RDONLY) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise VfsError(errno.EROFS)
        node = self.node(ino)
        if node.is_dir:
            raise VfsError(errno.EISDIR)
        node.validate(self)
        handle = node.open(self)  # type: ignore[attr-defined]
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise VfsError(errno.EBADF)
        return h

    def read(self, fh: int, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise VfsError(errno.EINVAL)
        return self.handle(fh).pread(offset, length)

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is not None:
            h.on_close()

    def getxattr(self, ino: int, name: str) -> bytes:
        values = self._xattrs(ino)
        if name not in values:
            raise VfsError(errno.ENODATA)
        return values[name]

    def listxattr(self, ino: int) -> list[str]:
        return list(self._xattrs(ino))

    def _xattrs(self, ino: int) -> dict[str, bytes]:
        node = self.node(ino)
        node.validate(self)
        return node.xattrs(self)

    def close(self) -> None:
        for fh in list(self._handles):
            self.release(fh)
        self.cache.close()


def stat_mode(attr: Attr) -> int:
    return (stat.S_IFDIR if attr.is_dir else stat.S_IFREG) | attr.mode
