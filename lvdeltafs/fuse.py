"""A thin pyfuse3 adapter over :mod:`lvdeltafs.vfs`: FUSE requests in, vfs calls out.

All filesystem meaning lives in vfs; here are only the things FUSE needs:
entry attributes, handle numbers, errno mapping, running blocking work off
the trio thread, signals and the mount itself.

pyfuse3 facts this follows (see the project's pyfuse3 reference):
- any exception but FUSEError raised in a handler kills the whole mount, so
  every handler maps every error to an errno and logs it;
- handlers run concurrently only where they await, so vfs calls (which read
  LVM and the target) run in worker threads behind a limiter; the one exception
  is a read the page cache can answer (delta.cached_only), made on the trio
  thread because the hand-off to a worker would cost more than the read;
- pyfuse3 installs no signal handlers: a trio signal receiver calls terminate().
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import logging.handlers
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from lvdeltafs.command import run
from lvdeltafs.delta import WouldBlock, cached_only
from lvdeltafs.errors import BadInput, Busy, CommandFailed, LvError
from lvdeltafs.replies import Attr, VfsError, errno_of, stat_mode
from lvdeltafs.vfs import Vfs

log = logging.getLogger(__name__)

# LVM changes under us (snapshots come and go), so the kernel re-asks often; reads are
# unaffected: they go to an open handle.
ENTRY_TIMEOUT = 1.0
READ_THREADS = 8
# Buffered reads reach a FUSE file as read-ahead requests: 128 KiB each by default.
# A larger read-ahead on the mount's bdi gives 1 MiB requests (libfuse negotiates
# max_pages = 256) and a few times the throughput; only root may set it.
READ_AHEAD_KB = 4096
BLKSIZE = 1 << 20  # cat and cp size their read() calls from st_blksize
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# glibc's malloc, left to itself, hands a freed 1 MiB read buffer back to the kernel (munmap, or
# a trim of the heap's top once 2 MiB are free there), so the next read's buffer is fresh pages,
# each zeroed in a page fault: measured, keeping them halves the time of `cat delta`.  Fixed
# thresholds keep request-sized buffers on the heap for reuse.  Bound: each malloc arena (one per
# thread at most: READ_THREADS + 1) keeps at most MALLOC_TRIM_THRESHOLD free at its top.
MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 8 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def _handler(fn: Callable) -> Callable:
    """Every error becomes an errno and a log line: nothing may escape to pyfuse3."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            err = errno_of(e)
            what = f"{fn.__name__}{tuple(a for a in args if isinstance(a, int | bytes))!r}"
            if isinstance(e, VfsError | LvError | OSError | ValueError):
                # A lookup of a name that does not exist is ordinary, not news; a quiet
                # error was already said once (a changed image fails every read after it).
                quiet = err == errno.ENOENT or getattr(e, "quiet", False)
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "%s: %s (%s)", what, e, errno.errorcode.get(err, err))
            else:
                log.exception("%s: unexpected error, answered %s", what, errno.errorcode.get(err, err))
            raise pyfuse3.FUSEError(err) from None

    return wrapper


