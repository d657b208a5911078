"""lvmirror's configuration: one TOML file, validated on load, with errors that name file and key.

    [defaults]                    # optional; any volume key but vg, lv, destination
    snapshot_size = "1G"
    keep = 1
    lock_dir = "/run/lock/lvmirror"           # one lock file per volume
    work_dir = "/var/lib/lvmirror"            # ranges of deltas in flight, and each volume's last runs
    metrics_file = "/var/lib/prometheus/node-exporter/lvmirror.prom"   # optional: Prometheus textfile
    bwlimit = "12M"                           # optional: a cap on the bytes sent per second
    exact = true                              # send only the 4 KiB blocks that differ from the base
    ssh_transport = "openssh"                 # ssh:// destinations: OpenSSH's ssh client, not paramiko
    history_points = 7                        # earlier points each mirror keeps (docs/history.md; 0: none)
    history_age = "30d"                       # optional: and none older than this
    history_size = "20G"                      # optional: and their undo deltas in at most this much space

    [volume.web]
    vg = "vg0"
    lv = "web"
    destination = "/srv/mirror/web.img"      # image file, block device, or ssh://user@host[:port]/path
    # or: destinations = ["/srv/mirror/web.img", "ssh://backup@far/srv/web.img"]  (1 to 8; each its own base)
    snapshot_size = "2G"                     # classic volumes: the snapshot's COW space
    state_dir = "/var/lib/lvmirror/web"      # block device destinations: where their state is kept
                                             # (default /var/lib/lvmirror/receiver)

What can be checked without LVM is checked here (unknown keys, types,
ranges, a destination under ``/dev/VG/LV``, file permissions); what needs
LVM (does the VG exist, is the destination on the source) is checked at use
time by :mod:`lvmirror.pipelines`, so ``status`` still works for the other volumes
when one VG is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from lvdeltafs.errors import BadInput
from lvdeltafs.lvm import check_name, dm_name
from lvmirror import retention
from lvmirror.destinations import (  # noqa: F401 - ConfigError, UnsafeConfig, Destination: config's API too
    ConfigError,
    Destination,
    UnsafeConfig,
    check_text,
    escaped,
    normpath,
    parse_destination,
    shown_path,
)
from lvmirror.destinations import (
    shown as shown_value,
)
from lvmirror.remote.history import Keep

DEFAULT_PATH = "/etc/lvmirror/lvmirror.toml"
ENV_PATH = "LVMIRROR_CONFIG"
DEFAULT_LOCK_DIR = "/run/lock/lvmirror"
DEFAULT_WORK_DIR = "/var/lib/lvmirror"

# Keys a [volume.NAME] table may hold; [defaults] may hold all but the per-volume ones.
VOLUME_ONLY = ("vg", "lv", "destination", "destinations")
REQUIRED = ("vg", "lv")  # and exactly one of destination, destinations
MAX_DESTINATIONS = 8
SHARED_KEYS = ("snapshot_size", "keep", "state_dir", "ssh_key", "known_hosts", "ssh_transport", "bwlimit",
               "exact", "compress") + retention.KEYS
DEFAULTS_ONLY = ("lock_dir", "work_dir", "metrics_file")
VOLUME_KEYS = VOLUME_ONLY + SHARED_KEYS
DEFAULTS_KEYS = SHARED_KEYS + DEFAULTS_ONLY

# Volume names become lock file names and part of an LVM tag: keep them to what both accept.
# A configuration is a few kilobytes; far more means --config names the wrong file.
MAX_CONFIG_BYTES = 1 << 20
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
_SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[bBsSkKmMgGtTpPeE]?")



@dataclass(frozen=True)
class VolumeConfig:
    name: str
    vg: str
    lv: str
    destination: Destination
    snapshot_size: str | None
    keep: int
    state_dir: str | None
    ssh_key: str | None
    known_hosts: str | None
    source_file: str  # the config file, for error messages
    work_dir: str = DEFAULT_WORK_DIR
    bwlimit: int | None = None  # bytes per second of delta sent (None: no cap); see lvmirror.bwlimit
    exact: bool = False  # send only the 4 KiB blocks that differ from the base (see lvdeltafs.exact)
    compress: str = "auto"  # auto | off | zlib | zstd: see lvmirror.compression
    ssh_transport: str = "paramiko"  # or "openssh": the system's ssh client (see lvmirror.openssh)
    history: Keep = Keep(retention.DEFAULT_POINTS)  # how many points the receiver keeps (lvmirror.retention)
    # Every destination of the volume; ``destination`` is the one this object is about (the first, or
    # the one a per-destination view was made for: see views()).
    destinations: tuple[Destination, ...] = ()
    # "" for a volume's only destination; else dest_key(destination), naming its spool and run record.
    dest_key: str = ""

    def __post_init__(self) -> None:
        if not self.destinations:
            object.__setattr__(self, "destinations", (self.destination,))

    @property
    def several(self) -> bool:
        return len(self.destinations) > 1

    def views(self) -> list[VolumeConfig]:
        """One VolumeConfig per destination, each with its own spool and run record.

        With a single destination the view is the volume itself: its spool and
        run record keep their names (an install made before `destinations`
        keeps its state).  With several, each is named by a key derived from
        the destination itself, not its place in the list, so reordering the
        list does not swap two destinations' records.
        """
        if not self.several:
            return [self]
        return [dataclasses.replace(self, destination=d, dest_key=destination_key(d))
                for d in self.destinations]

    def view(self, dest: Destination) -> VolumeConfig:
        """The view of one of this volume's destinations (compared by Destination.key)."""
        for v in self.views():
            if v.destination.key == dest.key:
                return v
        raise ConfigError(f"{self.where('destinations')}: {dest.raw} is not one of the volume's destinations "
                          f"({', '.join(d.raw for d in self.destinations)})")

    @property
    def record_name(self) -> str:
        """The name of this destination's record of runs (lvmirror.runlog): the volume's, or NAME@KEY."""
        return f"{self.name}@{self.dest_key}" if self.dest_key else self.name

    @property
    def spool(self) -> str:
        """Where this side keeps the ranges of a delta in flight, to resume it exactly."""
        # "@" cannot be in a volume name: NAME@KEY never collides with another volume's folder.
        return os.path.join(self.work_dir, "inflight", self.record_name)

    @property
    def vg_lv(self) -> str:
        return f"{self.vg}/{self.lv}"

    def where(self, key: str | None = None) -> str:
        """``FILE [volume.NAME] key`` for error messages."""
        return f"{shown_path(self.source_file)}: [volume.{self.name}]" + (f" {key}" if key else "")


