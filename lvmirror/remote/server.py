"""The receiver's request loop and entry point: requests in, replies out, every error a reply.  Stdlib only.

    (bundle) lvmirror.remote.server DEST [--state-dir DIR]

Requests arrive on stdin, replies leave on stdout (kept private: anything
printed by accident goes to stderr); the protocol is ``docs/receiver-protocol.md``.
A malformed request gets an error reply and the session goes on; a broken
link ends it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, BinaryIO

from lvmirror.remote.session import Session
from lvmirror.remote.staging import FrameReader
from lvmirror.remote.wire import BusyError, Channel, ConnectionLost, IoError, ProtocolError, RemoteError

OPS = ("hello", "receive", "apply", "rewind", "digests", "ranges", "read", "discard", "bye")


class Server:
    def __init__(self, session: Session | None, chan: Channel, failure: RemoteError | None = None):
        self.session, self.chan, self.failure = session, chan, failure

    def serve(self) -> int:
        while True:
            try:
                req = self.chan.read_message()
            except ProtocolError as e:
                self.chan.write_message(e.reply())
                continue
            except ConnectionLost:
                return 1
            if req is None:
                return 0
            op = req.get("op")
            if op == "bye":
                self.chan.write_message({"ok": True})
                return 0
            try:
                self.handle(op, req)
            except ConnectionLost:
                return 1
            except RemoteError as e:
                self.chan.write_message(e.reply())
                if isinstance(e, BusyError):
                    return 1
            except OSError as e:
                where = self.session.dest.path if self.session else "the destination"
                self.chan.write_message(IoError(f"{where}: {e}").reply())
            except Exception as e:  # a bug of ours: say so to the sender, then end the session cleanly
                self.chan.write_message(RemoteError(f"internal error in the receiver ({type(e).__name__}: "
                                                    f"{str(e)[:200]}); nothing more was done").reply())
                return 1

    def handle(self, op: Any, req: dict[str, Any]) -> None:
        if op not in OPS:
            raise ProtocolError(f"unknown request {str(op)[:40]!r} (receiver protocol: {', '.join(OPS)})")
        if self.session is None:
            assert self.failure is not None
            raise self.failure  # the destination itself was refused: every request says why
        self.session.start(op)
        if op == "hello":
            self.chan.write_message({"ok": True, **self.session.hello()})
        elif op == "receive":
            self.receive(req)
        elif op == "apply":
            self.chan.write_message({"ok": True, **self.session.apply(req)})
        elif op == "rewind":
            self.chan.write_message({"ok": True, **self.session.rewind(req)})
        elif op == "digests":
            self.digests(req)
        elif op == "ranges":
            gen = self.session.changed_ranges(req)
            size, count = next(gen)
            self.frames({"ok": True, "size": size, "count": count}, gen)
        elif op == "read":
            gen = self.session.read(req)
            self.frames({"ok": True, "bytes": next(gen)}, gen)
        elif op == "discard":
            self.chan.write_message({"ok": True, **self.session.discard()})

    def receive(self, req: dict[str, Any]) -> None:
        assert self.session is not None
        stager = self.session.begin_receive(req)
        ready: dict[str, Any] = {"ok": True, "ready": True, "offset": stager.written}
        if stager.written:
            ready["resume"] = stager.resume_point()  # what a generated stream continues from
        self.chan.write_message(ready)
        frames = FrameReader(self.chan)
        try:
            result = self.session.receive(stager, frames)
        finally:
            if not frames.ended:
                frames.drain()
        self.chan.write_message({"ok": True, **result})

    def digests(self, req: dict[str, Any]) -> None:
        assert self.session is not None
        gen = self.session.digests(req)
        size, n = next(gen)
        self.frames({"ok": True, "count": n, "size": size, "digest": "sha256/16"}, gen)

    def frames(self, head: dict[str, Any], chunks: Any) -> None:
        """A reply, then its frames, then the end frame.  Everything that can fail is checked before the
        reply (the generators do their checks before their first yield)."""
        self.chan.write_message(head)
        for chunk in chunks:
            self.chan.write_frame(chunk)
        self.chan.write_frame(b"")
        self.chan.flush()


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lvmirror-receiver", description="lvmirror's receiver")
    ap.add_argument("dest")
    ap.add_argument("--state-dir", default=None)
    args = ap.parse_args(argv)
    if stdout is None:
        # Keep the protocol channel private: anything printed by accident goes to stderr.
        out_fd = os.dup(1)
        os.dup2(2, 1)
        stdout = os.fdopen(out_fd, "wb")
    chan = Channel(stdin if stdin is not None else sys.stdin.buffer, stdout)
    try:
        session = Session(args.dest, args.state_dir)
    except RemoteError as e:
        return Server(None, chan, e).serve()
    except OSError as e:
        return Server(None, chan, IoError(f"{args.dest}: {e}")).serve()
    return Server(session, chan).serve()


if __name__ == "__main__":
    sys.exit(main())
