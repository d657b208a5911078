"""Turn what a user names (``vg/lv`` snapshots, image files, a COW image) into a Delta.

One place decides which source applies and how identities are formed, so the
command line, the FUSE tree and lvmirror all get the same answer for the
same pair.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from lvdeltafs import lvm
from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import BadInput, Refused, SnapshotUnusable
from lvdeltafs.extents import ZERO, Extents
from lvdeltafs.sources import compare, cow, thin

log = logging.getLogger(__name__)

COW_MAGIC = b"SnAp"
# The identity volume of every delta between image files: see image_side.
IMAGE_VOLUME = "image"
# Fine enough that a small write costs little more than itself, coarse enough
# that the digests of a TiB volume stay a few hundred MiB.
COMPARE_BLOCK = 64 * 1024


# ---- naming ---------------------------------------------------------------

def looks_like_lv(name: str) -> bool:
    """``vg/lv`` (not an existing path) names an LVM volume."""
    return name.count("/") == 1 and not name.startswith(("/", ".")) and not os.path.exists(name)


def split_lv(name: str) -> tuple[str, str]:
    vg, lv = name.split("/")
    return vg, lv


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def image_side(size: int, digest: str) -> str:
    """``image:SIZE:DIGEST``: an image-file side named by its content, never by its path.

    ``DIGEST`` is the side's content digest (:class:`lvdeltafs.sources.compare.ContentDigest`,
    128 bits of it), taken while the compare reads the image whole anyway.  So
    the target of ``export A B`` and the base of ``export B C`` get the same
    name wherever B lives, and an image changed in place gets a new one.  The
    identity's volume is then :data:`IMAGE_VOLUME` for every image pair: a
    path would break the chain (B's copy lives elsewhere), and the sides'
    names already bind the delta to exact contents and sizes.
    """
    return f"image:{size}:{digest[:32]}"


def image_id(path: str, block_size: int = COMPARE_BLOCK) -> str:
    """The name :func:`compare_delta` gives the image at ``path`` (as base or target), by reading it whole."""
    _require_readable(path)
    size = device_size(path)
    digests = compare.block_digests(path, block_size, size)
    return image_side(size, compare.content_digest(digests, size, block_size))


def _fresh(what: str) -> str:
    """A name no other run gives: for a side that is not point in time or not read whole."""
    return f"{what}-{secrets.token_hex(8)}"


def is_cow_image(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == COW_MAGIC


def _require_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file, device or vg/lv volume") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise BadInput(f"{path}: not a regular file or block device")


# ---- file sources ---------------------------------------------------------

def compare_delta(base: str, target: str, block_size: int = COMPARE_BLOCK) -> Delta:
    """The delta between two images or block devices, by comparing their blocks.

    Each side is named by its content (:func:`image_side`), digested during
    the compare's one read of both.
    """
    for p in (base, target):
        _require_readable(p)
    base_size, target_size = device_size(base), device_size(target)
    before = _file_stamps(base, target)
    found = compare.compare_images(base, target, block_size=block_size, base_size=base_size,
                                   target_size=target_size)
    if _file_stamps(base, target) != before:
        raise Refused(f"{base} or {target} was written to while they were compared, so the delta would "
                      "name contents neither holds; stop whatever writes it (or compare copies), then "
                      "run again")
    ident = Identity(volume=IMAGE_VOLUME, base=image_side(base_size, found.base_digest),
                     target=image_side(target_size, found.target_digest), base_size=base_size,
                     target_size=target_size, chunk_size=block_size, source="compare")
    return Delta(ident, found.extents, FileReader(target, target_size))


def _file_stamps(*paths: str) -> list[tuple[int, int, int, int]]:
    """What changes when a regular file is written (block devices keep no such stamp)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode)
                   else (st.st_dev, st.st_ino, 0, 0))
    return out


def cow_image_delta(cow_path: str, target: str) -> Delta:
    """A classic COW store copied to a file (or a COW device) with an image of the target.

    Only the chunks the store lists are read, so neither side is read whole
    and neither can be named by its content: both get names fresh each run.
    Such a delta never chains (no destination's state can name its base);
    it applies with ``lvmirror apply --force``, which a full check follows.
    """
    for p in (cow_path, target):
        _require_readable(p)
    target_size = device_size(target)
    table = cow.read_exception_table(cow_path)
    extents = cow.cow_extents(table, target_size)
    run = _fresh("run")
    ident = Identity(volume=IMAGE_VOLUME, base=f"cow:{target_size}:{run}",
                     target=f"image:{target_size}:{run}", base_size=target_size, target_size=target_size,
                     chunk_size=table.chunk_size, source="cow")
    return Delta(ident, extents, FileReader(target, target_size))


# ---- LVM sources ----------------------------------------------------------

@dataclass(frozen=True)
class LvmPair:
    """Two sides of one origin: a base snapshot and a newer snapshot (or the origin itself).

    Sizes are the devices' own: for a classic snapshot ``lvs`` reports the
    size of its COW space, not of the volume it shows.
    """

    base: lvm.LogicalVolume
    target: lvm.LogicalVolume
    origin: lvm.LogicalVolume
    base_size: int
    target_size: int

    @property
    def point_in_time(self) -> bool:
        return self.target.uuid != self.origin.uuid


