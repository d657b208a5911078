"""Who may read what through the mount: owner, group and read bits of each entry.

By default the mounting user alone (0400/0500).  With ``--allow-other`` each
entry carries the owner and group of the volume or image it shows, and at most
its read bits, so nobody reads through the mount what they could not read at
the source.  The kernel enforces these (the mount uses ``default_permissions``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    """Owner, group and read bits (a subset of 0o444) of an entry; nothing is ever writable."""

    uid: int
    gid: int
    read: int

    @property
    def file_mode(self) -> int:
        return self.read

    @property
    def dir_mode(self) -> int:
        return self.read | (self.read >> 2)  # x wherever r: a listable directory is enterable


NOBODY_BUT_ROOT = Access(0, 0, 0)


def shared_access(sources: Sequence[str]) -> Access:
    """With --allow-other: the owner, group and read bits of the newest of ``sources`` (the newer
    side of a pair: a snapshot's device node or an image), narrowed to the readers each older
    source lets in too, since a delta also shows where the newer side differs from the older.

    A source that cannot be looked at (an inactive LV, a removed image) leaves the entry to root.
    """
    try:
        stats = [os.stat(p) for p in sources]
    except (OSError, ValueError):
        return NOBODY_BUT_ROOT
    if not stats:
        return NOBODY_BUT_ROOT
    newer = stats[-1]
    read = newer.st_mode & 0o444
    for older in stats[:-1]:
        read &= _readers(older, newer.st_uid, newer.st_gid)
    return Access(newer.st_uid, newer.st_gid, read)


def _readers(st: os.stat_result, uid: int, gid: int) -> int:
    """Which classes of a file owned by uid:gid (0o400 owner, 0o040 group, 0o004 others) ``st`` lets read.

    Conservative: the owner counts only as the owner, never as a member of some group.
    """
    if st.st_mode & 0o004:
        return 0o444
    return ((0o400 if st.st_uid == uid and st.st_mode & 0o400 else 0)
            | (0o040 if st.st_gid == gid and st.st_mode & 0o040 else 0))
