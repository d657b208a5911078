"""Deltas of thin LVM snapshots, read from the pool's metadata with thin_delta.

See /work/shared/reference/thin-delta.md.  ``thin_delta`` compares two thin
devices' block mappings; its XML output is parsed line by line as it streams
(the tool writes one element per line), so memory grows with the number of
ranges kept (DATA and ZERO ones), never with the output's size, and any line
that is not understood is refused rather than skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from types import FrameType, TracebackType

import numpy as np

from lvdeltafs.command import _environment, run
from lvdeltafs.errors import BadInput, Busy, CommandFailed, UnsupportedFormat
from lvdeltafs.extents import DATA, ZERO, Extents

SECTOR = 512
DEFAULT_TIMEOUT = 3600.0
# The Rust rewrite reported changed blocks as "same" in these (fixed in 1.0.6).
BAD_VERSIONS = ((1, 0, 0), (1, 0, 5))

_ELEMENT = re.compile(r"<(/?)([A-Za-z_]+)((?:\s+[A-Za-z_]+=\"[^\"]*\")*)\s*(/?)>")
_ATTR = re.compile(r"([A-Za-z_]+)=\"([^\"]*)\"")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")
_KIND_OF = {"different": DATA, "right_only": DATA, "left_only": ZERO, "same": None}


def _number(attrs: dict[str, str], key: str, where: str) -> int:
    value = attrs.get(key)
    if value is None:
        raise BadInput(f"{where}: attribute {key!r} is missing")
    if not _NUMBER.fullmatch(value):
        raise BadInput(f"{where}: attribute {key}={value!r} is not a decimal block number")
    return int(value)


_Element = tuple[int, str, bool, bool, dict[str, str]]


def _elements(lines: Iterable[str | bytes], what: str) -> Iterator[_Element]:
    """(line number, tag, is_closing, is_self_closing, attributes) per line; blank lines skipped."""
    for no, raw in enumerate(lines, 1):
        line = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).strip()
        if not line:
            continue
        m = _ELEMENT.fullmatch(line)
        if not m:
            raise BadInput(f"{what} line {no} is not understood: {line[:120]!r}")
        closing, tag, attrs, selfclose = m.group(1) == "/", m.group(2), m.group(3), m.group(4) == "/"
        yield no, tag, closing, selfclose, dict(_ATTR.findall(attrs))


class _Ranges:
    """Block ranges collected in compact arrays (8 + 8 + 1 bytes each)."""

    def __init__(self) -> None:
        self.begins = array("Q")
        self.lengths = array("Q")
        self.kinds = array("B")

    def add(self, begin: int, length: int, kind: int) -> None:
        self.begins.append(begin)
        self.lengths.append(length)
        self.kinds.append(kind)

    def extents(self, block_bytes: int, size: int) -> Extents:
        begins = np.frombuffer(self.begins, dtype=np.uint64) if self.begins else np.empty(0, np.uint64)
        lengths = np.frombuffer(self.lengths, dtype=np.uint64) if self.lengths else np.empty(0, np.uint64)
        kinds = np.frombuffer(self.kinds, dtype=np.uint8) if self.kinds else np.empty(0, np.uint8)
        # Blocks past the end of the newer volume (one that shrank) are not part of it.
        nblocks = np.uint64(-(-size // block_bytes))
        keep = begins < nblocks
        begins, lengths, kinds = begins[keep], lengths[keep], kinds[keep]
        bb = np.uint64(block_bytes)
        return Extents.from_ranges(begins * bb, lengths * bb, kinds, size)


def _block_bytes(attrs: dict[str, str], where: str) -> int:
    sectors = _number(attrs, "data_block_size", where)
    if sectors == 0:
        raise BadInput(f"{where}: data_block_size is 0")
    return sectors * SECTOR


def parse_thin_delta(lines: Iterable[str | bytes], target_size: int, *, thin1: int, thin2: int) -> Extents:
    """Parse ``thin_delta`` output (plain or ``--verbose``) into byte extents of the newer device.

    ``different``/``right_only`` become DATA, ``left_only`` ZERO (unmapped in
    the newer device, so it reads as zeros), ``same`` is dropped; clipped to
    ``target_size``.  The diff must be between ``thin1`` and ``thin2``.
    """
    what = "thin_delta output"
    ranges = _Ranges()
    block_bytes = 0
    in_diff = seen_diff = done = False
    group: str | None = None  # the enclosing <different> etc. in --verbose output
    for no, tag, closing, selfclose, attrs in _elements(lines, what):
        where = f"{what} line {no}"
        if done:
            raise BadInput(f"{where}: <{tag}> after </superblock>")
        if tag == "superblock":
            if closing:
                done = True
            elif block_bytes:
                raise BadInput(f"{where}: a second <superblock>")
            else:
                block_bytes = _block_bytes(attrs, where)
        elif tag == "diff":
            if closing:
                in_diff = False
                continue
            if not block_bytes or seen_diff:
                raise BadInput(f"{where}: unexpected <diff>")
            left, right = _number(attrs, "left", where), _number(attrs, "right", where)
            if (left, right) != (thin1, thin2):
                raise BadInput(f"{where}: the diff is between thin devices {left} and {right}, "
                               f"but {thin1} and {thin2} were asked for")
            in_diff = seen_diff = True
        elif tag in _KIND_OF and in_diff:
            if selfclose:  # plain output: <different begin= length=/>
                if group is not None:
                    raise BadInput(f"{where}: <{tag}/> inside <{group}>")
                _add(ranges, tag, attrs, where)
            elif closing:
                if group != tag:
                    raise BadInput(f"{where}: </{tag}> does not close <{group}>")
                group = None
            elif group is None:
                group = tag  # --verbose: <different> <range .../> ... </different>
            else:
                raise BadInput(f"{where}: <{tag}> inside <{group}>")
        elif tag == "range" and selfclose and group is not None:
            _add(ranges, group, attrs, where)
        else:
            raise BadInput(f"{where}: unknown or misplaced element <{'/' if closing else ''}{tag}>; "
                           "refusing to guess what it means for the delta")
    if not done or not seen_diff or in_diff or group is not None:
        raise BadInput(f"{what} ended early (no complete <diff left=\"{thin1}\" right=\"{thin2}\"> "
                       "inside a closed <superblock>)")
    return ranges.extents(block_bytes, target_size)


def _add(ranges: _Ranges, tag: str, attrs: dict[str, str], where: str) -> None:
    begin, length = _number(attrs, "begin", where), _number(attrs, "length", where)
    if length == 0:
        raise BadInput(f"{where}: a range of length 0")
    kind = _KIND_OF[tag]
    if kind is not None:
        ranges.add(begin, length, kind)


def parse_thin_dump(lines: Iterable[str | bytes], dev_id: int, size: int) -> Extents:
    """The mapped blocks of one device in ``thin_dump --dev-id`` output, as DATA extents."""
    what = "thin_dump output"
    ranges = _Ranges()
    block_bytes = 0
    device: int | None = None
    seen = done = False
    for no, tag, closing, _selfclose, attrs in _elements(lines, what):
        where = f"{what} line {no}"
        if done:
            raise BadInput(f"{where}: <{tag}> after </superblock>")
        if tag == "superblock":
            if closing:
                done = True
            else:
                block_bytes = _block_bytes(attrs, where)
        elif tag == "device":
            if closing:
                device = None
                continue
            device = _number(attrs, "dev_id", where)
            if device != dev_id:
                raise BadInput(f"{where}: thin device {device} listed, but only {dev_id} was asked for")
            seen = True
        elif tag == "range_mapping" and device is not None:
            ranges.add(_number(attrs, "origin_begin", where), _number(attrs, "length", where), DATA)
        elif tag == "single_mapping" and device is not None:
            ranges.add(_number(attrs, "origin_block", where), 1, DATA)
        else:
            raise BadInput(f"{where}: unknown or misplaced element <{'/' if closing else ''}{tag}>")
    if not done:
        raise BadInput(f"{what} ended early (no </superblock>)")
    if not seen:
        raise BadInput(f"thin device {dev_id} is not in the pool's metadata: check its thin_id "
                       "(lvs -o lv_name,thin_id)")
    return ranges.extents(block_bytes, size)


# ---- the tools -------------------------------------------------------------


def thin_tools_version() -> tuple[int, int, int]:
    """The thin-provisioning-tools version, refusing releases whose thin_delta is wrong."""
    out = run(["thin_delta", "-V"], timeout=30, hint="install thin-provisioning-tools").strip()
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise UnsupportedFormat(f"cannot read the thin_delta version from {out[:80]!r}")
    version = (int(m[1]), int(m[2]), int(m[3]))
    if BAD_VERSIONS[0] <= version <= BAD_VERSIONS[1]:
        raise UnsupportedFormat(
            f"thin_delta {'.'.join(map(str, version))} is refused: thin-provisioning-tools 1.0.0 to "
            "1.0.5 can report changed blocks as unchanged, which would leave mirrors silently wrong; "
            "install 1.0.6 or later (or 0.9.x)")
    return version


def _stream(argv: list[str], parse, timeout: float, hint: str):
    """Run ``argv``, feed its stdout lines to ``parse`` as they come; stderr goes into CommandFailed."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env=_environment())
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            try:
                result = parse(proc.stdout)
            except BadInput:
                # A broken output can come from a tool that failed: its error explains more.
                proc.kill()
                if proc.wait() not in (0, -signal.SIGKILL):
                    raise _failed(argv, proc.returncode, err, hint) from None
                raise
            finally:
                proc.stdout.close()
            rc = proc.wait()
        finally:
            timed_out = not timer.is_alive() and proc.returncode == -signal.SIGKILL
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if timed_out:
            raise _failed(argv, None, err, hint or f"no answer within {timeout:.0f} s")
        if rc != 0:
            raise _failed(argv, rc, err, hint)
        return result


