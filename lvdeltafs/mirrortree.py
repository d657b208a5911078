"""The ``@mirrors`` part of the tree: each kept point of each ``--mirror``, as an image and an undo delta.

::

    MOUNT/@mirrors/NAME/            one directory per --mirror NAME=PATH
      G/                            one per point the mirror's state lists (its generation, decimal)
        image                       the point's content, composed on the fly (read-only, exact size)
        undo/                       the point's own undo delta as a delta directory (the five files)

The present content is not a point: it is the mirror itself.  Entries follow
the state (read at most every few seconds, :mod:`lvdeltafs.mirrors`): a point
dropped by retention or a rewind is ENOENT, a new one appears.
"""

from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING

from lvdeltafs.access import Access
from lvdeltafs.formats.files import NAMES
from lvdeltafs.mirrors import Mirror, Point
from lvdeltafs.replies import Attr, VfsError
from lvdeltafs.tree import Dir, Handle, Node, _blocks

if TYPE_CHECKING:
    from lvdeltafs.vfs import Vfs

IMAGE = "image"
UNDO = "undo"
_GENERATION = re.compile(r"0|[1-9][0-9]{0,18}")  # one spelling per point: no leading zeros, ASCII digits


class MirrorsDir(Dir):
    key = ("mirrors",)

    def names(self, fs: Vfs) -> list[str]:
        return list(fs.mirrors)

    def child(self, fs: Vfs, name: str) -> Node | None:
        m = fs.mirrors.get(name)
        return MirrorDir(m) if m else None


class _OfMirror(Dir):
    """A directory about one mirror: readable by whoever may read the mirror (with --allow-other)."""

    mirror: Mirror

    def access(self, fs: Vfs) -> Access:
        return fs.access((self.mirror.dest.path,))


class MirrorDir(_OfMirror):
    def __init__(self, mirror: Mirror):
        self.mirror = mirror
        self.key = ("mirror", mirror.name)

    def mtime_ns(self, fs: Vfs) -> int:
        points = self.mirror.points()
        return (points[-1].mtime_ns if points else 0) or fs.started_ns

    def names(self, fs: Vfs) -> list[str]:
        return [str(p.generation) for p in self.mirror.points()]

    def child(self, fs: Vfs, name: str) -> Node | None:
        if not _GENERATION.fullmatch(name):
            return None
        p = self.mirror.point(int(name))
        return PointDir(self.mirror, p) if p else None


def _current(mirror: Mirror, gen: int) -> Point:
    p = mirror.point(gen)
    if p is None:
        raise VfsError(errno.ENOENT, f"mirror {mirror.name} no longer keeps point {gen}")
    return p


class PointDir(_OfMirror):
    def __init__(self, mirror: Mirror, point: Point):
        self.mirror, self.gen = mirror, point.generation
        self.key = ("point", mirror.name, point.generation)

    def validate(self, fs: Vfs) -> None:
        _current(self.mirror, self.gen)

    def mtime_ns(self, fs: Vfs) -> int:
        return _current(self.mirror, self.gen).mtime_ns or fs.started_ns

    def names(self, fs: Vfs) -> list[str]:
        return [IMAGE, UNDO]

    def child(self, fs: Vfs, name: str) -> Node | None:
        if name == IMAGE:
            return PointImage(self.mirror, self.gen)
        return UndoDir(self.mirror, self.gen) if name == UNDO else None


class PointImage(Node):
    """The point's content: the mirror with the undo deltas from this point on laid over it."""

    def __init__(self, mirror: Mirror, gen: int):
        self.mirror, self.gen = mirror, gen
        self.key = ("point-image", mirror.name, gen)

    def validate(self, fs: Vfs) -> None:
        _current(self.mirror, self.gen)

    def attr(self, fs: Vfs) -> Attr:
        p = _current(self.mirror, self.gen)
        acc = fs.access((self.mirror.dest.path,))
        return Attr(self.ino, False, p.size, _blocks(p.size), p.mtime_ns or fs.started_ns, acc.file_mode,
                    acc.uid, acc.gid)

    def open(self, fs: Vfs) -> Handle:
        chain = self.mirror.open_chain()
        try:
            # Indexed here, on first use: a damaged undo delta fails the open with EIO.
            size = chain.composed(self.gen).size
        except BaseException:
            chain.release()
            raise
        gen = self.gen
        return Handle(lambda off, n: chain.read(gen, off, n), chain.release, size)


class UndoDir(_OfMirror):
    def __init__(self, mirror: Mirror, gen: int):
        self.mirror, self.gen = mirror, gen
        self.key = ("point-undo", mirror.name, gen)

    def validate(self, fs: Vfs) -> None:
        _current(self.mirror, self.gen)

    def mtime_ns(self, fs: Vfs) -> int:
        return _current(self.mirror, self.gen).mtime_ns or fs.started_ns

    def names(self, fs: Vfs) -> list[str]:
        return list(NAMES)

    def child(self, fs: Vfs, name: str) -> Node | None:
        return UndoFile(self.mirror, self.gen, name) if name in NAMES else None


class UndoFile(Node):
    """One of the five files of a point's undo delta; the undo file is indexed on first stat."""

    def __init__(self, mirror: Mirror, gen: int, name: str):
        self.mirror, self.gen, self.name = mirror, gen, name
        self.key = ("point-undo-file", mirror.name, gen, name)

    def validate(self, fs: Vfs) -> None:
        _current(self.mirror, self.gen)

    def attr(self, fs: Vfs) -> Attr:
        p = _current(self.mirror, self.gen)
        with self.mirror.chain() as chain:
            view = chain.undo_files(self.gen)[self.name]
        used = getattr(view, "changed_bytes", view.size)  # `data` is sparse, as in a pair directory
        acc = fs.access((self.mirror.dest.path,))
        return Attr(self.ino, False, view.size, _blocks(used), p.mtime_ns or fs.started_ns, acc.file_mode,
                    acc.uid, acc.gid)

    def open(self, fs: Vfs) -> Handle:
        # An undo delta's bytes never change; the chain is held only so its files stay open.
        chain = self.mirror.open_chain()
        try:
            view = chain.undo_files(self.gen)[self.name]
        except BaseException:
            chain.release()
            raise
        return Handle(view.pread, chain.release, view.size)
