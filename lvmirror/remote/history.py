"""A destination's history: undo deltas, the points they lead back to, retention, rewind.  Stdlib only.

docs/history.md is the contract.  Crash safety rests on three orders:

- an undo delta is written as ``…undo-part``, fsynced, renamed to its
  name, and the folder fsynced, *before* the apply is recorded as
  ``applying`` (which names it): once a byte of the destination may be
  overwritten, its undo delta is complete on disk, and a replay never
  writes it again (the destination's bytes are no longer the old ones);
- a point enters ``history`` only with the state that commits its apply;
- a file leaves only after a state that no longer lists it was written, so
  the state never names a file that is gone; what a killed run leaves (a
  part file, a file no state lists) is swept by the next session.

Every entry of ``history`` is checked on read (the state may be edited by
hand): a bad one is a damaged state, with the usual way out.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lvdeltafs.formats import overlay
from lvdeltafs.formats.reader import BlocksFile, StreamReader
from lvdeltafs.formats.stream import KIND_DATA, KIND_ZERO, StreamError, StreamLayout
from lvdeltafs.fsio import Writeback, pread_into
from lvmirror.remote import faults
from lvmirror.remote.destination import Destination
from lvmirror.remote.state import Damaged, Files, unknown_reason
from lvmirror.remote.wire import ProtocolError, StateError, delta_id_of, has_control, int_field

NOSPACE = (errno.ENOSPC, errno.EDQUOT)
DEFAULT_POINTS = 7  # what a sender that says nothing of retention gets (`lvmirror apply`, an older lvmirror)
_POINT_KEYS = {"generation", "snapshot", "synced", "synced_epoch", "size", "undo", "undo_bytes"}


@dataclass(frozen=True)
class Keep:
    """Retention: at most ``points`` points, none older than ``age`` seconds, ``size`` bytes in all.

    0 is no limit for ``age`` and ``size``; 0 ``points`` keeps no history."""

    points: int
    age: int = 0
    size: int = 0

    @classmethod
    def from_request(cls, doc: Any) -> Keep:
        if doc is None:
            return cls(DEFAULT_POINTS)
        if not isinstance(doc, dict):
            raise ProtocolError("keep must be an object")
        return cls(int_field(doc, "points", hi=100000), int_field(doc, "age", default=0),
                   int_field(doc, "size", default=0))

    def as_dict(self) -> dict[str, int]:
        return {"points": self.points, "age": self.age, "size": self.size}


# ---------------------------------------------------------------- the state's list


def points(files: Files, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The state's history, each entry checked; a bad one makes the state damaged.

    The one check of the list: the receiver's and the mount's (lvdeltafs.mirrors) alike."""
    raw = state.get("history") or []
    if not isinstance(raw, list):
        raise files.damaged(files.dest.state_name, "history is not a list")
    present = state.get("generation")
    last = -1
    for entry in raw:
        why = _entry_problem(files, entry, last, present if type(present) is int else None)
        if why:
            raise files.damaged(files.dest.state_name, f"a history entry {why}")
        last = entry["generation"]
    return raw


def _entry_problem(files: Files, entry: Any, last: int, present: int | None) -> str:
    if not isinstance(entry, dict) or set(entry) != _POINT_KEYS:
        return f"must hold exactly {', '.join(sorted(_POINT_KEYS))}"
    try:
        for key in ("generation", "size", "undo_bytes"):
            int_field(entry, key)
    except ProtocolError as e:
        return str(e)
    if any(not isinstance(entry[k], str) or has_control(entry[k]) for k in ("snapshot", "synced", "undo")):
        return "has a name that is not a plain string"
    if not isinstance(entry["synced_epoch"], int | float) or isinstance(entry["synced_epoch"], bool):
        return "has a time that is not a number"
    if entry["generation"] <= last:
        return "is out of order"
    if present is not None and entry["generation"] >= present:
        return f"has generation {entry['generation']}, not before the present generation {present}"
    if entry["undo"] != undo_name(files, entry["generation"]):
        return f"names the file {entry['undo'][:80]!r}, not the one its generation gives"
    return ""


