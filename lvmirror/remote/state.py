"""A destination's state and staging-progress files, checked on every read, and the base check.  Stdlib only.

The state file says what the destination holds (volume, snapshot, size,
generation) and the binding of the destination it was written for (see
:mod:`.destination`).  It is trusted only while that binding still matches
the destination: otherwise the destination holds nothing known, and only a
compare delta computed against its present content (or a forced apply) may
be applied to it.  Both files may be damaged or edited by hand: each field is
checked, and a file that fails gives a StateError naming it and the way out
(``lvmirror discard``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from lvdeltafs.fsio import UnsafePath
from lvmirror.remote.destination import Destination, state_name_of
from lvmirror.remote.wire import (
    ProtocolError,
    RefusedError,
    StateError,
    check_identity,
    delta_id_of,
    has_control,
    int_field,
    loads,
)

STATE_FORMAT = "lvmirror-state"
PROGRESS_FORMAT = "lvmirror-staging"
WAY_OUT = ("`lvmirror discard` (see README, \"When a mirror is stuck\") sets what is staged aside and makes "
           "the next sync resync by comparing block digests")
_STATE_STRS = ("volume", "snapshot", "dest", "kind", "synced", "delta_id", "source", "unknown")
_STATE_INTS = ("size", "generation", "version")
_READER_INTS = ("position", "seed", "target_size", "prev_end", "nrec", "ndata", "nzero", "dbytes", "zbytes")


def now() -> tuple[str, float]:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), t


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


class Damaged(StateError):
    """A state or progress file that is not what lvmirror writes."""


class Files:
    """The state and progress files of one destination, read and written through its folder."""

    def __init__(self, dest: Destination):
        self.dest = dest

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            raw = self.dest.folder.read_small(name)
        except UnsafePath as e:
            raise RefusedError(f"{e}; nothing was written") from None
        if raw is None:
            return None
        try:
            doc = loads(raw, self.dest.where(name))
        except ProtocolError as e:
            raise self.damaged(name, str(e)) from None
        if not isinstance(doc, dict):
            raise self.damaged(name, "it is not a JSON object")
        return doc

    def damaged(self, name: str, why: str) -> Damaged:
        return Damaged(f"{self.dest.where(name)} is damaged ({why}): lvmirror did not write it this way, or "
                       f"it was edited by hand; {WAY_OUT}")

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        self.dest.folder.replace(name, encode(doc))

    # -- the state

    def state(self) -> dict[str, Any] | None:
        doc = self._checked_state(self.dest.state_name)
        if doc is None and self.dest.is_block:
            return self._state_of_the_device_before()
        return doc

    def _checked_state(self, name: str) -> dict[str, Any] | None:
        doc = self._read(name)
        if doc is not None:
            why = _state_problem(doc)
            if why:
                raise self.damaged(name, why)
        return doc

    def _state_of_the_device_before(self) -> dict[str, Any] | None:
        """A block device with no state of its own, at a path that named another mirrored device.

        What that device held is what this one is expected to hold: it is
        reported (a check compares against it), but as unknown, so a sync
        resyncs by comparing instead of refusing or patching.
        """
        alias = self._read(self.dest.alias_name) or {}
        before = alias.get("device")
        if not isinstance(before, str) or before == self.dest.device:
            return None
        old = self._checked_state(state_name_of(before))
        if not old:
            return None
        return {**old, "unknown": f"{self.dest.given} is now another device ({self.dest.device}) than the "
                                  f"one lvmirror mirrored to there ({before})"}

    def write_state(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Replace the state with ``doc`` (plus what says which file it is); returns what was written."""
        full = {**doc, "format": STATE_FORMAT, "version": 2, "dest": self.dest.path, "kind": self.dest.kind}
        self._write(self.dest.state_name, full)
        if self.dest.is_block:
            self._write(self.dest.alias_name, {"device": self.dest.device, "path": self.dest.given})
        return full

    # -- staging progress

    def progress(self) -> dict[str, Any] | None:
        doc = self._read(self.dest.progress_name)
        if doc is not None:
            why = _progress_problem(doc)
            if why:
                raise self.damaged(self.dest.progress_name, why)
        return doc

    def write_progress(self, doc: dict[str, Any]) -> None:
        self._write(self.dest.progress_name, {**doc, "format": PROGRESS_FORMAT})

    def staging_size(self) -> int:
        st = self.dest.folder.stat(self.dest.staging_name)
        return st.st_size if st else 0

    def discard_staging(self) -> None:
        # Progress first: a staging file without progress is ignored and overwritten.
        self.dest.folder.unlink(self.dest.progress_name)
        self.dest.folder.unlink(self.dest.staging_name)
        self.dest.folder.sync()


