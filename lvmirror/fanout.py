"""One read of a snapshot, sent to several destinations: a reader shared by several streams.

Destinations that hold the same base get the same delta.  Each is sent its
own :class:`~lvmirror.encoder.DeltaStream` (its own compression policy, its
own resume point, its own link speed), but the data they carry is read from
the snapshot once: :class:`SharedRead` reads the delta's pieces in stream
order in one thread and keeps each piece until every consumer still in the
run has taken it.

Invariants:

- Each piece is read from the source once while its consumers read in
  stream order (a consumer asking for a piece outside that order, or again,
  is served by a read of its own, counted in ``extra_bytes``).
- At most ``limit`` bytes are held (plus one piece): the reader waits while
  the slowest consumer lags that far behind the fastest.
- A consumer that fails is dropped (:meth:`Consumer.close`): what it had
  not taken is freed and it holds the others back no longer; its workers
  waiting for a piece get an error at once.
- No deadlock: the reader reads in the order every consumer's workers ask
  (a DeltaStream builds its batches in order, on a FIFO pool), so the piece
  a stalled consumer needs next is always either held or the next to read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from lvdeltafs.delta import TargetReader
from lvmirror.encoder import DeltaStream, Resume

log = logging.getLogger(__name__)

LIMIT = 64 << 20  # bytes held for consumers that lag behind the fastest


class Dropped(OSError):
    """Raised in a consumer's workers once it has been dropped (its send failed or ended)."""


class SharedRead:
    """The pieces of one delta's target, read once in stream order, for every registered consumer."""

    def __init__(self, target: TargetReader, pieces: list[tuple[int, int]], limit: int = LIMIT):
        self.target = target
        self.pieces = pieces
        self.index = {p: i for i, p in enumerate(pieces)}
        self.limit = limit
        self.bytes_read = 0  # by the shared reader: each piece once
        self.extra_bytes = 0  # read again, for a consumer asking outside the shared order
        self.peak = 0  # the most bytes held at once
        self._cond = threading.Condition()
        self._held: dict[int, tuple[bytes, set[int]]] = {}  # piece index -> data, consumers yet to take it
        self._held_bytes = 0
        self._next = 0  # pieces before this one have been read (or skipped: nobody needed them)
        self._error: BaseException | None = None
        self._starts: dict[int, int] = {}  # consumer id -> the target offset it starts from
        self._ids = 0
        self._thread: threading.Thread | None = None

    @classmethod
    def for_stream(cls, target: TargetReader, stream: DeltaStream, limit: int = LIMIT) -> SharedRead:
        return cls(target, list(stream.data_pieces()), limit)

    @property
    def source_bytes(self) -> int:
        """Every byte read from the source, shared or not."""
        return self.bytes_read + self.extra_bytes

    def consumer(self, name: str = "") -> Consumer:
        """A new consumer; register them all before any reads (a piece read is kept only for those known)."""
        with self._cond:
            self._ids += 1
            self._starts[self._ids] = 0
            return Consumer(self, self._ids, name)

    # -- the reader thread

    def _start(self) -> None:
        # Called with the lock held, by the first consumer that asks for a piece.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fanout-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for i, (off, n) in enumerate(self.pieces):
            with self._cond:
                # The leader waits while the slowest lags: held bytes stay bounded.
                while self._starts and self._held_bytes and self._held_bytes + n > self.limit:
                    self._cond.wait()
                if not self._starts:
                    return  # every consumer is done or dropped
                wanted = any(start <= off for start in self._starts.values())
            data = b""
            if wanted:
                try:
                    data = self.target.pread(off, n)
                except BaseException as e:  # handed to the consumers, which raise it in their own threads
                    with self._cond:
                        self._error = e
                        self._cond.notify_all()
                    return
            with self._cond:
                if wanted:
                    self.bytes_read += n
                    # Recomputed: a consumer may have been dropped, or started later, meanwhile.
                    takers = {c for c, start in self._starts.items() if start <= off}
                    if takers:
                        self._held[i] = (data, takers)
                        self._held_bytes += n
                        self.peak = max(self.peak, self._held_bytes)
                self._next = i + 1
                self._cond.notify_all()

    # -- what consumers call

    def _begin(self, cid: int, start: int) -> None:
        """The consumer's stream starts at target offset ``start``: it will not ask for what lies before."""
        with self._cond:
            if cid in self._starts:
                self._starts[cid] = start
                for i in [i for i, (_, takers) in self._held.items() if cid in takers
                          and self.pieces[i][0] < start]:
                    self._take(i, cid)
                self._cond.notify_all()

    def _take(self, i: int, cid: int) -> bytes:
        data, takers = self._held[i]
        takers.discard(cid)
        if not takers:
            del self._held[i]
            self._held_bytes -= len(data)
            self._cond.notify_all()
        return data

    def _read(self, cid: int, offset: int, length: int) -> bytes:
        i = self.index.get((offset, length))
        if i is not None:
            with self._cond:
                self._start()
                while self._next <= i and self._error is None and cid in self._starts:
                    self._cond.wait()
                if cid not in self._starts:
                    raise Dropped(5, "this destination's send was stopped")
                held = self._held.get(i)
                if held is not None and cid in held[1]:
                    return self._take(i, cid)
                if self._error is not None and self._next <= i:
                    raise self._error
        # Outside the shared order (or asked again): a read of its own, so it is never refused.
        data = self.target.pread(offset, length)
        with self._cond:
            self.extra_bytes += length
        return data

    def _drop(self, cid: int) -> None:
        with self._cond:
            if self._starts.pop(cid, None) is None:
                return
            for i in [i for i, (_, takers) in self._held.items() if cid in takers]:
                self._take(i, cid)
            self._cond.notify_all()

    def close(self) -> None:
        """Drop every consumer and stop the reader (the source itself is closed by its owner)."""
        with self._cond:
            for cid in list(self._starts):
                self._starts.pop(cid)
            self._held.clear()
            self._held_bytes = 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


class Consumer:
    """One destination's reader of the shared pieces: a TargetReader for its Delta."""

    def __init__(self, shared: SharedRead, cid: int, name: str):
        self.shared, self.cid, self.name = shared, cid, name

    def pread(self, offset: int, length: int) -> bytes:
        return self.shared._read(self.cid, offset, length)

    def close(self) -> None:
        """Done with the pieces (a send ended, well or not): the others no longer wait for this one."""
        self.shared._drop(self.cid)


class ConsumerStream:
    """A DeltaStream reading through a :class:`Consumer`: tells it where it starts, drops it at the end.

    The consumer is dropped before the stream's worker pool is shut down:
    workers waiting for a piece then return at once instead of holding up the
    shutdown (and the shared reader) when the send breaks off.
    """

    def __init__(self, stream: DeltaStream, consumer: Consumer):
        self.stream, self.consumer = stream, consumer
        self.size = stream.size

    def header(self) -> dict[str, Any]:
        return self.stream.header()

    def read_from(self, offset: int, resume: Resume | None = None) -> Iterator[bytes]:
        self.consumer.shared._begin(self.consumer.cid, resume.prev_end if offset and resume else 0)
        inner = self.stream.read_from(offset, resume)
        try:
            # Not `yield from`: that would close the inner stream (and wait for its workers) before the
            # finally below drops the consumer those workers may be waiting on.
            for block in inner:  # noqa: UP028
                yield block
        finally:
            self.consumer.close()
            inner.close()
