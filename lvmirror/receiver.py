"""The receiver: lvmirror's one apply engine.  Python standard library only.

It runs next to a destination (an image file or a block device), locally in a
subprocess or on another host over ssh, and is the only code that writes to a
destination.  It must run on any host with python3, so it imports nothing but
the standard library and the stream module (``lvdeltafs/formats/stream.py``,
itself stdlib-only); when shipped, both files are placed side by side and the
stream module is imported as top-level ``stream``.

    python3 -m lvmirror.receiver DEST [--state-dir DIR]
    python3 receiver.py DEST [--state-dir DIR]        (shipped copy, stream.py beside it)

Protocol (stdin: requests, stdout: replies; stderr: diagnostics only)
-------------------------------------------------------------------
Every request is one JSON object on one line (UTF-8, ``\\n``-terminated, at
most 1 MiB) with an ``op`` key; every request gets exactly one reply line:
``{"ok": true, ...}`` or ``{"ok": false, "error": KIND, "message": TEXT, ...}``.
Bulk bytes travel as *frames*: a u32 little-endian length, then that many
bytes (at most 8 MiB); a frame of length 0 ends the bulk.

``hello``      -> version, dest, kind ("file"/"block"), exists, size, state
                  (or null), staged (null or {delta_id, verified, complete,
                  stream_size, identity}), replayed (delta id or null), problem.
``state``      -> {"state": the state file's content or null, "paths": {...}}
``receive``    {delta_id, from_offset, identity, stream_size, force}
               -> first a reply {"ok": true, "ready": true, "offset": N}, or an
                  error (a refused base is refused here, before any bulk);
                  then the client sends the ``delta`` stream from byte N as
                  frames and an end frame; then a final reply {"ok": true,
                  "verified": N, "complete": bool, "received": bytes}.  On an
                  error mid-bulk the receiver reads and discards the remaining
                  frames up to the end frame before replying, so the session
                  stays in step.
``apply``      -> applies the complete staged delta; {"applied": delta_id, "state": {...}}
``digests``    {block_size, start, count} -> a reply {"ok": true, "count": n,
                  "size": dest size} followed by frames holding n 16-byte
                  digests (blocks of [start, min(size, start+count*block_size)),
                  the last one possibly short) and an end frame.  The digest of
                  a block is the first 16 bytes of its SHA-256, exactly as
                  ``lvdeltafs.sources.compare.digest_block``.
``bye``        -> {"ok": true}, then the receiver exits.

Repairs (``check --repair``, compare resyncs) are ordinary delta streams
(source "compare") sent with ``receive`` and applied with ``apply``: there is
one write path.

Files (image file DEST / block device DEST with state folder DIR, NAME =
DEST without ``/dev/`` and with ``/`` turned into ``_``):

    state     DEST.lvmirror-state             DIR/NAME.json
    staging   DEST.lvmirror-staging           DIR/NAME.staging
    progress  DEST.lvmirror-staging.progress  DIR/NAME.staging.progress
    lock      DEST.lvmirror-lock              DIR/NAME.lock

The staging file holds the delta stream's bytes, verified record by record as
they arrive; the progress file (JSON, replaced atomically) says up to which
stream byte they are verified *and* fsynced, with the verifier's state there,
so a new session resumes from what the receiver holds durably.

Applying: verify the whole staged stream again (a bit flip on the staging
disk must not reach the destination) while preallocating its data ranges
(so a full filesystem is found before anything is written); record
``applying`` in the state file; write every record at its absolute offset;
fsync; write the new state; remove the staging files.  Writes are absolute,
so a session that finds ``applying`` with the delta still staged replays it
first, before anything else.

Tuning: ``LVMIRROR_STAGING_SYNC_BYTES`` (default 32 MiB) is how many staged
bytes may wait for an fsync (also every 2 s).

Test hook: ``LVMIRROR_TEST_KILL_AT=PHASE:N`` makes the receiver SIGKILL itself
at the N-th event of PHASE: ``receive`` (records staged), ``sync`` (staging
progress saved), ``apply`` (destination writes), ``applied`` (after the
destination fsync, before the new state), ``committed`` (after the new state,
before the staging files are removed); and in the sending lvmirror,
``rotate`` (before each old snapshot is removed).  For the fault tests only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import queue
import signal
import stat
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

if __package__:  # imported as lvmirror.receiver (python -m, or in-process)
    from lvdeltafs.formats import stream as _stream
else:
    # Run as a file (shipped over ssh): use the stream.py shipped beside it, not
    # whatever lvdeltafs the far host might have installed in another version.
    try:
        import stream as _stream  # type: ignore[no-redef]
    except ImportError:
        from lvdeltafs.formats import stream as _stream

PROTOCOL_VERSION = 1
RECEIVER_VERSION = "0.1.0"
STATE_FORMAT = "lvmirror-state"
PROGRESS_FORMAT = "lvmirror-staging"
DEFAULT_STATE_DIR = "/var/lib/lvmirror/receiver"
MAX_LINE = 1 << 20
MAX_FRAME = 8 << 20
FRAME = struct.Struct("<I")
DIGEST_SIZE = 16
# Durability of staging costs an fsync; every 32 MiB or 2 s keeps a killed
# session's loss small without making fsync the bottleneck.
# LVMIRROR_STAGING_SYNC_BYTES overrides the byte interval (the fault tests use small ones).
SYNC_BYTES = int(os.environ.get("LVMIRROR_STAGING_SYNC_BYTES") or 32 << 20)
SYNC_SECONDS = 2.0
_ZEROS = bytes(_stream.MAX_DATA)
_IO = 1 << 20

# Linux constants the standard library does not name.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------- errors
# Carried back as {"error": kind, "message": text}; the client turns them into
# lvdeltafs.errors classes (see lvmirror.transports.ERROR_CLASSES).


class ReceiverError(Exception):
    kind = "error"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class RefusedError(ReceiverError):
    """The delta does not fit what the destination holds (wrong base, wrong size)."""

    kind = "refused"


class CorruptError(ReceiverError):
    """The stream failed verification."""

    kind = "corrupt"


class TruncatedError(CorruptError):
    kind = "truncated"


class UnsupportedError(CorruptError):
    kind = "unsupported"


class NoSpaceError(ReceiverError):
    kind = "nospace"


class BusyError(ReceiverError):
    kind = "busy"


class ProtocolError(ReceiverError):
    kind = "protocol"


class StateError(ReceiverError):
    """The destination's state or staging is not what the request needs."""

    kind = "state"


