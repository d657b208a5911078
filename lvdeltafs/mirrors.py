"""Earlier points of lvmirror mirrors, for the mount: which points a mirror keeps, and their bytes.

A mirror's receiver keeps an undo delta per sync (docs/history.md); its state
file lists the points, oldest first.  Here that list is read (through
:class:`lvmirror.remote.state.Files`, which checks the file, and through the
destination's :class:`~lvdeltafs.fsio.Folder`, which never follows a link),
checked entry by entry (the state is untrusted input), and each point is
composed on demand by :mod:`lvdeltafs.formats.overlay`: nothing is written and
nothing is copied.

Caching: the state is read at most once per ``ttl`` seconds (the clock is
injected, as in :mod:`lvdeltafs.discovery`).  Everything that rests on one
reading of it (the mirror and undo files held open, composed points) is a
:class:`Chain`; when the state says anything else (a sync, a rewind, a
retention drop, an apply starting) the chain is retired: open files of it
fail with EIO and new opens get a new chain.  An undo file's index (the one
full read of it) is kept by the file's identity (device, inode, size, mtime),
so a sync re-indexes only the new undo delta.  An image-file mirror is also
checked by ``fstat`` on every read against the state's binding, so a write
to it is noticed at once, not ``ttl`` seconds later.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lvdeltafs.discovery import LISTING_TTL
from lvdeltafs.formats import overlay
from lvdeltafs.formats.stream import StreamError
from lvdeltafs.formats.undofiles import UndoFiles
from lvdeltafs.fsio import UnsafePath
from lvdeltafs.replies import VfsError
from lvmirror.remote import history as receiver_history
from lvmirror.remote.destination import DEFAULT_STATE_DIR, Destination
from lvmirror.remote.state import Damaged, Files, unknown_reason
from lvmirror.remote.wire import RemoteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One checked entry of a state's ``history``."""

    generation: int
    size: int
    undo: str
    undo_bytes: int | None
    mtime_ns: int  # when it was synced; 0 if the state does not say


@dataclass(frozen=True)
class History:
    """One reading of a mirror's state: its points (oldest first) and what composing them rests on.

    ``key`` changes whenever anything a composed point rests on changes.
    ``busy``: why points cannot be read just now (an apply in progress), or "".
    """

    key: tuple
    points: tuple[Point, ...] = ()
    binding: dict[str, Any] | None = None
    busy: str = ""

    def point(self, generation: int) -> Point | None:
        return next((p for p in self.points if p.generation == generation), None)


NO_HISTORY = History(("none",))


class BadHistory(Exception):
    """A state whose history cannot be trusted: the mirror shows no points."""


def check_history(files: Files, state: dict[str, Any]) -> tuple[Point, ...]:
    """The state's ``history`` as points, checked by the receiver's own rules (one place for them:
    :func:`lvmirror.remote.history.points`); BadHistory naming the first entry that is not as written."""
    try:
        entries = receiver_history.points(files, state)
    except Damaged as e:
        raise BadHistory(str(e)) from None
    out: list[Point] = []
    for e in entries:
        when = e["synced_epoch"]
        mtime = int(when * 1e9) if math.isfinite(when) and 0 <= when < 1e11 else 0
        out.append(Point(e["generation"], e["size"], e["undo"], e["undo_bytes"], mtime))
    return tuple(out)


def read_history(dest: Destination) -> History:
    """The mirror's points as its state says now; BadHistory if the state cannot be trusted."""
    try:
        files = Files(dest)
        state = files.state()
        if not state:
            return NO_HISTORY
        points = check_history(files, state)
        if not points:
            return NO_HISTORY
        if state.get("applying") is not None:
            busy = f"a sync is being applied to {dest.path}; read it again when it has finished"
            return History(("busy", points), points, None, busy)
        binding = dest.binding()
        why = unknown_reason(state, binding, dest.path)
    except (RemoteError, UnsafePath, OSError) as e:
        raise BadHistory(str(e)) from None
    if why:
        raise BadHistory(why)
    key = (state.get("generation"), state.get("snapshot"), json.dumps(binding, sort_keys=True), points)
    return History(key, points, binding)


