"""What each volume's last runs did, kept on this side for `lvmirror status` and the metrics file.

The receiver's state says what a destination holds; nothing there says that
last night's sync failed, why, or how long the one before took.  So every run
of init, sync, check or repair (not a dry run) leaves its outcome in
``WORK_DIR/runs/VOLUME.json``, replaced atomically while the volume's lock is
held.  The last run, the last successful init or sync (the last *good sync*,
which ``--max-age`` measures) and the last failure are kept apart: a failure
never hides when the mirror was last good, nor a success the failure before it.

Root wrote the file, but a hand edit, a restored backup or a full disk may
have damaged it: it is read back as untrusted, every field checked, and a
damaged file is a problem to report (and replaced by the next run's record),
never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from lvdeltafs.clisupport import exit_status, printable
from lvdeltafs.errors import LvError, Refused
from lvdeltafs.fsio import Folder, UnsafePath

if TYPE_CHECKING:
    from lvmirror.pipelines import Outcome

log = logging.getLogger(__name__)

FORMAT = "lvmirror-runs/1"
COMMANDS = ("init", "sync", "check", "repair")
SYNCS = ("init", "sync")  # a success of these brings the mirror up to a new snapshot
MAX_FILE = 64 * 1024  # a record is well under 2 KiB
MAX_TEXT = 600  # an error message is one line; longer ones are cut
MAX_EPOCH = 1 << 40  # past the year 30000: a damaged number, not a time
JSON_ORDER = ("command", "action", "started", "finished", "duration", "exit_code", "ok", "error",
              "bytes_sent", "resumed_bytes", "generation", "snapshot", "base_cow_percent", "read_bytes",
              "marked_bytes", "differed_bytes", "wire_bytes")


@dataclass(frozen=True)
class Run:
    """One run's outcome. Times are Unix seconds; ``duration`` is measured on the monotonic clock."""

    command: str  # init | sync | check | repair
    started: float
    finished: float
    duration: float
    exit_code: int  # as README's Exit codes; 0 is success
    error: str = ""  # the one-line message of a failure
    action: str = ""  # what the pipeline did: init, sync, resync (a compare), repair, check
    bytes_sent: int = 0  # data bytes sent (zero ranges cost none)
    # Stream bytes the far side already held verified from an interrupted run, not sent again (0: none, or
    # an older record).
    resumed_bytes: int = 0
    generation: int | None = None  # the destination's generation after the run, if it applied one
    snapshot: str = ""  # the snapshot the destination holds after it (LVUUID@time)
    base_cow_percent: float | None = None  # a classic base's COW use as a sync found it
    # A volume with several destinations: bytes of the new snapshot the run read for all of them (None: not
    # counted, or an older record).
    read_bytes: int | None = None
    # What the delta's data came to (None: not known; a check, a failure, a resumed stream, an older record):
    marked_bytes: int | None = None  # marked changed by the snapshot's metadata (COW table, thin_delta)
    differed_bytes: int | None = None  # of those, found different from the base and sent as data
    wire_bytes: int | None = None  # what those took in the stream after compression

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def as_dict(self) -> dict[str, Any]:
        """The run as stored and as `status --json` shows it (docs/status-json.md, in that order)."""
        fields = asdict(self)
        return {key: self.ok if key == "ok" else fields[key] for key in JSON_ORDER}


@dataclass(frozen=True)
class RunLog:
    """A volume's record; ``problem`` says why a damaged or unreadable one was set aside ("" if none)."""

    last_run: Run | None = None
    last_success: Run | None = None  # the last good init or sync
    last_failure: Run | None = None
    problem: str = ""


def runs_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "runs")


def _file(name: str) -> str:
    # Volume names are letters, digits and _ . + - not starting with a dot (config.py): a plain file name.
    return f"{name}.json"


# ---- reading ---------------------------------------------------------------------------


def read(name: str, work_dir: str) -> RunLog:
    """The volume's record: empty if there is none, with ``problem`` set if it cannot be used."""
    where = os.path.join(runs_dir(work_dir), _file(name))
    try:
        with Folder(runs_dir(work_dir)) as folder:
            raw = folder.read_small(_file(name), MAX_FILE)
    except FileNotFoundError:
        return RunLog()  # no run recorded yet (the folder is made by the first)
    except (OSError, UnsafePath) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return RunLog(problem=printable(f"cannot read the record of past runs {where}: {why}"))
    if raw is None:
        return RunLog()
    try:
        return parse(raw, name)
    except ValueError as e:
        return RunLog(problem=printable(f"the record of past runs {where} is damaged ({e}); the next run "
                                        "replaces it"))