def destination_key(dest: Destination) -> str:
    """A stable short name for one destination of several: 8 hex digits of a digest of where it is."""
    return hashlib.sha256(repr(dest.key).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Config:
    path: str
    volumes: dict[str, VolumeConfig]
    lock_dir: str
    metrics_file: str | None = None  # written after each run when set (see lvmirror.metrics)

    def volume(self, name: str) -> VolumeConfig:
        try:
            return self.volumes[name]
        except KeyError:
            known = ", ".join(sorted(self.volumes)) or "none"
            raise ConfigError(f"{shown_path(self.path)}: no volume named {shown_value(name)} "
                              f"(configured: {known})") from None


def config_path(explicit: str | None = None) -> str:
    """The file to read: --config, else $LVMIRROR_CONFIG, else /etc/lvmirror/lvmirror.toml."""
    return explicit or os.environ.get(ENV_PATH) or DEFAULT_PATH


def load(path: str | None = None, *, check_permissions: bool = True) -> Config:
    """Read, check and return the configuration."""
    path = config_path(path)
    shown = shown_path(path)
    if "\0" in path:
        raise ConfigError(f"{shown}: a file name cannot contain a NUL byte (check --config and ${ENV_PATH})")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such configuration file (give one with --config or "
                          f"${ENV_PATH})") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot look at the configuration file: {e.strerror}"
                          f"{_access_hint(e)}") from None
    # Before opening: open() on a FIFO would wait for a writer, and reading a device or a
    # directory gives nothing a config could be.
    _require_regular_file(st, shown)
    data = _read_config(path, st, shown, check_permissions)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "a TOML file is UTF-8 text: is this the right file?") from None
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: thousands of '[' would
        # otherwise end in a traceback.
        raise ConfigError(f"{shown}: not valid TOML for lvmirror: arrays or tables are nested too "
                          "deeply (the configuration needs only [defaults] and [volume.NAME] tables "
                          "of plain values)") from None
    except ValueError as e:  # TOMLDecodeError, and anything else tomllib finds malformed
        raise ConfigError(f"{shown}: not valid TOML: {escaped(str(e))}") from None
    return parse(doc, path)


