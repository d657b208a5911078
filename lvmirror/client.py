"""The sending end of the receiver protocol: requests, typed replies, and streams to send.

:class:`ReceiverClient` speaks ``docs/receiver-protocol.md`` through the same
:mod:`lvmirror.remote.wire` the receiver uses, over any pair of byte streams
(a local subprocess's pipes, an ssh channel).  Replies come back as small
typed objects, checked field by field (the far side may be hostile), and
errors the receiver reports as the project's exception classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from lvdeltafs.errors import (
    BadInput,
    Busy,
    ConnectionProblem,
    CorruptDelta,
    LvError,
    NoSpace,
    Refused,
    UnsupportedFormat,
)
from lvdeltafs.formats.reader import BlocksFile, StreamReader
from lvdeltafs.formats.stream import StreamError
from lvmirror.bwlimit import TokenBucket, estimate
from lvmirror.encoder import Resume
from lvmirror.remote import wire
from lvmirror.remote.history import Keep

log = logging.getLogger(__name__)

FRAME_BYTES = 1 << 20  # bulk bytes per frame sent
DIGEST_SIZE = 16

# The receiver's error kinds, as the project's exceptions.
ERROR_CLASSES: dict[str, type[LvError]] = {
    "refused": Refused,
    "corrupt": CorruptDelta,
    "truncated": CorruptDelta,
    "unsupported": UnsupportedFormat,
    "busy": Busy,
    "nospace": NoSpace,
    "state": BadInput,
    "protocol": LvError,
    "io": LvError,
}


# ---------------------------------------------------------------- typed replies

@dataclass(frozen=True)
class Staged:
    """A delta the receiver holds staged, verified up to ``verified`` stream bytes."""

    delta_id: str
    verified: int
    complete: bool
    identity: dict[str, Any]
    version: int = 1  # of the stream format: a resume continues in the version staged

    @property
    def target(self) -> str:
        return str(self.identity.get("target", ""))


@dataclass(frozen=True)
class Hello:
    """What the receiver says of its destination when a session starts."""

    dest: str
    kind: str
    exists: bool
    size: int
    state: dict[str, Any]  # empty when the destination holds nothing known
    recorded: dict[str, Any]  # the state as written, trusted or not (what a check compares against)
    unknown: str  # why a state it has is not trusted ("" if none)
    token: str  # names the destination's present content (the base of a compare delta)
    staged: Staged | None
    replayed: str
    problem: str
    codecs: tuple[str, ...] = ()  # what the far side's python can decompress
    history_problem: str = ""  # why the kept points cannot be read ("" if they can, or none are kept)

    @property
    def holds(self) -> str:
        """The snapshot identity the destination holds ("" when nothing known)."""
        return str(self.state.get("snapshot") or "")


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    return wire.shown(value)[:4000] if isinstance(value, str) else ""


def _state(doc: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """A state the receiver reports: the fields lvmirror acts on are checked, the rest is shown as is."""
    state = doc.get(key)
    if not isinstance(state, dict):
        return {}
    for name in ("snapshot", "volume"):
        if state.get(name) is not None:
            wire.str_field(state, name, empty=True, what=f"{what}: {key}")
    if state.get("size") is not None:
        wire.int_field(state, "size", what=f"{what}: {key}")
    return state


def parse_hello(doc: dict[str, Any]) -> Hello:
    what = "the receiver's hello"
    try:
        if doc.get("version") != wire.PROTOCOL_VERSION:
            raise wire.ProtocolError(f"{what}: protocol version {doc.get('version')!r}, expected "
                                     f"{wire.PROTOCOL_VERSION}")
        staged = None
        if isinstance(doc.get("staged"), dict):
            s = doc["staged"]
            staged = Staged(wire.str_field(s, "delta_id", what=what),
                            wire.int_field(s, "verified", what=what),
                            s.get("complete") is True, wire.check_identity(s.get("identity"), what),
                            wire.int_field(s, "version", lo=1, hi=2, default=1, what=what))
        state, recorded = (_state(doc, key, what) for key in ("state", "recorded"))
        return Hello(_text(doc, "dest"), _text(doc, "kind"), doc.get("exists") is True,
                     wire.int_field(doc, "size", what=what), state, recorded, _text(doc, "unknown"),
                     wire.str_field(doc, "token", what=what), staged, _text(doc, "replayed"),
                     _text(doc, "problem"), _codecs(doc.get("codecs")), _text(doc, "history_problem"))
    except wire.ProtocolError as e:
        raise ConnectionProblem(str(e)) from None


def _codecs(value: Any) -> tuple[str, ...]:
    """The codec names the far side lists (only plain short names are kept)."""
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value[:16] if isinstance(v, str) and v.isascii() and v.isalnum() and len(v) <= 16)


# ---------------------------------------------------------------- streams to send

class StreamSource(Protocol):
    """A delta stream the client can send from where the receiver holds it up to.

    ``size`` is None when not known before it is generated (a compressed
    stream); ``resume`` is the receiver's verifier state at ``offset``,
    which a generated stream continues from (:mod:`lvmirror.encoder`).
    """

    size: int | None

    def header(self) -> dict[str, Any]: ...

    def read_from(self, offset: int, resume: Resume | None = None) -> Iterable[bytes]: ...


class FileSource:
    """A stream file on disk (``lvmirror apply DELTA DEST``, or a `delta` file in the mount)."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)

    def header(self) -> dict[str, Any]:
        return stream_header(self)

    def read_from(self, offset: int, resume: Resume | None = None) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(FRAME_BYTES):
                yield chunk


