"""The receiver protocol's bytes for both ends: JSON lines, frames, error kinds, checked fields.

The protocol itself is described in ``docs/receiver-protocol.md``.  Both the
receiver and the sending lvmirror (:mod:`lvmirror.client`) use this module,
so the framing and the error kinds exist once.  Everything that arrives from
the other end is untrusted: each field is read through a checker here that
bounds it before anything is allocated or written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, BinaryIO

from lvdeltafs.fsio import ShortRead, read_exactly

PROTOCOL_VERSION = 4
MAX_LINE = 1 << 20  # one request or reply line
MAX_FRAME = 8 << 20  # one bulk frame
FRAME = struct.Struct("<I")
MAX_SIZE = (1 << 63) - 1  # sizes and offsets: what a signed 64-bit file offset can hold
MAX_NAME = 1024  # identity strings, delta ids
IDENTITY_INTS = ("base_size", "target_size", "chunk_size")
IDENTITY_STRS = ("volume", "base", "target", "source")


# ---------------------------------------------------------------- error kinds
# Carried as {"ok": false, "error": KIND, "message": TEXT, ...}; the client
# turns each kind into the project's exception class (lvmirror.client).


class RemoteError(Exception):
    kind = "error"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "error": self.kind, "message": str(self), **self.extra}


class RefusedError(RemoteError):
    """The delta does not fit what the destination holds, or the destination is not safe to write."""

    kind = "refused"


class CorruptError(RemoteError):
    kind = "corrupt"


class TruncatedError(CorruptError):
    kind = "truncated"


class UnsupportedError(CorruptError):
    kind = "unsupported"


class NoSpaceError(RemoteError):
    kind = "nospace"


class BusyError(RemoteError):
    kind = "busy"


class ProtocolError(RemoteError):
    """A request or reply that breaks the protocol (malformed, out of bounds, unknown)."""

    kind = "protocol"


class StateError(RemoteError):
    """The destination's state or staging is damaged, or not what the request needs."""

    kind = "state"


class IoError(RemoteError):
    kind = "io"


class ConnectionLost(Exception):
    """The other end went away in the middle of a line or a frame."""


# ---------------------------------------------------------------- text


def has_control(text: str) -> bool:
    """Control characters (C0, DEL, C1): never stored, never echoed raw to a terminal."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def shown(text: str) -> str:
    """``text`` safe to print: control characters escaped."""
    return text if not has_control(text) else ascii(text)[1:-1]


def loads(raw: bytes | str, what: str) -> Any:
    """JSON from the other end or from disk; nesting too deep is malformed, not a crash."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} is not valid JSON ({str(e)[:200]})") from None


def dumps_line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------- fields


def int_field(doc: dict[str, Any], key: str, *, lo: int = 0, hi: int = MAX_SIZE,
              default: int | None = None, what: str = "request") -> int:
    """An integer field within [lo, hi]; a missing one is ``default`` (or an error without one)."""
    value = doc.get(key)
    if value is None and default is not None:
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what}: {key} must be an integer from {lo} to {hi}, "
                            f"not {shown(repr(value))[:80]}")
    return value


def str_field(doc: dict[str, Any], key: str, *, empty: bool = False, what: str = "request") -> str:
    value = doc.get(key, "" if empty else None)
    if not isinstance(value, str) or len(value) > MAX_NAME or has_control(value) or (not value and not empty):
        raise ProtocolError(f"{what}: {key} must be a printable string of at most {MAX_NAME} characters, "
                            f"not {shown(repr(value))[:80]}")
    return value


def check_identity(identity: Any, what: str = "the delta's identity") -> dict[str, Any]:
    """The seven fields of a delta's identity, each bounded; anything else in it is refused."""
    if not isinstance(identity, dict) or set(identity) != set(IDENTITY_INTS + IDENTITY_STRS):
        raise ProtocolError(f"{what} must hold exactly {', '.join(IDENTITY_STRS + IDENTITY_INTS)}")
    for key in IDENTITY_INTS:
        int_field(identity, key, what=what)
    for key in IDENTITY_STRS:
        str_field(identity, key, empty=key == "base", what=what)
    return identity


def delta_id_of(identity: dict[str, Any]) -> str:
    """A delta's id: a digest of its identity (the same rule as lvdeltafs.delta.Identity.delta_id)."""
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- the channel


class Channel:
    """JSON lines and length-prefixed frames over a pair of byte streams (either end)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO):
        self.r, self.w = rfile, wfile

    def read_message(self, what: str = "request") -> dict[str, Any] | None:
        """The next line as a JSON object; None when the input ended cleanly between lines."""
        line = self.r.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise ConnectionLost(f"{what} line too long or cut off")
        doc = loads(line, what)
        if not isinstance(doc, dict):
            raise ProtocolError(f"{what} is not a JSON object")
        return doc

    def write_message(self, doc: dict[str, Any]) -> None:
        self.w.write(dumps_line(doc))
        self.w.flush()

    def read_exactly(self, n: int) -> bytes:
        try:
            return read_exactly(self.r.read, n)
        except ShortRead as e:
            raise ConnectionLost(f"input ended inside a frame ({e.got} of {n} bytes)") from None

    def read_frame(self) -> bytes:
        """One frame's bytes; b"" is the end frame."""
        (n,) = FRAME.unpack(self.read_exactly(FRAME.size))
        if n > MAX_FRAME:
            raise ConnectionLost(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit; out of step")
        return self.read_exactly(n) if n else b""

    def write_frame(self, data: bytes | memoryview) -> None:
        self.w.write(FRAME.pack(len(data)))
        if data:
            self.w.write(data)

    def flush(self) -> None:
        self.w.flush()
