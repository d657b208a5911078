"""Applying a staged delta to its destination: preflight, absolute writes, commit.  Stdlib only.

Order, and why:

1. Preflight, before anything is recorded: verify the whole staged stream
   again (a bit flip on the staging disk must not reach the destination),
   check the destination's size can be what the delta says (a block device's
   exact size; an image file grown to it, so a filesystem that cannot hold
   that size refuses here), and reserve space for the data ranges (so a full
   filesystem is found now).  Any failure here leaves the destination as it
   was and the delta staged.
2. Record ``applying`` (with the destination's binding) in the state file.
3. Write every record at its absolute offset; fsync.
4. Write the new state with the destination's new binding; remove the staging files.

Writes are absolute, so a session that finds ``applying`` with the delta
still staged and the same destination replays it (steps 1 without reserving,
then 3 and 4).  One that cannot (the destination was replaced, the staged
copy is damaged) reports why and leaves the way out to ``lvmirror discard``.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

from lvdeltafs.formats import reader as _reader
from lvdeltafs.formats.stream import MAX_DATA, StreamError
from lvdeltafs.fsio import pwrite_all
from lvmirror.remote import faults
from lvmirror.remote.destination import Destination
from lvmirror.remote.state import WAY_OUT, Files, now
from lvmirror.remote.wire import CorruptError, NoSpaceError, RefusedError

# Linux constants the standard library does not name.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
NOSPACE = (errno.ENOSPC, errno.EDQUOT)
TOO_BIG = (errno.EFBIG, errno.EINVAL, errno.EOVERFLOW)
_ZEROS = bytes(MAX_DATA)
_IO = 1 << 20

_libc_fallocate: Any = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
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
            pwrite_all(self.fd, data, offset)
        faults.tick("apply")

    def zero(self, offset: int, length: int) -> None:
        if self.punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
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
            pwrite_all(self.fd, memoryview(_ZEROS)[:min(_IO, offset + length - p)], p)

    def size(self, size: int) -> None:
        if self.dest.is_block:
            have = os.lseek(self.fd, 0, os.SEEK_END)
            if have != size:
                raise RefusedError(block_size_message(self.dest.path, have, size))
        else:
            os.ftruncate(self.fd, size)


def block_size_message(path: str, have: int, want: int) -> str:
    return (f"block device {path} is {have} bytes but the delta's target is {want} bytes: resize it to "
            f"exactly {want} bytes (e.g. lvresize -L {want}b) and run again; nothing was applied")


def staged_records(files: Files) -> Iterator[_reader.Record]:
    fd = files.dest.folder.open(files.dest.staging_name, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        try:
            yield from _reader.iter_records(f)
        except StreamError as e:
            where = files.dest.where(files.dest.staging_name)
            raise CorruptError(f"the staged copy of the delta ({where}) is damaged: {e}; {WAY_OUT}") from None


def preflight(files: Files, writer: Writer, progress: dict[str, Any], *, reserve: bool) -> None:
    """Step 1: verify the staged stream, fit the size, reserve space; the destination is left as it was."""
    dest, target_size = files.dest, progress["identity"]["target_size"]
    st = os.fstat(writer.fd)
    if dest.is_block:
        have = os.lseek(writer.fd, 0, os.SEEK_END)
        if have != target_size:
            raise RefusedError(block_size_message(dest.path, have, target_size))
    try:
        if not dest.is_block and target_size > st.st_size:
            _grow(writer.fd, dest.path, target_size)
        reserve = reserve and not dest.is_block
        for rec in staged_records(files):
            if reserve and rec.type == "data" and rec.data != _ZEROS[:rec.length]:
                try:
                    fallocate(writer.fd, FALLOC_FL_KEEP_SIZE, rec.offset, rec.length)
                except OSError as e:
                    if e.errno in NOSPACE:
                        raise
                    reserve = False  # no fallocate here: find out while writing instead
    except BaseException as e:
        if not dest.is_block:
            os.ftruncate(writer.fd, st.st_size)  # frees what was reserved past the end
            dest.restore_mtime(writer.fd, st.st_mtime_ns)
        if isinstance(e, OSError) and e.errno in NOSPACE:
            need = progress["reader"]["dbytes"]
            raise NoSpaceError(
                f"no space left on {dest.path}'s filesystem to apply the staged delta (needs up to {need} "
                "bytes for its data): free space and run again; nothing was applied and the staged delta "
                "is kept") from None
        raise


def _grow(fd: int, path: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in TOO_BIG:
            raise RefusedError(f"{path}'s filesystem cannot hold a file of {size} bytes ({e.strerror}); "
                               "nothing was applied. Put the mirror on a filesystem that can, or "
                               f"{WAY_OUT}") from None
        raise


def write_records(files: Files, writer: Writer, identity: dict[str, Any]) -> None:
    """Step 3: every record at its absolute offset."""
    for rec in staged_records(files):
        if rec.type == "size":
            if not identity["base"] and not files.dest.is_block:
                # An initial copy defines every byte: start from an empty (all-hole) file.
                os.ftruncate(writer.fd, 0)
            writer.size(rec.offset)
        elif rec.type == "data":
            writer.data(rec.offset, rec.data)
        elif rec.type == "zero":
            writer.zero(rec.offset, rec.length)
            faults.tick("apply")


def apply_staged(files: Files, progress: dict[str, Any], old: dict[str, Any], *,
                 replay: bool) -> dict[str, Any]:
    """Steps 1 to 4 for the complete staged delta; returns the new state."""
    dest, identity, delta_id = files.dest, progress["identity"], progress["delta_id"]
    fd = dest.open_rw()
    try:
        writer = Writer(dest, fd)
        preflight(files, writer, progress, reserve=not replay)
        binding = dest.binding()
        try:
            files.write_state({**old, "applying": {"delta_id": delta_id, "target": identity["target"],
                                                   "started": now()[0], "binding": binding}})
        except OSError as e:
            if e.errno in NOSPACE:
                raise NoSpaceError(f"no space left on {dest.where(dest.state_name)}'s filesystem for the "
                                   "state file: free space and run again; nothing was applied") from None
            raise
        try:
            write_records(files, writer, identity)
            os.fsync(fd)
        except OSError as e:
            if e.errno in NOSPACE:
                raise NoSpaceError(
                    f"no space left on {dest.path}'s filesystem while applying delta {delta_id}: the "
                    "destination is partly updated; free space and run again: the next run finishes the "
                    "apply from the staged copy") from None
            raise
    finally:
        os.close(fd)
    faults.tick("applied")
    new = commit(files, old, identity, delta_id, forced=progress["force"])
    faults.tick("committed")
    files.discard_staging()
    return new


def commit(files: Files, old: dict[str, Any], identity: dict[str, Any], delta_id: str, *,
           forced: bool) -> dict[str, Any]:
    """Step 4: the destination now holds the delta's target, and is bound to as it is now."""
    synced, epoch = now()
    # A forced apply is followed by a full check; only a compare (repair) delta clears that.
    still_unchecked = bool(old.get("needs_check")) and identity["source"] != "compare"
    new = {k: v for k, v in old.items() if k not in ("applying", "unknown")}
    new.update(volume=identity["volume"], snapshot=identity["target"], size=identity["target_size"],
               generation=int(old.get("generation") or 0) + 1, synced=synced, synced_epoch=epoch,
               delta_id=delta_id, source=identity["source"], needs_check=forced or still_unchecked,
               binding=files.dest.binding())
    return files.write_state(new)
