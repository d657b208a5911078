"""Applying a staged delta to its destination: preflight, absolute writes, commit.  Stdlib only.

Order, and why:

1. Preflight, before anything is recorded: verify the whole staged stream
   again (a bit flip on the staging disk must not reach the destination),
   unless this very session verified every byte of it as it arrived (see below);
   keep the undo delta of what the apply overwrites, durably (:mod:`.history`;
   only for a destination whose state is trusted, and when history is kept);
   then check the destination's size can be what the delta says (a block
   device's exact size; an image file grown to it, so a filesystem that
   cannot hold that size refuses here), and reserve space for the data ranges
   (so a full filesystem is found now).  Any failure here leaves the
   destination as it was and the delta staged.
2. (The undo delta, above: complete on disk before step 3 names it.)
3. Record ``applying`` (with the destination's binding and the history plan) in the state file.
4. Write every record at its absolute offset; fsync.
5. Write the new state with the destination's new binding and history; remove
   the staging files and the undo deltas it no longer lists.

Step 4 reads the staged copy through the verifier too, so a byte that changed
on the staging disk never reaches the destination, whichever session applies.
Step 1's second reading is for a staged copy this session did not receive
whole: left by an earlier session, or continued from one.  One received whole
just now was verified record by record as it arrived and is read back from the
page cache: reading it again cost a sync 0.1 s in 1.1 s (164 MiB) and guarded
only against the page cache itself.  If step 4 does find damage there, the
apply stops at that record with ``applying`` recorded and the staged copy
damaged: the next session reports it, and ``lvmirror discard`` is the way out,
as for any damaged replay.

Writes are absolute, so a session that finds ``applying`` with the delta
still staged and the same destination replays it (steps 1 without reserving,
then 4 and 5, with the history plan ``applying`` recorded: its undo delta was
complete before step 4 began, and is never written again).  One that cannot
(the destination was replaced, the staged copy is damaged) reports why and
leaves the way out to ``lvmirror discard``.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

from lvdeltafs.formats import reader as _reader
from lvdeltafs.formats.stream import MAX_DATA, StreamError
from lvdeltafs.fsio import Writeback, libc_error, libc_function, pwrite_all
from lvmirror.remote import faults
from lvmirror.remote import history as _history
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

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with a mode (os.posix_fallocate has none); OSError as usual."""
    import ctypes

    args = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn = libc_function("fallocate64", args) or libc_function("fallocate", args)
    if fn is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if fn(fd, mode, offset, length) != 0:
        raise libc_error()


class Writer:
    """Absolute writes to an open destination: data, zero ranges, size.

    The disk is asked to start writing every 8 MiB of data (fsio.Writeback), so the fsync
    that ends the apply waits for less."""

    def __init__(self, dest: Destination, fd: int):
        self.dest, self.fd = dest, fd
        self.punch = not dest.is_block  # cleared when the filesystem cannot punch holes
        self.zeroout = dest.is_block
        self.writeback = Writeback(fd)

    def data(self, offset: int, data: bytes) -> None:
        if self.punch and data == (_ZEROS if len(data) == len(_ZEROS) else bytes(len(data))):
            # All-zero data on an image file: a hole reads the same and keeps the file sparse.
            self.zero(offset, len(data))
        else:
            pwrite_all(self.fd, data, offset)
            self.writeback.wrote(offset, len(data))
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


Ranges = list[tuple[int, int, bool]]  # what a delta writes: (offset, length, holds data not all zeros)


def range_of(rec: _reader.Record) -> tuple[int, int, bool]:
    """A data or zero record's entry in Ranges."""
    return rec.offset, rec.length, rec.type == "data" and rec.data != _ZEROS[:rec.length]


def verify_staged(files: Files) -> Ranges:
    """Step 1a: verify the whole staged stream again (a bit flip on the staging disk must not reach the
    destination); the ranges it writes."""
    return [range_of(rec) for rec in staged_records(files) if rec.type in ("data", "zero")]


