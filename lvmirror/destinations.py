"""Destination strings of the config and the command line: parsed, checked and normalised.

A destination is a local absolute path (an image file or a block device) or
``ssh://[user@]host[:port]/path``.  Everything that reaches a message is
escaped (control characters never reach a terminal raw), and :attr:`Destination.key`
is what every spelling of one destination has in common.
"""

from __future__ import annotations

import ipaddress
import os
import re
import reprlib
from dataclasses import dataclass
from typing import Any

from lvdeltafs.errors import BadInput, Refused
from lvdeltafs.lvm import check_name, dm_name

# Characters no configured value may hold: C0 controls (NUL, newline, ESC, ...), DEL and C1
# controls, which rewrite a terminal or split a log line when echoed; and the Unicode line
# separators and bidi controls, which make text display as something other than what it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Hostnames: dot-separated labels of letters, digits, '_' and '-' (not leading), one trailing
# dot allowed.  Anything else (spaces, '%', non-ASCII) is a typo or needs another spelling.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*\.?")
# scp's "host:/path" (or "user@host:path"): a common slip for an ssh:// URL.
_SCP_LIKE = re.compile(r"[^/:]+:")

# Values echoed in messages: repr escapes every control character, and the limits keep a
# huge or deeply nested value from flooding the terminal (or recursing in repr).
_REPR = reprlib.Repr()
_REPR.maxstring = 300
_REPR.maxother = 300
_REPR.maxlevel = 3


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

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        """What every spelling of this destination has in common, to catch two volumes sharing one.

        - paths: ``//`` and ``.`` components dropped (``..`` is refused at parse time), and
          ``/dev/VG/LV`` written as ``/dev/mapper/VG-LV``.  Symlinks are not resolved: the config
          may be checked on a host without them; the receiver resolves them at use time.
        - hosts: compared in lower case (DNS names are case-insensitive); IP literals in their
          canonical form (``[0::1]`` is ``[::1]``).  A trailing dot is kept: ``host.`` is
          absolute while ``host`` may take a resolver search domain, so they can differ.
        - ports: as numbers, so ``ssh://host/x`` and ``ssh://host:22/x`` are one destination.
        - users: equal only when both are written and equal, or both are absent.  An absent
          user means whoever runs lvmirror (``getpass.getuser()`` at connect time): root from
          cron, but maybe someone else for ``status``.  Parsing cannot know which, so
          ``ssh://host/x`` and ``ssh://root@host/x`` are *not* reported as duplicates, rather
          than refusing a valid config on a guess.
        """
        if not self.is_ssh:
            return ("local", "", "", 0, _path_key(self.path))
        return ("ssh", self.user, _host_key(self.host), self.port, _path_key(self.path))

    def __str__(self) -> str:
        return self.raw


def shown(value: Any) -> str:
    """``value`` for an error message: quoted, control characters escaped, cut short if huge."""
    return _REPR.repr(value)


def shown_path(path: str) -> str:
    """A file name for messages: as is when plain (so it can be copied), else escaped."""
    return path if path.isprintable() else shown(path)


