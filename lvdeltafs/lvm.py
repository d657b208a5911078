"""Facts and actions on LVM and device-mapper: a thin adapter returning plain dataclasses.

Every external command goes through :func:`lvdeltafs.command.run` with a
timeout, and names from config or users only ever travel as single argv
elements, after :func:`check_name` has accepted them.

Facts come from ``lvs --reportformat json`` (LVM 2.03.16: every value is a
string, blank when not applicable; there is no ``json_std``).  Creation times
are requested as epoch seconds (``report/time_format="%s"``) and turned into a
UTC string here, because the default format follows the caller's time zone and
``lvm.conf``: a snapshot's identity must not change when cron runs with another TZ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from lvdeltafs.command import run
from lvdeltafs.errors import BadInput, LvError, Refused, SnapshotUnusable

LVS_TIMEOUT = 60.0
CHANGE_TIMEOUT = 120.0
DMSETUP_TIMEOUT = 30.0

LVS_FIELDS = (
    "lv_uuid", "lv_name", "vg_name", "lv_attr", "origin", "origin_uuid", "pool_lv", "thin_id",
    "lv_size", "chunk_size", "snap_percent", "data_percent", "metadata_percent", "lv_time", "lv_dm_path",
    "lv_path",
    "lv_tags", "lv_merging", "lv_skip_activation", "lv_active",
)
# -a: a snapshot being merged turns hidden ("[name]"), and must still be seen
# as merging rather than as gone.
_LVS_BASE = ("lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix",
             "--config", 'report/time_format="%s"', "-o", ",".join(LVS_FIELDS))

# LVM's own rules (lib/misc/lvm-string.c): these characters, no leading '-',
# not '.' or '..', under 128 bytes.  Reserved words and suffixes (_tmeta, ...)
# are left to LVM to refuse, which it does with a clear message.
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_TAG_RE = re.compile(r"[A-Za-z0-9_+./=!:&#][A-Za-z0-9_+.\-/=!:&#]{0,1023}")
_SIZE_RE = re.compile(r"[0-9]+(\.[0-9]+)?[bBsSkKmMgGtTpPeE]?")
_MAJMIN_RE = re.compile(r"[0-9]+:[0-9]+")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if LVM would accept it as a VG or LV name, else raise BadInput."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadInput(f"{what} {name!r} is not a valid LVM name: use letters, digits and + _ . - "
                       "(not starting with '-'), at most 127 characters")
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` if LVM would accept it as a tag, else raise BadInput."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise BadInput(f"tag {tag!r} is not a valid LVM tag: use letters, digits and _ + . - / = ! : & # "
                       "(not starting with '-'), at most 1024 characters")
    return tag


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of ``vg/lv``: each '-' inside a part doubled, parts joined by '-'."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _natural_key(name: str) -> tuple:
    # Text and digit runs alternate, starting with text, so the tuples always compare.
    return tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"([0-9]+)", name)))


@dataclass(frozen=True)
class LogicalVolume:
    """One row of ``lvs``, typed.  Sizes are bytes; percentages None where LVM gives none."""

    uuid: str
    name: str
    vg: str
    attr: str
    origin: str
    origin_uuid: str
    pool: str
    thin_id: int | None
    # lv_size as lvs reports it: for a classic snapshot, the size of its COW space, not of the
    # volume it shows (pairs.device_size gives that).
    size: int
    chunk_size: int
    snap_percent: float | None
    data_percent: float | None  # a thin pool's data use (of a thin volume: how much of it is mapped)
    time: str  # creation time, UTC, "YYYY-MM-DDTHH:MM:SSZ"; "" if LVM does not know it
    creation: int | None  # the same as epoch seconds
    dm_path: str
    path: str
    tags: tuple[str, ...]
    merging: bool = False
    active: bool = False
    activation_skip: bool = False
    hidden: bool = False  # LVM-internal or merging; lvs shows it as "[name]"
    metadata_percent: float | None = None  # a thin pool's metadata use

    @property
    def vg_lv(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def is_classic_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_snapshot(self) -> bool:
        return self.is_classic_snapshot or (self.is_thin and bool(self.origin))

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"

    @property
    def is_invalid(self) -> bool:
        # 'I' invalid snapshot; 'S' is the same while suspended.
        return self.is_classic_snapshot and self.attr[4:5] in ("I", "S")

    @property
    def is_merging(self) -> bool:
        # 'S'/'O' merging snapshot/origin; 'm'/'M' a merge that failed, which is no safer to read.
        return self.merging or self.attr[:1] in ("S", "O") or self.attr[4:5] in ("m", "M")

    @property
    def is_active(self) -> bool:
        return self.active

    @property
    def needs_activation_skip_override(self) -> bool:
        """True when plain activation skips it (``-k``): activate with ``lvchange -ay -K``."""
        return self.activation_skip or self.attr[9:10] == "k"

    @property
    def snapshot_id(self) -> str:
        """How a snapshot is named in delta identities: UUID and creation time."""
        return f"{self.uuid}@{self.time}"


def _int_or_none(s: str) -> int | None:
    return int(s) if s != "" else None


def _float_or_none(s: str) -> float | None:
    return float(s) if s != "" else None


def _utc(epoch: int | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str) -> int | None:
    """lv_time as we request it (epoch seconds); LVM's default format is accepted too."""
    if text == "":
        return None
    if text.isdigit():
        return int(text)
    try:
        return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").timestamp())
    except ValueError:
        raise BadInput(f"lvs gave an lv_time this tool cannot read: {text!r}") from None


