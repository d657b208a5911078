"""How lvmirror reaches a receiver: the client side of the receiver protocol, and the transports.

:class:`ReceiverClient` speaks the protocol documented in
:mod:`lvmirror.receiver` over any pair of byte streams, so the local
transport (the receiver in a subprocess) and the ssh transport (the receiver
shipped over an ssh channel and run with the far side's python3) share it.
Errors the receiver reports come back as :mod:`lvdeltafs.errors` classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
from lvdeltafs.formats.stream import StreamError, StreamLayout, StreamReader
from lvmirror.receiver import FRAME, MAX_LINE

log = logging.getLogger(__name__)

FRAME_BYTES = 1 << 20  # bulk bytes per frame sent

# The receiver's error kinds, as the project's exceptions.
ERROR_CLASSES: dict[str, type[LvError]] = {
    "refused": Refused,
    "corrupt": CorruptDelta,
    "truncated": CorruptDelta,
    "unsupported": UnsupportedFormat,
    "busy": Busy,
    "nospace": NoSpace,
    "state": LvError,
    "protocol": LvError,
    "io": LvError,
}


class StreamSource(Protocol):
    """A delta stream the client can send from any record boundary."""

    size: int

    def read_from(self, offset: int) -> Iterable[bytes]: ...


class BytesSource:
    """A stream held in memory (tests, small repairs)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def read_from(self, offset: int) -> Iterator[bytes]:
        view = memoryview(self.data)
        for p in range(offset, self.size, FRAME_BYTES):
            yield bytes(view[p:p + FRAME_BYTES])


class FileSource:
    """A stream file on disk (``lvmirror apply DELTA DEST``, or a `delta` file in the mount)."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)

    def read_from(self, offset: int) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(FRAME_BYTES):
                yield chunk


class LayoutSource:
    """A stream generated on the fly from its layout and a reader of the target (the sync pipeline)."""

    def __init__(self, layout: StreamLayout, read: Callable[[int, int], bytes]):
        self.layout, self.read = layout, read
        self.size = layout.size

    def read_from(self, offset: int) -> Iterator[bytes]:
        return self.layout.blocks(self.read, offset)


class _IterFile(io.RawIOBase):
    """A read-only file over an iterator of bytes blocks (to read a stream's header)."""

    def __init__(self, blocks: Iterable[bytes]):
        self.blocks = iter(blocks)
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self.buf) < max(n, 1):
            blk = next(self.blocks, None)
            if blk is None:
                break
            self.buf += blk
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out


def stream_header(source: StreamSource) -> dict[str, Any]:
    """The verified HEADER of a stream source (its identity and delta id), reading only its start."""
    blocks = source.read_from(0)
    try:
        first = next(iter(StreamReader(_IterFile(blocks))))
    except StreamError as e:
        raise CorruptDelta(f"the delta stream to send is unusable: {e}") from None
    finally:
        close = getattr(blocks, "close", None)
        if close:
            close()
    return first.header or {}