class Operations(pyfuse3.Operations):
    """pyfuse3 operations; each one a call into :class:`Vfs`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Vfs, read_threads: int = READ_THREADS,
                 after_init: Callable[[], None] | None = None):
        super().__init__()
        self.fs = fs
        # Run once the kernel has taken our INIT reply, which resets the mount's read-ahead:
        # the first request after it is always a lookup or getattr, never a read.
        self.after_init = after_init
        self.limiter = trio.CapacityLimiter(read_threads)
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_dir = 1

    async def _run(self, fn: Callable, *args: Any) -> Any:
        if self.after_init is not None:
            hook, self.after_init = self.after_init, None
            hook()
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = ENTRY_TIMEOUT
        e.st_mode = stat_mode(a)
        e.st_nlink = 2 if a.is_dir else 1
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = BLKSIZE
        e.st_blocks = a.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.fs.lookup, parent_inode, os.fsdecode(name)))

    @_handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.fs.getattr, inode))

    @_handler
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        # The listing is taken once per opendir so offsets stay stable while it is read.
        entries = await self._run(self.fs.readdir, inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = [(os.fsencode(n), a) for n, a in entries]
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise VfsError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), i + 1):
                break

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        fh = await self._run(self.fs.open, inode, flags)
        # keep_cache stays off: a pair against the live origin changes between opens,
        # and a benchmark must not measure the page cache.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # The handle's bound pread, fetched here on the trio thread: the worker thread
        # then does nothing but the read itself.  A read the handle can answer without
        # disk I/O is answered here: the hand-off to a thread and back would be most of its cost.
        h = self.fs.handle(fh)
        if h.quick is not None:  # e.g. `data` where nothing changed: zeros
            data = h.quick(off, size)
            if data is not None:
                return data
        if h.inline:
            # From the page cache, if it holds the bytes: the hand-off to a worker and back
            # waited ~1 ms each way for the GIL (pyfuse3 holds it while it writes a reply),
            # against ~0.15 ms for a cached 1 MiB pread.  What would wait for the disk, a worker reads.
            try:
                with cached_only():
                    return h.pread(off, size)
            except WouldBlock:
                pass
        return await trio.to_thread.run_sync(h.pread, off, size, limiter=self.limiter)

    @_handler
    async def release(self, fh: int) -> None:
        await self._run(self.fs.release, fh)

    @_handler
    async def flush(self, fh: int) -> None:
        return None

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        try:
            return await self._run(self.fs.getxattr, inode, os.fsdecode(name))
        except VfsError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_handler
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return [os.fsencode(n) for n in await self._run(self.fs.listxattr, inode)]

    @_handler
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


# ---- mounting ------------------------------------------------------------------

def mount_options(allow_other: bool, debug: bool = False) -> set[str]:
    # ro: the kernel answers every write with EROFS before it reaches us;
    # default_permissions: the kernel checks the owners and modes vfs gives (access.Access):
    # with allow_other, that is what keeps a delta from those who cannot read its source.
    opts = {"fsname=lvdeltafs", "subtype=lvdeltafs", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


def _unescape_mountinfo(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_device(mountpoint: str) -> str | None:
    """MAJOR:MINOR of the mount at ``mountpoint`` (from mountinfo: a stat would wait for us)."""
    target = os.path.abspath(mountpoint)  # realpath would stat the mount, which waits for us
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    found = fields[2]  # the last one is the top of the stack
    except OSError:
        return None
    return found


def tune_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Raise the mount's read-ahead so buffered reads arrive as 1 MiB requests (root only).

    Only after the FUSE INIT exchange: the kernel sets the read-ahead from it.
    """
    dev = mount_device(mountpoint)
    if dev is None or kb <= 0:
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        log.debug("read-ahead of %s set to %d KiB", mountpoint, kb)
    except OSError as e:
        log.debug("cannot set %s (%s): reads stay at the default request size", path, e.strerror)


def keep_read_buffers() -> None:
    """Set MALLOC_MMAP_THRESHOLD and MALLOC_TRIM_THRESHOLD (glibc only; elsewhere nothing)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            # Signals were blocked from before the mount until now, so none is lost
            # and none can kill the process with the mount up.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            nursery.start_soon(_stop_on_signal, signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: Any) -> None:
    async for signum in signals:
        log.info("%s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return


def serve(fs: Vfs, mountpoint: str, *, allow_other: bool = False, debug: bool = False,
          read_threads: int = READ_THREADS, read_ahead_kb: int = READ_AHEAD_KB,
          on_ready: Callable[[], None] | None = None) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve until unmounted or signalled; always unmounts."""
    ops = Operations(fs, read_threads, after_init=lambda: tune_read_ahead(mountpoint, read_ahead_kb))
    keep_read_buffers()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    pyfuse3.init(ops, mountpoint, mount_options(allow_other, debug))
    try:
        if on_ready is not None:
            on_ready()
        log.info("serving %s", mountpoint)
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        fs.close()
        log.info("unmounted %s", mountpoint)