def check_block_size(dest: Destination, fd: int, target_size: int) -> None:
    if dest.is_block:
        have = os.lseek(fd, 0, os.SEEK_END)
        if have != target_size:
            raise RefusedError(block_size_message(dest.path, have, target_size))


def make_room(files: Files, writer: Writer, progress: dict[str, Any], ranges: list[tuple[int, int, bool]],
              *, reserve: bool) -> None:
    """Step 1b: fit the size and reserve space for the data; on failure the destination is left as it was."""
    dest, target_size = files.dest, progress["identity"]["target_size"]
    if dest.is_block:
        return
    st = os.fstat(writer.fd)
    try:
        if target_size > st.st_size:
            _grow(writer.fd, dest.path, target_size)
        for offset, length, data in ranges if reserve else ():
            if data:
                try:
                    fallocate(writer.fd, FALLOC_FL_KEEP_SIZE, offset, length)
                except OSError as e:
                    if e.errno in NOSPACE:
                        raise
                    break  # no fallocate here: find out while writing instead
    except BaseException as e:
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


def apply_staged(files: Files, progress: dict[str, Any], old: dict[str, Any], *, replay: bool,
                 keep: _history.Keep | None = None, plan: dict[str, Any] | None = None,
                 verified: Ranges | None = None) -> tuple[dict[str, Any], list[str]]:
    """Steps 1 to 5 for the complete staged delta; returns the new state and warnings for the sender.

    ``plan`` is the history plan of a replay (what ``applying`` recorded) or of a rewind.
    ``verified``: the delta's ranges when this session verified every byte of the staged copy as it
    arrived (Stager.ranges); step 1a is then skipped (module docstring)."""
    dest, identity, delta_id = files.dest, progress["identity"], progress["delta_id"]
    fd = dest.open_rw()
    try:
        writer = Writer(dest, fd)
        check_block_size(dest, fd, identity["target_size"])
        ranges = verified if verified is not None else verify_staged(files)
        if plan is None:
            # Before make_room grows the file or reserves space: the undo delta reads the bytes as they are,
            # and a run killed while writing it leaves the destination exactly as its state says.
            plan = _history.plan(files, fd, old, identity, [(o, n) for o, n, _ in ranges],
                                 trusted=_history.trusted(dest, old), forced=progress["force"], keep=keep)
        try:
            make_room(files, writer, progress, ranges, reserve=not replay)
        except NoSpaceError:
            if plan.get("mode") != "add":
                raise
            # Room for the undo delta but then not for the apply: the sync matters more than its history.
            plan = _history.drop_for_room(files, old)
            make_room(files, writer, progress, ranges, reserve=True)
        binding = dest.binding()
        try:
            files.write_state({**old, "applying": {"delta_id": delta_id, "target": identity["target"],
                                                   "started": now()[0], "binding": binding,
                                                   "history": plan}})
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
    new = commit(files, old, identity, delta_id, forced=progress["force"], plan=plan)
    faults.tick("committed")
    files.discard_staging()
    _history.sweep(files, new)
    return new, [plan["warning"]] if plan.get("warning") else []


def commit(files: Files, old: dict[str, Any], identity: dict[str, Any], delta_id: str, *,
           forced: bool, plan: dict[str, Any]) -> dict[str, Any]:
    """Step 4: the destination now holds the delta's target, and is bound to as it is now."""
    synced, epoch = now()
    # A forced apply is followed by a full check; only a compare (repair) delta clears that.
    still_unchecked = bool(old.get("needs_check")) and identity["source"] != "compare"
    new = {k: v for k, v in old.items() if k not in ("applying", "unknown")}
    new.update(volume=identity["volume"], snapshot=identity["target"], size=identity["target_size"],
               generation=int(old.get("generation") or 0) + 1, synced=synced, synced_epoch=epoch,
               delta_id=delta_id, source=identity["source"], needs_check=forced or still_unchecked,
               binding=files.dest.binding(), history=_history.after(files, old, plan, epoch))
    return files.write_state(new)