class ReceiverClient:
    """The receiver protocol over a reader and a writer (a subprocess's pipes, an ssh channel).

    ``where`` names the far side in messages; ``on_close`` ends the transport;
    ``diagnostics`` returns the receiver's stderr so far, if the transport
    keeps it, to explain a receiver that went away.
    """

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, where: str = "receiver",
                 on_close: Callable[[], None] | None = None,
                 diagnostics: Callable[[], str] | None = None):
        self.r, self.w = rfile, wfile
        self.where = where
        self.on_close = on_close
        self.diagnostics = diagnostics
        self.bytes_sent = 0  # stream bytes sent by the last send_delta
        self.closed = False

    # -- protocol plumbing

    def _lost(self, what: str) -> ConnectionProblem:
        extra = (self.diagnostics() if self.diagnostics else "").strip()
        tail = f": {extra.splitlines()[-1]}" if extra else ""
        return ConnectionProblem(f"lost the connection to the {self.where} {what}{tail}")

    def _send(self, req: dict) -> None:
        try:
            self.w.write(json.dumps(req, separators=(",", ":")).encode() + b"\n")
            self.w.flush()
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise self._lost(f"while sending {req.get('op')} ({e})") from None

    def _reply(self, op: str) -> dict:
        try:
            line = self.r.readline(MAX_LINE + 1)
        except (ConnectionError, OSError) as e:
            raise self._lost(f"waiting for the reply to {op} ({e})") from None
        if not line:
            raise self._lost(f"waiting for the reply to {op}")
        try:
            doc = json.loads(line)
        except ValueError:
            raise ConnectionProblem(f"the {self.where} sent something that is not a reply: {line[:120]!r}") \
                from None
        if not doc.get("ok"):
            cls = ERROR_CLASSES.get(doc.get("error", ""), LvError)
            err = cls(doc.get("message") or f"the {self.where} failed without a message")
            err.reply = doc  # type: ignore[attr-defined]
            raise err
        return doc

    def request(self, op: str, **args: Any) -> dict:
        self._send({"op": op, **args})
        return self._reply(op)

    def _frame(self, data: bytes | memoryview) -> None:
        self.w.write(FRAME.pack(len(data)))
        if data:
            self.w.write(data)

    def _read_exact(self, n: int) -> bytes:
        buf = self.r.read(n)
        while len(buf) < n:
            more = self.r.read(n - len(buf))
            if not more:
                raise self._lost("in the middle of a reply")
            buf += more
        return buf

    def _read_frames(self) -> Iterator[bytes]:
        while True:
            (n,) = FRAME.unpack(self._read_exact(FRAME.size))
            if not n:
                return
            yield self._read_exact(n)

    # -- operations

    def hello(self) -> dict:
        """Version, destination kind and size, state, staged delta; replays an interrupted apply first."""
        return self.request("hello")

    def state(self) -> dict | None:
        return self.request("state")["state"]

    def send_delta(self, source: StreamSource, delta_id: str, *, force: bool = False,
                   progress: Callable[[int], None] | None = None) -> dict:
        """Stage a delta on the receiver, sending only what it does not already hold verified.

        Asks the receiver what it holds (resume from what the receiver has
        durably, not from what this side thinks it sent), then streams from
        there.  Returns the receiver's final reply (``verified``, ``complete``).
        """
        staged = self.hello().get("staged") or {}
        header = stream_header(source)
        if header.get("delta_id") != delta_id:
            raise CorruptDelta(f"the stream to send is delta {header.get('delta_id')}, not {delta_id}")
        offset = 0
        if staged.get("delta_id") == delta_id:
            if staged.get("complete"):
                self.bytes_sent = 0
                return {"ok": True, "verified": staged["verified"], "complete": True, "received": 0,
                        "delta_id": delta_id}
            offset = int(staged.get("verified") or 0)
            if offset:
                log.info("resuming delta %s at byte %d of %d: the receiver holds the rest verified",
                         delta_id, offset, source.size)
        ready = self.request("receive", delta_id=delta_id, from_offset=offset, identity=header["identity"],
                             stream_size=source.size, force=force)
        return self._stream_bulk(source, int(ready["offset"]), progress)

    def _stream_bulk(self, source: StreamSource, offset: int,
                     progress: Callable[[int], None] | None) -> dict:
        self.bytes_sent = 0
        failure: BaseException | None = None
        try:
            for blk in source.read_from(offset):
                view = memoryview(blk)
                for p in range(0, len(view), FRAME_BYTES):
                    self._frame(view[p:p + FRAME_BYTES])
                self.bytes_sent += len(blk)
                if progress:
                    progress(len(blk))
        except (BrokenPipeError, ConnectionError) as e:
            raise self._lost(f"while sending the delta ({e})") from None
        except Exception as e:  # the source failed (disk, snapshot gone): end the bulk cleanly, then re-raise
            failure = e
        try:
            self._frame(b"")
            self.w.flush()
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise self._lost(f"while sending the delta ({e})") from None
        try:
            reply = self._reply("receive")
        except BadInput:
            if failure is not None:
                raise failure from None
            raise
        if failure is not None:
            raise failure
        return reply

    def apply(self) -> dict:
        """Apply the complete staged delta; returns {"applied": delta_id, "state": new state}."""
        return self.request("apply")

    def write_blocks(self, source: StreamSource, delta_id: str, *, force: bool = False) -> dict:
        """A repair: just another delta (source "compare"), through the same receive and apply."""
        self.send_delta(source, delta_id, force=force)
        return self.apply()

    def digests(self, block_size: int, start: int = 0, count: int | None = None) -> tuple[int, bytes]:
        """(destination size, 16-byte SHA-256 prefixes of its blocks from ``start``), computed there."""
        head = self.request("digests", block_size=block_size, start=start, count=count)
        raw = b"".join(self._read_frames())
        if len(raw) != head["count"] * 16:
            raise ConnectionProblem(f"the {self.where} sent {len(raw)} digest bytes for "
                                    f"{head['count']} blocks")
        return int(head["size"]), raw

    def close(self) -> None:
        """Say goodbye and end the transport (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._send({"op": "bye"})
            self._reply("bye")
        except LvError:
            pass  # already gone: closing is all that is left
        finally:
            if self.on_close:
                self.on_close()

    def __enter__(self) -> ReceiverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalTransport:
    """The receiver in a subprocess on this host: ``python -m lvmirror.receiver DEST``.

    One subprocess per session; ``connect()`` starts it and returns the client.
    ``env`` adds environment variables (the fault tests' kill hook).
    """

    def __init__(self, dest: str, state_dir: str | None = None, *, env: dict[str, str] | None = None):
        self.dest, self.state_dir, self.env = dest, state_dir, env
        self.proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self.client: ReceiverClient | None = None

    def argv(self) -> list[str]:
        cmd = [sys.executable, "-m", "lvmirror.receiver", self.dest]
        if self.state_dir:
            cmd += ["--state-dir", self.state_dir]
        return cmd

    def connect(self) -> ReceiverClient:
        if self.client is not None:
            return self.client
        # stderr to a file, never a pipe nobody reads (a full pipe would stall the receiver).
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _end()
        env = {**os.environ, **(self.env or {})}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env)
        self.client = ReceiverClient(self.proc.stdout, self.proc.stdin, where=f"receiver for {self.dest}",
                                     on_close=self._end, diagnostics=self.diagnostics)
        return self.client

    def diagnostics(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _end(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        else:
            self._end()

    def __enter__(self) -> ReceiverClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SshTransport:
    """The receiver shipped over ssh and run with the far host's python3 (see :mod:`lvmirror.ssh`).

    ``url`` is ``ssh://[user@]host[:port]/path`` (or a parsed config Destination); ``key`` the
    private key (default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa); ``known_hosts`` the file the host
    key must be in (default ~/.ssh/known_hosts).  ``state_dir`` is a folder on the far host.
    One connection and one channel per session; ``connect()`` returns the client.
    """

    def __init__(self, url: Any, key: str | None = None, known_hosts: str | None = None, *,
                 state_dir: str | None = None, remote_python: str = "python3", compress: bool = False,
                 timeout: float = 20.0):
        from lvmirror.ssh import parse_ssh_url

        self.dest = parse_ssh_url(url) if isinstance(url, str) else url
        self.key, self.known_hosts, self.state_dir = key, known_hosts, state_dir
        self.remote_python, self.compress, self.timeout = remote_python, compress, timeout
        self.link: Any = None
        self.client: ReceiverClient | None = None

    def argv(self) -> list[str]:
        """The receiver's arguments: sent as data over the channel, never through the remote shell."""
        return [self.dest.path, *(["--state-dir", self.state_dir] if self.state_dir else [])]

    def connect(self) -> ReceiverClient:
        if self.client is not None:
            return self.client
        from lvmirror.ssh import open_link  # paramiko is imported only when a destination needs it

        self.link = open_link(self.dest, key=self.key, known_hosts=self.known_hosts, argv=self.argv(),
                              remote_python=self.remote_python, compress=self.compress,
                              timeout=self.timeout)
        self.client = ReceiverClient(self.link.reader, self.link.writer,
                                     where=f"receiver on {self.dest.host} for {self.dest.path}",
                                     on_close=self.link.close, diagnostics=self.link.stderr_tail)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        elif self.link is not None:
            self.link.close()

    def __enter__(self) -> ReceiverClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