def _lv_from_row(row: dict[str, str]) -> LogicalVolume:
    creation = _epoch(row["lv_time"])
    name = row["lv_name"]
    hidden = name.startswith("[") and name.endswith("]")
    return LogicalVolume(
        uuid=row["lv_uuid"], name=name[1:-1] if hidden else name, vg=row["vg_name"], attr=row["lv_attr"],
        origin=row["origin"], origin_uuid=row.get("origin_uuid", ""), pool=row["pool_lv"],
        thin_id=_int_or_none(row["thin_id"]), size=int(row["lv_size"]),
        chunk_size=int(row["chunk_size"] or 0),
        snap_percent=_float_or_none(row["snap_percent"]), data_percent=_float_or_none(row["data_percent"]),
        time=_utc(creation), creation=creation, dm_path=row["lv_dm_path"], path=row["lv_path"],
        tags=tuple(sorted(t for t in row["lv_tags"].split(",") if t)),
        merging=bool(row.get("lv_merging", "")),
        active=row.get("lv_active", "") not in ("", "inactive"),
        activation_skip=bool(row.get("lv_skip_activation", "")),
        hidden=hidden, metadata_percent=_float_or_none(row.get("metadata_percent", "")),
    )


def parse_lvs_json(text: str) -> list[LogicalVolume]:
    """Parse ``lvs --reportformat json`` output (pure: no commands run)."""
    try:
        doc = json.loads(text)
        rows = [row for report in doc["report"] for row in report.get("lv", [])]
        return [_lv_from_row(row) for row in rows]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"could not read the report of lvs ({type(e).__name__}: {e}); "
                       f"it began: {text[:200]!r}") from None


def list_lvs(vg: str | None = None, *, hidden: bool = False) -> list[LogicalVolume]:
    """The LVs of one VG or of all; LVM-internal and merging ones only with ``hidden``."""
    argv = [*_LVS_BASE, *([check_name(vg, "volume group")] if vg is not None else [])]
    lvs = parse_lvs_json(run(argv, timeout=LVS_TIMEOUT))
    return lvs if hidden else [x for x in lvs if not x.hidden]


def get_lv(vg: str, lv: str) -> LogicalVolume | None:
    """``vg/lv``, or None if the VG has no such LV (a missing VG raises CommandFailed)."""
    check_name(lv, "logical volume")
    return next((x for x in list_lvs(vg, hidden=True) if x.name == lv), None)


def lv_by_uuid(uuid: str) -> LogicalVolume | None:
    """The LV with this UUID in any VG, or None: UUIDs survive renames, names do not."""
    return next((x for x in list_lvs(hidden=True) if x.uuid == uuid), None)


def snapshots_of(vg: str, origin: str) -> list[LogicalVolume]:
    """Snapshots (classic and thin) of ``vg/origin``, oldest first.

    lv_time has one-second resolution, so ties are broken by the thin device
    id (LVM allocates those increasing within a pool) and then by the name in
    natural order (``s9`` before ``s10``): give snapshots taken within one
    second names that sort in creation order.  A snapshot being merged is
    listed too (``is_merging``), so callers can see it and leave it alone.
    """
    check_name(origin, "logical volume")
    snaps = [x for x in list_lvs(vg, hidden=True) if x.is_snapshot and x.origin == origin]
    return sorted(snaps, key=lambda x: (x.creation or 0, x.thin_id if x.thin_id is not None else -1,
                                        _natural_key(x.name)))


