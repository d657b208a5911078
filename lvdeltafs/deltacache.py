"""Deltas of the pairs, opened on first need and kept in a bounded cache, each target held open only in use.

A delta is opened on first need (a lookup or listing inside a pair
directory).  The target device is held open only while some file of the pair
is open, so ``lvremove`` of an idle snapshot works while mounted; before the
target is reopened, the cache's ``check`` (see :class:`lvdeltafs.vfs.Vfs`)
makes sure its snapshots are still there and valid.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lvdeltafs.delta import Delta, FileReader
from lvdeltafs.formats.files import DeltaFiles
from lvdeltafs.freshness import Stamp, changed_side, check_unchanged_while_opening, stamps_of

log = logging.getLogger(__name__)

FAILURE_TTL = 2.0       # seconds a failed delta open is remembered, so a loop of stats cannot hammer LVM
LIVE_TTL = 2.0          # seconds an idle delta against the live origin is reused before it is recomputed
DEFAULT_CACHE = 16


@dataclass
class PairSpec:
    """How to open one pair's delta; ``key`` names it in the cache and in inode numbers."""

    key: tuple
    base: str
    target: str
    opener: Callable[[], Delta]
    live: bool = False          # the target is the live origin: the delta goes stale
    mtime_ns: int = 0           # when the newer side was taken
    sources: tuple[str, ...] = ()  # base, target: device nodes or images, for ownership and stamps
    watch: bool = False         # image files of --pair: may change in place (see Stamp)


@dataclass
class CacheEntry:
    spec: PairSpec
    delta: Delta
    files: DeltaFiles
    opened_at: float
    stamps: tuple[Stamp | None, ...] = ()  # of spec.sources, before the delta was computed
    refs: int = 0
    evicted: bool = False
    changed: bool = False       # a source moved since: said once in the log
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mtime_ns(self) -> int:
        """The newer side's mtime as the delta saw it (for images), else when it was taken."""
        newest = self.stamps[-1] if self.stamps else None
        return newest.mtime_ns if newest else self.spec.mtime_ns


class DeltaCache:
    """At most ``capacity`` idle deltas; an entry with open files is never closed under a reader."""

    def __init__(self, capacity: int = DEFAULT_CACHE, *, check: Callable[[Delta], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = max(1, capacity)
        self.check = check or (lambda d: None)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, CacheEntry] = OrderedDict()
        self._opening: dict[tuple, threading.Lock] = {}
        self._failures: dict[tuple, tuple[float, BaseException]] = {}

    def get(self, spec: PairSpec) -> CacheEntry:
        """The entry for ``spec``, opening its delta if needed (one thread opens, others wait)."""
        with self._lock:
            entry = self._fresh(spec.key)
            if entry is not None:
                return entry
            gate = self._opening.setdefault(spec.key, threading.Lock())
        with gate:
            with self._lock:
                entry = self._fresh(spec.key)
                if entry is not None:
                    return entry
                failed = self._failures.get(spec.key)
                if failed and self.clock() - failed[0] < FAILURE_TTL:
                    raise failed[1]
            return self._open(spec)

    def _fresh(self, key: tuple) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stale = entry.spec.live and entry.refs == 0 and self.clock() - entry.opened_at > LIVE_TTL
        if stale or self.changed(entry):
            self._evict(key)  # readers of the old entry keep it until they close
            return None
        self._entries.move_to_end(key)
        return entry

    def changed(self, entry: CacheEntry) -> bool:
        """Has an image of the pair changed since its delta was computed?  Logs it once."""
        if not entry.spec.watch:
            return False
        now = stamps_of(entry.spec)
        if now == entry.stamps:
            return False
        with entry.lock:
            first, entry.changed = not entry.changed, True
        if first:
            log.warning("%s changed since the delta from %s to %s was computed (its size, times or "
                        "inode differ): the delta is computed again at the next lookup; files of the "
                        "pair opened before now fail reads with EIO: close and reopen them",
                        changed_side(entry.spec, entry.stamps, now), entry.spec.base, entry.spec.target)
        return True

    def _open(self, spec: PairSpec) -> CacheEntry:
        log.info("opening delta %s..%s", spec.base, spec.target)
        try:
            before = stamps_of(spec)
            delta = spec.opener()
            check_unchanged_while_opening(spec, before, delta)
        except BaseException as e:
            with self._lock:
                self._failures[spec.key] = (self.clock(), e)
            raise
        # Let go of the target until a file is opened: an idle mount must not keep
        # snapshots busy (lvremove refuses an open device).
        delta.target.close()
        entry = CacheEntry(spec, delta, DeltaFiles(delta), self.clock(), stamps=before)
        with self._lock:
            self._failures.pop(spec.key, None)
            self._entries[spec.key] = entry
            while len(self._entries) > self.capacity:
                idle = next((k for k, e in self._entries.items() if e.refs == 0 and k != spec.key), None)
                if idle is None:
                    break
                self._evict(idle)
        return entry

    def _evict(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        with entry.lock:  # not while a file is being opened on it
            entry.evicted = True
            if entry.refs == 0:
                entry.delta.close()

    def acquire(self, entry: CacheEntry) -> None:
        """A file of the pair is being opened: make sure the target is open and still the same."""
        with entry.lock:
            if entry.refs == 0:
                self.check(entry.delta)
                _reopen_target(entry.delta)
            entry.refs += 1

    def release(self, entry: CacheEntry) -> None:
        with entry.lock:
            entry.refs -= 1
            if entry.refs == 0:
                entry.delta.target.close()

    def drop(self, key: tuple) -> None:
        """Forget a pair whose snapshots are gone (its open files keep their target until closed)."""
        with self._lock:
            if key in self._entries:
                self._evict(key)
            self._failures.pop(key, None)

    def close(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._evict(key)


def _reopen_target(delta: Delta) -> None:
    reader = delta.target
    if isinstance(reader, FileReader) and reader.fd < 0:
        delta.target = FileReader(reader.path, reader.size)