class ConnectionLost(Exception):
    """stdin ended in the middle of a frame: the sender went away."""


def _stream_error(e: Exception) -> ReceiverError:
    if isinstance(e, _stream.StreamUnsupported):
        return UnsupportedError(str(e), offset=e.offset)
    if isinstance(e, _stream.StreamTruncated):
        return TruncatedError(str(e), offset=e.offset)
    return CorruptError(str(e), offset=getattr(e, "offset", None))


# ---------------------------------------------------------------- test hook


class _KillHook:
    """LVMIRROR_TEST_KILL_AT=PHASE:N: SIGKILL ourselves at the N-th PHASE event (fault tests only)."""

    def __init__(self, spec: str | None):
        self.phase, self.at, self.count = None, 0, 0
        if spec:
            phase, _, n = spec.partition(":")
            self.phase, self.at = phase, int(n or 1)

    def tick(self, phase: str) -> None:
        if phase != self.phase:
            return
        self.count += 1
        if self.count >= self.at:
            os.kill(os.getpid(), signal.SIGKILL)


_HOOK = _KillHook(os.environ.get("LVMIRROR_TEST_KILL_AT"))


def test_hook(phase: str) -> None:
    """The kill hook for the sender's own phases (``rotate``); a no-op unless the variable is set."""
    _HOOK.tick(phase)


# ---------------------------------------------------------------- small file helpers


def _now() -> tuple[str, float]:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), t


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, doc: Any) -> None:
    """Replace ``path`` with ``doc``: temp file, fsync, rename, fsync the folder.

    A crash leaves either the old or the new content, never a torn file.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path)


def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StateError(f"{path} is not valid JSON ({e}); it was not written by lvmirror or is damaged: "
                         "move it away and resync with `lvmirror init`") from None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_libc_fallocate = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with a mode (os.posix_fallocate has none); OSError as usual."""
    global _libc_fallocate
    if _libc_fallocate is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc_fallocate = fn
        except (ImportError, OSError, AttributeError):
            _libc_fallocate = False
    if not _libc_fallocate:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _libc_fallocate(fd, mode, offset, length) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ---------------------------------------------------------------- framing