def _require_regular_file(st: os.stat_result, shown: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{shown}: is a directory, not a configuration file (give the file itself, "
                          f"e.g. {shown.rstrip('/')}/lvmirror.toml)")
    kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode) else "not a file")
    raise ConfigError(f"{shown}: is {kind}, not a regular file; lvmirror reads its configuration "
                      "only from a regular file (not a pipe or process substitution)")


def _read_config(path: str, st: os.stat_result, shown: str, check_permissions: bool) -> bytes:
    """The file's bytes, from the same regular file that was stat'ed, checked before it is read."""
    # O_NONBLOCK: should the path have become a FIFO since the stat, open() returns at once
    # instead of waiting for a writer; the inode check below then refuses it.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read the configuration file: {e.strerror}"
                          f"{_access_hint(e)}") from None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise ConfigError(f"{shown}: the configuration file was replaced while it was being "
                              "opened; run again")
        if check_permissions:
            check_file_safety(path, fst)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read the configuration file: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{shown}: is over {MAX_CONFIG_BYTES} bytes; a configuration file is a few "
                          "kilobytes: is --config (or $" f"{ENV_PATH}) naming the right file?")
    return b"".join(chunks)


def _access_hint(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return (f" (lvmirror runs as uid {os.geteuid()}: run it as root, or let that user read the "
                "file and search its directories)")
    return ""


def check_file_safety(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a config anyone else could edit: it decides which devices root overwrites."""
    st = st or os.stat(path)
    shown = shown_path(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise UnsafeConfig(f"{shown}: the configuration file is world-writable (mode {mode:04o}); "
                           f"anyone could point a mirror at any device. Fix: chmod o-w {shown}")
    if os.geteuid() == 0:
        if st.st_uid != 0:
            raise UnsafeConfig(f"{shown}: running as root but the configuration file is owned by uid "
                               f"{st.st_uid}, not root. Fix: chown root: {shown}")
        if mode & stat.S_IWGRP:
            raise UnsafeConfig(f"{shown}: running as root but the configuration file is group-writable "
                               f"(mode {mode:04o}). Fix: chmod g-w {shown}")


def parse(doc: dict[str, Any], path: str = "<config>") -> Config:
    """Check a parsed TOML document and build the Config."""
    shown = shown_path(path)
    unknown = sorted(set(doc) - {"defaults", "volume"})
    if unknown:
        raise ConfigError(f"{shown}: unknown table or key {shown_value(unknown[0])} at the top level "
                          "(expected [defaults] and [volume.NAME] tables)")
    defaults = _table(doc.get("defaults", {}), f"{shown}: [defaults]")
    _check_keys(defaults, DEFAULTS_KEYS, f"{shown}: [defaults]")
    volumes_doc = _table(doc.get("volume", {}), f"{shown}: [volume]")
    volumes = {name: _volume(name, _table(body, _volume_where(shown, name)), defaults, path)
               for name, body in volumes_doc.items()}
    _check_distinct_destinations(volumes, shown)
    lock_dir = _abs_path(defaults.get("lock_dir", DEFAULT_LOCK_DIR), f"{shown}: [defaults] lock_dir")
    metrics_file = _metrics_file(defaults.get("metrics_file"), f"{shown}: [defaults] metrics_file")
    return Config(path, volumes, lock_dir, metrics_file)


def _volume_where(shown: str, name: str) -> str:
    # The name is echoed as written only once it is known to be plain; else escaped.
    return f"{shown}: [volume.{name if _VOLUME_NAME.fullmatch(name) else shown_value(name)}]"


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, not {type(value).__name__}")
    return value


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {shown_value(key)} (known keys: {', '.join(allowed)})")


def _volume(name: str, body: dict[str, Any], defaults: dict[str, Any], path: str) -> VolumeConfig:
    shown = shown_path(path)
    where = _volume_where(shown, name)
    check_text(name, f"{where}: the volume name")
    if not _VOLUME_NAME.fullmatch(name):
        raise ConfigError(f"{where}: volume name {shown_value(name)} may use letters, digits and _ . + - "
                          "only (it names a lock file and an LVM tag)")
    _check_keys(body, VOLUME_KEYS, where)
    merged = {**defaults, **body}
    for key in REQUIRED:
        if key not in body:
            raise ConfigError(f"{where}: missing key {key!r}")
    vg = _lvm_name(merged["vg"], f"{where} vg", "volume group")
    lv = _lvm_name(merged["lv"], f"{where} lv", "logical volume")
    dests = _destinations(body, where, vg, lv)
    dest = dests[0]
    state_dir = merged.get("state_dir")
    if state_dir is not None:
        state_dir = _abs_path(state_dir, f"{where} state_dir")
    ssh_key = _opt_path(merged.get("ssh_key"), f"{where} ssh_key")
    known_hosts = _opt_path(merged.get("known_hosts"), f"{where} known_hosts")
    ssh_transport = _ssh_transport(merged.get("ssh_transport", "paramiko"), f"{where} ssh_transport")
    key = "destinations" if "destinations" in body else "destination"
    if ssh_transport == "openssh" and any(d.is_ssh for d in dests):
        # What ssh would read as syntax is refused now, before anything runs.
        from lvmirror import openssh
        for d in dests:
            if d.is_ssh:
                openssh.check_destination(d, f"{where} {key}")
        openssh.check_path(ssh_key, f"{where} ssh_key")
        openssh.check_path(known_hosts, f"{where} known_hosts")
    return VolumeConfig(
        name=name, vg=vg, lv=lv, destination=dest, destinations=dests,
        snapshot_size=_size(merged.get("snapshot_size"), f"{where} snapshot_size"),
        keep=_keep(merged.get("keep", 1), f"{where} keep"),
        state_dir=state_dir,
        ssh_key=ssh_key,
        known_hosts=known_hosts,
        source_file=path,
        work_dir=_abs_path(defaults.get("work_dir", DEFAULT_WORK_DIR), f"{shown}: [defaults] work_dir"),
        bwlimit=_bwlimit(body, defaults, where, shown),
        exact=_bool(merged.get("exact", False), f"{where} exact"),
        compress=_compress(merged.get("compress", "auto"), f"{where} compress"),
        ssh_transport=ssh_transport,
        history=retention.parse(merged, where),
    )


def _destinations(body: dict[str, Any], where: str, vg: str, lv: str) -> tuple[Destination, ...]:
    """``destination = "..."`` or ``destinations = ["...", ...]``: exactly one, each checked alike."""
    if ("destination" in body) == ("destinations" in body):
        if "destination" in body:
            raise ConfigError(f"{where}: give either destination or destinations, not both (put every "
                              "mirror in the destinations list)")
        raise ConfigError(f"{where}: missing key 'destination' (or 'destinations', a list of them)")
    if "destination" in body:
        raws, key = [body["destination"]], "destination"
    else:
        key = "destinations"
        raws = body["destinations"]
        if not isinstance(raws, list) or not 1 <= len(raws) <= MAX_DESTINATIONS:
            raise ConfigError(f"{where} destinations must be a list of 1 to {MAX_DESTINATIONS} destinations "
                              f"(strings), not {shown_value(raws)}")
    dests: list[Destination] = []
    for i, raw in enumerate(raws):
        at = f"{where} {key}" if key == "destination" else f"{where} destinations[{i}]"
        dest = parse_destination(_str(raw, at), at)
        if not dest.is_ssh:
            _check_not_source(dest.path, vg, lv, at)
        same = next((d for d in dests if d.key == dest.key), None)
        if same is not None:
            also = "" if same.raw == dest.raw else f" (written there as {same.raw}; both name the same place)"
            raise ConfigError(f"{at}: {dest.raw} is in the list twice{also}; each destination once")
        dests.append(dest)
    return tuple(dests)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {shown_value(value)}")
    check_text(value, where)
    return value


def _lvm_name(value: Any, where: str, what: str) -> str:
    value = _str(value, where)
    try:
        return check_name(value, what)
    except BadInput as e:
        raise ConfigError(f"{where}: {e}") from None


def _abs_path(value: Any, where: str) -> str:
    value = _str(value, where)
    if not value.startswith("/"):
        # cron and systemd start in / or $HOME: a relative path would mean different files.
        raise ConfigError(f"{where} must be an absolute path (starting with /), not {shown_value(value)}")
    return normpath(value)


def _opt_path(value: Any, where: str) -> str | None:
    return None if value is None else _abs_path(value, where)


def _metrics_file(value: Any, where: str) -> str | None:
    """An absolute ``*.prom`` path: node_exporter's textfile collector reads only files so named."""
    path = _opt_path(value, where)
    name = "" if path is None or value.endswith("/") else os.path.basename(path)
    if path is not None and (not name.endswith(".prom") or name == ".prom"):
        raise ConfigError(f"{where} must name a file ending in .prom (node_exporter's textfile "
                          f"collector reads only those), not {shown_value(value)}")
    return path


def _size(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where} must be positive, not {value}")
        return f"{value}b"
    if isinstance(value, str):
        check_text(value, where)
    if not isinstance(value, str) or not _SIZE.fullmatch(value) or float(re.sub(r"[^0-9.]", "", value)) <= 0:
        raise ConfigError(f"{where}: {shown_value(value)} is not a size (use e.g. \"1G\", \"512M\" or bytes)")
    return value


def _bwlimit(body: dict[str, Any], defaults: dict[str, Any], where: str, shown: str) -> int | None:
    """The volume's cap in bytes per second, else [defaults]'s; an error names the table it is in."""
    from lvmirror.bwlimit import parse_rate
    value, where = (body["bwlimit"], where) if "bwlimit" in body else (defaults.get("bwlimit"),
                                                                       f"{shown}: [defaults]")
    if value is None:
        return None
    if isinstance(value, str):
        check_text(value, f"{where} bwlimit")
    try:
        return parse_rate(value)
    except ValueError as e:
        raise ConfigError(f"{where} bwlimit: {shown_value(value)}: {e}") from None


def _compress(value: Any, where: str) -> str:
    from lvmirror.compression import MODES
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(f"{where} must be one of {', '.join(repr(m) for m in MODES)}, not "
                          f"{shown_value(value)}")
    return value


def _ssh_transport(value: Any, where: str) -> str:
    """ "paramiko" (the default) or "openssh" (the system's ssh client), exactly so spelt."""
    from lvmirror.transports import SSH_TRANSPORTS
    if value not in SSH_TRANSPORTS or not isinstance(value, str):
        raise ConfigError(f"{where} must be \"paramiko\" (the default) or \"openssh\" (the system's ssh "
                          f"client), not {shown_value(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    """A TOML boolean: true or false, never a string or number that looks like one."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false (a TOML boolean, unquoted), "
                          f"not {shown_value(value)}")
    return value


def _keep(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a whole number of at least 1 (the base snapshot), "
                          f"not {shown_value(value)}")
    return value


# ---- destinations -------------------------------------------------------------------------


def _check_not_source(dest: str, vg: str, lv: str, where: str) -> None:
    """Refuse the obvious ways of naming the source as its own mirror (stat-based checks come at use)."""
    source_paths = (f"/dev/{vg}/{lv}", f"/dev/mapper/{dm_name(vg, lv)}")
    for src in source_paths:
        if dest == src or dest.startswith(src + "/"):
            raise ConfigError(f"{where}: {dest} is the source volume {vg}/{lv} itself; a mirror "
                              "must live somewhere else")


def _check_distinct_destinations(volumes: dict[str, VolumeConfig], shown: str) -> None:
    """Two volumes writing one destination would overwrite each other's mirror, every run."""
    seen: dict[tuple[str, str, str, int, str], tuple[VolumeConfig, Destination]] = {}
    for v in volumes.values():
        for dest in v.destinations:
            found = seen.get(dest.key)
            if found is not None and found[0] is not v:
                first, other = found
                same = "" if other.raw == dest.raw else \
                    f" (written there as {other.raw}; both name the same place)"
                article = "a" if first.several else "the"
                raise ConfigError(f"{shown}: [volume.{v.name}] destination {dest.raw} is also {article} "
                                  f"destination of [volume.{first.name}]{same}; each volume needs its own")
            seen[dest.key] = (v, dest)