def problem(files: Files, state: dict[str, Any]) -> str:
    """Why the state's history cannot be read ("" if it can): the list is damaged, or an undo file it
    names is missing or not the size the state says (what `lvmirror status` lists as a problem)."""
    try:
        entries = points(files, state)
    except Damaged as e:
        return str(e)
    for entry in entries:
        where = files.dest.where(entry["undo"])
        try:
            st = files.dest.folder.stat(entry["undo"])
        except OSError as e:
            return f"the undo delta {where} of point {entry['generation']} cannot be read ({e.strerror})"
        if st is None:
            return (f"the undo delta {where} of point {entry['generation']} is missing; that point and "
                    "older ones cannot be composed")
        if st.st_size != entry["undo_bytes"]:
            return (f"the undo delta {where} of point {entry['generation']} is {st.st_size} bytes, not the "
                    f"{entry['undo_bytes']} the state says; that point and older ones cannot be composed")
    return ""


def undo_name(files: Files, generation: int) -> str:
    return f"{files.dest.undo_prefix}{generation}"  # lvdeltafs.mirrors reads by the same prefix


def part_name(files: Files) -> str:
    return f"{files.dest.undo_prefix}part"


def retained(entries: list[dict[str, Any]], keep: Keep | None, now: float) -> list[dict[str, Any]]:
    """What retention keeps of ``entries`` (oldest first): the oldest go first."""
    if keep is None or keep.points <= 0:
        return []
    out = list(entries)
    while out and (len(out) > keep.points or (keep.age and now - out[0]["synced_epoch"] > keep.age)
                   or (keep.size and sum(e["undo_bytes"] for e in out) > keep.size)):
        out.pop(0)
    return out


def sweep(files: Files, state: dict[str, Any]) -> None:
    """Remove undo files the state does not list (and a part file): debris of a killed or pruned run."""
    listed = {e["undo"] for e in points(files, state)}
    pending = ((state.get("applying") or {}).get("history") or {}).get("point")
    if isinstance(pending, dict):
        listed.add(str(pending.get("undo")))  # an interrupted apply's: its state is not committed yet
    prefix = files.dest.undo_prefix
    gone = False
    for name in files.dest.folder.names():
        if name.startswith(prefix) and name not in listed and _is_ours(name[len(prefix):]):
            gone |= files.dest.folder.unlink(name)
    if gone:
        files.dest.folder.sync()


def _is_ours(suffix: str) -> bool:
    return suffix == "part" or (suffix.isdigit() and suffix.isascii())


# ---------------------------------------------------------------- writing an undo delta


def undo_pieces(fd: int, ranges: list[tuple[int, int]], old_size: int, new_size: int, *,
                sparse: bool) -> list[tuple[int, int, int]]:
    """The ranges an apply overwrites, as the destination has them now: clipped to its size, plus what a
    shrink cuts off; holes of an image file become zero ranges."""
    cut = [(o, min(o + n, old_size)) for o, n in ranges if o < old_size]
    if new_size < old_size:
        cut.append((new_size, old_size))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(cut):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        elif b > a:
            merged.append((a, b))
    out: list[tuple[int, int, int]] = []
    for a, b in merged:
        out.extend(_split_holes(fd, a, b) if sparse else [(a, b - a, KIND_DATA)])
    return out


def _split_holes(fd: int, start: int, end: int) -> list[tuple[int, int, int]]:
    out, pos = [], start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole from here to the end of the file
                return out + [(pos, end - pos, KIND_DATA)]
            data = end
        data = min(data, end)
        if data > pos:
            out.append((pos, data - pos, KIND_ZERO))
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        out.append((data, hole - data, KIND_DATA))
        pos = hole
    return out


