"""The deltas lvmirror builds besides LVM's own: full copies, compare resyncs, and the digests they need.

- init:    base "" (an empty destination) and the snapshot's non-zero blocks (thin: mapped blocks);
- resync:  block digests of the destination against the new snapshot; its base names the
           destination's present content (the receiver's token), so it applies to nothing else;
- repair:  the same, against the snapshot the destination holds;
- exact:   an incremental's ranges cut down to the 4 KiB blocks that differ from its base (``exact = true``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from lvdeltafs import exact, lvm
from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.sources import compare
from lvmirror.client import Hello, ReceiverClient
from lvmirror.progress import Progress, human

log = logging.getLogger(__name__)

BLOCK_SIZE = compare.DEFAULT_BLOCK_SIZE


def nonzero_extents(path: str, size: int, block_size: int = BLOCK_SIZE,
                    progress: Callable[[int], None] | None = None) -> Extents:
    """DATA where a block holds anything but zeros, ZERO elsewhere: a full copy that skips zero runs."""
    digests = compare.block_digests(path, block_size, size, progress=progress)
    data = Extents.from_chunks(np.flatnonzero(~digests["zero"]), block_size, size, DATA)
    return with_zero_rest(data, size)


def with_zero_rest(data: Extents, size: int) -> Extents:
    """Say ZERO for everything ``data`` does not cover.

    A fresh image file keeps those as holes; a destination that held older
    bytes there gets them zeroed, so an init is right whatever was there.
    """
    if size == 0:
        return Extents.empty()
    return data.data_only().union(Extents.from_ranges([0], [size], [ZERO], size))


def full_copy_delta(volume: str, target_id: str, path: str, size: int, *, source: str,
                    mapped: Extents | None = None, block_size: int = BLOCK_SIZE) -> Delta:
    """An init: base "" (an empty destination) to the target, data ranges only where data is."""
    if mapped is not None:
        extents = with_zero_rest(mapped, size)
    else:
        with Progress("scanning for data", size) as bar:
            extents = nonzero_extents(path, size, block_size, bar.update)
    ident = Identity(volume=volume, base="", target=target_id, base_size=0, target_size=size,
                     chunk_size=block_size, source=source)
    return Delta(ident, extents, FileReader(path, size))


def thin_mapped(snap: lvm.LogicalVolume, size: int) -> Extents:
    """The blocks a thin snapshot maps (the rest reads as zeros), from the pool's metadata."""
    from lvdeltafs.sources import thin
    devices = lvm.pool_devices(snap.vg, snap.pool)
    with thin.MetadataSnapshot(devices.tpool_name):
        return thin.thin_mapped_extents(devices.tmeta, snap.thin_id, size, metadata_snap=True)


def destination_digests(client: ReceiverClient, target_size: int, block_size: int = BLOCK_SIZE,
                        point: int | None = None) -> tuple[int, int, np.ndarray]:
    """(destination size, bytes the digests cover, digests), computed by the receiver where it lives
    (of its kept point ``point``, if given).

    Only the blocks under the target's size are asked for: what lies past it
    is cut off anyway, and it bounds what a far side can make us hold.
    """
    max_blocks = -(-target_size // block_size)
    size, raw = client.digests(block_size, max_blocks, point)
    covered = min(size, max_blocks * block_size)
    return size, covered, compare.digests_from_bytes(bytes(raw), block_size, covered)


def source_digests(path: str, size: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    with Progress(f"reading {path}", size) as bar:
        return compare.block_digests(path, block_size, size, progress=bar.update)


def compare_delta(client: ReceiverClient, hello: Hello, volume: str, target_id: str, path: str, size: int,
                  block_size: int = BLOCK_SIZE) -> Delta:
    """Only the blocks where the destination differs from the target, found by digests on both sides.

    Its base is the receiver's token for the destination as it is now, so the
    receiver applies it only if nothing changed the destination since.
    """
    return delta_over(hello, compare_extents(client, path, size, block_size), volume, target_id, path, size,
                      block_size)


def delta_over(hello: Hello, extents: Extents, volume: str, target_id: str, path: str, size: int,
               block_size: int = BLOCK_SIZE) -> Delta:
    """The compare delta of ``extents`` (what differs) over the destination as ``hello`` saw it."""
    ident = Identity(volume=volume, base=hello.token, target=target_id, base_size=hello.size,
                     target_size=size, chunk_size=block_size, source="compare")
    return Delta(ident, extents, FileReader(path, size))


def compare_extents(client: ReceiverClient, path: str, size: int, block_size: int = BLOCK_SIZE,
                    point: int | None = None) -> Extents:
    """What differs between the destination (or its kept point ``point``) and the image or device at
    ``path``."""
    _, covered, dest = destination_digests(client, size, block_size, point)
    src = source_digests(path, size, block_size)
    return compare.diff_digests(dest, src, block_size, covered, size)


def exact_delta(delta: Delta, base_path: str, label: str) -> Delta:
    """``exact = true``: the incremental ``delta`` with only the 4 KiB blocks that differ from its base.

    Both snapshots are on this host, so this costs a local read of the changed
    ranges on each side, not the link.  The identity stays (see
    :func:`lvdeltafs.exact.refine_delta`).  On failure ``delta`` is closed.
    """
    try:
        with Progress(f"{label}: comparing with the base", delta.extents.data_bytes) as bar:
            refined = exact.refine_delta(delta, base_path, progress=bar.update)
    except BaseException:
        delta.close()
        raise
    log.info("%s: exact: %s of the %s marked changed hold the same bytes as the base; %s to send",
             label, human(refined.unchanged_bytes or 0), human(delta.extents.data_bytes),
             human(refined.extents.data_bytes))
    return refined
