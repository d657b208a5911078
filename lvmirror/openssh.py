"""ssh to a remote destination through the system's OpenSSH client (``ssh_transport = "openssh"``).

Why a second transport: Debian 12's paramiko (2.12) has no AES-GCM, so it
sends with aes128-ctr and HMAC; OpenSSH's ssh uses aes128-gcm, which costs
less CPU on both ends (scripts/bench/bench_ssh.py).  paramiko stays the default.

It keeps every guarantee of :mod:`lvmirror.ssh`:

- strict host key checking against the same known_hosts file, with nothing
  ever added to it (``StrictHostKeyChecking=yes``, ``UpdateHostKeys=no``, no
  global file); a refused host key is explained in the very words of the
  paramiko transport (its fingerprint and the command that trusts it);
- the configured key only, no agent, no password or other prompt
  (``BatchMode=yes``, ``IdentitiesOnly=yes``, ``IdentityAgent=none``);
- no ssh_config (``-F none``): the connection is exactly what lvmirror's config
  says, as with paramiko, and no ProxyCommand or ``Match exec`` can expand the
  user or host name (OpenSSH before 9.6 did so into a shell, CVE-2023-51385);
- no shell on this side: ssh gets an argument list, user and port as option
  values, the host after ``--``; the remote command is the constant bootstrap
  of :mod:`lvmirror.bundle`, and the blob follows on ssh's stdin as data.
  Values ssh itself would read as syntax (a user with shell characters, a key
  or known_hosts path with spaces or ``%``) are refused before anything runs.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from lvdeltafs.errors import ConnectionProblem, LvError
from lvmirror import bundle
from lvmirror.client import ReceiverClient
from lvmirror.destinations import ConfigError, Destination, shown
from lvmirror.transports import SshTransport, on_this_host

log = logging.getLogger(__name__)

# The ciphers cheapest per byte first (AES-GCM with AES-NI), then OpenSSH's own defaults; the
# server picks the first it also has.  Spelt out: the "^" prefix needs OpenSSH 8.7 or newer.
CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
# As the paramiko transport: a keepalive every 15 s, and the far host counts as gone after
# 8 unanswered ones (2 minutes, its TCP_USER_TIMEOUT).
KEEPALIVE, KEEPALIVE_COUNT = 15, 8
# A user name: POSIX's portable characters, and '@' for directory accounts.  Anything else (spaces,
# ';', '$', quotes) a login name never needs, and OpenSSH 9.6 and later refuse it themselves.
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._@-]*")
# A path ssh takes as one plain word: ssh_config splits values on spaces and expands '%' and '~'.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+,:@=-]*")
STDERR_TAIL = 64 << 10


def check_destination(dest: Destination, where: str) -> None:
    """Refuse a user or host that ssh could read as anything but a name (before anything runs)."""
    if dest.user and not _USER.fullmatch(dest.user):
        raise ConfigError(f"{where}: {shown(dest.raw)}: with ssh_transport = \"openssh\" the user "
                          f"{shown(dest.user)} may hold letters, digits and . _ @ - only (not starting "
                          "with '-' or '@'): ssh would read anything else as syntax")
    # parse_destination already allows only letters, digits, '.', '-', '_' (not leading '-') or an
    # IPv6 address; checked again here because a host that starts with '-' is an ssh option.
    if dest.host.startswith("-") or not re.fullmatch(r"[A-Za-z0-9_.:%-]+", dest.host):
        raise ConfigError(f"{where}: {shown(dest.raw)}: {shown(dest.host)} is not a host name ssh can be "
                          "given safely")


def check_path(path: str | None, where: str) -> None:
    """Refuse a key or known_hosts path ssh would split or expand (spaces, quotes, '%', '~')."""
    if path is not None and not _PLAIN_PATH.fullmatch(os.path.abspath(path)):
        raise ConfigError(f"{where}: {shown(path)}: with ssh_transport = \"openssh\" the path may hold "
                          "letters, digits and . _ / + , : @ = - only (ssh reads spaces, quotes, '%' and "
                          "'~' in it as syntax); move or link the file to such a path")


def ssh_argv(dest: Destination, user: str, key: str, known_hosts: str, remote_python: str = "python3", *,
             compress: bool = False, timeout: float = 20.0) -> list[str]:
    """The ssh command line: options, then ``--``, the host and the constant bootstrap command."""
    opts = {
        "BatchMode": "yes",  # never a prompt: lvmirror runs unattended
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",  # nothing is ever added to known_hosts
        "CheckHostIP": "no",
        "VerifyHostKeyDNS": "no",
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "IdentityFile": key,
        "PreferredAuthentications": "publickey",
        "Compression": "yes" if compress else "no",
        "Ciphers": CIPHERS,
        "ConnectTimeout": str(max(1, round(timeout))),
        "ServerAliveInterval": str(KEEPALIVE),
        "ServerAliveCountMax": str(KEEPALIVE_COUNT),
        "ControlMaster": "no",  # never ride on (or become) a shared connection
        "ControlPath": "none",
        "ClearAllForwardings": "yes",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "PermitLocalCommand": "no",
        "LogLevel": "ERROR",
    }
    argv = [_ssh_binary(), "-F", "none", "-T"]
    for name, value in opts.items():
        argv += ["-o", f"{name}={value}"]
    return [*argv, "-p", str(dest.port), "-l", user, "--", dest.host, bundle.remote_command(remote_python)]


def _ssh_binary() -> str:
    found = shutil.which("ssh")
    if found is None:
        raise ConnectionProblem("ssh_transport = \"openssh\" needs OpenSSH's ssh client and there is no ssh "
                                f"in PATH ({os.environ.get('PATH', '')}): install openssh-client, or set "
                                "ssh_transport = \"paramiko\"")
    return found


class OpenSshLink:
    """ssh running the shipped receiver: byte streams, stderr kept and logged, diagnosis, close.

    An end of ssh's output, or a broken pipe to it, becomes a ConnectionProblem explained from
    ssh's exit status (the remote command's, or 255 for ssh's own failures) and its stderr.
    """

    def __init__(self, dest: Destination, *, key: str | Path | None = None,
                 known_hosts: str | Path | None = None, remote_python: str = "python3",
                 compress: bool = False, timeout: float = 20.0):
        from lvmirror import ssh  # paramiko: the same key loading, host key messages and diagnosis

        self.dest, self.host, self.remote_python, self.timeout = dest, dest.host, remote_python, timeout
        where = "ssh_transport = \"openssh\""
        check_destination(dest, where)
        key_path = str(key) if key else _default_key(ssh.DEFAULT_KEYS)
        kh_path = str(known_hosts or ssh.default_known_hosts())
        check_path(key_path, f"{where}: ssh key")
        check_path(kh_path, f"{where}: known_hosts")
        self.known_hosts = ssh.KnownHosts(kh_path)
        self.key = ssh.load_key(key_path)  # the paramiko path's errors: missing, passphrase, not a key
        self.user = dest.user or _login_name()
        self.closing = False
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self._stderr_lock = threading.Lock()
        self._lost: ConnectionProblem | None = None
        self.bytes_sent = self.bytes_received = 0
        command = ssh_argv(dest, self.user, os.path.abspath(key_path), os.path.abspath(self.known_hosts.path),
                           remote_python, compress=compress, timeout=timeout)
        log.debug("running %s", command[:-1])
        # A session of its own: ssh has no terminal to prompt on, and a Ctrl-C meant for lvmirror
        # reaches ssh only through lvmirror closing its stdin (the receiver then ends cleanly).
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        self._drainer = threading.Thread(target=self._drain_stderr, name=f"ssh-stderr-{self.host}",
                                         daemon=True)
        self._drainer.start()
        self.reader = io.BufferedReader(_PipeReader(self), buffer_size=1 << 20)
        self.writer = io.BufferedWriter(_PipeWriter(self), buffer_size=1 << 20)

    def ship(self, blob: bytes) -> None:
        """Send the bootstrap its modules and the receiver's arguments."""
        self.writer.write(blob)
        self.writer.flush()

    def _drain_stderr(self) -> None:
        # ssh's own messages and the receiver's stderr, line by line: kept (a bounded tail) and logged.
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line.strip():
                log.info("ssh to %s: %s", self.host, line[:1000])
            with self._stderr_lock:
                self._stderr.append(raw)
                self._stderr_size += len(raw)
                while self._stderr_size > STDERR_TAIL and len(self._stderr) > 1:
                    self._stderr_size -= len(self._stderr.popleft())

    def stderr_tail(self) -> str:
        """The last ~64 KiB ssh and the receiver wrote to stderr."""
        with self._stderr_lock:
            return b"".join(self._stderr).decode(errors="replace").strip()

    def lost(self, what: str) -> ConnectionProblem:
        """The error for an end of ssh's output or a broken pipe to it; diagnosed once."""
        if self._lost is None:
            self._lost = self._diagnose(what)
        return self._lost

    def _diagnose(self, what: str) -> ConnectionProblem:
        try:
            status: int | None = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            status = None
        self._drainer.join(2.0)
        said = self.stderr_tail()
        last = (said.splitlines() or [""])[-1]
        if status == 255:  # ssh's own failure: the connection, the host key or the login
            return self._ssh_failed(said, last)
        return bundle.exit_problem(self.host, self.remote_python, status, last, what)

    def _ssh_failed(self, said: str, last: str) -> ConnectionProblem:
        from lvmirror import ssh

        port = self.dest.port
        if "Host key verification failed" in said or "HOST IDENTIFICATION HAS CHANGED" in said:
            return self._host_key_refused(said)
        if "Permission denied" in said:
            return ssh.key_refused(self.host, self.user, self.key)
        if "Connection refused" in said:
            return ConnectionProblem(f"{self.host} port {port} refused the connection (is sshd running "
                                     "there, and is the port in the destination right?)")
        if "Could not resolve hostname" in said:
            return ConnectionProblem(f"cannot resolve ssh host {self.host}: {last}")
        if "timed out" in said:
            return ConnectionProblem(f"no answer from {self.host} port {port} within {self.timeout:g} s: "
                                     f"{last}")
        return ConnectionProblem(f"ssh to {self.host} port {port} failed: {last or 'exit status 255'}; "
                                 f"{bundle.RESUMES}")

    def _host_key_refused(self, said: str) -> ConnectionProblem:
        """OpenSSH refused the host key: say which key was offered and how to trust it, as paramiko does."""
        from lvmirror import ssh

        try:
            self.known_hosts.check(self.host, self.dest.port, ssh.offered_host_key(
                self.host, self.dest.port, self.known_hosts, self.timeout))
        except ConnectionProblem as e:
            return e  # unknown, changed or revoked: the paramiko transport's own message
        # paramiko would accept it (a type OpenSSH did not ask for, say): quote OpenSSH instead.
        name = ssh.known_hosts_name(self.host, self.dest.port)
        lines = [x for x in said.splitlines() if x.strip() and not set(x) <= set("@ ")]
        return ConnectionProblem(f"OpenSSH refused the host key of {name} checked against "
                                 f"{self.known_hosts.path}: {' / '.join(lines[-4:])}. Check the host's key "
                                 "fingerprint out of band (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub there) "
                                 f"and put the right key in {self.known_hosts.path}")

    def close(self, wait: float = 30.0) -> int | None:
        """End our side, give the receiver ``wait`` s to finish, then stop ssh; its exit status."""
        with contextlib.suppress(OSError, ValueError, LvError):
            self.writer.flush()
        self.closing = True  # what could not be flushed to a dead ssh is dropped, not retried
        with contextlib.suppress(OSError, ValueError, LvError):
            self.writer.close()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF on the channel: the receiver ends, then ssh
        try:
            status = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        with contextlib.suppress(OSError):
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        self._drainer.join(2.0)
        return status

    def abort(self) -> None:
        """Drop the connection now (tests cut links with this)."""
        self.proc.kill()