def _state_problem(doc: dict[str, Any]) -> str:
    if doc.get("format") != STATE_FORMAT:
        return f"its format is not {STATE_FORMAT}"
    for key in _STATE_STRS:
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or has_control(value)):
            return f"{key} is not a plain string"
    for key in _STATE_INTS:
        if doc.get(key) is not None and _bad_int(doc, key):
            return f"{key} is not a size"
    for key in ("binding", "applying"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"{key} is not an object"
    applying = doc.get("applying")
    if applying is not None and (not isinstance(applying.get("delta_id"), str)
                                 or not isinstance(applying.get("binding", {}), dict | None)):
        return "applying is malformed"
    return ""


def _progress_problem(doc: dict[str, Any]) -> str:
    if doc.get("format") != PROGRESS_FORMAT:
        return f"its format is not {PROGRESS_FORMAT}"
    try:
        identity = check_identity(doc.get("identity"))
        for key in ("verified",) + (("stream_size",) if doc.get("stream_size") is not None else ()):
            int_field(doc, key)
    except ProtocolError as e:
        return str(e)
    if doc.get("delta_id") != delta_id_of(identity):
        return "its delta_id is not its identity's"
    if not isinstance(doc.get("complete"), bool) or not isinstance(doc.get("force"), bool):
        return "complete and force must be true or false"
    reader = doc.get("reader")
    if not isinstance(reader, dict) or any(_bad_int(reader, k) for k in _READER_INTS):
        return "its verifier state is malformed"
    if reader.get("version", 1) not in (1, 2):
        return "its verifier state names a stream format version this receiver does not know"
    if reader["position"] != doc["verified"] or not isinstance(reader.get("header"), dict):
        return "its verifier state does not match what it says is verified"
    return ""


def _bad_int(doc: dict[str, Any], key: str) -> bool:
    try:
        int_field(doc, key)
    except ProtocolError:
        return True
    return False


# ---------------------------------------------------------------- what the destination holds


def unknown_reason(state: dict[str, Any] | None, binding: dict[str, Any] | None, path: str) -> str:
    """Why the state may not be trusted for this destination ("" when it may)."""
    if state and state.get("unknown"):
        return state["unknown"]
    if not state or not state.get("snapshot"):
        return ""
    recorded = state.get("binding")
    if not recorded:
        return "its state does not record which file or device it describes (an older lvmirror wrote it)"
    if binding is None:
        return f"{path} no longer exists, but its state says it held {describe(state)}"
    if any(recorded.get(k) != binding.get(k) for k in ("kind", "device", "dev", "ino")):
        return f"{path} is not the file or device its state was written for (it was replaced or recreated)"
    if recorded.get("size") != binding.get("size"):
        return (f"{path} is {binding.get('size')} bytes but its state records {recorded.get('size')} "
                "(truncated or resized)")
    if recorded.get("mtime_ns") != binding.get("mtime_ns"):
        return f"{path} was modified since lvmirror last wrote it"
    return ""


def describe(state: dict[str, Any]) -> str:
    return (f"snapshot {state.get('snapshot')} of volume {state.get('volume')} ({state.get('size')} bytes, "
            f"generation {state.get('generation')}, synced {state.get('synced')})")


def check_base(identity: dict[str, Any], delta_id: str, *, known: dict[str, Any] | None, unknown: str,
               dest: Destination) -> None:
    """Refuse a delta whose base is not what the destination holds (the ZFS rule); not asked when forced."""
    base = identity["base"]
    if identity["source"] == "compare" and base.startswith("dest:"):
        # A compare delta names the destination content it was computed against.
        if base != dest.token() or identity["base_size"] != dest.size():
            raise RefusedError(f"refusing delta {delta_id}: it was computed against {dest.path} as it was, "
                               "but the destination has changed since; run again")
        return
    if not base:
        _check_initial(identity, delta_id, known, dest)
        return
    if not known:
        why = unknown or f"{dest.path} holds nothing lvmirror knows of (no state)"
        raise RefusedError(
            f"refusing delta {delta_id}: it applies on top of snapshot {base}, but {why}. For a mirror in "
            "lvmirror's config, `lvmirror sync` resyncs it by comparing block digests (or `lvmirror init` "
            "makes a first copy); to apply this delta anyway, `lvmirror apply --force` (a full check "
            "follows)")
    same = (known.get("volume") == identity["volume"] and known.get("snapshot") == base
            and known.get("size") == identity["base_size"])
    if not same:
        raise RefusedError(
            f"refusing delta {delta_id}: it applies on top of snapshot {base} of volume {identity['volume']} "
            f"({identity['base_size']} bytes), but {dest.path} holds {describe(known)}; nothing was staged "
            "or applied. Sync from the snapshot it holds, or resync with `lvmirror check --repair`")


def _check_initial(identity: dict[str, Any], delta_id: str, known: dict[str, Any] | None,
                   dest: Destination) -> None:
    if known:
        raise RefusedError(
            f"refusing delta {delta_id}: it is an initial full copy of volume {identity['volume']}, but "
            f"{dest.path} already holds {describe(known)}; to update it, sync from the snapshot it holds; "
            f"to start over, move {dest.where(dest.state_name)} away or force it")
    if not dest.is_block and dest.size() > 0:
        # An init rewrites the whole file: never over a file lvmirror does not know.
        raise RefusedError(
            f"refusing delta {delta_id}: {dest.path} already exists and holds {dest.size()} bytes that "
            "lvmirror has no record of; check the destination path, then remove the file or force the init")
