"""lvmirror's configuration: one TOML file, validated on load, with errors that name file and key.

    [defaults]                    # optional; any volume key but vg, lv, destination
    snapshot_size = "1G"
    keep = 1
    lock_dir = "/run/lock/lvmirror"           # one lock file per volume
    work_dir = "/var/lib/lvmirror"            # ranges of deltas in flight, to resume them exactly

    [volume.web]
    vg = "vg0"
    lv = "web"
    destination = "/srv/mirror/web.img"      # image file, block device, or ssh://user@host[:port]/path
    snapshot_size = "2G"                     # classic volumes: the snapshot's COW space
    state_dir = "/var/lib/lvmirror/web"      # block device destinations: where their state is kept
                                             # (default /var/lib/lvmirror/receiver)

What can be checked without LVM is checked here (unknown keys, types,
ranges, a destination under ``/dev/VG/LV``, file permissions); what needs
LVM (does the VG exist, is the destination on the source) is checked at use
time by :mod:`lvmirror.sync`, so ``status`` still works for the other volumes
when one VG is missing.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lvdeltafs.errors import BadInput, Refused
from lvdeltafs.lvm import check_name, dm_name

DEFAULT_PATH = "/etc/lvmirror/lvmirror.toml"
ENV_PATH = "LVMIRROR_CONFIG"
DEFAULT_LOCK_DIR = "/run/lock/lvmirror"
DEFAULT_WORK_DIR = "/var/lib/lvmirror"

# Keys a [volume.NAME] table may hold; [defaults] may hold all but the per-volume ones.
VOLUME_ONLY = ("vg", "lv", "destination")
SHARED_KEYS = ("snapshot_size", "keep", "state_dir", "ssh_key", "known_hosts")
DEFAULTS_ONLY = ("lock_dir", "work_dir")
VOLUME_KEYS = VOLUME_ONLY + SHARED_KEYS
DEFAULTS_KEYS = SHARED_KEYS + DEFAULTS_ONLY

# Volume names become lock file names and part of an LVM tag: keep them to what both accept.
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
_SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[bBsSkKmMgGtTpPeE]?")


class ConfigError(BadInput):
    """The configuration file is malformed or holds a value lvmirror cannot use."""


class UnsafeConfig(Refused):
    """The configuration file could be changed by someone who should not control what root runs."""


@dataclass(frozen=True)
class Destination:
    """Where a mirror lives: a local path (image file or block device) or an ssh URL."""

    raw: str
    path: str
    host: str = ""
    user: str = ""
    port: int = 22

    @property
    def is_ssh(self) -> bool:
        return bool(self.host)

    def __str__(self) -> str:
        return self.raw


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

    @property
    def spool(self) -> str:
        """Where this side keeps the ranges of a delta in flight, to resume it exactly."""
        return os.path.join(self.work_dir, "inflight", self.name)

    @property
    def vg_lv(self) -> str:
        return f"{self.vg}/{self.lv}"

    def where(self, key: str | None = None) -> str:
        """``FILE [volume.NAME] key`` for error messages."""
        return f"{self.source_file}: [volume.{self.name}]" + (f" {key}" if key else "")


@dataclass(frozen=True)
class Config:
    path: str
    volumes: dict[str, VolumeConfig]
    lock_dir: str

    def volume(self, name: str) -> VolumeConfig:
        try:
            return self.volumes[name]
        except KeyError:
            known = ", ".join(sorted(self.volumes)) or "none"
            raise ConfigError(f"{self.path}: no volume named {name!r} (configured: {known})") from None


def config_path(explicit: str | None = None) -> str:
    """The file to read: --config, else $LVMIRROR_CONFIG, else /etc/lvmirror/lvmirror.toml."""
    return explicit or os.environ.get(ENV_PATH) or DEFAULT_PATH


def load(path: str | None = None, *, check_permissions: bool = True) -> Config:
    """Read, check and return the configuration."""
    path = config_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file (give one with --config or "
                          f"${ENV_PATH})") from None
    if check_permissions:
        check_file_safety(path, st)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    return parse(doc, path)


def check_file_safety(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a config anyone else could edit: it decides which devices root overwrites."""
    st = st or os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        raise UnsafeConfig(f"{path}: the configuration file is world-writable (mode {mode:04o}); "
                           f"anyone could point a mirror at any device. Fix: chmod o-w {path}")
    if os.geteuid() == 0:
        if st.st_uid != 0:
            raise UnsafeConfig(f"{path}: running as root but the configuration file is owned by uid "
                               f"{st.st_uid}, not root. Fix: chown root: {path}")
        if mode & stat.S_IWGRP:
            raise UnsafeConfig(f"{path}: running as root but the configuration file is group-writable "
                               f"(mode {mode:04o}). Fix: chmod g-w {path}")


