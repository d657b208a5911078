"""Where a destination and its files are, what it is (its identity), its lock and its raw opens.  Stdlib only.

A destination is an image file or a block device.  Its path is resolved once,
when a session starts: a destination that is a symbolic link (``/dev/VG/LV``
always is) means the file or device it points to, and the lock, the state and
every write follow that one decision.  A link at the destination's own name
is accepted only from root or the running user; after resolving, nothing is
opened through a link again.

Files beside an image file ``DIR/NAME`` (DIR must be safe, see
:class:`lvdeltafs.fsio.Folder`)::

    state     DIR/NAME.lvmirror-state
    staging   DIR/NAME.lvmirror-staging
    progress  DIR/NAME.lvmirror-staging.progress
    lock      DIR/NAME.lvmirror-lock
    history   DIR/NAME.lvmirror-undo-GENERATION (docs/history.md)

A block device's files live in its state folder (default
``/var/lib/lvmirror/receiver``), named after the device's identity, not its
path, so two spellings of one device share one lock and one state and two
devices never share either: ``ID.json``, ``ID.staging``,
``ID.staging.progress``, ``ID.lock``, ``ID.undo-GENERATION``.  The identity is the device-mapper UUID
(every LVM volume has one), else the device's ``/dev/disk/by-id`` name, else
its device number.  ``PATH.device`` (the path as given, escaped) says which
device that path named when its mirror was last written, so a device swapped
in at the same path is told apart from one never mirrored.

The *binding* is what the state records of the destination it describes
(an image's device, inode, size and modification time; a device's identity
and size).  A destination whose binding differs from the state's was deleted,
recreated, truncated, written behind lvmirror's back or swapped, and holds
nothing known.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from typing import Any

from lvdeltafs.fsio import Folder, Locked, UnsafePath
from lvmirror.remote.wire import BusyError, RefusedError, has_control, shown

DEFAULT_STATE_DIR = "/var/lib/lvmirror/receiver"
BY_ID = "/dev/disk/by-id"


def _refused(e: UnsafePath) -> RefusedError:
    return RefusedError(f"{e}; nothing was written")


def resolve(path: str) -> str:
    """The destination's real path, resolved once; a link at its name must be root's or ours."""
    if not isinstance(path, str) or not os.path.isabs(path) or has_control(path) or "\0" in path:
        raise RefusedError(f"destination {shown(repr(path))} must be an absolute path without control "
                           "characters")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        folder, name = os.path.split(os.path.normpath(path))
        return os.path.join(os.path.realpath(folder), name)
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.geteuid()):
        raise RefusedError(f"destination {path} is a symbolic link made by uid {st.st_uid}, not by root or "
                           "this user: lvmirror does not follow it; point the config at the real file")
    return os.path.realpath(path)


def block_identity(rdev: int, real: str) -> str:
    """A name for a block device that survives reboots and respellings (see the module's docstring)."""
    major, minor = os.major(rdev), os.minor(rdev)
    try:
        with open(f"/sys/dev/block/{major}:{minor}/dm/uuid") as f:
            uuid = f.read().strip()
        if uuid:
            return f"dm:{uuid}"
    except OSError:
        pass  # not a device-mapper device
    try:
        names = sorted(os.listdir(BY_ID))
    except OSError:
        names = []
    for name in names:
        if os.path.realpath(os.path.join(BY_ID, name)) == real:
            return f"disk:{name}"
    return f"devno:{major}:{minor}"


def state_name_of(device: str) -> str:
    """The state file of a block device, by its identity."""
    return f"{_file_stem(device)}.json"


def _file_stem(identity: str) -> str:
    """An identity as a file name; injective ('_' is always escaped), so two devices never share one."""
    return "".join(c if c.isalnum() or c in ".-" else f"_{ord(c):02x}" for c in identity)


class Destination:
    """One destination, resolved once: its folder of side files, its names there, its identity and lock."""

    def __init__(self, path: str, state_dir: str | None = None):
        self.path = resolve(path)
        self.given = path
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # an image file made by the first apply
        self.is_block = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and not (self.is_block or stat.S_ISREG(st.st_mode)):
            raise RefusedError(f"{self.path} is neither a regular file nor a block device")
        try:
            if self.is_block:
                assert st is not None
                self.rdev = st.st_rdev
                self.device = block_identity(st.st_rdev, self.path)
                self.folder = Folder(state_dir or DEFAULT_STATE_DIR, create=True)
                stem = _file_stem(self.device)
                self.name = ""
                # Which device this path named when it was last written: a device swapped in at the
                # same path is then told apart from one never mirrored.
                self.alias_name = f"{_file_stem(os.path.normpath(path))}.device"
                self.state_name, self.staging_name = state_name_of(self.device), f"{stem}.staging"
                self.lock_name = f"{stem}.lock"
                self.undo_prefix = f"{stem}.undo-"
            else:
                folder, self.name = os.path.split(self.path)
                if not os.path.isdir(folder):
                    raise RefusedError(f"the destination's folder {folder} does not exist: create it (mode "
                                       "0700 or 0755, owned by the user lvmirror runs as), then run again")
                self.folder = Folder(folder)
                self.device = self.alias_name = ""
                self.state_name = f"{self.name}.lvmirror-state"
                self.staging_name = f"{self.name}.lvmirror-staging"
                self.lock_name = f"{self.name}.lvmirror-lock"
                self.undo_prefix = f"{self.name}.lvmirror-undo-"
        except UnsafePath as e:
            raise _refused(e) from None
        self.progress_name = f"{self.staging_name}.progress"
        self.lock_fd: int | None = None

    @property
    def kind(self) -> str:
        return "block" if self.is_block else "file"

    def where(self, name: str) -> str:
        return self.folder.where(name)

    def paths(self) -> dict[str, str]:
        return {"dest": self.path, "state": self.where(self.state_name),
                "staging": self.where(self.staging_name), "progress": self.where(self.progress_name),
                "lock": self.where(self.lock_name)}

    def lock(self) -> None:
        """Hold the destination's lock for the whole session; it dies with the process."""
        try:
            self.lock_fd = self.folder.lock(self.lock_name)
        except Locked as e:
            raise BusyError(f"{self.path} is busy: another lvmirror receiver (pid {e.holder or '?'}) holds "
                            f"{e.path}; try again when it has finished") from None
        except UnsafePath as e:
            raise _refused(e) from None

    # -- the destination itself

    def _entry(self) -> os.stat_result | None:
        """The image file's own entry (no link followed), or None; a block device's node."""
        if self.is_block:
            return os.stat(self.path)
        st = self.folder.stat(self.name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RefusedError(f"{self.path} is no longer a regular file (a link or something else was put "
                               "there); remove it and run again")
        return st

    def exists(self) -> bool:
        return self._entry() is not None

    def size(self) -> int:
        if not self.is_block:
            st = self._entry()
            return st.st_size if st else 0
        fd = self.open_read()
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def binding(self) -> dict[str, Any] | None:
        """What identifies the destination as it is now (None: there is no image file)."""
        if self.is_block:
            return {"kind": "block", "device": self.device, "size": self.size()}
        st = self._entry()
        if st is None:
            return None
        return {"kind": "file", "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}

    def token(self) -> str:
        """The destination as it is now, named: a compare delta computed against it names this as its base."""
        canon = json.dumps(self.binding(), sort_keys=True, separators=(",", ":"))
        return "dest:" + hashlib.sha256(canon.encode()).hexdigest()[:24]

    def restore_mtime(self, fd: int, mtime_ns: int) -> None:
        """Put back an image's modification time after a step that changed none of its bytes."""
        if not self.is_block:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns, mtime_ns))

    def _check_device(self, fd: int) -> int:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != self.rdev:
            os.close(fd)
            raise RefusedError(f"{self.path} changed while lvmirror was using it; run again")
        return fd

    def open_read(self) -> int:
        try:
            if self.is_block:
                return self._check_device(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
            return self.folder.open(self.name, os.O_RDONLY)
        except UnsafePath as e:
            raise _refused(e) from None

    def open_rw(self) -> int:
        """The destination for writing; a new image file is private (it holds the volume's data)."""
        try:
            if self.is_block:
                # O_EXCL on a block device fails with EBUSY while it is mounted or held by
                # device-mapper: never write under a live filesystem.
                fd = os.open(self.path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW)
                return self._check_device(fd)
            return self.folder.open(self.name, os.O_RDWR | os.O_CREAT, 0o600)
        except UnsafePath as e:
            raise _refused(e) from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise RefusedError(f"{self.path} is in use (mounted, or held open by another program): "
                                   "unmount it or stop what uses it, then run again; nothing was "
                                   "applied") from None
            raise