def _failed(argv: list[str], rc: int | None, err, hint: str) -> CommandFailed:
    err.seek(0)
    text = err.read().decode(errors="replace")
    # thin-provisioning-tools 0.9 prints its usage after the real error; the
    # error line is what the user needs to see.
    text = text.split("\nUsage:")[0] if not text.startswith("Usage:") else text
    return CommandFailed(argv, rc, text, hint)


def _meta_args(metadata_snap: bool) -> list[str]:
    # -m first and alone: 0.9 takes a block number only glued on (-m123), and a
    # following positional could be taken as its value by the 1.x parser.
    return ["-m"] if metadata_snap else []


def thin_delta_extents(metadata_dev: str, thin1_id: int, thin2_id: int, target_size: int, *,
                       metadata_snap: bool, timeout: float = DEFAULT_TIMEOUT) -> Extents:
    """What changed from thin device ``thin1_id`` to ``thin2_id``, as extents of the newer one."""
    argv = ["thin_delta", *_meta_args(metadata_snap), "--thin1", str(thin1_id),
            "--thin2", str(thin2_id), metadata_dev]
    hint = "check the thin ids (lvs -o lv_name,thin_id)"
    if not metadata_snap:
        hint += "; on a live pool hold a metadata snapshot (MetadataSnapshot) and pass metadata_snap"
    return _stream(argv, lambda out: parse_thin_delta(out, target_size, thin1=thin1_id, thin2=thin2_id),
                   timeout, hint)


