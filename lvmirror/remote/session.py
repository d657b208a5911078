"""One receiver session over one destination: lock, recovery, hello, receive, apply, digests, discard.

Before its first request a session takes the destination's lock and finishes
an interrupted apply, so nothing else ever sees a half-applied destination
as if it were whole.  Every request's fields are checked here, through
:mod:`.wire`, before they reach the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from lvdeltafs.formats import codecs
from lvmirror.remote import apply as applying
from lvmirror.remote import history, serving
from lvmirror.remote.destination import Destination
from lvmirror.remote.staging import ForeignStream, FrameReader, Stager, receive
from lvmirror.remote.state import WAY_OUT, Files, describe, unknown_reason
from lvmirror.remote.state import check_base as _check_base
from lvmirror.remote.wire import (
    PROTOCOL_VERSION,
    NoSpaceError,
    ProtocolError,
    RefusedError,
    RemoteError,
    StateError,
    check_identity,
    delta_id_of,
    int_field,
    str_field,
)

RECEIVER_VERSION = "0.2.0"
DIGEST_SIZE = 16
MIN_BLOCK, MAX_BLOCK = 4096, 16 << 20  # digest blocks: bounded before a buffer is allocated


class Session:
    """The engine: every request of one connection, over one destination."""

    def __init__(self, dest: str, state_dir: str | None = None):
        self.dest = Destination(dest, state_dir)
        self.files = Files(self.dest)
        self.replayed: str | None = None
        self.warnings: list[str] = []
        self.problem: str | None = None
        self._locked = False
        self._recovered = False
        # The delta this session received whole, verifying every byte, and the ranges it writes
        # (apply.apply_staged's ``verified``); cleared by anything else that touches the staging.
        self.received_whole: tuple[str, applying.Ranges] | None = None

    # -- before every request

    def start(self, op: str) -> None:
        """Hold the lock, and finish an interrupted apply first.

        A replay that fails (no space, damaged staging) is retried on each
        request; ``hello`` and ``discard`` still run, with the failure as ``problem``.
        """
        if not self._locked:
            self.dest.lock()
            self._locked = True
        if self._recovered or op == "discard":
            return
        try:
            self.recover()
        except (RemoteError, OSError) as e:
            self.problem = f"finishing the interrupted apply to {self.dest.path} failed: {e}"
            if op != "hello":
                raise
            return
        self._recovered = True
        self._sweep()

    def _sweep(self) -> None:
        """Remove undo files no state lists (a killed run's); a damaged state is reported elsewhere."""
        with contextlib.suppress(StateError):
            history.sweep(self.files, self.files.state() or {})

    def recover(self) -> None:
        state = self.files.state() or {}
        progress = self.files.progress()
        pending = state.get("applying")
        if not pending:
            if progress and progress["complete"] and progress["delta_id"] == state.get("delta_id"):
                # Killed after committing the new state, before removing the staging files.
                self.files.discard_staging()
            return
        if not (progress and progress["complete"] and progress["delta_id"] == pending["delta_id"]):
            self.problem = (f"{self.dest.path} was being updated by delta {pending['delta_id']} but that "
                            "delta is no longer staged, so the destination may be a mix of two snapshots; "
                            + WAY_OUT)
            return
        was, now = pending.get("binding"), self.dest.binding() or {}
        if was is not None and any(was.get(k) != now.get(k) for k in ("kind", "device", "dev", "ino")):
            self.problem = (f"{self.dest.path} was replaced while delta {pending['delta_id']} was being "
                            "applied to it; the staged delta does not belong on the new one; " + WAY_OUT)
            return
        old = {k: v for k, v in state.items() if k != "applying"}
        plan = pending.get("history") if isinstance(pending.get("history"), dict) else {"mode": "drop"}
        _new, warnings = applying.apply_staged(self.files, progress, old, replay=True, plan=plan)
        self.warnings += warnings
        self.replayed = pending["delta_id"]
        print(f"lvmirror receiver: finished applying delta {self.replayed} to {self.dest.path}",
              file=sys.stderr)

    # -- what the destination holds

    def known_state(self) -> tuple[dict[str, Any] | None, str]:
        """(the state, if it may be trusted for this destination, else None; why not)."""
        return self._judge(self.files.state())

    def _judge(self, state: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
        if state is not None and state.get("applying"):
            return None, self.problem or f"an apply to {self.dest.path} was interrupted"
        why = unknown_reason(state, self.dest.binding(), self.dest.path)
        return (None, why) if why else (state, "")

    def held_progress(self) -> dict[str, Any] | None:
        """The progress of the staged delta, if its staging file still holds what it says."""
        progress = self.files.progress()
        if progress and self.files.staging_size() < progress["verified"]:
            return None  # the staging file lost bytes: start that delta over
        return progress

    def staged(self) -> dict[str, Any] | None:
        progress = self.held_progress()
        keys = ("delta_id", "verified", "complete", "stream_size", "identity", "force")
        if not progress:
            return None
        return {**{k: progress[k] for k in keys}, "version": progress["reader"].get("version", 1)}

    def hello(self) -> dict[str, Any]:
        recorded = self.files.state()
        state, unknown = self._judge(recorded)
        return {"version": PROTOCOL_VERSION, "receiver_version": RECEIVER_VERSION, "dest": self.dest.path,
                "kind": self.dest.kind, "exists": self.dest.exists(), "size": self.dest.size(),
                "state": state, "recorded": recorded, "unknown": unknown, "token": self.dest.token(),
                "staged": self.staged(), "codecs": codecs.available(),
                "replayed": self.replayed, "problem": self.problem, "paths": self.dest.paths(),
                "history_problem": history.problem(self.files, state) if state else ""}

    def check_base(self, identity: dict[str, Any], delta_id: str, force: bool) -> None:
        if force:
            return
        if self.problem:
            raise RefusedError(self.problem)
        known, unknown = self.known_state()
        _check_base(identity, delta_id, known=known, unknown=unknown, dest=self.dest)

    # -- receive

    def begin_receive(self, req: dict[str, Any]) -> Stager:
        """Check a receive request; a stager that continues from what is held verified (or from 0)."""
        self.received_whole = None
        delta_id = str_field(req, "delta_id")
        offset = int_field(req, "from_offset", default=0)
        stream_size = int_field(req, "stream_size", default=0) or None
        force = req.get("force") is True
        if offset == 0:
            identity = check_identity(req.get("identity"))
            if delta_id_of(identity) != delta_id:
                raise ProtocolError(f"delta id {delta_id} is not the digest of the identity sent with it")
            self.check_base(identity, delta_id, force)
            self.files.discard_staging()
            return Stager(self.files, delta_id, identity, force=force, stream_size=stream_size, offset=0,
                          reader_state=None)
        staged = self.held_progress()
        if not staged or staged["delta_id"] != delta_id:
            raise StateError(f"cannot resume delta {delta_id} at byte {offset}: the receiver holds "
                             f"{_staged_text(staged)}; send it from byte 0", verified=0)
        if offset != staged["verified"] or staged["complete"]:
            held = f"{staged['verified']}{' (complete)' if staged['complete'] else ''}"
            raise StateError(f"cannot resume delta {delta_id} at byte {offset}: the receiver holds it "
                             f"verified up to byte {held}; resume from there", verified=staged["verified"])
        self.check_base(staged["identity"], delta_id, staged["force"] or force)
        return Stager(self.files, delta_id, staged["identity"], force=staged["force"] or force,
                      stream_size=staged["stream_size"], offset=offset, reader_state=staged["reader"])

    def receive(self, stager: Stager, frames: FrameReader) -> dict[str, Any]:
        """Verify and stage what arrives; the reply says how much is held verified (begin_receive cleared
        ``received_whole``)."""
        try:
            receive(stager, frames)
            if stager.complete and stager.ranges is not None:
                self.received_whole = (stager.delta_id, stager.ranges)
        except ForeignStream:
            stager.close()
            self.files.discard_staging()
            raise
        except OSError as e:
            stager.save_quietly()
            if e.errno in applying.NOSPACE:
                need = (stager.stream_size or 0) - stager.durable
                raise NoSpaceError(
                    f"no space left on {self.dest.path}'s filesystem for the staged delta (needs "
                    f"{max(need, 0)} more bytes in {self.dest.where(self.dest.staging_name)}): free space "
                    f"and run again; nothing was applied (the {stager.durable} bytes verified so far are "
                    "kept and the next run continues from there)", verified=stager.durable) from None
            raise
        finally:
            stager.close()
        return {"verified": stager.durable, "complete": stager.complete, "received": frames.received,
                "delta_id": stager.delta_id}

    # -- apply

    def apply(self, req: dict[str, Any]) -> dict[str, Any]:
        keep = history.Keep.from_request(req.get("keep"))
        progress = self.files.progress()
        if not progress:
            raise StateError(f"nothing is staged for {self.dest.path}: send a delta first")
        if not progress["complete"]:
            raise StateError(f"delta {progress['delta_id']} is staged only up to byte {progress['verified']} "
                             f"of {progress.get('stream_size') or '?'}: send the rest before applying")
        self.check_base(progress["identity"], progress["delta_id"], progress["force"])
        state = self.files.state() or {}
        whole, self.received_whole = self.received_whole, None
        verified = whole[1] if whole and whole[0] == progress["delta_id"] else None
        new, warnings = applying.apply_staged(self.files, progress, state, replay=False, keep=keep,
                                              verified=verified)
        self.problem = None
        return {"applied": progress["delta_id"], "state": new, "warnings": self._take_warnings(warnings)}

    def _take_warnings(self, more: list[str]) -> list[str]:
        out, self.warnings = self.warnings + more, []
        return out

    # -- history

    def rewind(self, req: dict[str, Any]) -> dict[str, Any]:
        """Make the destination equal a kept point, through a staged apply (a killed rewind is replayed)."""
        generation = int_field(req, "to")
        self.received_whole = None  # the rewind stages a delta of its own
        keep = history.Keep.from_request(req.get("keep"))
        if self.problem:
            raise RefusedError(self.problem)
        state, unknown = self.known_state()
        if not state or not state.get("snapshot"):
            raise RefusedError(f"cannot rewind {self.dest.path}: "
                               f"{unknown or 'it holds nothing lvmirror knows of'}; nothing was changed")
        entries = history.rewind_layers(self.files, state, generation)
        base_fd = self.dest.open_read()
        try:
            composed, fds = history.compose(self.files, base_fd, entries)
            try:
                progress = history.stage_rewind(self.files, state, entries, composed)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            os.close(base_fd)
        new, warnings = applying.apply_staged(self.files, progress, state, replay=False, keep=keep,
                                              plan={"mode": "rewind", "to": generation})
        return {"rewound": generation, "state": new, "warnings": self._take_warnings(warnings)}

    # -- the way out

    def discard(self) -> dict[str, Any]:
        """Set aside what is staged and what the state claims: the destination then holds nothing known.

        Works whatever the state and progress files hold (they may be the damage).
        """
        try:
            held = describe(self.files.state() or {})
        except StateError:
            held = "a damaged state"
        self.received_whole = None
        self.files.discard_staging()
        self.files.write_state({"unknown": f"`lvmirror discard` set aside what {self.dest.path} was recorded "
                                           f"to hold ({held}); its content is unknown until a resync"})
        self.problem = None
        self._recovered = True
        self._sweep()  # the history described bytes that are no longer known
        return {"discarded": True}

    # -- digests

    def digests(self, req: dict[str, Any]) -> Iterator[Any]:
        """Yield (size, n), then the digests in chunks: SHA-256[:16] of each block (of a kept point, with
        ``point``)."""
        block_size = int_field(req, "block_size", lo=MIN_BLOCK, hi=MAX_BLOCK)
        start = int_field(req, "start", default=0)
        count = None if req.get("count") is None else int_field(req, "count")
        if start % block_size:
            raise ProtocolError(f"digest start {start} is not a multiple of the block size {block_size}")
        with self.point_source(req) as src:
            end = src.size if count is None else min(src.size, start + count * block_size)
            n = max(0, -(-(end - start) // block_size))
            yield src.size, n
            out = bytearray()
            for off in range(start, end, block_size):
                want = min(block_size, end - off)
                data = src.read(off, want)
                if len(data) != want:
                    raise StateError(f"{self.dest.path} ended early near byte {off} while reading it")
                out += hashlib.sha256(data).digest()[:DIGEST_SIZE]
                if len(out) >= 1 << 16:
                    yield bytes(out)
                    out.clear()
            if out:
                yield bytes(out)

    # -- serving a point (restore)

    def point_source(self, req: dict[str, Any]) -> serving.PointSource:
        """The destination's content, or that of the kept point ``req["point"]``."""
        generation = serving.point_of(req)
        state = None
        if generation is not None:
            if self.problem:
                raise RefusedError(self.problem)
            state, unknown = self.known_state()
            if not state:
                why = unknown or "no state"
                raise RefusedError(f"{self.dest.path} holds nothing lvmirror knows of ({why}), so its points "
                                   "cannot be read")
        return serving.PointSource(self.files, state, generation)

    def changed_ranges(self, req: dict[str, Any]) -> Iterator[Any]:
        with self.point_source(req) as src:
            gen = serving.changed_frames(src)
            yield src.size, next(gen)
            yield from gen

    def read(self, req: dict[str, Any]) -> Iterator[Any]:
        with self.point_source(req) as src:
            ranges = serving.read_ranges(req, src.size)
            yield sum(n for _, n in ranges)
            yield from serving.read_frames(src, ranges)


def _staged_text(staged: dict[str, Any] | None) -> str:
    if not staged:
        return "nothing staged"
    return f"delta {staged['delta_id']} verified up to byte {staged['verified']}"

