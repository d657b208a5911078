"""Staging a delta: verified record by record as it arrives, durable, resumable.  Stdlib only.

The staging file holds the delta stream's bytes; the progress file (replaced
atomically) says up to which stream byte they are verified *and* fsynced,
with the verifier's state there, so a new session resumes from what the
receiver holds durably, never from what the sender thinks it sent.  A staged
prefix is continued only by the same delta: the same delta id, which is a
digest of an identity the receiver checks against the stream's own header.

Invariant: the staging file is at least as long as the progress file's
``verified``, its bytes up to there are the stream's, verified, and the
progress file's ``reader`` is the verifier's state at exactly that byte.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from lvdeltafs.formats import reader as _reader
from lvdeltafs.formats import stream as _stream
from lvdeltafs.fsio import Writeback
from lvmirror.remote import apply as _applying
from lvmirror.remote import faults
from lvmirror.remote.state import Files, now
from lvmirror.remote.wire import (
    Channel,
    ConnectionLost,
    CorruptError,
    RemoteError,
    TruncatedError,
    UnsupportedError,
)

# Durability of staging costs an fsync; every 32 MiB or 2 s keeps a killed
# session's loss small without making fsync the bottleneck.
# LVMIRROR_STAGING_SYNC_BYTES overrides the byte interval (the fault tests use small ones).
_env_sync = os.environ.get("LVMIRROR_STAGING_SYNC_BYTES", "")
SYNC_BYTES = int(_env_sync) if _env_sync.isdigit() and int(_env_sync) > 0 else 32 << 20
SYNC_SECONDS = 2.0
# The disk is asked to start writing staged bytes every WRITEBACK_BYTES (fsio.Writeback), so the
# fsync every SYNC_BYTES finds them mostly written.
WRITEBACK_BYTES = 4 << 20


def stream_error(e: _stream.StreamError) -> RemoteError:
    if isinstance(e, _stream.StreamUnsupported):
        return UnsupportedError(str(e), offset=e.offset)
    if isinstance(e, _stream.StreamTruncated):
        return TruncatedError(str(e), offset=e.offset)
    return CorruptError(str(e), offset=e.offset)


class ForeignStream(CorruptError):
    """The stream's header is not the delta announced: none of it belongs here."""


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
    """Passes reads through and keeps the bytes, so a verified record is staged byte for byte.

    The pieces are kept as read, not copied together (a sync's every byte passes here): the
    verifier reads exactly up to a record's end, so what is kept at a record's end is that record."""

    def __init__(self, inner: FrameReader):
        self.inner = inner
        self.kept: list[bytes] = []
        self.kept_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.kept.append(data)
        self.kept_bytes += len(data)
        return data

    def take(self, n: int) -> list[bytes]:
        """The ``n`` bytes read since the last take, as the pieces they were read in."""
        if n != self.kept_bytes:
            raise AssertionError(f"staging: {self.kept_bytes} bytes read for a record of {n}")
        out, self.kept, self.kept_bytes = self.kept, [], 0
        return out


class Stager:
    """One receive: verified records appended to the staging file, progress saved durably."""

    def __init__(self, files: Files, delta_id: str, identity: dict[str, Any], *, force: bool,
                 stream_size: int | None, offset: int, reader_state: dict[str, Any] | None):
        self.files = files
        self.delta_id, self.identity, self.force, self.stream_size = delta_id, identity, force, stream_size
        self.durable = offset  # stream bytes verified and fsynced, as the progress file says
        self.written = offset  # stream bytes verified and written (maybe not yet fsynced)
        self.complete = False
        self.reader_state = reader_state  # where verification resumes
        self.state_at_written = reader_state  # the verifier's state at `written` (None before SIZE)
        # The ranges the delta writes, as the apply needs them (apply.Ranges), while this receive has
        # verified every byte of the stream itself (from byte 0); None for a continued one.
        self.ranges: _applying.Ranges | None = [] if offset == 0 else None
        dest = files.dest
        flags = os.O_WRONLY | (os.O_CREAT if offset == 0 else 0)
        self.fd = dest.folder.open(dest.staging_name, flags, 0o600)  # private: it holds the volume's data
        # Bytes past the durable point were never confirmed: drop them.
        os.ftruncate(self.fd, offset)
        os.lseek(self.fd, offset, os.SEEK_SET)
        self.writeback = Writeback(self.fd, WRITEBACK_BYTES, at=offset)
        self.last_sync = time.monotonic()

    def resume_point(self) -> dict[str, Any]:
        """The verifier's state where this receive continues: what the sender needs to carry on from
        the end of the last range held, in the version held, with the counts its END record must give."""
        state = self.reader_state or {}
        keys = ("position", "prev_end", "nrec", "ndata", "nzero", "dbytes", "zbytes")
        return {"version": state.get("version", 1), **{k: state.get(k) for k in keys}}

    def run(self, frames: FrameReader) -> None:
        tee = TeeReader(frames)
        reader = _reader.StreamReader(tee, resume=self.reader_state)
        for rec in reader:
            if rec.type == "header":
                self._check_header(rec.header or {})
            for piece in tee.take(rec.end - self.written):
                self.writeback.write(piece)
            self.written = rec.end
            if self.ranges is not None and rec.type in ("data", "zero"):
                self.ranges.append(_applying.range_of(rec))
            if reader.target_size is not None:
                # Resuming needs the header and size, so only points after SIZE are resume points.
                self.state_at_written = reader.state()
            faults.tick("receive")
            if rec.type == "end":
                self.complete = True
                self.sync()
            elif self._due():
                self.sync()

    def _check_header(self, header: dict[str, Any]) -> None:
        """The stream must be the delta announced: same id, same identity, and a size its identity names."""
        ident = header.get("identity") or {}
        if (header.get("delta_id") != self.delta_id or ident != self.identity
                or header.get("target_size") != self.identity["target_size"]):
            raise ForeignStream(f"the stream's header is for delta {header.get('delta_id')!s:.40} "
                               f"(target size {header.get('target_size')!s:.20}), not the announced "
                               f"{self.delta_id} ({self.identity['target_size']} bytes); nothing was staged")

    def _due(self) -> bool:
        return (self.written - self.durable >= SYNC_BYTES
                or time.monotonic() - self.last_sync >= SYNC_SECONDS)

    def sync(self) -> None:
        """fsync the staging file, then say so in the progress file (in that order)."""
        if self.state_at_written is None:
            return  # nothing resumable yet (before the SIZE record)
        os.fsync(self.fd)
        self.files.write_progress({"delta_id": self.delta_id, "identity": self.identity, "force": self.force,
                                   "verified": self.written, "complete": self.complete,
                                   "stream_size": self.stream_size, "reader": self.state_at_written,
                                   "updated": now()[0]})
        self.durable = self.written
        self.last_sync = time.monotonic()
        faults.tick("sync")

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


def receive(stager: Stager, frames: FrameReader) -> None:
    """Run a stager over incoming frames; stream errors become error kinds with what is verified."""
    try:
        stager.run(frames)
    except ConnectionLost:
        stager.save_quietly()
        raise
    except _stream.StreamError as e:
        stager.save_quietly()
        err = stream_error(e)
        err.extra["verified"] = stager.durable
        raise err from None