def require_usable(lv: LogicalVolume | None, what: str = "snapshot") -> LogicalVolume:
    """Return ``lv`` if a correct delta can be read from it; otherwise raise SnapshotUnusable saying why."""
    if lv is None:
        raise SnapshotUnusable(f"the {what} is gone (removed or renamed outside lvmirror); "
                               "a full compare resync is needed to bring the mirror back in step")
    if not lv.is_snapshot:
        raise SnapshotUnusable(f"{lv.vg_lv} is not a snapshot, so it cannot be a delta's {what}")
    if lv.is_invalid:
        raise SnapshotUnusable(
            f"snapshot {lv.vg_lv} is invalid: its COW space filled up (or had an I/O error) and the "
            f"kernel dropped it. Remove it (lvremove {lv.vg_lv}); the next sync falls back to a "
            "compare resync. Give the volume a larger snapshot size so it does not happen again")
    if lv.is_merging:
        raise SnapshotUnusable(
            f"snapshot {lv.vg_lv} is being merged into its origin (lvconvert --merge); leave it alone "
            "and let the merge finish; the next sync takes a new base")
    if not lv.is_active:
        raise SnapshotUnusable(f"snapshot {lv.vg_lv} is not active; activate it with "
                               f"lvchange -ay -K {lv.vg_lv}")
    return lv


def _dmsetup_table(name: str, hint: str) -> list[list[str]]:
    out = run(["dmsetup", "table", name], timeout=DMSETUP_TIMEOUT, hint=hint)
    return [line.split() for line in out.splitlines() if line.strip()]


def cow_device(vg: str, snap: str) -> str:
    """Path of the exception store (COW device) of the classic snapshot ``vg/snap``.

    Found through the kernel, not by guessing ``-cow`` names: argument 2 of
    the ``snapshot`` target line is the COW's major:minor, and sysfs names it.
    """
    name = dm_name(check_name(vg, "volume group"), check_name(snap, "logical volume"))
    table = _dmsetup_table(name, hint=f"is {vg}/{snap} an active snapshot? lvs {vg}")
    if len(table) != 1 or len(table[0]) < 7 or table[0][2] != "snapshot":
        kinds = ", ".join(t[2] for t in table if len(t) > 2) or "empty"
        raise SnapshotUnusable(f"{vg}/{snap} is not a classic snapshot: its device-mapper table is "
                               f"{kinds!r}, not 'snapshot' (a thin snapshot's delta comes from thin_delta; "
                               "a merging snapshot must be left alone)")
    majmin = table[0][4]
    if not _MAJMIN_RE.fullmatch(majmin):
        raise SnapshotUnusable(f"{vg}/{snap}: cannot read the COW device from the table {table[0]}")
    try:
        with open(f"/sys/dev/block/{majmin}/dm/name") as f:
            cow = f.read().strip()
    except OSError as e:
        raise SnapshotUnusable(f"{vg}/{snap}: its COW device {majmin} is not a device-mapper "
                               f"device ({e.strerror})") from None
    return f"/dev/mapper/{cow}"


@dataclass(frozen=True)
class PoolDevices:
    """The device-mapper devices of a thin pool that thin_delta needs."""

    tpool_name: str  # takes `dmsetup message` (reserve/release_metadata_snap)
    tpool: str
    tmeta_name: str
    tmeta: str


def pool_devices(vg: str, pool: str) -> PoolDevices:
    """The ``-tpool`` and ``_tmeta`` devices of the active thin pool ``vg/pool``."""
    tpool = dm_name(check_name(vg, "volume group"), check_name(pool, "thin pool")) + "-tpool"
    table = _dmsetup_table(tpool, hint=f"is the thin pool {vg}/{pool} active? lvchange -ay {vg}/{pool}")
    if len(table) != 1 or len(table[0]) < 3 or table[0][2] != "thin-pool":
        raise BadInput(f"{vg}/{pool} is not an active thin pool: {tpool} has no thin-pool table")
    tmeta = dm_name(vg, pool + "_tmeta")
    return PoolDevices(tpool, f"/dev/mapper/{tpool}", tmeta, f"/dev/mapper/{tmeta}")


# LVM's size units (lvcreate(8), "UNIT"): either case, binary multiples, s a 512-byte sector.
SIZE_UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
              "e": 1 << 60}


def size_in_bytes(text: str, default_unit: str = "m") -> int:
    """Bytes in an LVM size such as ``12M``, ``1.5g`` or ``512``: the one reader of LVM's size grammar.

    A plain number is in ``default_unit``: MiB, as ``lvcreate -L`` reads it, unless the caller
    says otherwise.  Fractions are exact (no float rounding), then rounded down to whole bytes.
    ValueError for anything LVM would not read as a size.
    """
    from fractions import Fraction
    text = text.strip()
    if not _SIZE_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a size (a number with an optional unit b, s, k, m, g, t, p or e)")
    unit = text[-1].lower() if text[-1].isalpha() else default_unit
    number = text[:-1] if text[-1].isalpha() else text
    return int(Fraction(number) * SIZE_UNITS[unit])


def _size_arg(size: int | str, what: str) -> str:
    if isinstance(size, bool):
        raise BadInput(f"{what} {size!r} is not a size")
    if isinstance(size, int):
        if size <= 0:
            raise BadInput(f"{what} must be positive, not {size}")
        return f"{size}b"
    if not _SIZE_RE.fullmatch(size):
        raise BadInput(f"{what} {size!r} is not a size LVM understands (e.g. 1G, 512M, or bytes)")
    return size


