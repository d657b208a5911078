"""The ranges of deltas in flight, kept so that a broken run resumes byte for byte.

A classic snapshot's COW table keeps growing while it exists, so a delta
recomputed after a break could differ from the one the receiver holds part
of; the ranges saved here rebuild exactly the stream that was being sent.
One folder per volume (``WORK_DIR/inflight/VOLUME``), private, opened through
:class:`lvdeltafs.fsio.Folder` like every folder root writes in.
"""

from __future__ import annotations

import logging
import os

from lvdeltafs.errors import BadInput, Refused
from lvdeltafs.extents import Extents, format_ranges, parse_ranges
from lvdeltafs.fsio import Folder, UnsafePath

log = logging.getLogger(__name__)
MAX_RANGES_FILE = 1 << 30


def _folder(spool: str) -> Folder:
    try:
        return Folder(spool, create=True)
    except UnsafePath as e:
        raise Refused(f"the work folder for deltas in flight is unsafe: {e}") from None


def _name(delta_id: str) -> str:
    return f"{delta_id}.ranges"


def save(spool: str, delta_id: str, extents: Extents) -> None:
    """Keep the ranges of a delta in flight (written once, atomically)."""
    with _folder(spool) as folder:
        if folder.stat(_name(delta_id)) is None:
            folder.replace(_name(delta_id), format_ranges(extents).encode())


def load(spool: str, delta_id: str, size: int) -> Extents | None:
    """The saved ranges of a delta, or None (never saved, or unusable: the delta is then sent anew)."""
    with _folder(spool) as folder:
        try:
            raw = folder.read_small(_name(delta_id), MAX_RANGES_FILE)
        except UnsafePath as e:
            log.warning("ignoring the saved ranges of delta %s: %s", delta_id, e)
            return None
    if raw is None:
        return None
    try:
        return parse_ranges(raw, size)
    except (BadInput, ValueError) as e:
        log.warning("ignoring the saved ranges of delta %s: %s", delta_id, e)
        return None


def forget(spool: str, delta_id: str) -> None:
    with _folder(spool) as folder:
        folder.unlink(_name(delta_id))


def clear(spool: str) -> None:
    """Forget the ranges of deltas no longer in flight (the destination moved past them)."""
    with _folder(spool) as folder:
        for name in [n for n in os.listdir(folder.fd) if n.endswith(".ranges")]:
            folder.unlink(name)
