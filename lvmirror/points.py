"""A mirror's kept points as lvmirror shows them: `lvmirror history` and `lvmirror rewind`.

The receiver owns the history (:mod:`lvmirror.remote.history`, docs/history.md):
what it reports is the far side's word, so every entry is checked here
before it is shown or acted on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from lvdeltafs.errors import BadInput, Refused
from lvmirror.client import Hello, ReceiverClient
from lvmirror.config import VolumeConfig
from lvmirror.pipelines import hello, volume_receiver
from lvmirror.remote import wire
from lvmirror.remote.history import Keep, retained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    generation: int
    snapshot: str
    synced: str
    synced_epoch: float
    size: int
    undo_bytes: int

    def as_entry(self) -> dict[str, Any]:
        return {"generation": self.generation, "snapshot": self.snapshot, "synced": self.synced,
                "synced_epoch": self.synced_epoch, "size": self.size, "undo_bytes": self.undo_bytes}


@dataclass
class History:
    """What `lvmirror history` shows for one destination."""

    dest: str
    points: list[Point]  # oldest first
    current: dict[str, Any]  # the state the destination holds now ({} if nothing known)
    keep: Keep
    drops_next: list[int]  # the generations the next sync's retention drops

    @property
    def undo_bytes(self) -> int:
        return sum(p.undo_bytes for p in self.points)


def parse_points(state: dict[str, Any], where: str) -> list[Point]:
    """The state's history, as the far side reports it, each field checked."""
    raw = state.get("history") or []
    if not isinstance(raw, list) or len(raw) > 100000:
        raise BadInput(f"the {where} reported a history that is not a list of points")
    out = []
    what = f"the {where}'s history"
    for entry in raw:
        if not isinstance(entry, dict):
            raise BadInput(f"{what} holds an entry that is not an object")
        epoch = entry.get("synced_epoch")
        if not isinstance(epoch, int | float) or isinstance(epoch, bool):
            raise BadInput(f"{what} holds an entry without a time")
        try:
            out.append(Point(wire.int_field(entry, "generation", what=what),
                             wire.str_field(entry, "snapshot", what=what),
                             wire.str_field(entry, "synced", what=what), float(epoch),
                             wire.int_field(entry, "size", what=what),
                             wire.int_field(entry, "undo_bytes", what=what)))
        except wire.ProtocolError as e:
            raise BadInput(str(e)) from None
    return out


def history_of(vol: VolumeConfig, now: float | None = None) -> History:
    """The kept points of the volume's destination, and what retention drops at the next sync."""
    with volume_receiver(vol) as client:
        greeting = hello(client)
    state = greeting.state or greeting.recorded
    points = parse_points(state, client.where) if greeting.state else []
    now = time.time() if now is None else now
    drops: list[int] = []
    if greeting.state.get("snapshot"):
        # The next sync adds what the destination holds now as a point; its size is not known yet.
        nxt = {"generation": -1, "synced_epoch": now, "undo_bytes": 0}
        kept = {e["generation"] for e in retained([p.as_entry() for p in points] + [nxt], vol.history, now)}
        drops = [p.generation for p in points if p.generation not in kept]
    return History(str(vol.destination), points, greeting.state, vol.history, drops)


def find_point(points: list[Point], wanted: str) -> Point:
    """POINT as a user gives it: a generation number, or the point's snapshot name."""
    for p in points:
        if wanted == str(p.generation) or wanted == p.snapshot:
            return p
    kept = ", ".join(str(p.generation) for p in points) or "none"
    raise BadInput(f"no kept point {wanted!r} (kept generations: {kept}); `lvmirror history` lists them")


def known(vol: VolumeConfig, client: ReceiverClient, why: str) -> tuple[Hello, list[Point]]:
    """The greeting of a destination whose state is trusted, and its points; Refused otherwise."""
    greeting = hello(client)
    if greeting.problem:
        raise Refused(f"{vol.name}: {greeting.problem}")
    if not greeting.state.get("snapshot"):
        raise Refused(f"{vol.name}: the destination {vol.destination} holds nothing lvmirror knows of "
                      f"({greeting.unknown or 'no state'}), so {why}")
    return greeting, parse_points(greeting.state, client.where)


def rewind(vol: VolumeConfig, wanted: str) -> tuple[Point, dict[str, Any]]:
    """Make the volume's destination equal one of its kept points; (the point, the new state)."""
    with volume_receiver(vol) as client:
        _greeting, points = known(vol, client, "it has no points to rewind to")
        point = find_point(points, wanted)
        reply = client.rewind(point.generation)
    state = reply.get("state") if isinstance(reply.get("state"), dict) else {}
    return point, state
