"""The filesystem lvdeltafs shows, with no FUSE in it: inode numbers, open files and the calls over the tree.

Plain Python objects a test can drive directly; :mod:`lvdeltafs.fuse` is a
thin adapter that turns these calls into FUSE replies.  Every method here is
synchronous and thread-safe: the adapter runs them in worker threads because
opening a delta (reading a COW table, running thin_delta, comparing images)
and reading the target block on I/O.

The parts, one job each:

- :mod:`lvdeltafs.tree`: the entries (volume groups, volumes, snapshots, pairs,
  delta files), what each directory lists and how a name resolves;
- :mod:`lvdeltafs.discovery`: the LVM listing the tree is built from;
- :mod:`lvdeltafs.deltacache`: deltas opened lazily and cached, targets held
  open only while in use;
- :mod:`lvdeltafs.freshness`: ``--pair`` images that change in place;
- :mod:`lvdeltafs.mirrors` and :mod:`lvdeltafs.mirrortree`: the kept points of
  ``--mirror`` mirrors, composed from the mirror and its undo deltas;
- :mod:`lvdeltafs.access`: who may read what (owners and modes);
- :mod:`lvdeltafs.replies`: what the calls answer (attributes, errors).

On every lookup, and before a target is reopened, a pair's snapshots are
checked against a fresh LVM listing (by UUID): a snapshot that is gone gives
ENOENT, an invalidated one EIO, and the rest of the tree goes on.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lvdeltafs.access import Access, shared_access
from lvdeltafs.delta import Delta
from lvdeltafs.deltacache import DEFAULT_CACHE, CacheEntry, DeltaCache, PairSpec
from lvdeltafs.discovery import Discovery
from lvdeltafs.freshness import Stamp, stamp_of
from lvdeltafs.replies import Attr, VfsError
from lvdeltafs.tree import Dir, Handle, Node, Root

if TYPE_CHECKING:  # lvdeltafs.mirrors reads lvmirror's state files: imported only by mounts that use it
    from lvdeltafs.mirrors import Mirror

ROOT_INO = 1


def _lvm_delta(base: str, target: str) -> Delta:
    from lvdeltafs.pairs import lvm_delta
    return lvm_delta(base, target)


class Vfs:
    """Inodes, handles and the operations a filesystem needs, over :mod:`lvdeltafs.tree`."""

    def __init__(self, *, discovery: Discovery | None = None,
                 pairs: dict[str, PairSpec] | None = None, cache_size: int = DEFAULT_CACHE,
                 uid: int | None = None, gid: int | None = None, allow_other: bool = False,
                 lvm_opener: Callable[[str, str], Delta] | None = None,
                 mirrors: dict[str, Mirror] | None = None):
        self.discovery = discovery
        # pairs.lvm_delta, not open_delta: "vg/lv" must never be taken for a relative path.
        self.lvm_opener = lvm_opener or _lvm_delta
        # Explicit vg/lv pairs are checked by UUID too, even when the tree shows no LVM.
        self.lvm_facts = discovery or Discovery()
        self.explicit = dict(pairs or {})
        # --mirror NAME=PATH: the kept points of lvmirror mirrors, under @mirrors (lvdeltafs.mirrortree).
        self.mirrors = dict(mirrors or {})
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
        for m in self.mirrors.values():
            m.close()