class Channel:
    """JSON lines and length-prefixed frames over a pair of byte streams."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO):
        self.r, self.w = rfile, wfile

    def read_request(self) -> dict | None:
        line = self.r.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise ConnectionLost("request line too long or cut off")
        try:
            req = json.loads(line)
        except ValueError:
            raise ProtocolError(f"request is not JSON: {line[:80]!r}") from None
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise ProtocolError("request is not a JSON object with an 'op'")
        return req

    def reply(self, doc: dict) -> None:
        self.w.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        self.w.flush()

    def _exact(self, n: int) -> bytes:
        buf = self.r.read(n)
        while len(buf) < n:
            more = self.r.read(n - len(buf))
            if not more:
                raise ConnectionLost(f"input ended inside a frame ({len(buf)} of {n} bytes)")
            buf += more
        return buf

    def read_frame(self) -> bytes:
        (n,) = FRAME.unpack(self._exact(FRAME.size))
        if n > MAX_FRAME:
            raise ConnectionLost(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit; out of step")
        return self._exact(n) if n else b""

    def write_frame(self, data: bytes | memoryview) -> None:
        self.w.write(FRAME.pack(len(data)))
        if data:
            self.w.write(data)


class FrameReader:
    """A read-only file over incoming frames; EOF at the end frame (what StreamReader reads from).

    A thread reads frames ahead into a bounded queue, so the link keeps
    flowing while the stager writes and fsyncs (over ssh, a stalled reader
    leaves the 2 MiB window full and the sender idle).  It stops right after
    the end frame, so it never reads into the next request.
    """

    PREFETCH_FRAMES = 16

    def __init__(self, chan: Channel):
        self.chan = chan
        self.buf = memoryview(b"")
        self.ended = False
        self.received = 0
        self.queue: queue.Queue = queue.Queue(self.PREFETCH_FRAMES)
        self.thread = threading.Thread(target=self._prefetch, name="frames", daemon=True)
        self.thread.start()

    def _prefetch(self) -> None:
        while True:
            try:
                frame = self.chan.read_frame()
            except BaseException as exc:  # handed to the reading thread, which raises it
                self.queue.put(exc)
                return
            self.queue.put(frame)
            if not frame:
                return

    def _next_frame(self) -> bytes:
        item = self.queue.get()
        if isinstance(item, BaseException):
            self.ended = True  # the link is gone: nothing more to drain
            raise item
        return item

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.ended:
            frame = self._next_frame()
            if not frame:
                self.ended = True
            self.received += len(frame)
            self.buf = memoryview(frame)
        if n < 0:
            n = len(self.buf)
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def drain(self) -> None:
        """Discard everything up to the end frame, so the next request line is in step."""
        self.buf = memoryview(b"")
        while not self.ended:
            if not self._next_frame():
                self.ended = True


class TeeReader:
    """Passes reads through and keeps the bytes, so a verified record is staged byte for byte."""

    def __init__(self, inner: FrameReader):
        self.inner = inner
        self.kept = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.kept += data
        return data

    def take(self, n: int) -> bytes:
        out = bytes(self.kept[:n])
        del self.kept[:n]
        return out


# ---------------------------------------------------------------- destination


class Destination:
    """Where the destination, its state, staging and lock live, and its raw I/O."""

    def __init__(self, path: str, state_dir: str | None = None):
        self.path = path
        try:
            st = os.stat(path)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise StateError(f"{path} is neither a regular file nor a block device")
        except FileNotFoundError:
            self.is_block = False  # an image file made by the first apply
        if self.is_block:
            folder = state_dir or DEFAULT_STATE_DIR
            os.makedirs(folder, mode=0o700, exist_ok=True)
            name = os.path.normpath(path).removeprefix("/dev/").strip("/").replace("/", "_")
            stem = os.path.join(folder, name)
            self.state_path, self.staging_path = f"{stem}.json", f"{stem}.staging"
            self.lock_path = f"{stem}.lock"
        else:
            self.state_path, self.staging_path = f"{path}.lvmirror-state", f"{path}.lvmirror-staging"
            self.lock_path = f"{path}.lvmirror-lock"
        self.progress_path = f"{self.staging_path}.progress"
        self.lock_fd: int | None = None

    @property
    def kind(self) -> str:
        return "block" if self.is_block else "file"

    def paths(self) -> dict[str, str]:
        return {"dest": self.path, "state": self.state_path, "staging": self.staging_path,
                "progress": self.progress_path, "lock": self.lock_path}

    def lock(self) -> None:
        """flock the destination's lock file for the whole session; dies with the process."""
        import fcntl

        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BusyError(f"{self.path} is busy: another lvmirror receiver (pid {holder or '?'}) holds "
                            f"{self.lock_path}; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def size(self) -> int:
        if not self.exists():
            return 0
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def open_rw(self) -> int:
        # O_EXCL on a block device fails with EBUSY while it is mounted or held
        # by device-mapper: never write under a live filesystem.
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if self.is_block else os.O_CREAT)
        try:
            # A new mirror image is private: it holds the volume's data.
            return os.open(self.path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise RefusedError(f"{self.path} is in use (mounted, or held open by another program): "
                                   "unmount it or stop what uses it, then run again; nothing was applied") \
                    from None
            raise


class Writer:
    """Absolute writes to an open destination: data, zero ranges, size."""

    def __init__(self, dest: Destination, fd: int):
        self.dest, self.fd = dest, fd
        self.punch = not dest.is_block  # cleared when the filesystem cannot punch holes
        self.zeroout = dest.is_block

    def data(self, offset: int, data: bytes) -> None:
        if self.punch and data == (_ZEROS if len(data) == len(_ZEROS) else bytes(len(data))):
            # All-zero data on an image file: a hole reads the same and keeps the file sparse.
            self.zero(offset, len(data))
        else:
            _pwrite_all(self.fd, data, offset)
        _HOOK.tick("apply")

    def zero(self, offset: int, length: int) -> None:
        if self.punch:
            try:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self.punch = False
        if self.zeroout and offset % 512 == 0 and length % 512 == 0:
            try:
                import fcntl

                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
                self.zeroout = False
        for p in range(offset, offset + length, _IO):
            _pwrite_all(self.fd, memoryview(_ZEROS)[:min(_IO, offset + length - p)], p)

    def size(self, size: int) -> None:
        if self.dest.is_block:
            have = os.lseek(self.fd, 0, os.SEEK_END)
            if have != size:
                raise RefusedError(_block_size_message(self.dest.path, have, size))
        else:
            os.ftruncate(self.fd, size)


def _block_size_message(path: str, have: int, want: int) -> str:
    return (f"block device {path} is {have} bytes but the delta's target is {want} bytes: resize it to "
            f"exactly {want} bytes (e.g. lvresize -L {want}b) and run again; nothing was applied")


# ---------------------------------------------------------------- the engine


class Receiver:
    """One session's engine over one destination: staging, verification, apply, state, digests."""

    def __init__(self, dest: str, state_dir: str | None = None):
        self.dest = Destination(dest, state_dir)
        self.replayed: str | None = None
        self.problem: str | None = None
        self._started = False
        self._recovered = False

    # -- session start: lock, then finish any interrupted apply before anything else

    def start(self, op: str) -> None:
        """Before every request: hold the lock, and finish an interrupted apply first.

        A replay that fails (no space, damaged staging) is retried on each
        request; ``hello`` still answers, with the failure as its ``problem``.
        """
        if not self._started:
            self.dest.lock()
            self._started = True
        if self._recovered:
            return
        try:
            self.recover()
        except (ReceiverError, OSError) as e:
            self.problem = f"finishing the interrupted apply failed: {e}"
            if op != "hello":
                raise
            return
        self._recovered = True

    def recover(self) -> None:
        state = self.state()
        applying = (state or {}).get("applying")
        progress = self.progress()
        if not applying:
            last = (state or {}).get("delta_id")
            if progress and progress.get("complete") and progress.get("delta_id") == last:
                # Killed after committing the new state, before removing the staging files.
                self.discard_staging()
            return
        if progress and progress.get("complete") and progress.get("delta_id") == applying["delta_id"]:
            self._apply_staged(progress, state, replay=True)
            self.replayed = applying["delta_id"]
            return
        # Should not happen (the staging was removed by hand?); say so and let a forced resync mend it.
        self.problem = (f"{self.dest.path} was being updated by delta {applying['delta_id']} but that delta "
                        f"is no longer staged ({self.dest.staging_path}): the destination may be a mix of "
                        "two snapshots; resync it with a forced compare (`lvmirror check --repair`)")

    # -- state and staging progress

    def state(self) -> dict | None:
        return read_json(self.dest.state_path)

    def progress(self) -> dict | None:
        return read_json(self.dest.progress_path)

    def staged_info(self) -> dict | None:
        p = self.progress()
        if not p:
            return None
        return {k: p.get(k) for k in ("delta_id", "verified", "complete", "stream_size", "identity", "force")}

    def hello(self) -> dict:
        return {"version": PROTOCOL_VERSION, "receiver_version": RECEIVER_VERSION, "dest": self.dest.path,
                "kind": self.dest.kind, "exists": self.dest.exists(), "size": self.dest.size(),
                "state": self.state(), "staged": self.staged_info(), "replayed": self.replayed,
                "problem": self.problem, "paths": self.dest.paths()}

    def discard_staging(self) -> None:
        # Progress first: a staging file without progress is ignored and overwritten.
        _unlink(self.dest.progress_path)
        _unlink(self.dest.staging_path)
        _fsync_dir(self.dest.staging_path)

    # -- the base check

    def check_base(self, identity: dict, force: bool, delta_id: str = "") -> None:
        """Refuse a delta whose base is not what the destination holds (ZFS-style), unless forced."""
        if force:
            return
        state = self.state() or {}
        if self.problem:
            raise RefusedError(self.problem)
        holds = state.get("snapshot")
        did = delta_id or _delta_id_hint(identity)
        if not identity.get("base"):
            if holds:
                raise RefusedError(
                    f"refusing delta {did}: it is an initial full copy of volume {identity.get('volume')}, "
                    f"but {self.dest.path} already holds {_describe(state)}; to update it, sync from the "
                    f"snapshot it holds; to start over, move {self.dest.state_path} away or force it")
            if self.dest.kind == "file" and self.dest.exists() and self.dest.size() > 0:
                # An init rewrites the whole file: never over a file we did not make.
                raise RefusedError(
                    f"refusing delta {did}: {self.dest.path} already exists and holds "
                    f"{self.dest.size()} bytes but no lvmirror state, so it is not a mirror lvmirror "
                    "made; check the destination path, then remove the file or force the init")
            return
        if not holds:
            raise RefusedError(
                f"refusing delta {did}: it applies on top of snapshot {identity.get('base')} but "
                f"{self.dest.path} holds nothing yet (no state in {self.dest.state_path}); run "
                "`lvmirror init` first")
        same = (state.get("volume") == identity.get("volume") and holds == identity.get("base")
                and state.get("size") == identity.get("base_size"))
        if not same:
            raise RefusedError(
                f"refusing delta {did}: it applies on top of snapshot {identity.get('base')} of volume "
                f"{identity.get('volume')} ({identity.get('base_size')} bytes), but {self.dest.path} holds "
                f"{_describe(state)}; nothing was staged or applied. Sync from the snapshot it holds, or "
                "resync with `lvmirror check --repair` (a forced apply is followed by a full check)")

    # -- receive

    def begin_receive(self, req: dict) -> tuple[int, dict | None]:
        """Check a receive request; returns (offset to continue from, verifier state or None)."""
        delta_id, offset = req.get("delta_id"), int(req.get("from_offset") or 0)
        identity, force = req.get("identity"), bool(req.get("force"))
        if not isinstance(delta_id, str) or not delta_id:
            raise ProtocolError("receive needs a delta_id")
        progress = self.progress()
        if offset == 0:
            if not isinstance(identity, dict):
                raise ProtocolError("receive from offset 0 needs the delta's identity")
            self.check_base(identity, force, delta_id)
            self.discard_staging()
            return 0, None
        if not progress or progress.get("delta_id") != delta_id:
            raise StateError(f"cannot resume delta {delta_id} at byte {offset}: the receiver holds "
                             f"{_staged_text(progress)}; send it from byte 0", verified=0)
        if offset != progress["verified"] or progress.get("complete"):
            raise StateError(f"cannot resume delta {delta_id} at byte {offset}: the receiver holds it "
                             f"verified up to byte {progress['verified']}"
                             f"{' (complete)' if progress.get('complete') else ''}; resume from there",
                             verified=progress["verified"])
        self.check_base(progress["identity"], progress.get("force", False) or force, delta_id)
        return offset, progress["reader"]

    def receive(self, req: dict, frames: FrameReader, offset: int, reader_state: dict | None) -> dict:
        """Verify records as they arrive and append them to the staging file durably."""
        stager = _Stager(self, req, offset, reader_state)
        try:
            stager.run(frames)
        except ConnectionLost:
            stager.save_quietly()
            raise
        except _stream.StreamError as e:
            stager.save_quietly()
            err = _stream_error(e)
            err.extra["verified"] = stager.durable
            raise err from None
        except CorruptError:
            # A stream for another delta than announced: none of it belongs here.
            stager.close()
            self.discard_staging()
            raise
        except OSError as e:
            stager.save_quietly()
            if e.errno in _NOSPACE:
                need = (req.get("stream_size") or 0) - stager.durable
                raise NoSpaceError(
                    f"no space left on {self.dest.path}'s filesystem for the staged delta (needs "
                    f"{max(need, 0)} more bytes in {self.dest.staging_path}): free space and run again; "
                    f"nothing was applied (the {stager.durable} bytes verified so far are kept and the "
                    "next run continues from there)", verified=stager.durable) from None
            raise
        finally:
            if stager.fd >= 0:
                stager.close()
        return {"verified": stager.durable, "complete": stager.complete, "received": frames.received,
                "delta_id": stager.delta_id}

    # -- apply

    def apply(self) -> dict:
        progress = self.progress()
        if not progress:
            raise StateError(f"nothing is staged for {self.dest.path}: send a delta first")
        if not progress.get("complete"):
            raise StateError(f"delta {progress['delta_id']} is staged only up to byte {progress['verified']} "
                             f"of {progress.get('stream_size') or '?'}: send the rest before applying")
        self.check_base(progress["identity"], progress.get("force", False), progress["delta_id"])
        state = self._apply_staged(progress, self.state(), replay=False)
        return {"applied": progress["delta_id"], "state": state}

    def _apply_staged(self, progress: dict, state: dict | None, replay: bool) -> dict:
        identity, delta_id = progress["identity"], progress["delta_id"]
        fd = self.dest.open_rw()
        try:
            writer = Writer(self.dest, fd)
            if not replay:
                self._preflight(writer, progress)
            old = dict(state or {})
            started, _ = _now()
            try:
                write_json_atomic(self.dest.state_path, {**_base_state(self.dest, old),
                                  "applying": {"delta_id": delta_id, "target": identity.get("target"),
                                               "started": started}})
            except OSError as e:
                if e.errno in _NOSPACE:
                    raise NoSpaceError(f"no space left on {self.dest.state_path}'s filesystem for the state "
                                       "file: free space and run again; nothing was applied") from None
                raise
            try:
                self._write_records(writer, identity)
                os.fsync(fd)
            except OSError as e:
                if e.errno in _NOSPACE:
                    raise NoSpaceError(
                        f"no space left on {self.dest.path}'s filesystem while applying delta {delta_id}: "
                        "the destination is partly updated; free space and run again: the next run finishes "
                        "the apply from the staged copy") from None
                raise
        finally:
            os.close(fd)
        _HOOK.tick("applied")
        new = self._commit(old, identity, delta_id, bool(progress.get("force")))
        _HOOK.tick("committed")
        self.discard_staging()
        self.problem = None
        return new

    def _staged_records(self):
        f = open(self.dest.staging_path, "rb")  # noqa: SIM115 - closed by the generator
        try:
            yield from _stream.iter_records(f)
        except _stream.StreamError as e:
            raise CorruptError(f"the staged copy of the delta ({self.dest.staging_path}) is damaged: {e}; "
                               "discard it and send the delta again") from None
        finally:
            f.close()

    def _preflight(self, writer: Writer, progress: dict) -> None:
        """Verify the whole staged stream, and reserve space for its data, before touching the destination.

        Preallocation (KEEP_SIZE) leaves the content as it is, so running out
        of space here means nothing was applied.
        """
        identity = progress["identity"]
        if self.dest.is_block:
            have = self.dest.size()
            if have != identity.get("target_size"):
                raise RefusedError(_block_size_message(self.dest.path, have, identity.get("target_size")))
        before = os.fstat(writer.fd).st_size
        reserve = not self.dest.is_block
        try:
            for rec in self._staged_records():
                if reserve and rec.type == "data" and rec.data != _ZEROS[:rec.length]:
                    try:
                        _fallocate(writer.fd, FALLOC_FL_KEEP_SIZE, rec.offset, rec.length)
                    except OSError as e:
                        if e.errno in _NOSPACE:
                            raise
                        reserve = False  # no fallocate here: find out while writing instead
        except OSError as e:
            if e.errno not in _NOSPACE:
                raise
            os.ftruncate(writer.fd, before)  # frees what was reserved past the end
            need = (progress.get("reader") or {}).get("dbytes", "?")
            raise NoSpaceError(
                f"no space left on {self.dest.path}'s filesystem to apply the staged delta (needs up to "
                f"{need} bytes for its data): free space and run again; nothing was applied and the "
                "staged delta is kept") from None

    def _write_records(self, writer: Writer, identity: dict) -> None:
        for rec in self._staged_records():
            if rec.type == "size":
                if not identity.get("base") and not self.dest.is_block:
                    # An initial copy defines every byte: start from an empty (all-hole) file.
                    os.ftruncate(writer.fd, 0)
                writer.size(rec.offset)
            elif rec.type == "data":
                writer.data(rec.offset, rec.data)
            elif rec.type == "zero":
                writer.zero(rec.offset, rec.length)
                _HOOK.tick("apply")

    def _commit(self, old: dict, identity: dict, delta_id: str, forced: bool) -> dict:
        synced, epoch = _now()
        # A forced apply is followed by a full check; only a compare (repair) delta clears that.
        still_unchecked = bool(old.get("needs_check")) and identity.get("source") != "compare"
        new = {**_base_state(self.dest, old), "volume": identity.get("volume"),
               "snapshot": identity.get("target"), "size": identity.get("target_size"),
               "generation": int(old.get("generation") or 0) + 1, "synced": synced, "synced_epoch": epoch,
               "delta_id": delta_id, "source": identity.get("source"),
               "needs_check": forced or still_unchecked}
        new.pop("applying", None)
        write_json_atomic(self.dest.state_path, new)
        return new

    # -- digests

    def digests(self, block_size: int, start: int, count: int | None):
        """Yield (size, n) then the digest bytes in chunks: SHA-256[:16] of each block."""
        import hashlib

        if block_size <= 0 or start < 0 or start % block_size:
            raise ProtocolError(f"bad digest geometry: block_size {block_size}, start {start}")
        size = self.dest.size()
        end = size if count is None else min(size, start + count * block_size)
        n = max(0, -(-(end - start) // block_size))
        yield size, n
        if not n:
            return
        fd = os.open(self.dest.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = memoryview(bytearray(block_size))
            out = bytearray()
            for off in range(start, end, block_size):
                view = buf[:min(block_size, end - off)]
                got = 0
                while got < len(view):
                    r = os.preadv(fd, [view[got:]], off + got)
                    if r == 0:
                        raise StateError(f"{self.dest.path} ended early at byte {off + got} while reading it")
                    got += r
                out += hashlib.sha256(view).digest()[:DIGEST_SIZE]
                if len(out) >= 1 << 16:
                    yield bytes(out)
                    out.clear()
            if out:
                yield bytes(out)
        finally:
            os.close(fd)


class _Stager:
    """One receive: verified records appended to the staging file, progress saved durably.

    Invariant: the staging file is at least as long as the progress file's
    ``verified``, and its bytes up to there are the stream's, verified; the
    progress file's ``reader`` is the verifier's state at exactly that byte.
    """

    def __init__(self, rx: Receiver, req: dict, offset: int, reader_state: dict | None):
        self.rx, self.req = rx, req
        self.delta_id: str = req["delta_id"]
        self.force = bool(req.get("force"))
        self.durable = offset  # stream bytes verified and fsynced, as the progress file says
        self.written = offset  # stream bytes verified and written (maybe not yet fsynced)
        self.complete = False
        self.identity = req.get("identity") if offset == 0 else (rx.progress() or {}).get("identity")
        self.reader_state = reader_state  # where verification resumes
        self.state_at_written = reader_state  # the verifier's state at `written` (None before SIZE)
        # Private: the staged delta holds the volume's data.
        self.fd = os.open(rx.dest.staging_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Bytes past the durable point were never confirmed: drop them.
        os.ftruncate(self.fd, offset)
        os.lseek(self.fd, offset, os.SEEK_SET)
        self.last_sync = time.monotonic()

    def run(self, frames: FrameReader) -> None:
        tee = TeeReader(frames)
        reader = _stream.StreamReader(tee, resume=self.reader_state)
        for rec in reader:
            if rec.type == "header":
                self._check_header(rec.header or {})
            _write_all(self.fd, tee.take(rec.end - self.written))
            self.written = rec.end
            if reader.target_size is not None:
                # Resuming needs the header and size, so only points after SIZE are resume points.
                self.state_at_written = reader.state()
            _HOOK.tick("receive")
            if rec.type == "end":
                self.complete = True
                self.sync()
            elif self._due():
                self.sync()

    def _check_header(self, header: dict) -> None:
        ident = header.get("identity") or {}
        mine = self.identity or {}
        keys = ("volume", "base", "target", "base_size", "target_size", "source")
        if header.get("delta_id") != self.delta_id or any(ident.get(k) != mine.get(k) for k in keys):
            raise CorruptError(f"the stream's header is for delta {header.get('delta_id')} "
                               f"({ident.get('base')} -> {ident.get('target')}), not the announced "
                               f"{self.delta_id}; nothing was staged")

    def _due(self) -> bool:
        return (self.written - self.durable >= SYNC_BYTES
                or time.monotonic() - self.last_sync >= SYNC_SECONDS)

    def sync(self) -> None:
        """fsync the staging file, then say so in the progress file (in that order)."""
        if self.state_at_written is None:
            return  # nothing resumable yet (before the SIZE record)
        os.fsync(self.fd)
        doc = {"format": PROGRESS_FORMAT, "delta_id": self.delta_id, "identity": self.identity,
               "force": self.force, "verified": self.written, "complete": self.complete,
               "stream_size": self.req.get("stream_size"), "reader": self.state_at_written,
               "updated": _now()[0]}
        write_json_atomic(self.rx.dest.progress_path, doc)
        self.durable = self.written
        self.last_sync = time.monotonic()
        _HOOK.tick("sync")

    def save_quietly(self) -> None:
        """After an error: make what is verified durable, so the next send continues after it."""
        try:
            os.ftruncate(self.fd, self.written)  # a partly written record is not kept
            if self.written > self.durable:
                self.sync()
        except OSError:
            pass  # the previous progress file still describes a valid prefix

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _base_state(dest: Destination, old: dict) -> dict:
    return {**old, "format": STATE_FORMAT, "version": 1, "dest": dest.path, "kind": dest.kind}


def _describe(state: dict) -> str:
    return (f"snapshot {state.get('snapshot')} of volume {state.get('volume')} ({state.get('size')} bytes, "
            f"generation {state.get('generation')}, synced {state.get('synced')})")


def _staged_text(progress: dict | None) -> str:
    if not progress:
        return "nothing staged"
    return f"delta {progress.get('delta_id')} verified up to byte {progress.get('verified')}"


def _delta_id_hint(identity: dict) -> str:
    return f"{identity.get('base') or '(init)'} -> {identity.get('target')}"


# ---------------------------------------------------------------- the request loop


class Server:
    """Reads requests, dispatches, writes replies; errors become error replies."""

    def __init__(self, rx: Receiver, chan: Channel):
        self.rx, self.chan = rx, chan

    def serve(self) -> int:
        while True:
            try:
                req = self.chan.read_request()
            except ProtocolError as e:
                self.chan.reply(_error_reply(e))
                continue
            except ConnectionLost:
                return 1
            if req is None:
                return 0
            if req["op"] == "bye":
                self.chan.reply({"ok": True})
                return 0
            try:
                self.rx.start(req["op"])
                self.dispatch(req)
            except ConnectionLost:
                return 1
            except ReceiverError as e:
                self.chan.reply(_error_reply(e))
                if isinstance(e, BusyError):
                    return 1
                continue
            except OSError as e:
                self.chan.reply({"ok": False, "error": "io", "message": f"{self.rx.dest.path}: {e}"})

    def dispatch(self, req: dict) -> None:
        op = req["op"]
        if op == "hello":
            self.chan.reply({"ok": True, **self.rx.hello()})
        elif op == "state":
            self.chan.reply({"ok": True, "state": self.rx.state(), "paths": self.rx.dest.paths()})
        elif op == "receive":
            self.receive(req)
        elif op == "apply":
            self.chan.reply({"ok": True, **self.rx.apply()})
        elif op == "digests":
            self.digests(req)
        else:
            raise ProtocolError(f"unknown request {op!r} (receiver protocol version {PROTOCOL_VERSION})")

    def receive(self, req: dict) -> None:
        offset, reader_state = self.rx.begin_receive(req)
        self.chan.reply({"ok": True, "ready": True, "offset": offset})
        frames = FrameReader(self.chan)
        try:
            result = self.rx.receive(req, frames, offset, reader_state)
        except ReceiverError:
            frames.drain()
            raise
        except OSError:
            frames.drain()
            raise
        if not frames.ended:
            frames.drain()
        self.chan.reply({"ok": True, **result})

    def digests(self, req: dict) -> None:
        gen = self.rx.digests(int(req.get("block_size") or 0), int(req.get("start") or 0),
                              None if req.get("count") is None else int(req["count"]))
        size, n = next(gen)
        self.chan.reply({"ok": True, "count": n, "size": size, "digest": "sha256/16"})
        for chunk in gen:
            self.chan.write_frame(chunk)
        self.chan.write_frame(b"")
        self.chan.w.flush()


def _error_reply(e: ReceiverError) -> dict:
    return {"ok": False, "error": e.kind, "message": str(e), **e.extra}


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Entry point; a bootstrap that loaded this module some other way can call it with its own streams."""
    ap = argparse.ArgumentParser(prog="lvmirror-receiver", description=__doc__.split("\n")[0])
    ap.add_argument("dest")
    ap.add_argument("--state-dir", default=None)
    args = ap.parse_args(argv)
    if stdout is None:
        # Keep the protocol channel private: anything printed by accident goes to stderr.
        out_fd = os.dup(1)
        os.dup2(2, 1)
        stdout = os.fdopen(out_fd, "wb")
    rfile = stdin if stdin is not None else sys.stdin.buffer
    chan = Channel(rfile, stdout)
    try:
        rx = Receiver(args.dest, args.state_dir)
    except ReceiverError as e:
        chan.reply(_error_reply(e))
        return 1
    return Server(rx, chan).serve()


if __name__ == "__main__":
    sys.exit(main())
