"""Deltas of thin LVM snapshots, read from the pool's metadata with thin_delta.

``thin_delta`` (thin-provisioning-tools) compares two thin
devices' block mappings; its XML output is parsed with expat as it streams
from the tool's pipe, chunk by chunk, so memory grows with the number of
ranges kept (DATA and ZERO ones), never with the output's size.  Anything that
is not understood (an unknown element, a missing or non-decimal attribute,
text, comments, malformed XML) is refused rather than skipped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from types import FrameType, TracebackType
from typing import IO, NoReturn, TypeVar
from xml.parsers import expat

import numpy as np

from lvdeltafs.command import _environment, run
from lvdeltafs.errors import BadInput, Busy, CommandFailed, Refused, UnsupportedFormat
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.fsio import Folder, Locked, UnsafePath

SECTOR = 512
DEFAULT_TIMEOUT = 3600.0
# The Rust rewrite reported changed blocks as "same" in these (fixed in 1.0.6).
BAD_VERSIONS = ((1, 0, 0), (1, 0, 5))
# Bytes asked of the tool's pipe per read: the size of a Linux pipe buffer.
CHUNK = 64 * 1024

_KIND_OF = {"different": DATA, "right_only": DATA, "left_only": ZERO, "same": None}

_T = TypeVar("_T")


def _decimal(value: str) -> bool:
    """A block number as the tools write it: fullmatch of 0|[1-9][0-9]{0,19}.

    No sign, spaces, underscores, leading zeros or non-ASCII digits, all of
    which int() would take.  Str methods rather than a regex: this runs twice
    per range, and takes about half the time of a match.
    """
    return value.isascii() and value.isdigit() and len(value) <= 20 and (value[0] != "0" or value == "0")


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


class _Scan:
    """One tool's XML output through expat: elements only, each checked by a subclass.

    Subclasses handle ``start(tag, attrs)`` and ``end(tag)`` and raise BadInput
    (with ``where()``) for anything they do not expect; expat itself checks
    that the XML is well formed.  Everything else XML allows is refused, as the
    line scanner this replaced refused it: the thin tools write none of it, so
    its presence means the output is not what we think it is.
    """

    what = "thin tool output"

    def __init__(self) -> None:
        p = expat.ParserCreate()
        # One call per run of text between two tags, not one per line piece.
        p.buffer_text = True
        p.StartElementHandler = self.start
        p.EndElementHandler = self.end
        p.CharacterDataHandler = self._text
        p.CommentHandler = lambda _text: self._refuse("a comment")
        p.ProcessingInstructionHandler = lambda _target, _data: self._refuse("a processing instruction")
        p.XmlDeclHandler = lambda *_args: self._refuse("an XML declaration")
        # Refused at its start, before any entity it declares is read.
        p.StartDoctypeDeclHandler = lambda *_args: self._refuse("a DOCTYPE")
        p.StartCdataSectionHandler = lambda: self._refuse("a CDATA section")
        self._parser = p

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        raise NotImplementedError

    def end(self, tag: str) -> None:
        raise NotImplementedError

    def ended_early(self) -> str:
        """Why output that stopped short, or never said what was asked, is refused."""
        raise NotImplementedError

    def where(self) -> str:
        # expat counts columns from 0; editors and people count from 1.
        p = self._parser
        return f"{self.what} line {p.CurrentLineNumber} column {p.CurrentColumnNumber + 1}"

    def number(self, attrs: dict[str, str], key: str) -> int:
        value = attrs.get(key)
        if value is None:
            raise BadInput(f"{self.where()}: attribute {key!r} is missing")
        if not _decimal(value):
            raise BadInput(f"{self.where()}: attribute {key}={value!r} is not a decimal block number")
        number = int(value)
        if number >= 1 << 63:  # kept in uint64 arrays and multiplied by the block size: bound it here
            raise BadInput(f"{self.where()}: attribute {key}={value} is past any device's size")
        return number

    def misplaced(self, tag: str, why: str = "") -> NoReturn:
        raise BadInput(f"{self.where()}: unknown or misplaced element <{tag}>{why}")

    def _refuse(self, what: str) -> NoReturn:
        raise BadInput(f"{self.where()} is not understood: {what}")

    def _text(self, text: str) -> None:
        if text.isspace():
            return
        # With buffer_text, expat's position is the end of the text: count back
        # to the line the first non-blank character is on.
        first = len(text) - len(text.lstrip())
        line = self._parser.CurrentLineNumber - text.count("\n", first)
        shown = text[first:].split("\n", 1)[0].rstrip()[:120]
        raise BadInput(f"{self.what} line {line} is not understood: text {shown!r} outside the elements")

    def parse(self, chunks: Iterable[bytes]) -> None:
        """Feed the whole output; BadInput, with line and column, for anything not understood."""
        p = self._parser
        try:
            amp = False
            for chunk in chunks:
                # expat would decode &#49; to "1"; the scanner refused any number
                # not written in plain digits, and so does this.
                at = chunk.find(b"&#")
                if at >= 0 or (amp and chunk.startswith(b"#")):
                    p.Parse(chunk[:max(at, 0)], False)  # to report where it is
                    self._refuse("a character reference (&#...;)")
                amp = chunk.endswith(b"&")
                p.Parse(chunk, False)
            try:
                p.Parse(b"", True)
            except expat.ExpatError as exc:
                # Only the end can be missing here: the tool stopped or was cut short.
                raise BadInput(f"{self.ended_early()}; the XML stops at line {exc.lineno} "
                               f"column {exc.offset + 1}: {expat.ErrorString(exc.code)}") from None
        except expat.ExpatError as exc:
            raise BadInput(f"{self.what} line {exc.lineno} column {exc.offset + 1} is not understood: "
                           f"{expat.ErrorString(exc.code)}") from None
        finally:
            # The handlers are bound methods: break the cycle so the parser's buffers go now.
            del self._parser


def _block_bytes(scan: _Scan, attrs: dict[str, str]) -> int:
    sectors = scan.number(attrs, "data_block_size")
    if sectors == 0:
        raise BadInput(f"{scan.where()}: data_block_size is 0")
    return sectors * SECTOR


_NO_GUESS = "refusing to guess what it means for the delta"


class _DeltaScan(_Scan):
    """``thin_delta`` output, plain or ``--verbose``, for the diff of ``thin1`` to ``thin2``."""

    what = "thin_delta output"

    def __init__(self, thin1: int, thin2: int) -> None:
        super().__init__()
        self.thin1, self.thin2 = thin1, thin2
        self.ranges = _Ranges()
        self.block_bytes = 0
        self.in_diff = self.seen_diff = False
        self.group: str | None = None  # the enclosing <different> etc. in --verbose output
        self.group_ranges = 0
        # A range element is open: it may hold nothing, and the next end tag is its own.
        self.in_range = False

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        if self.in_range:
            self.misplaced(tag, f" inside a range; {_NO_GUESS}")
        elif tag in _KIND_OF and self.in_diff:
            if self.group is not None:
                raise BadInput(f"{self.where()}: <{tag}> inside <{self.group}>")
            if attrs:  # plain output: <different begin= length=/>
                self.add(tag, attrs)
                self.in_range = True
            else:  # --verbose: <different> <range .../> ... </different>
                self.group = tag
                self.group_ranges = 0
        elif tag == "range" and self.group is not None:
            self.add(self.group, attrs)
            self.in_range = True
            self.group_ranges += 1
        elif tag == "superblock":
            if self.block_bytes:
                raise BadInput(f"{self.where()}: a second <superblock>")
            self.block_bytes = _block_bytes(self, attrs)
        elif tag == "diff":
            if not self.block_bytes or self.seen_diff:
                raise BadInput(f"{self.where()}: unexpected <diff>")
            left, right = self.number(attrs, "left"), self.number(attrs, "right")
            if (left, right) != (self.thin1, self.thin2):
                raise BadInput(f"{self.where()}: the diff is between thin devices {left} and {right}, "
                               f"but {self.thin1} and {self.thin2} were asked for")
            self.in_diff = self.seen_diff = True
        else:
            self.misplaced(tag, f"; {_NO_GUESS}")

    def end(self, tag: str) -> None:
        # expat has checked that end tags match: only elements start() took get here.
        if self.in_range:
            self.in_range = False
        elif self.group is not None:
            if not self.group_ranges:
                # The tool writes a group only around ranges; <different/> is a range missing its numbers.
                raise BadInput(f"{self.where()}: <{tag}> has neither begin and length nor <range>s")
            self.group = None
        elif tag == "diff":
            self.in_diff = False

    def add(self, tag: str, attrs: dict[str, str]) -> None:
        begin, length = self.number(attrs, "begin"), self.number(attrs, "length")
        if length == 0:
            raise BadInput(f"{self.where()}: a range of length 0")
        kind = _KIND_OF[tag]
        if kind is not None:
            self.ranges.add(begin, length, kind)

    def ended_early(self) -> str:
        return (f"{self.what} ended early (no complete <diff left=\"{self.thin1}\" right=\"{self.thin2}\"> "
                "inside a closed <superblock>)")

    def extents(self, target_size: int) -> Extents:
        # expat has checked that every element was closed: a diff is all that can be missing.
        if not self.seen_diff:
            raise BadInput(self.ended_early())
        return self.ranges.extents(self.block_bytes, target_size)


class _DumpScan(_Scan):
    """``thin_dump --dev-id`` output: the mappings of that one device."""

    what = "thin_dump output"

    def __init__(self, dev_id: int) -> None:
        super().__init__()
        self.dev_id = dev_id
        self.ranges = _Ranges()
        self.block_bytes = 0
        self.in_device = self.seen = False
        self.in_mapping = False  # like _DeltaScan.in_range

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        if self.in_mapping:
            self.misplaced(tag, " inside a mapping")
        elif tag == "range_mapping" and self.in_device:
            self.ranges.add(self.number(attrs, "origin_begin"), self.number(attrs, "length"), DATA)
            self.in_mapping = True
        elif tag == "single_mapping" and self.in_device:
            self.ranges.add(self.number(attrs, "origin_block"), 1, DATA)
            self.in_mapping = True
        elif tag == "device" and self.block_bytes and not self.in_device:
            device = self.number(attrs, "dev_id")
            if device != self.dev_id:
                raise BadInput(f"{self.where()}: thin device {device} listed, but only {self.dev_id} "
                               "was asked for")
            self.in_device = self.seen = True
        elif tag == "superblock" and not self.block_bytes:
            self.block_bytes = _block_bytes(self, attrs)
        else:
            self.misplaced(tag)

    def end(self, tag: str) -> None:
        if self.in_mapping:
            self.in_mapping = False
        elif self.in_device:
            self.in_device = False

    def ended_early(self) -> str:
        return f"{self.what} ended early (no </superblock>)"

    def extents(self, size: int) -> Extents:
        if not self.seen:
            raise BadInput(f"thin device {self.dev_id} is not in the pool's metadata: check its thin_id "
                           "(lvs -o lv_name,thin_id)")
        return self.ranges.extents(self.block_bytes, size)


def _line_chunks(lines: Iterable[str | bytes]) -> Iterator[bytes]:
    """Lines with or without their ends (a file, str.splitlines()) as expat input, line numbers kept."""
    for line in lines:
        data = line.encode(errors="surrogateescape") if isinstance(line, str) else line
        yield data if data.endswith(b"\n") else data + b"\n"


def _pipe_chunks(pipe: IO[bytes]) -> Iterator[bytes]:
    """What the tool has written so far, a chunk at a time, until it closes its end.

    One read(2) per chunk, straight from the descriptor: the file object's
    buffer is never used, and a pipe hands over what it holds, at most CHUNK.
    """
    return iter(functools.partial(os.read, pipe.fileno(), CHUNK), b"")


def _delta_from_chunks(chunks: Iterable[bytes], target_size: int, thin1: int, thin2: int) -> Extents:
    scan = _DeltaScan(thin1, thin2)
    scan.parse(chunks)
    return scan.extents(target_size)


def _mapped_from_chunks(chunks: Iterable[bytes], dev_id: int, size: int) -> Extents:
    scan = _DumpScan(dev_id)
    scan.parse(chunks)
    return scan.extents(size)


def parse_thin_delta(lines: Iterable[str | bytes], target_size: int, *, thin1: int, thin2: int) -> Extents:
    """Parse ``thin_delta`` output (plain or ``--verbose``) into byte extents of the newer device.

    ``different``/``right_only`` become DATA, ``left_only`` ZERO (unmapped in
    the newer device, so it reads as zeros), ``same`` is dropped; clipped to
    ``target_size``.  The diff must be between ``thin1`` and ``thin2``.
    ``lines`` may come with or without their line ends.
    """
    return _delta_from_chunks(_line_chunks(lines), target_size, thin1, thin2)


def parse_thin_dump(lines: Iterable[str | bytes], dev_id: int, size: int) -> Extents:
    """The mapped blocks of one device in ``thin_dump --dev-id`` output, as DATA extents."""
    return _mapped_from_chunks(_line_chunks(lines), dev_id, size)


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


# thin_tools_version()'s verdict, asked once per process: the version, or the
# refusal's message (raised afresh each time, so every caller gets a clean
# error).  A tool that cannot be run at all (CommandFailed) is not remembered:
# it may be installed by the next attempt.
_tools_verdict: tuple[int, int, int] | str | None = None
_tools_lock = threading.Lock()


def _checked_tools() -> tuple[int, int, int]:
    """thin_tools_version(), run on the first call only; a refused version raises on every call."""
    global _tools_verdict
    with _tools_lock:
        if _tools_verdict is None:
            try:
                _tools_verdict = thin_tools_version()
            except UnsupportedFormat as exc:
                _tools_verdict = str(exc)
        verdict = _tools_verdict
    if isinstance(verdict, str):
        raise UnsupportedFormat(verdict)
    return verdict


def _stream(argv: list[str], parse: Callable[[Iterator[bytes]], _T], timeout: float, hint: str) -> _T:
    """Run thin tool ``argv``, feed its stdout to ``parse`` in chunks as they come.

    A failure raises CommandFailed with the tool's stderr.  Every run here
    reads a thin mapping, so the tools' version is checked first: a refused
    release never runs.
    """
    _checked_tools()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env=_environment())
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            try:
                result = parse(_pipe_chunks(proc.stdout))
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
    return _stream(argv, lambda out: _delta_from_chunks(out, target_size, thin1_id, thin2_id), timeout, hint)


def thin_mapped_extents(metadata_dev: str, dev_id: int, size: int, metadata_snap: bool, *,
                        timeout: float = DEFAULT_TIMEOUT) -> Extents:
    """The mapped blocks of thin device ``dev_id``: what a first full copy must read (the rest is zeros)."""
    argv = ["thin_dump", *_meta_args(metadata_snap), "--dev-id", str(dev_id), metadata_dev]
    return _stream(argv, lambda out: _mapped_from_chunks(out, dev_id, size), timeout, "")


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
        try:
            with Folder(self.lock_dir, create=True) as folder:
                self._lock_fd = folder.lock(f"{self.target}.lock", wait=self.LOCK_WAIT)
        except Locked:
            raise Busy(f"pool {self.target}: another process has held its metadata snapshot for over "
                       f"{self.LOCK_WAIT:.0f} s; check for a stuck thin_delta") from None
        except UnsafePath as e:
            raise Refused(f"cannot lock pool {self.target}'s metadata snapshot: {e}") from None

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