def parse(doc: dict[str, Any], path: str = "<config>") -> Config:
    """Check a parsed TOML document and build the Config."""
    unknown = sorted(set(doc) - {"defaults", "volume"})
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {unknown[0]!r} at the top level "
                          "(expected [defaults] and [volume.NAME] tables)")
    defaults = _table(doc.get("defaults", {}), f"{path}: [defaults]")
    _check_keys(defaults, DEFAULTS_KEYS, f"{path}: [defaults]")
    volumes_doc = _table(doc.get("volume", {}), f"{path}: [volume]")
    volumes = {name: _volume(name, _table(body, f"{path}: [volume.{name}]"), defaults, path)
               for name, body in volumes_doc.items()}
    _check_distinct_destinations(volumes, path)
    lock_dir = _abs_path(defaults.get("lock_dir", DEFAULT_LOCK_DIR), f"{path}: [defaults] lock_dir")
    return Config(path, volumes, lock_dir)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, not {type(value).__name__}")
    return value


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(allowed)})")


def _volume(name: str, body: dict[str, Any], defaults: dict[str, Any], path: str) -> VolumeConfig:
    where = f"{path}: [volume.{name}]"
    if not _VOLUME_NAME.fullmatch(name):
        raise ConfigError(f"{where}: volume name {name!r} may use letters, digits and _ . + - only "
                          "(it names a lock file and an LVM tag)")
    _check_keys(body, VOLUME_KEYS, where)
    merged = {**defaults, **body}
    for key in VOLUME_ONLY:
        if key not in body:
            raise ConfigError(f"{where}: missing key {key!r}")
    vg = _lvm_name(merged["vg"], f"{where} vg", "volume group")
    lv = _lvm_name(merged["lv"], f"{where} lv", "logical volume")
    dest = parse_destination(_str(merged["destination"], f"{where} destination"), f"{where} destination")
    if not dest.is_ssh:
        _check_not_source(dest.path, vg, lv, f"{where} destination")
    state_dir = merged.get("state_dir")
    if state_dir is not None:
        state_dir = _abs_path(state_dir, f"{where} state_dir")
    return VolumeConfig(
        name=name, vg=vg, lv=lv, destination=dest,
        snapshot_size=_size(merged.get("snapshot_size"), f"{where} snapshot_size"),
        keep=_keep(merged.get("keep", 1), f"{where} keep"),
        state_dir=state_dir,
        ssh_key=_opt_path(merged.get("ssh_key"), f"{where} ssh_key"),
        known_hosts=_opt_path(merged.get("known_hosts"), f"{where} known_hosts"),
        source_file=path,
        work_dir=_abs_path(defaults.get("work_dir", DEFAULT_WORK_DIR), f"{path}: [defaults] work_dir"),
    )


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
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
        raise ConfigError(f"{where} must be an absolute path, not {value!r}")
    return os.path.normpath(value)


def _opt_path(value: Any, where: str) -> str | None:
    return None if value is None else _abs_path(value, where)


def _size(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where} must be positive, not {value}")
        return f"{value}b"
    if not isinstance(value, str) or not _SIZE.fullmatch(value) or float(re.sub(r"[^0-9.]", "", value)) <= 0:
        raise ConfigError(f"{where}: {value!r} is not a size (use e.g. \"1G\", \"512M\" or bytes)")
    return value


def _keep(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a whole number of at least 1 (the base snapshot), "
                          f"not {value!r}")
    return value


def parse_destination(raw: str, where: str = "destination") -> Destination:
    """A local absolute path, or ``ssh://[user@]host[:port]/path``."""
    if raw.startswith("ssh://"):
        return _parse_ssh(raw, where)
    if "://" in raw:
        raise ConfigError(f"{where}: {raw!r} uses an unknown scheme (use a path or ssh://user@host/path)")
    return Destination(raw, _abs_path(raw, where))


def _parse_ssh(raw: str, where: str) -> Destination:
    u = urlsplit(raw)
    try:
        port = u.port or 22
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} has a bad port (1 to 65535)") from None
    if not u.hostname:
        raise ConfigError(f"{where}: {raw!r} names no host (ssh://user@host[:port]/path)")
    if u.query or u.fragment or u.password:
        raise ConfigError(f"{where}: {raw!r}: no password, '?' or '#' allowed in an ssh destination")
    if not u.path or u.path == "/":
        raise ConfigError(f"{where}: {raw!r} names no path on the remote host (ssh://user@host/path)")
    return Destination(raw, os.path.normpath(u.path), host=u.hostname, user=u.username or "", port=port)


def _check_not_source(dest: str, vg: str, lv: str, where: str) -> None:
    """Refuse the obvious ways of naming the source as its own mirror (stat-based checks come at use)."""
    source_paths = (f"/dev/{vg}/{lv}", f"/dev/mapper/{dm_name(vg, lv)}")
    for src in source_paths:
        if dest == src or dest.startswith(src + "/"):
            raise ConfigError(f"{where}: {dest} is the source volume {vg}/{lv} itself; a mirror "
                              "must live somewhere else")


def _check_distinct_destinations(volumes: dict[str, VolumeConfig], path: str) -> None:
    seen: dict[str, str] = {}
    for v in volumes.values():
        key = v.destination.raw if v.destination.is_ssh else v.destination.path
        if key in seen:
            raise ConfigError(f"{path}: [volume.{v.name}] destination {key} is also the destination of "
                              f"[volume.{seen[key]}]; each volume needs its own")
        seen[key] = v.name