def thin_mapped_extents(metadata_dev: str, dev_id: int, size: int, metadata_snap: bool, *,
                        timeout: float = DEFAULT_TIMEOUT) -> Extents:
    """The mapped blocks of thin device ``dev_id``: what a first full copy must read (the rest is zeros)."""
    argv = ["thin_dump", *_meta_args(metadata_snap), "--dev-id", str(dev_id), metadata_dev]
    return _stream(argv, lambda out: parse_thin_dump(out, dev_id, size), timeout, "")


# ---- metadata snapshot -----------------------------------------------------

# What `dmsetup message ... release_metadata_snap` says when none is held: the
# kernel answers EINVAL ("no metadata snap" in its log).
_NOT_HELD = re.compile(r"Invalid argument|no metadata snap", re.IGNORECASE)


class MetadataSnapshot(contextlib.AbstractContextManager):
    """Hold the pool's metadata snapshot for a ``with`` block; always released.

    ``pool_dm_name`` is the pool's dm name, ``VG-pool`` or ``VG-pool-tpool``
    (the messages go to the ``-tpool`` device).  A reservation left by a
    crashed run is released first.  SIGTERM and SIGINT inside the block raise,
    so the release runs; the old handlers come back afterwards.
    """

    # The pool's one metadata snapshot is shared by every process on the host:
    # without this lock, one run's "release a stale reservation" would pull the
    # snapshot from under another run's thin_delta on the same pool.
    LOCK_DIR = "/run/lock/lvdeltafs"
    LOCK_WAIT = 3600.0

    def __init__(self, pool_dm_name: str, *, timeout: float = 60.0, lock_dir: str | None = None):
        self.target = pool_dm_name if pool_dm_name.endswith("-tpool") else f"{pool_dm_name}-tpool"
        self.timeout = timeout
        self.lock_dir = lock_dir or self.LOCK_DIR
        self._lock_fd = -1
        self._old: dict[int, object] = {}
        self.held = False

    def _lock_pool(self) -> None:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.lock_dir, f"{self.target}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise Busy(f"pool {self.target}: another process has held its metadata snapshot for "
                               f"over {self.LOCK_WAIT:.0f} s; check for a stuck thin_delta") from None
                time.sleep(0.2)
        self._lock_fd = fd

    def _unlock_pool(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def _message(self, what: str) -> None:
        run(["dmsetup", "message", self.target, "0", what], timeout=self.timeout,
            hint=f"pool {self.target}")

    def release_stale(self) -> None:
        try:
            self._message("release_metadata_snap")
        except CommandFailed as exc:
            if not _NOT_HELD.search(exc.stderr):
                raise

    def __enter__(self) -> MetadataSnapshot:
        self._install_handlers()
        try:
            self._lock_pool()
            self.release_stale()
            self._message("reserve_metadata_snap")
            self.held = True
        except BaseException:
            self._unlock_pool()
            self._restore_handlers()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Signals arriving during the release are held back until it is done.
        deferred: list[int] = []
        self._set_handlers(lambda signum, _frame: deferred.append(signum))
        try:
            if self.held:
                self._message("release_metadata_snap")
                self.held = False
        finally:
            self._unlock_pool()
            self._restore_handlers()
            for signum in deferred:
                signal.raise_signal(signum)

    # -- signals: only the main thread may install handlers; elsewhere the
    # caller's own signal handling has to unwind through __exit__.

    def _install_handlers(self) -> None:
        def interrupt(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            self._set_handlers(interrupt)

    def _set_handlers(self, handler) -> None:
        for s in self._old:
            signal.signal(s, handler)

    def _restore_handlers(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