def stream_header(source: StreamSource) -> dict[str, Any]:
    """The verified HEADER of a stream source (its identity and delta id), reading only its start."""
    blocks = source.read_from(0)
    try:
        first = next(iter(StreamReader(BlocksFile(blocks))))
    except StreamError as e:
        raise CorruptDelta(f"the delta stream to send is unusable: {e}") from None
    finally:
        close = getattr(blocks, "close", None)
        if close:
            close()
    return first.header or {}


# ---------------------------------------------------------------- the client

class ReceiverClient:
    """The receiver protocol over a reader and a writer (a subprocess's pipes, an ssh channel).

    ``where`` names the far side in messages; ``on_close`` ends the transport;
    ``diagnostics`` returns the receiver's stderr so far, if the transport
    keeps it, to explain a receiver that went away.  :meth:`set_bwlimit` caps
    the rate of the delta bytes sent (the requests and replies around them are tiny).
    """

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, where: str = "receiver",
                 on_close: Callable[[], None] | None = None, diagnostics: Callable[[], str] | None = None):
        self.chan = wire.Channel(rfile, wfile)
        self.where = where
        self.on_close = on_close
        self.diagnostics = diagnostics
        self.bytes_sent = 0  # stream bytes sent by the last send_delta
        # Stream bytes of the deltas this session sent that the far side already held verified (from an
        # interrupted run), so were not sent again.
        self.resumed_bytes = 0
        self.closed = False
        self.limit: TokenBucket | None = None
        self.local = False  # a receiver on this host (set by lvmirror.transports): never a slow link
        self.codecs: tuple[str, ...] = ()  # what the far side decompresses, from its last hello
        self.keep: Keep | None = None  # the history retention sent with each apply (None: the receiver's)

    @property
    def bwlimit(self) -> int | None:
        """The cap on the delta bytes sent, in bytes per second (None: none)."""
        return self.limit.rate if self.limit else None

    def set_bwlimit(self, rate: int | None) -> None:
        """Cap the delta bytes this session sends to ``rate`` bytes per second; None lifts the cap."""
        if not rate:
            self.limit = None
        elif self.limit:
            self.limit.set_rate(rate)
        else:
            self.limit = TokenBucket(rate)

    # -- plumbing

    def _lost(self, what: str) -> ConnectionProblem:
        extra = (self.diagnostics() if self.diagnostics else "").strip()
        tail = f": {wire.shown(extra.splitlines()[-1])}" if extra else ""
        return ConnectionProblem(f"lost the connection to the {self.where} {what}{tail}")

    def _send(self, req: dict[str, Any]) -> None:
        try:
            self.chan.write_message(req)
        except (ConnectionError, OSError) as e:
            raise self._lost(f"while sending {req.get('op')} ({_why(e)})") from None

    def _reply(self, op: str) -> dict[str, Any]:
        try:
            doc = self.chan.read_message(f"the reply to {op}")
        except (ConnectionError, OSError, wire.ConnectionLost) as e:
            raise self._lost(f"waiting for the reply to {op} ({_why(e)})") from None
        except wire.ProtocolError as e:
            raise ConnectionProblem(f"the {self.where} sent something that is not a reply: {e}") from None
        if doc is None:
            raise self._lost(f"waiting for the reply to {op}")
        if doc.get("ok") is not True:
            cls = ERROR_CLASSES.get(str(doc.get("error")), LvError)
            err = cls(_text(doc, "message") or f"the {self.where} failed without a message")
            err.reply = doc  # type: ignore[attr-defined]
            raise err
        return doc

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        self._send({"op": op, **args})
        return self._reply(op)

    # -- operations

    def hello(self) -> Hello:
        """The destination and what it holds; the receiver finishes an interrupted apply first."""
        greeting = parse_hello(self.request("hello"))
        self.codecs = greeting.codecs
        return greeting

    def send_delta(self, source: StreamSource, delta_id: str, *, force: bool = False,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Stage a delta on the receiver, sending only what it does not already hold verified.

        Asks the receiver what it holds (resume from what the receiver has
        durably, not from what this side thinks it sent), then streams from
        there.  Returns the receiver's final reply (``verified``, ``complete``).
        """
        staged = self.hello().staged
        header = source.header()
        if header.get("delta_id") != delta_id:
            raise CorruptDelta(f"the stream to send is delta {header.get('delta_id')}, not {delta_id}")
        offset = 0
        if staged is not None and staged.delta_id == delta_id:
            if staged.complete:
                self.bytes_sent = 0
                self.resumed_bytes += staged.verified
                return {"ok": True, "verified": staged.verified, "complete": True, "received": 0,
                        "delta_id": delta_id}
            offset = staged.verified
            if offset:
                of = f" of {source.size}" if source.size else " (compressed: its size is not known ahead)"
                log.info("resuming delta %s at byte %d%s: the receiver holds what comes before verified",
                         delta_id, offset, of)
        ready = self.request("receive", delta_id=delta_id, from_offset=offset,
                             identity=header.get("identity"), stream_size=source.size or 0, force=force)
        what = "the receiver's reply to receive"
        start = wire.int_field(ready, "offset", hi=source.size or wire.MAX_SIZE, what=what)
        resume = None
        if start:
            try:
                resume = Resume.from_reply(ready.get("resume"))
            except ValueError as e:
                raise ConnectionProblem(f"{what}: {e}") from None
            if resume.position != start:
                raise ConnectionProblem(f"{what}: it holds byte {start}, its state says {resume.position}")
            self.resumed_bytes += start
        return self._stream_bulk(source, start, resume, progress)

    def _stream_bulk(self, source: StreamSource, offset: int, resume: Resume | None,
                     progress: Callable[[int], None] | None) -> dict:
        """Send the stream from ``offset`` as frames; every delta byte sent anywhere goes through here.

        With a cap, each frame is at most one burst of the token bucket, paid
        for before it is written and flushed at once, so the bytes leave at
        the bucket's pace rather than whenever the writer's 1 MiB buffer fills.
        """
        self.bytes_sent = 0
        failure: BaseException | None = None
        limit = self.limit
        piece = min(FRAME_BYTES, limit.burst) if limit else FRAME_BYTES
        if limit and source.size:  # the progress line is drawn on a terminal only: say it in the log too
            log.info("to the %s: %s", self.where, estimate(source.size - offset, limit.rate))
        # A generated stream comes a record's head and payload at a time: they are sent in whole frames
        # (measured: 2 frames a record kept a local receiver's threads handing off 5000 times for 164 MiB,
        # and the sender waiting on it).
        parts: list[memoryview] = []
        held = 0
        try:
            for blk in source.read_from(offset, resume):
                view = memoryview(blk)
                while view:
                    n = min(len(view), piece - held)
                    parts.append(view[:n])
                    held, view = held + n, view[n:]
                    if held == piece:
                        self._send_frame(parts, progress)
                        parts, held = [], 0
        except (BrokenPipeError, ConnectionError) as e:
            raise self._lost(f"while sending the delta ({_why(e)})") from None
        except Exception as e:  # the source failed (disk, snapshot gone): end the bulk cleanly, then re-raise
            failure = e
        try:
            if parts:  # what was read before a failure goes too: the receiver keeps its whole records
                self._send_frame(parts, progress)
            self.chan.write_frame(b"")
            self.chan.flush()
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise self._lost(f"while sending the delta ({_why(e)})") from None
        try:
            reply = self._reply("receive")
        except BadInput:
            if failure is not None:
                raise failure from None
            raise
        if failure is not None:
            raise failure
        return reply

    def _send_frame(self, parts: list[memoryview], progress: Callable[[int], None] | None) -> None:
        """One frame of the bulk, paid for first to the cap (if any) and then flushed at once."""
        frame = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.limit:
            self.limit.take(len(frame))
        self.chan.write_frame(frame)
        if self.limit:
            self.chan.flush()
        self.bytes_sent += len(frame)
        if progress:
            progress(len(frame))

    def apply(self) -> dict[str, Any]:
        """Apply the complete staged delta; returns {"applied": delta_id, "state": new state}."""
        return self._with_warnings(self.request("apply", **self._keep()))

    def rewind(self, generation: int) -> dict[str, Any]:
        """Make the destination equal its kept point ``generation``; returns {"rewound", "state"}."""
        return self._with_warnings(self.request("rewind", to=generation, **self._keep()))

    def _keep(self) -> dict[str, Any]:
        return {"keep": self.keep.as_dict()} if self.keep else {}

    def _with_warnings(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Log what the receiver warns of (its history pruned for space, say); text from the far side is
        shown escaped and bounded."""
        warnings = reply.get("warnings")
        for text in warnings[:8] if isinstance(warnings, list) else ():
            log.warning("%s: %s", self.where, wire.shown(str(text))[:400])
        return reply

    def discard(self) -> None:
        """Set aside what is staged and what the state claims (the way out of a stuck mirror)."""
        self.request("discard")

    def digests(self, block_size: int, max_blocks: int, point: int | None = None) -> tuple[int, bytearray]:
        """(destination size, 16-byte SHA-256 prefixes of its first blocks, at most ``max_blocks``);
        of its kept point ``point`` if given.

        The far side's answer is bounded by what was asked: memory is at most
        ``max_blocks`` digests, whatever it sends.
        """
        args = {"point": point} if point is not None else {}
        head = self.request("digests", block_size=block_size, start=0, count=max_blocks, **args)
        what = f"the {self.where}'s digests"
        try:
            n = wire.int_field(head, "count", hi=max_blocks, what=what)
            size = wire.int_field(head, "size", what=what)
        except wire.ProtocolError as e:
            raise ConnectionProblem(str(e)) from None
        if n != min(max_blocks, -(-size // block_size)):
            raise ConnectionProblem(f"the {self.where} announced {n} digests for {size} bytes")
        out = self.read_frames(n * DIGEST_SIZE, "the digests")
        return size, out

    def read_frames(self, expected: int, what: str) -> bytearray:
        """The frames after a reply, up to the end frame: exactly ``expected`` bytes, never more held."""
        out = bytearray(expected)
        got = 0
        try:
            while frame := self.chan.read_frame():
                if got + len(frame) > expected:
                    raise ConnectionProblem(f"the {self.where} sent more than the {expected} bytes of {what} "
                                            "it announced")
                out[got:got + len(frame)] = frame
                got += len(frame)
        except wire.ConnectionLost as e:
            raise self._lost(f"in the middle of {what} ({e})") from None
        if got != expected:
            raise ConnectionProblem(f"the {self.where} sent {got} bytes of {what}, not {expected}")
        return out

    def close(self) -> None:
        """Say goodbye and end the transport (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._send({"op": "bye"})
            self._reply("bye")
        except LvError as e:
            log.debug("closing the %s: %s", self.where, e)  # already gone: closing is all that is left
        finally:
            if self.on_close:
                self.on_close()

    def __enter__(self) -> ReceiverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _why(e: BaseException) -> str:
    """An exception's text, never empty (some socket errors have none)."""
    return str(e) or type(e).__name__