def resolve_lvm_pair(base_name: str, target_name: str) -> LvmPair:
    """Look both volumes up and check they are snapshots of one origin, in order."""
    bvg, blv = split_lv(base_name)
    tvg, tlv = split_lv(target_name)
    base = _existing(bvg, blv)
    target = _existing(tvg, tlv)
    if not base.is_snapshot:
        raise BadInput(f"{base_name} is not a snapshot: the base of a delta must be one")
    origin = _existing(bvg, base.origin)
    if target.uuid != origin.uuid and (not target.is_snapshot or target.origin != base.origin
                                       or tvg != bvg):
        raise BadInput(f"{target_name} is not a snapshot of {bvg}/{base.origin} (the origin of "
                       f"{base_name}): a delta needs two snapshots of the same volume")
    if target.uuid == base.uuid:
        raise BadInput(f"{base_name} and {target_name} are the same snapshot")
    if target.is_snapshot and (target.creation, target.name) < (base.creation, base.name):
        raise BadInput(f"{target_name} is older than {base_name}: name the older snapshot first")
    lvm.require_usable(base)
    if target.is_snapshot:
        lvm.require_usable(target)
    return LvmPair(base, target, origin, device_size(base.path), device_size(target.path))


def _existing(vg: str, lv: str) -> lvm.LogicalVolume:
    found = lvm.get_lv(vg, lv)
    if found is None:
        raise BadInput(f"{vg}/{lv}: no such logical volume (lvs {vg} lists what there is)")
    return found


def lvm_delta(base_name: str, target_name: str) -> Delta:
    """The delta between two snapshots of one LVM volume (classic or thin)."""
    pair = resolve_lvm_pair(base_name, target_name)
    if pair.base.is_thin:
        return _thin_delta(pair)
    if pair.base.is_classic_snapshot:
        return _classic_delta(pair)
    raise BadInput(f"{base_name}: neither a classic nor a thin snapshot")


def _identity(pair: LvmPair, extents_chunk: int, source: str) -> Identity:
    # A live origin keeps changing: named afresh each run, a transfer of it never resumes into another's.
    target = pair.target.snapshot_id if pair.point_in_time else _fresh(f"{pair.origin.uuid}@origin")
    return Identity(volume=pair.origin.uuid, base=pair.base.snapshot_id, target=target,
                    base_size=pair.base_size, target_size=pair.target_size,
                    chunk_size=extents_chunk, source=source)


def _finish(pair: LvmPair, extents: Extents, chunk_size: int, source: str) -> Delta:
    """The Delta of an LVM pair, once its extents are read."""
    # The change list was read after the target existed; if either snapshot was
    # invalidated meanwhile, what was read may be incomplete.
    _recheck(pair)
    delta = Delta(_identity(pair, chunk_size, source), extents,
                  FileReader(pair.target.path, pair.target_size), point_in_time=pair.point_in_time)
    if not pair.point_in_time:
        delta.notes.append("target is the live origin: not point in time")
    return delta


def _classic_delta(pair: LvmPair) -> Delta:
    base = pair.base
    cow_dev = lvm.cow_device(base.vg, base.name)
    table = cow.read_exception_table(cow_dev, name=f"{base.vg}/{base.name}")
    # A grown volume's new tail is sent whole: the destination's new space may hold anything.
    extents = cow.cow_extents(table, pair.base_size).with_tail(pair.base_size, pair.target_size)
    return _finish(pair, extents, table.chunk_size, "cow")


def _thin_delta(pair: LvmPair) -> Delta:
    base, target = pair.base, pair.target
    if not target.is_thin or target.pool != base.pool:
        raise BadInput(f"{target.vg}/{target.name} is not a thin volume of pool {base.pool}")
    devices = lvm.pool_devices(base.vg, base.pool)
    block = _existing(base.vg, base.pool).chunk_size
    with thin.MetadataSnapshot(devices.tpool_name):
        extents = thin.thin_delta_extents(devices.tmeta, base.thin_id, target.thin_id,
                                          pair.target_size, metadata_snap=True)
    if pair.target_size > pair.base_size:
        # Unmapped new space reads as zeros, but the destination's may not.
        tail = Extents.from_ranges([pair.base_size], [pair.target_size - pair.base_size], [ZERO],
                                   pair.target_size)
        extents = extents.union(tail)
    return _finish(pair, extents, block, "thin")


def _recheck(pair: LvmPair) -> None:
    for side in (pair.base, pair.target):
        if side.is_snapshot:
            fresh = lvm.lv_by_uuid(side.uuid)
            if fresh is None:
                raise SnapshotUnusable(f"{side.vg}/{side.name} disappeared while its delta was read")
            lvm.require_usable(fresh)


# ---- entry point ----------------------------------------------------------

def open_delta(base: str, target: str, *, source: str | None = None) -> Delta:
    """The delta from BASE to TARGET, choosing the source from what they are.

    - two ``vg/lv`` snapshots of one origin: classic COW table or thin_delta;
    - a file or device whose first bytes are a COW header, and a target image: cow;
    - any two files or devices: a block compare.
    ``source`` ("cow", "compare") forces the file interpretation.
    """
    if looks_like_lv(base) and looks_like_lv(target) and source is None:
        return lvm_delta(base, target)
    if looks_like_lv(base) or looks_like_lv(target):
        raise BadInput(f"{base} and {target}: name two LVM volumes (vg/lv) or two files, not one of each")
    if source not in (None, "cow", "compare"):
        raise Refused(f"unknown source {source!r}: use cow or compare")
    _require_readable(base)
    if source == "cow" or (source is None and is_cow_image(base)):
        return cow_image_delta(base, target)
    return compare_delta(base, target)


def pair_label(base: str, target: str) -> str:
    """A directory-safe name for an explicit pair."""
    return f"{Path(base).name}..{Path(target).name}"
