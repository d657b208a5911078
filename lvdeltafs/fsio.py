"""Files that root creates beside data others may reach: opened without following links.  Stdlib only.

This is the one place for the project's low-level file jobs: read exactly n
bytes, write all of a buffer, replace a small file atomically, hold a lock,
open an entry of a directory.  lvmirror ships this module to far hosts with
its receiver, so it imports nothing but the standard library.

Rules, each kept by every function here:

- A directory is opened once (:class:`Folder`) and every entry in it is
  opened relative to that descriptor with ``O_NOFOLLOW``: a symlink planted
  at a name is refused (ELOOP), never followed, whatever happens to the
  directory's path afterwards.
- A folder anyone but its owner can write is refused unless it is sticky;
  its owner must be the running user or root.  In a sticky folder (``/tmp``)
  another user can still create entries, so an existing entry is used only if
  the running user owns it (:func:`Folder.open`), and temporary files get
  fresh random names, created with ``O_EXCL``.
- A file is replaced atomically: a fresh temporary beside it, fsync, rename
  over the name (rename replaces a planted link, it does not follow it),
  fsync of the folder.  A crash leaves the old or the new content.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable
from typing import Any

# O_NONBLOCK: a FIFO planted at a name must not hang the open (fstat then refuses it); it changes
# nothing for regular files.
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafePath(Exception):
    """A folder or entry that someone else could control: refused, nothing was written."""


class Locked(Exception):
    """Another process holds the lock; ``holder`` is what it wrote there (its pid), if anything."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by pid {holder or '?'}")
        self.path, self.holder = path, holder


class ShortRead(EOFError):
    """The input ended before the bytes asked for."""

    def __init__(self, got: int, wanted: int):
        super().__init__(f"input ended after {got} of {wanted} bytes")
        self.got, self.wanted = got, wanted


# ---------------------------------------------------------------- whole reads and writes


def read_exactly(read: Callable[[int], bytes | None], n: int) -> bytes:
    """``n`` bytes from ``read`` (a file's or pipe's read), however it splits them; ShortRead at EOF."""
    buf = read(n) or b""
    if len(buf) == n:
        return buf
    parts, got = [buf], len(buf)
    while got < n:
        more = read(n - got)
        if not more:
            raise ShortRead(got, n)
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; ShortRead if the file ends first."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise ShortRead(got, len(view))
        got += n


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ---------------------------------------------------------------- calls the standard library does not wrap

_libc_functions: dict[str, Any] = {}


def libc_function(name: str, argtypes: list[Any]) -> Any:
    """The C library's ``name`` (returning int, errno kept) through ctypes, or None where there is none.

    ctypes is imported on first use only: a receiver that never needs it starts without it."""
    if name not in _libc_functions:
        fn = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = getattr(libc, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
        except (ImportError, OSError):
            fn = None
        _libc_functions[name] = fn
    return _libc_functions[name]


def libc_error() -> OSError:
    """The OSError of the last libc_function call that failed."""
    import ctypes

    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these dirty bytes to disk now, without waiting (Linux's
    sync_file_range with SYNC_FILE_RANGE_WRITE); a hint, never an error, and never a promise of
    durability: an fsync still follows.

    With much memory the kernel starts writing dirty pages late (10% of RAM, or 30 s), so an fsync
    after a large write waits for all of it; started as the bytes come, the disk writes while the
    writer goes on (measured: a receive of 164 MiB spent 0.21 s of its 0.53 s in fsync)."""
    import ctypes

    fn = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if fn is not None and length > 0:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class Writeback:
    """start_writeback every ``every`` bytes written to ``fd``, over the span those writes fall in:
    ``wrote`` after each write at an offset (scattered), or ``write`` to append at ``at`` (sequential)."""

    def __init__(self, fd: int, every: int = 8 << 20, at: int = 0):
        self.fd, self.every, self.at = fd, every, at
        self.dirty, self.lo, self.hi = 0, 0, 0  # bytes written since the last ask, and their span

    def write(self, data: bytes | memoryview) -> None:
        """write_all at the file's position, which is ``at`` (a file written only through here)."""
        write_all(self.fd, data)
        self.wrote(self.at, len(data))
        self.at += len(data)

    def wrote(self, offset: int, length: int) -> None:
        self.lo = min(self.lo, offset) if self.dirty else offset
        self.hi = max(self.hi, offset + length)
        self.dirty += length
        if self.dirty >= self.every:
            start_writeback(self.fd, self.lo, self.hi - self.lo)
            self.dirty = 0


# ---------------------------------------------------------------- folders


def check_folder(st: os.stat_result, path: str) -> None:
    """Refuse a folder someone other than its owner may write (unless sticky), or owned by another user."""
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to this user or root: whoever owns it "
                         "could swap the files lvmirror keeps there; use a folder you own")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{path} can be written by users other than its owner (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}), so they could plant links or files there: "
                         f"`chmod go-w {path}`, or use another folder")