def parse(raw: bytes, name: str) -> RunLog:
    """Check a record's bytes field by field; ValueError naming the first thing wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON: {str(e)[:80]}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"format is {_shown(doc.get('format'))}, not {FORMAT!r}")
    if doc.get("volume") != name:
        raise ValueError(f"it is the record of volume {_shown(doc.get('volume'))}, not of {name}")
    runs = {key: _run(doc.get(key), key) for key in ("last_run", "last_success", "last_failure")}
    success, failure = runs["last_success"], runs["last_failure"]
    if success is not None and not (success.ok and success.command in SYNCS):
        raise ValueError("last_success is not a successful init or sync")
    if failure is not None and failure.ok:
        raise ValueError("last_failure has exit code 0")
    return RunLog(runs["last_run"], success, failure)


def _shown(value: Any) -> str:
    return printable(repr(value)[:60])


def _run(doc: Any, key: str) -> Run | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValueError(f"{key} is not an object")
    command = doc.get("command")
    if command not in COMMANDS:
        raise ValueError(f"{key}.command is {_shown(command)}, not one of {', '.join(COMMANDS)}")
    run = Run(
        command=command,
        started=_number(doc, key, "started", MAX_EPOCH),
        finished=_number(doc, key, "finished", MAX_EPOCH),
        duration=_number(doc, key, "duration", MAX_EPOCH),
        exit_code=_int(doc, key, "exit_code", 255),
        error=_text(doc, key, "error"),
        action=_text(doc, key, "action"),
        bytes_sent=_int(doc, key, "bytes_sent", 1 << 62),
        resumed_bytes=0 if doc.get("resumed_bytes") is None else _int(doc, key, "resumed_bytes", 1 << 62),
        generation=None if doc.get("generation") is None else _int(doc, key, "generation", 1 << 62),
        snapshot=_text(doc, key, "snapshot"),
        base_cow_percent=(None if doc.get("base_cow_percent") is None
                          else _number(doc, key, "base_cow_percent", 100.0)),
        read_bytes=_optional_int(doc, key, "read_bytes"),
        marked_bytes=_optional_int(doc, key, "marked_bytes"),
        differed_bytes=_optional_int(doc, key, "differed_bytes"),
        wire_bytes=_optional_int(doc, key, "wire_bytes"),
    )
    if doc.get("ok") is not run.ok:
        raise ValueError(f"{key}.ok disagrees with its exit code {run.exit_code}")
    return run


def _number(doc: dict[str, Any], key: str, field: str, hi: float) -> float:
    value = doc.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= hi:
        raise ValueError(f"{key}.{field} is {_shown(value)}, not a number from 0 to {hi:g}")
    return float(value)


def _int(doc: dict[str, Any], key: str, field: str, hi: int) -> int:
    value = doc.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ValueError(f"{key}.{field} is {_shown(value)}, not a whole number from 0 to {hi}")
    return value


def _optional_int(doc: dict[str, Any], key: str, field: str) -> int | None:
    return None if doc.get(field) is None else _int(doc, key, field, 1 << 62)


def _text(doc: dict[str, Any], key: str, field: str) -> str:
    value = doc.get(field, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{key}.{field} is not a string of at most {MAX_TEXT} characters")
    return printable(value)  # shown on terminals and in metrics: escaped whatever a hand put there


# ---- writing ---------------------------------------------------------------------------


def record(name: str, work_dir: str, run: Run) -> RunLog:
    """Add ``run`` to the volume's record (replaced atomically); call it with the volume's lock held."""
    # As it will be read back: one line, escaped, of bounded length.
    run = replace(run, **{key: printable(getattr(run, key))[:MAX_TEXT]
                          for key in ("error", "action", "snapshot")})
    old = read(name, work_dir)
    if old.problem:
        log.warning("%s: %s", name, old.problem)
    new = RunLog(run, run if run.ok and run.command in SYNCS else old.last_success,
                 old.last_failure if run.ok else run)
    doc = {"format": FORMAT, "volume": name,
           **{key: None if r is None else r.as_dict() for key, r in
              (("last_run", new.last_run), ("last_success", new.last_success),
               ("last_failure", new.last_failure))}}
    try:
        with Folder(runs_dir(work_dir), create=True) as folder:
            folder.replace(_file(name), (json.dumps(doc, indent=1) + "\n").encode())
    except UnsafePath as e:
        raise Refused(f"the folder for records of past runs is unsafe: {e}") from None
    return new


class Recording:
    """One run being timed: what its outcome was goes in with :meth:`outcome`; the end writes the record."""

    def __init__(self, name: str, work_dir: str, command: str):
        self.name, self.work_dir = name, work_dir
        self.run = Run(command, time.time(), 0.0, 0.0, 0)
        self._t0 = time.monotonic()

    def outcome(self, out: Outcome) -> None:
        """What a pipeline did: its action, bytes, the generation and snapshot the destination now holds."""
        self.run = replace(self.run, action=out.action, bytes_sent=out.data_bytes,
                           resumed_bytes=out.resumed_bytes, generation=out.generation,
                           snapshot=out.target, base_cow_percent=out.base_cow_percent,
                           read_bytes=out.source_bytes_read, marked_bytes=out.marked_bytes,
                           differed_bytes=out.differed_bytes, wire_bytes=out.wire_bytes)

    def holding(self, snapshot: str) -> None:
        """What the destination holds after a run that failed (so what a later run must not remove)."""
        self.run = replace(self.run, snapshot=snapshot)

    def finish(self, exit_code: int, error: str = "") -> None:
        """Write the record; a failure to write is a warning, never the run's result."""
        self.run = replace(self.run, finished=time.time(), duration=time.monotonic() - self._t0,
                           exit_code=exit_code, error=error)
        try:
            record(self.name, self.work_dir, self.run)
        except (LvError, OSError) as e:
            _, why = exit_status(e)
            log.warning("%s: could not record this run for `lvmirror status` and the metrics: %s",
                        self.name, why)


@contextmanager
def recording(name: str, work_dir: str, command: str) -> Iterator[Recording]:
    """Time the block and record it: a success, or the exception's exit code and one-line message."""
    rec = Recording(name, work_dir, command)
    try:
        yield rec
    except BaseException as e:
        rec.finish(*exit_status(e))
        raise
    rec.finish(0)
