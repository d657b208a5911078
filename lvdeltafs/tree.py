"""The entries lvdeltafs shows: each directory or file of the tree, and what it lists and resolves.

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
      @mirrors/NAME/G/         each kept point of a --mirror: image, undo/ (lvdeltafs.mirrortree)

``@`` cannot start an LVM name, so ``@pairs``, ``@mirrors`` and ``@origin`` never collide
with a volume group or a snapshot.  Every pair directory holds the five delta
files (:data:`lvdeltafs.formats.files.NAMES`), served by the same
:class:`~lvdeltafs.formats.files.DeltaFiles` views as ``lvdeltafs export``.

A pair directory's name BASE..TARGET is read by :func:`split_pair_name`;
:func:`lvm_pair` and :func:`explicit_pairs` make the :class:`~lvdeltafs.deltacache.PairSpec`
that says how its delta opens.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lvdeltafs import lvm
from lvdeltafs.access import Access
from lvdeltafs.delta import Delta, FileReader
from lvdeltafs.deltacache import PairSpec
from lvdeltafs.discovery import Volume
from lvdeltafs.errors import LvError
from lvdeltafs.formats.files import NAMES
from lvdeltafs.freshness import checked_pread, stamp_of
from lvdeltafs.replies import Attr, VfsError

if TYPE_CHECKING:  # only for annotations: vfs imports this module
    from lvdeltafs.vfs import Vfs

log = logging.getLogger(__name__)

PAIRS_DIR = "@pairs"
MIRRORS_DIR = "@mirrors"  # lvdeltafs.mirrortree
ORIGIN = "@origin"
SNAPSHOTS_DIR = "snapshots"
XATTR_PREFIX = "user.lvdeltafs."
INLINE_FILES = ("ranges", "data", "chunks", "delta")  # see DeltaFile.open
XATTR_FIELDS = ("delta_id", "volume", "base", "target", "source", "point_in_time")


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
        return names + ([PAIRS_DIR] if fs.explicit else []) + ([MIRRORS_DIR] if fs.mirrors else [])

    def child(self, fs: Vfs, name: str) -> Node | None:
        if name == PAIRS_DIR:
            return PairsDir() if fs.explicit else None
        if name == MIRRORS_DIR:
            from lvdeltafs.mirrortree import MirrorsDir  # it builds on this module's nodes
            return MirrorsDir() if fs.mirrors else None
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
        pread = checked_pread(fs.cache, entry, view.pread) if self.spec.watch else view.pread
        # `data` answers reads of unchanged regions without I/O, but an image pair's reads must
        # each stat the images (checked_pread), which is I/O: those go to a worker thread.
        quick = None if self.spec.watch else getattr(view, "unchanged", None)
        # A file whose reads are all FileReader preads (manifest.json reads the whole of chunks
        # once) may be tried from the page cache alone, on the FUSE thread.  An image pair's
        # check then stats its images there too: files on a filesystem with RWF_NOWAIT (local),
        # open and just read, so their inodes are cached.
        inline = self.name in INLINE_FILES and type(entry.delta.target) is FileReader
        return Handle(pread, lambda: fs.cache.release(entry), view.size, quick, inline)


@dataclass
class Handle:
    """An open file: the view's bound pread, so a read costs one dict lookup and one call."""

    pread: Callable[[int, int], bytes]
    on_close: Callable[[], None] = lambda: None
    size: int = 0
    # A read answered without I/O (bytes), or None for "use pread": the FUSE adapter calls it
    # on its own thread, sparing the hand-off to a worker thread and back.
    quick: Callable[[int, int], bytes | None] | None = None
    # pread may be called inside delta.cached_only() (it reads only through FileReader).
    inline: bool = False


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