def _chunk_arg(chunk_size: int | str) -> str:
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        if chunk_size < 4096 or chunk_size > 512 * 1024 or chunk_size & (chunk_size - 1):
            raise BadInput(f"snapshot chunk size {chunk_size} must be a power of two from 4 KiB to 512 KiB")
        return f"{chunk_size // 1024}k"
    return _size_arg(chunk_size, "snapshot chunk size")


def _tag_args(tags: Iterable[str]) -> list[str]:
    return [a for t in tags for a in ("--addtag", check_tag(t))]


def create_snapshot(vg: str, origin: str, name: str, *, size: int | str | None = None,
                    chunk_size: int | str | None = None, tags: Iterable[str] = (),
                    thin: bool | None = None) -> LogicalVolume:
    """Snapshot ``vg/origin`` as ``vg/name``, active and readable, and return it.

    ``thin=None`` picks a thin snapshot for a thin origin when no ``size`` is
    given, else a classic one, which needs ``size`` (its COW space: '1G' or
    bytes).  Thin snapshots are created with ``-kn`` so they are active now and
    after a reboot.
    """
    for n, what in ((vg, "volume group"), (origin, "origin"), (name, "snapshot name")):
        check_name(n, what)
    tag_args = _tag_args(tags)
    src = get_lv(vg, origin)
    if src is None:
        raise BadInput(f"cannot snapshot {vg}/{origin}: no such logical volume")
    if thin is None:
        thin = src.is_thin and size is None
    if thin:
        if not src.is_thin:
            raise BadInput(f"{vg}/{origin} is not a thin volume; a classic snapshot needs a size")
        if size is not None or chunk_size is not None:
            raise BadInput("a thin snapshot takes no size or chunk size: it shares its pool's space")
        argv = ["lvcreate", "-q", "-s", "-kn", "-n", name, *tag_args, f"{vg}/{origin}"]
    else:
        if size is None:
            raise BadInput(f"a classic snapshot of {vg}/{origin} needs a size for its COW space, e.g. 1G")
        argv = ["lvcreate", "-q", "-s", "-L", _size_arg(size, "snapshot size"),
                *(["-c", _chunk_arg(chunk_size)] if chunk_size is not None else []),
                "-n", name, *tag_args, f"{vg}/{origin}"]
    run(argv, timeout=CHANGE_TIMEOUT, hint=f"creating snapshot {vg}/{name} of {vg}/{origin}")
    snap = get_lv(vg, name)
    if snap is None:
        raise LvError(f"lvcreate reported success but {vg}/{name} is not there")
    return snap if snap.is_active else activate(vg, name)


def activate(vg: str, lv: str) -> LogicalVolume:
    """Activate ``vg/lv``, overriding the activation-skip flag thin snapshots get by default."""
    check_name(vg, "volume group")
    check_name(lv, "logical volume")
    run(["lvchange", "-q", "-ay", "-K", f"{vg}/{lv}"], timeout=CHANGE_TIMEOUT, hint=f"activating {vg}/{lv}")
    got = get_lv(vg, lv)
    if got is None:
        raise LvError(f"{vg}/{lv} vanished while being activated")
    return got


def _change_tag(vg: str, lv: str, option: str, tag: str) -> None:
    check_name(vg, "volume group")
    check_name(lv, "logical volume")
    run(["lvchange", "-q", option, check_tag(tag), f"{vg}/{lv}"], timeout=CHANGE_TIMEOUT,
        hint=f"tagging {vg}/{lv}")


def add_tag(vg: str, lv: str, tag: str) -> None:
    _change_tag(vg, lv, "--addtag", tag)


def remove_tag(vg: str, lv: str, tag: str) -> None:
    _change_tag(vg, lv, "--deltag", tag)


def remove_lv(vg: str, lv: str, *, allow_non_snapshot: bool = False) -> bool:
    """Remove ``vg/lv``; False if it was already gone.

    Refuses anything that is not a snapshot unless ``allow_non_snapshot``, and
    always refuses a snapshot being merged (removing it would abort the merge).
    """
    found = get_lv(vg, lv)
    if found is None:
        return False
    if not found.is_snapshot and not allow_non_snapshot:
        raise Refused(f"will not remove {vg}/{lv}: it is not a snapshot (attr {found.attr})")
    if found.is_merging:
        raise Refused(f"will not remove {vg}/{lv}: it is being merged into its origin")
    run(["lvremove", "-q", "-y", f"{vg}/{lv}"], timeout=CHANGE_TIMEOUT, hint=f"removing {vg}/{lv}")
    return True