def undo_identity(old: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """An undo delta leads from the delta's target back to what the destination holds now."""
    return {"volume": old["volume"], "base": identity["target"], "target": old["snapshot"], "source": "undo",
            "base_size": identity["target_size"], "target_size": old["size"],
            "chunk_size": identity["chunk_size"]}


def write_undo(files: Files, fd: int, identity: dict[str, Any], pieces: list[tuple[int, int, int]],
               generation: int) -> tuple[str, int]:
    """Write the undo delta of ``pieces`` (read from the destination ``fd``) durably; (its name, bytes)."""
    folder, part, name = files.dest.folder, part_name(files), undo_name(files, generation)
    layout = StreamLayout.from_pieces(identity, identity["target_size"], pieces,
                                      delta_id=delta_id_of(identity))

    def read(off: int, n: int) -> bytes:
        buf = bytearray(n)
        pread_into(fd, memoryview(buf), off)
        return bytes(buf)

    # Ask for every range at once: the disk serves them in parallel, not one scattered read at a time.
    for off, n, kind in pieces:
        if kind == KIND_DATA:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
    out = folder.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private: the volume's data
    try:
        writeback = Writeback(out)
        for block in layout.blocks(read):
            writeback.write(block)
            faults.tick("undo")
        os.fsync(out)
    except BaseException:
        os.close(out)
        folder.unlink(part)
        raise
    os.close(out)
    folder.rename(part, name)
    folder.sync()
    return name, layout.size


# ---------------------------------------------------------------- an apply's plan


def trusted(dest: Destination, old: dict[str, Any]) -> bool:
    """Whether the destination holds what its state says (so an undo delta leads back to a real point)."""
    needed = ("volume", "snapshot", "size", "generation", "synced", "synced_epoch")
    return (all(old.get(k) is not None for k in needed) and not old.get("applying")
            and not unknown_reason(old, dest.binding(), dest.path))


def plan(files: Files, fd: int, old: dict[str, Any], identity: dict[str, Any],
                 ranges: list[tuple[int, int]], *, trusted: bool, forced: bool,
                 keep: Keep | None) -> dict[str, Any]:
    """Step 2: what this apply does to the history; writes the undo delta when it adds a point.

    "drop": history is not kept, or the destination's content was not what its
    state said (the undo deltas would lead back to bytes that were never
    there); "keep": a repair mends bytes and adds no point; "add": a point
    (a sync, or a compare resync of a trusted mirror, after a rewind say).
    """
    if not trusted or forced or not identity["base"] or keep is None or keep.points <= 0:
        return {"mode": "drop"}
    if identity["source"] == "compare" and identity["target"] == old["snapshot"]:
        # A repair mends bytes back to the snapshot already held: no new point, the chain still holds.
        return {"mode": "keep", "keep": keep.as_dict()}
    pieces = undo_pieces(fd, ranges, old["size"], identity["target_size"],
                                  sparse=not files.dest.is_block)
    undo_ident = undo_identity(old, identity)
    entries, warning = points(files, old), ""
    while True:
        try:
            name, nbytes = write_undo(files, fd, undo_ident, pieces, int(old["generation"]))
            break
        except OSError as e:
            if e.errno not in NOSPACE:
                raise
            if not entries:
                return {"mode": "drop", "warning": f"no space left in {files.dest.folder.path} for the undo "
                                                   "delta of this sync: the mirror's history was dropped"}
            # Make room: the oldest point goes first, and the state stops naming it before its file goes.
            entries = entries[1:]
            files.write_state({**old, "history": entries})
            sweep(files, {**old, "history": entries})
            warning = (f"no space left in {files.dest.folder.path} for every point: the oldest points were "
                       "dropped to keep this sync's undo delta")
    point = {"generation": int(old["generation"]), "snapshot": old["snapshot"], "synced": old["synced"],
             "synced_epoch": old["synced_epoch"], "size": old["size"], "undo": name, "undo_bytes": nbytes}
    return {"mode": "add", "point": point, "keep": keep.as_dict(), "warning": warning}


def drop_for_room(files: Files, old: dict[str, Any]) -> dict[str, Any]:
    """Free what history takes (the state first stops naming it), for an apply that needs the room."""
    files.write_state({**old, "history": []})
    sweep(files, {**old, "history": []})  # this sync's own undo delta too: no state names it yet
    why = f"no space left in {files.dest.folder.path} for both the apply and its undo delta"
    return {"mode": "drop", "warning": f"{why}: the mirror's history was dropped so the sync could go on"}


def after(files: Files, old: dict[str, Any], plan: dict[str, Any], epoch: float) -> list[dict[str, Any]]:
    """The history the committing state lists, by the apply's plan and retention."""
    mode = plan.get("mode")
    if mode not in ("keep", "add", "rewind"):
        return []
    entries = points(files, old)
    if mode == "rewind":
        return [e for e in entries if e["generation"] < plan["to"]]
    keep = Keep.from_request(plan.get("keep"))
    return retained(entries + ([plan["point"]] if mode == "add" else []), keep, epoch)


# ---------------------------------------------------------------- rewind


def rewind_layers(files: Files, state: dict[str, Any], generation: int) -> list[dict[str, Any]]:
    """The entries from the point ``generation`` to the newest: the undo deltas a rewind applies."""
    entries = points(files, state)
    for i, entry in enumerate(entries):
        if entry["generation"] == generation:
            return entries[i:]
    kept = ", ".join(str(e["generation"]) for e in entries) or "none"
    raise StateError(f"{files.dest.path} keeps no point with generation {generation} (kept: {kept}); "
                     "`lvmirror history` lists them")


def compose(files: Files, base_fd: int, entries: list[dict[str, Any]]) -> tuple[overlay.Composed, list[int]]:
    """The first entry's point composed over the destination; the caller closes the returned fds."""
    fds: list[int] = []
    try:
        indexes = []
        for entry in entries:
            try:
                fds.append(files.dest.folder.open(entry["undo"], os.O_RDONLY))
            except FileNotFoundError:
                raise StateError(f"the undo delta {files.dest.where(entry['undo'])} of point "
                                 f"{entry['generation']} is missing; that point and older ones cannot be "
                                 "composed") from None
            try:
                indexes.append(overlay.index_undo(fds[-1]))
            except StreamError as e:
                raise StateError(f"the undo delta {files.dest.where(entry['undo'])} is damaged ({e}); "
                                 "that point and older ones cannot be composed") from None
        overlay.check_chain(indexes)
        size = indexes[0].target_size
        segments = overlay.overlay([i.ranges for i in indexes], size)
        base_size = os.lseek(base_fd, 0, os.SEEK_END)
        return overlay.Composed(base_fd, base_size, fds, segments, size), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def stage_rewind(files: Files, state: dict[str, Any], entries: list[dict[str, Any]],
                 composed: overlay.Composed) -> dict[str, Any]:
    """Stage the squash of the undo deltas as one complete delta; returns its progress record."""
    point = entries[0]
    identity = {"volume": state["volume"], "base": state["snapshot"], "target": point["snapshot"],
                "source": "rewind", "base_size": state["size"], "target_size": point["size"],
                "chunk_size": 4096}
    delta_id = delta_id_of(identity)
    layout = StreamLayout.from_pieces(identity, point["size"], composed.changed(), delta_id=delta_id)
    files.discard_staging()
    dest = files.dest
    fd = dest.folder.open(dest.staging_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def written() -> Iterator[bytes]:
        writeback = Writeback(fd)
        for block in layout.blocks(composed.read):
            writeback.write(block)
            yield block

    # One pass: each block is staged as the verifier reads it; the progress record carries the verifier's
    # state, as a received delta's does.  The apply verifies the staged file itself again (verify_staged).
    try:
        reader = StreamReader(BlocksFile(written()))
        for _ in reader:
            pass
        os.fsync(fd)
    finally:
        os.close(fd)
    reader_state = reader.state()
    progress = {"delta_id": delta_id, "identity": identity, "force": False, "verified": layout.size,
                "complete": True, "stream_size": layout.size, "reader": reader_state, "updated": ""}
    files.write_progress(progress)
    faults.tick("rewind")
    return files.progress() or progress