def _default_key(names: tuple[str, ...]) -> str:
    """The first of ~/.ssh/id_{ed25519,ecdsa,rsa}, as the paramiko transport picks it."""
    home = Path.home() / ".ssh"
    for name in names:
        if (home / name).exists():
            return str(home / name)
    raise ConnectionProblem(f"no ssh key: set ssh_key in the config (none of {', '.join(names)} exists in "
                            f"{home})")


def _login_name() -> str:
    import getpass
    return getpass.getuser()


class _PipeReader(io.RawIOBase):
    def __init__(self, link: OpenSshLink):
        self.link = link
        assert link.proc.stdout is not None
        self.fd = link.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        try:
            n = os.readv(self.fd, [buf])
        except OSError as e:
            raise self.link.lost(f"waiting for a reply: {e.strerror or e}") from None
        if not n:
            # The protocol never reads past a reply it expects: an end here is a failure.
            raise self.link.lost("the receiver closed its output")
        self.link.bytes_received += n
        return n


class _PipeWriter(io.RawIOBase):
    def __init__(self, link: OpenSshLink):
        self.link = link
        assert link.proc.stdin is not None
        self.fd = link.proc.stdin.fileno()

    def writable(self) -> bool:
        return True

    def write(self, buf: Any) -> int:
        if self.link.closing and self.link._lost is not None:
            return len(buf)
        try:
            n = os.write(self.fd, buf)
        except OSError as e:  # EPIPE: ssh is gone
            raise self.link.lost(f"sending: {e.strerror or e}") from None
        self.link.bytes_sent += n
        return n