def _damaged(path: str, why: str) -> str:
    return f"undo delta {path} is damaged: {why}"


class Chain:
    """Everything that rests on one reading of a mirror's state: its open files and composed points.

    Held (acquire/release) by each open file and each call that reads it; closed
    once it is retired (the state changed) and nobody holds it.
    """

    def __init__(self, mirror: Mirror, history: History):
        self.mirror, self.history = mirror, history
        self.refs = 0
        self.retired = False
        self._lock = threading.Lock()
        self._base: tuple[int, int] | None = None  # fd, size
        self._undo: dict[int, tuple[int, overlay.UndoIndex, int]] = {}  # gen -> fd, index, file size
        self._composed: dict[int, overlay.Composed] = {}
        self._files: dict[int, UndoFiles] = {}
        self._errors: dict[tuple[str, int], str] = {}  # ("image" | "undo", gen) -> what failed

    # -- lifetime

    def acquire(self) -> None:
        with self._lock:
            self.refs += 1

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            done = self.retired and self.refs == 0
        if done:
            self.close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            done = self.refs == 0
        if done:
            self.close()

    def close(self) -> None:
        with self._lock:
            fds = [u[0] for u in self._undo.values()] + ([self._base[0]] if self._base else [])
            self._undo, self._base = {}, None
            self._composed.clear()
            self._files.clear()
        for fd in fds:
            os.close(fd)

    # -- checks

    def check(self) -> None:
        """EIO if the mirror changed since this chain was made (a sync, a rewind, a write)."""
        self.mirror.history()  # retires this chain if the state says something else
        name = self.mirror.name
        if self.retired:
            raise VfsError(errno.EIO, f"mirror {name} changed since this file was opened: open it again",
                           quiet=True)
        b = self.history.binding
        if self._base is not None and b and b.get("kind") == "file":
            st = os.fstat(self._base[0])
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (b.get("ino"), b.get("size"), b.get("mtime_ns")):
                self.mirror.log_once(f"mirror {name} ({self.mirror.dest.path}) was written since its state "
                                     "was: its points cannot be read until the state says what it holds")
                raise VfsError(errno.EIO, f"mirror {name} was written behind its state", quiet=True)

    # -- composing

    def _fail(self, what: tuple[str, int], message: str) -> VfsError:
        """EIO, said in the log once; later calls for the same file answer EIO without a new try."""
        self._errors[what] = message
        self.mirror.log_once(message)
        return VfsError(errno.EIO, message, quiet=True)

    def _base_fd(self) -> tuple[int, int]:
        if self._base is None:
            fd = self.mirror.dest.open_read()
            self._base = (fd, os.lseek(fd, 0, os.SEEK_END))
        return self._base

    def _undo_of(self, p: Point) -> tuple[int, overlay.UndoIndex, int]:
        got = self._undo.get(p.generation)
        if got is None:
            dest = self.mirror.dest
            fd = dest.folder.open(p.undo, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if p.undo_bytes is not None and st.st_size != p.undo_bytes:
                    raise StreamError(f"it is {st.st_size} bytes but the state says {p.undo_bytes}")
                index = self.mirror.index(p.undo, fd, st)
                ident = index.header.get("identity") or {}
                if ident.get("source") != "undo":
                    raise StreamError(f"its source is {str(ident.get('source'))[:40]!r}, not 'undo'")
                if index.target_size != p.size:
                    raise StreamError(f"it restores {index.target_size} bytes but the point had {p.size}")
            except BaseException:
                os.close(fd)
                raise
            got = self._undo[p.generation] = (fd, index, st.st_size)
        return got

    def composed(self, gen: int) -> overlay.Composed:
        """Point ``gen``'s bytes; EIO (logged once, naming the file) if an undo delta it needs is damaged."""
        comp = self._composed.get(gen)  # without the lock: another point being indexed must not wait
        if comp is not None:
            return comp
        with self._lock:
            if gen in self._composed:
                return self._composed[gen]
            if ("image", gen) in self._errors:
                raise VfsError(errno.EIO, self._errors["image", gen], quiet=True)
            points = self.history.points
            k = next((i for i, p in enumerate(points) if p.generation == gen), None)
            if k is None:
                raise VfsError(errno.ENOENT, f"mirror {self.mirror.name} has no point {gen} any more")
            layers = []
            for p in points[k:]:
                path = self.mirror.dest.where(p.undo)
                try:
                    layers.append(self._undo_of(p))
                except StreamError as e:
                    raise self._fail(("image", gen), _damaged(path, str(e))) from None
                except (UnsafePath, OSError) as e:
                    raise self._fail(("image", gen), f"cannot open undo delta {path}: {e}") from None
            try:
                overlay.check_chain([idx for _fd, idx, _n in layers])
            except StreamError as e:
                why = f"the undo deltas of mirror {self.mirror.name} from point {gen} on: {e}"
                raise self._fail(("image", gen), why) from None
            try:
                base_fd, base_size = self._base_fd()
            except (RemoteError, OSError) as e:
                raise VfsError(errno.EIO, f"cannot open mirror {self.mirror.name}: {e}") from None
            size = points[k].size
            segments = overlay.overlay([idx.ranges for _fd, idx, _n in layers], size)
            comp = overlay.Composed(base_fd, base_size, [fd for fd, _idx, _n in layers], segments, size)
            self._composed[gen] = comp
            return comp

    def read(self, gen: int, offset: int, length: int) -> bytes:
        self.check()
        comp = self.composed(gen)
        try:
            return comp.read(offset, length)
        except (OSError, EOFError) as e:
            why = (f"reading point {gen} of mirror {self.mirror.name} failed: {e} (an undo delta or the "
                   "mirror changed under the mount?)")
            raise self._fail(("image", gen), why) from None

    def undo_files(self, gen: int) -> UndoFiles:
        """The five files of point ``gen``'s own undo delta (indexed on first use)."""
        with self._lock:
            if ("undo", gen) in self._errors:
                raise VfsError(errno.EIO, self._errors["undo", gen], quiet=True)
            if gen not in self._files:
                p = self.history.point(gen)
                if p is None:
                    raise VfsError(errno.ENOENT, f"mirror {self.mirror.name} has no point {gen} any more")
                path = self.mirror.dest.where(p.undo)
                try:
                    fd, index, size = self._undo_of(p)
                except StreamError as e:
                    raise self._fail(("undo", gen), _damaged(path, str(e))) from None
                except (UnsafePath, OSError) as e:
                    raise self._fail(("undo", gen), f"cannot open undo delta {path}: {e}") from None
                self._files[gen] = UndoFiles(index, fd, size)
            return self._files[gen]


class Mirror:
    """One ``--mirror NAME=PATH``: its destination, its state read at most once per ``ttl`` seconds."""

    def __init__(self, name: str, dest: Destination, *, clock: Callable[[], float] = time.monotonic,
                 ttl: float = LISTING_TTL):
        self.name, self.dest, self.clock, self.ttl = name, dest, clock, ttl
        self.said: set[str] = set()
        self._lock = threading.Lock()
        self._history = NO_HISTORY
        self._at = -1e18
        self._chain: Chain | None = None
        self._indexes: dict[tuple, overlay.UndoIndex] = {}

    def log_once(self, message: str) -> None:
        """Warn once per distinct message: a broken state or file is news once, not on every lookup."""
        if message not in self.said:
            self.said.add(message)
            log.warning("%s", message)

    def history(self) -> History:
        """The state as last read (read again once ``ttl`` has passed); a change retires the chain."""
        with self._lock:
            if self.clock() - self._at < self.ttl:
                return self._history
            try:
                h = read_history(self.dest)
            except BadHistory as e:
                self.log_once(f"mirror {self.name}: the state of {self.dest.path} cannot be trusted ({e}): "
                              "its points are not shown")
                h = History(("bad", str(e)))
            self._at = self.clock()
            if h.key == self._history.key:
                return self._history
            old, self._chain, self._history = self._chain, None, h
            live = {p.undo for p in h.points}
            self._indexes = {k: v for k, v in self._indexes.items() if k[0] in live}
        if old is not None:
            old.retire()
        return h

    def points(self) -> tuple[Point, ...]:
        return self.history().points

    def point(self, gen: int) -> Point | None:
        return self.history().point(gen)

    def index(self, name: str, fd: int, st: os.stat_result) -> overlay.UndoIndex:
        """An undo file's index, by the file's identity: the one full read of it is done once."""
        key = (name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._indexes.get(key)
        if found is None:
            found = overlay.index_undo(fd)
            with self._lock:
                self._indexes[key] = found
        return found

    @contextmanager
    def chain(self) -> Iterator[Chain]:
        """The chain of the state as it is now, held while the block runs; EIO while an apply runs."""
        h = self.history()
        if h.busy:
            raise VfsError(errno.EIO, h.busy)
        with self._lock:
            if self._chain is None or self._chain.history is not h:
                old, self._chain = self._chain, Chain(self, h)
            else:
                old = None
            c = self._chain
            c.acquire()
        if old is not None:
            old.retire()
        try:
            yield c
        finally:
            c.release()

    def open_chain(self) -> Chain:
        """The chain, held until the caller releases it (an open file)."""
        with self.chain() as c:
            c.acquire()
        return c

    def close(self) -> None:
        """At unmount (every open file released first): the chain's files and the folder."""
        with self._lock:
            c, self._chain = self._chain, None
        if c is not None:
            c.retire()
        self.dest.folder.close()


def split_mirror_arg(value: str) -> tuple[str, str]:
    """``--mirror NAME=PATH`` as (name, absolute path); BadInput for a name that cannot be a directory."""
    from lvdeltafs.clisupport import printable
    from lvdeltafs.errors import BadInput
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise BadInput(f"--mirror {printable(value)}: give NAME=PATH (the name to show it under, then the "
                       "mirror's image file or block device)")
    if "/" in name or name in (".", "..") or len(name.encode()) > 255:
        raise BadInput(f"--mirror {printable(value)}: the name must be one directory name (no '/')")
    return name, os.path.abspath(path)


def open_mirrors(args: list[str] | tuple[str, ...], state_dir: str | None) -> dict[str, Mirror]:
    """name -> Mirror for each ``--mirror NAME=PATH``, checked now: the mount's errors are said here.

    A block device's state lives in ``state_dir``; a missing one is refused, not created (the
    mount reads, it never makes the receiver's folders).
    """
    from lvdeltafs.clisupport import check_input, printable
    from lvdeltafs.errors import BadInput
    out: dict[str, Mirror] = {}
    for value in args:
        name, path = split_mirror_arg(value)
        if name in out:
            raise BadInput(f"--mirror {printable(name)} is given twice")
        st = check_input(path, f"--mirror {printable(name)}:", (stat.S_IFREG, stat.S_IFBLK),
                         missing="no such image file or block device")
        if stat.S_ISBLK(st.st_mode):
            folder = state_dir or DEFAULT_STATE_DIR
            if not os.path.isdir(folder):
                raise BadInput(f"--mirror {printable(name)}: {printable(path)} is a block device and its "
                               f"state folder {printable(folder)} does not exist (--mirror-state-dir)")
        try:
            dest = Destination(path, state_dir)
        except RemoteError as e:
            raise BadInput(f"--mirror {printable(name)}: {e}") from None
        out[name] = Mirror(name, dest)
    return out