# ---- mount points: checks, background start, unmount -----------------------------

FUSERMOUNT = "fusermount3"
UNMOUNT_TIMEOUT = 30.0


def is_dead_mount(mountpoint: str) -> bool:
    """True for a FUSE mount whose process is gone ("Transport endpoint is not connected")."""
    # statfs, not stat: the kernel answers stat from its attribute cache for a second
    # after the process died, but always sends statfs on.
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_advice(mountpoint: str) -> str:
    return (f"{mountpoint} is a dead FUSE mount (the process serving it ended without unmounting: "
            f"'Transport endpoint is not connected'); clear it with: lvdeltafs umount {mountpoint} "
            f"(or {FUSERMOUNT} -u -z {mountpoint}), then mount again")


def check_mountpoint(mountpoint: str) -> None:
    """Refuse, saying what to do, a mount point that is missing, busy or left dead by a crash."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise BadInput(f"{mountpoint} does not exist: create the directory first") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise Busy(dead_mount_advice(mountpoint)) from None
        raise BadInput(f"cannot use {mountpoint} as a mount point: {e.strerror}") from None
    if not os.path.isdir(mountpoint) or not (st.st_mode & 0o040000):
        raise BadInput(f"{mountpoint} is not a directory")
    if is_dead_mount(mountpoint):
        raise Busy(dead_mount_advice(mountpoint))
    if os.path.ismount(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point: unmount it first "
                   f"(lvdeltafs umount {mountpoint})")


def unmount(mountpoint: str, lazy: bool = False) -> str:
    """Unmount with fusermount3; a dead mount is detached lazily.  Returns what was done."""
    dead = is_dead_mount(mountpoint)
    if not dead and not os.path.ismount(mountpoint):
        raise BadInput(f"{mountpoint} is not mounted")
    argv = [FUSERMOUNT, "-u", *(["-z"] if lazy or dead else []), mountpoint]
    try:
        run(argv, timeout=UNMOUNT_TIMEOUT)
    except CommandFailed as e:
        # fusermount3 says EBUSY only in its message (it exits 1 for everything); run()
        # sets LC_ALL=C, so the text is strerror's English.
        if "busy" in e.stderr.lower():
            raise Busy(f"{mountpoint} is busy: a file in it is open or a process has its working "
                       f"directory there (fuser -vm {mountpoint} shows which); close them, or detach it "
                       f"now with: lvdeltafs umount --lazy {mountpoint}") from None
        raise
    return "cleared the dead mount" if dead else "unmounted"


def start_background(argv: list[str], timeout: float = 120.0) -> int:
    """Run ``argv`` (a foreground mount given --ready-fd) detached; return its pid once mounted.

    A fork after pyfuse3 and trio have started is unsafe, so the mount runs in
    a fresh process of its own; it reports on a pipe once the mount is up and
    until then its errors reach our stderr.
    """
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lvdeltafs.cli", *argv, "--ready-fd", str(w)],
                                pass_fds=(w,), stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as ready:
        got = ready.read(6) if select.select([ready], [], [], timeout)[0] else b""
    if got == b"ready\n":
        return proc.pid
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    raise LvError(f"the mount process exited (code {code}) before the mount was ready; see above")


def detach(ready_fd: int, log_file: str | None) -> None:
    """In the background process, once mounted: logs to a file or syslog, no terminal, then report ready."""
    root = logging.getLogger()
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s lvdeltafs[%(process)d]: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("lvdeltafs[%(process)d]: %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    # Whoever started us may be waiting for our stdout/stderr to close (a pipe in a script).
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