class Folder:
    """A directory opened once; every entry is reached through its descriptor, never through a link."""

    def __init__(self, path: str, *, create: bool = False, mode: int = 0o700):
        self.path = os.path.abspath(path)
        if create:
            make_folders(self.path, mode)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise UnsafePath(f"{self.path} is not a directory") from None
        try:
            check_folder(os.fstat(self.fd), self.path)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def stat(self, name: str) -> os.stat_result | None:
        """The entry itself (a link is not followed), or None if there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open(self, name: str, flags: int, mode: int = 0o600, *, device_ok: bool = False) -> int:
        """Open an entry without following a link; an existing one must be ours and a regular file.

        ``device_ok`` also accepts a block device (a destination), which root owns.
        """
        try:
            fd = os.open(name, flags | NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as e:
            # ELOOP is O_NOFOLLOW meeting a link; in a sticky folder the kernel's protected_symlinks
            # and protected_regular answer EACCES first for another user's entry.
            if e.errno in (errno.ELOOP, errno.EACCES):
                self._refuse_planted(name)
            raise
        try:
            st = os.fstat(fd)
            if device_ok and stat.S_ISBLK(st.st_mode):
                return fd
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{self.where(name)} is not a regular file")
            if st.st_uid != os.geteuid():
                self._refuse_planted(name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse_planted(self, name: str) -> None:
        st = self.stat(name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{self.where(name)} is a symbolic link; lvmirror does not follow links beside "
                             "a destination: remove it") from None
        if st is not None and st.st_uid != os.geteuid():
            raise UnsafePath(f"{self.where(name)} belongs to uid {st.st_uid}, not to this user: someone else "
                             "made it; remove it, then run again") from None

    def read_small(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """The content of a small file of ours, or None if there is none; refused past ``limit`` bytes."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise UnsafePath(f"{self.where(name)} is over {limit} bytes: not a file lvmirror wrote")
        return data

    def create_temp(self, name: str, mode: int = 0o600) -> tuple[str, int]:
        """A new file with a fresh random name beside ``name`` (O_EXCL: never one someone planted)."""
        while True:
            tmp = f".{name}.{secrets.token_hex(6)}.tmp"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
                return tmp, os.open(tmp, flags, mode, dir_fd=self.fd)
            except FileExistsError:
                continue

    def replace(self, name: str, data: bytes, mode: int = 0o600) -> None:
        """Replace ``name`` with ``data`` atomically and durably; its mode is ``mode``, whatever the umask."""
        tmp, fd = self.create_temp(name, mode)
        try:
            try:
                os.fchmod(fd, mode)  # the umask narrowed the mode open() gave
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.rename(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise
        self.sync()

    def names(self) -> list[str]:
        """The folder's entry names (as listed through its descriptor)."""
        return os.listdir(self.fd)

    def rename(self, old: str, new: str) -> None:
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> bool:
        """Remove an entry (a link itself, never its target); False if there was none."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def sync(self) -> None:
        os.fsync(self.fd)

    def lock(self, name: str, wait: float = 0.0) -> int:
        """flock ``name`` exclusively, waiting at most ``wait`` seconds; Locked if another holds it.

        The lock is the returned descriptor's: it goes when that is closed or the process dies
        (a run killed by the OOM killer or a reboot leaves no stale lock, unlike a pid file).
        """
        fd = self.open(name, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise Locked(self.where(name), holder if holder.isdigit() else "") from None
        # Who holds it, for the message another run prints (advisory only).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def make_folders(path: str, mode: int = 0o700) -> None:
    """``mkdir -p`` whose new folders are private; existing ones are left as they are (checked on open)."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        raise UnsafePath(f"{path} exists and is not a directory") from None