def escaped(text: str) -> str:
    """``text`` with each control character written escaped (as repr would), without quotes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def check_text(value: str, where: str) -> None:
    """Refuse a control character in a configured value, showing it escaped, never raw."""
    m = _CONTROL.search(value)
    if m:
        raise ConfigError(f"{where}: {shown(value)} contains the control character "
                          f"{repr(m.group())[1:-1]} (character {m.start() + 1}); write the value "
                          "without it (a stray newline or escape sequence from copy and paste?)")


def normpath(path: str) -> str:
    # normpath keeps a leading "//" (POSIX leaves its meaning open); on Linux it is "/", and
    # "//dev/vg0/web" must not slip past the comparisons made on normalised paths.
    return re.sub(r"^/+", "/", os.path.normpath(path))


def parse_destination(raw: str, where: str = "destination") -> Destination:
    """A local absolute path, or ``ssh://[user@]host[:port]/path``; ConfigError for anything else.

    The one parser for the config's ``destination`` and for DEST/URLs on the command line.
    """
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where} must be a non-empty string, not {shown(raw)}")
    # First, on the whole text: urlsplit would silently drop a newline or tab from a URL, and
    # nothing echoed below may carry one to the terminal.
    check_text(raw, where)
    if raw.startswith("ssh://"):
        return _parse_ssh(raw, where)
    if "://" in raw:
        scheme = raw.split("://", 1)[0]
        hint = " (write the scheme in lower case: ssh://)" if scheme.lower() == "ssh" else ""
        raise ConfigError(f"{where}: {shown(raw)} uses an unknown scheme {shown(scheme)}{hint}; "
                          "write a local path (/srv/mirror/web.img) or ssh://[user@]host[:port]/path")
    if not raw.startswith("/") and _SCP_LIKE.match(raw):
        raise ConfigError(f"{where}: {shown(raw)} must be an absolute path or an ssh:// URL; for a "
                          "remote mirror write ssh://[user@]host[:port]/absolute/path, not scp's host:path")
    if not raw.startswith("/"):
        raise ConfigError(f"{where} must be an absolute path (starting with /) such as "
                          f"/srv/mirror/web.img, or ssh://[user@]host[:port]/path; not {shown(raw)}")
    return Destination(raw, _dest_path(raw, raw, where))


def _dest_path(path: str, raw: str, where: str) -> str:
    """The normalised form of an absolute destination path (local, or on the far host)."""
    if ".." in path.split("/"):
        # "/a/link/../b" is not "/a/b" when link is a symlink: normalising it here could name
        # another file than the one written, and duplicate checks would compare the wrong thing.
        raise ConfigError(f"{where}: {shown(raw)} has a '..' component; write the path without "
                          "it (the directory it really means, e.g. /srv/mirror/web.img)")
    normal = normpath(path)
    if normal == "/":
        raise ConfigError(f"{where}: {shown(raw)} names the root directory, not a file or device; "
                          "write the image file or block device, e.g. /srv/mirror/web.img")
    return normal


def _parse_ssh(raw: str, where: str) -> Destination:
    """``ssh://[user@]host[:port]/path``, parsed by hand: urlsplit drops characters, lets port 0
    through as "no port" and raises plain ValueError on a bad ``[...]``."""
    form = "ssh://[user@]host[:port]/absolute/path"
    if "?" in raw or "#" in raw:
        raise ConfigError(f"{where}: {shown(raw)}: '?' and '#' are not allowed in an ssh destination "
                          "(a URL would cut the path there); rename the file or directory")
    authority, slash, rest = raw[len("ssh://"):].partition("/")
    path = slash + rest
    userinfo, at, hostport = authority.rpartition("@")
    user = userinfo
    if at and not user:
        raise ConfigError(f"{where}: {shown(raw)} has an empty user before '@'; write ssh://user@host/path, "
                          "or leave out the '@' to log in as the user running lvmirror")
    if ":" in user:
        raise ConfigError(f"{where}: {shown(raw)} holds a password (user:password@); lvmirror logs in "
                          "with the ssh_key only: write ssh://user@host/path")
    if user.startswith("-"):
        raise ConfigError(f"{where}: {shown(raw)}: the user {shown(user)} starts with '-', which no "
                          "real account does and ssh tools read as an option; write the account name")
    host, port = _parse_host_port(hostport, raw, where, form)
    if not path or path == "/":
        raise ConfigError(f"{where}: {shown(raw)} names no path on the remote host; write "
                          f"{form} (e.g. ssh://backup@mirror.example/srv/mirror/web.img)")
    return Destination(raw, _dest_path(path, raw, where), host=host, user=user, port=port)


def _parse_host_port(hostport: str, raw: str, where: str, form: str) -> tuple[str, int]:
    if hostport.startswith("["):
        inner, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise ConfigError(f"{where}: {shown(raw)} opens '[' for an IPv6 address but never closes "
                              "it; write e.g. ssh://[2001:db8::1]/path")
        host = _ipv6_host(inner, raw, where)
        if after and not after.startswith(":"):
            raise ConfigError(f"{where}: {shown(raw)}: after ']' only ':port' may follow; write e.g. "
                              "ssh://[2001:db8::1]:2222/path")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_ = hostport.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            raise ConfigError(f"{where}: {shown(raw)}: an IPv6 address goes in brackets, e.g. "
                              "ssh://[2001:db8::1]:2222/path")
        if not host:
            raise ConfigError(f"{where}: {shown(raw)} names no host; write {form}")
        if not host.isascii():
            raise ConfigError(f"{where}: {shown(raw)}: the host {shown(host)} is not plain ASCII; "
                              "write an internationalised name in its xn-- (punycode) form")
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ConfigError(f"{where}: {shown(raw)}: {shown(host)} is not a host name: use letters, "
                              "digits, '.', '-' and '_' (not starting with '-' or '.'), an IPv4 address, "
                              "or an IPv6 address in brackets")
        host = host.lower()  # as urlsplit gave it, which callers have relied on
    return host, _port(port_text, raw, where)


def _ipv6_host(inner: str, raw: str, where: str) -> str:
    """The address inside ``[...]``; a zone is written ``%25eth0`` (RFC 6874) or ``%eth0``."""
    addr, pct, zone = inner.partition("%")
    if pct and zone.startswith("25") and len(zone) > 2:
        zone = zone[2:]
    try:
        ipaddress.IPv6Address(addr)
        if pct and not re.fullmatch(r"[A-Za-z0-9_.-]+", zone):
            raise ValueError(zone)
    except ValueError:
        raise ConfigError(f"{where}: {shown(raw)}: {shown(inner)} in brackets is not an IPv6 address; "
                          "write e.g. ssh://[2001:db8::1]/path, or a host name without brackets") from None
    # The address is case-insensitive; a zone names a network interface, whose case matters.
    return addr.lower() + (f"%{zone}" if pct else "")


def _port(text: str | None, raw: str, where: str) -> int:
    if text is None:
        return 22
    if not text:
        raise ConfigError(f"{where}: {shown(raw)} has ':' but no port number; write the port "
                          "(ssh://host:2222/path) or leave out the ':' for port 22")
    digits = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(digits) > 5 or not 1 <= int(digits) <= 65535:
        raise ConfigError(f"{where}: {shown(raw)} has a bad port {shown(text)}: a port is a number "
                          "from 1 to 65535 (leave it out for ssh's 22)")
    return int(digits)


def _path_key(path: str) -> str:
    """A destination path as compared for duplicates: ``/dev/VG/LV`` as ``/dev/mapper/VG-LV``."""
    path = normpath(path)
    parts = path.split("/")
    # Only /dev/X/Y is mapped, and only when X and Y could be LVM names; another /dev/X/Y
    # mapped by mistake could only give a spurious duplicate, never hide a real one.
    if len(parts) == 4 and parts[1] == "dev" and parts[2] != "mapper":
        try:
            vg, lv = check_name(parts[2]), check_name(parts[3])
        except BadInput:
            return path
        return f"/dev/mapper/{dm_name(vg, lv)}"
    return path


def _host_key(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))  # canonical: [0::1] and [::1] are one host
    except ValueError:
        return host.lower()