class OpenSshTransport(SshTransport):
    """The receiver bundle shipped through OpenSSH's ssh (see the module's docstring).

    The same arguments and behaviour as :class:`lvmirror.transports.SshTransport`, whose
    session handling (argv, close, the context manager) it shares; only the link differs.
    """

    def __init__(self, url: Any, key: str | None = None, known_hosts: str | None = None, *,
                 state_dir: str | None = None, remote_python: str = "python3", compress: bool = False,
                 timeout: float = 20.0):
        from lvmirror.destinations import parse_destination

        dest = parse_destination(url) if isinstance(url, str) else url
        if not dest.is_ssh:
            raise ConfigError(f"destination: {shown(dest.raw)} is not an ssh:// URL")
        super().__init__(dest, key, known_hosts, state_dir=state_dir, remote_python=remote_python,
                         compress=compress, timeout=timeout)

    def connect(self) -> ReceiverClient:
        if self.client is not None:
            return self.client
        link = OpenSshLink(self.dest, key=self.key, known_hosts=self.known_hosts,
                           remote_python=self.remote_python, compress=self.compress, timeout=self.timeout)
        self.link = link
        try:
            link.ship(bundle.blob(self.argv()))
        except BaseException:
            link.close(wait=5.0)
            raise
        self.client = ReceiverClient(link.reader, link.writer,
                                     where=f"receiver on {self.dest.host} for {self.dest.path}",
                                     on_close=link.close, diagnostics=link.stderr_tail)
        self.client.local = on_this_host(self.dest.host)
        return self.client
