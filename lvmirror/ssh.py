"""ssh to a remote destination: a strict paramiko connection and the receiver shipped over it.

The far host needs python3 and nothing else.  One exec channel per run
carries everything: a constant bootstrap command (no user-controlled text
ever reaches the remote shell) reads a length-prefixed JSON blob with the
receiver's source and its arguments from the channel, then runs the
receiver on the same stdin/stdout.

Host keys are checked strictly against a known_hosts file: an unknown or
changed key is refused with its SHA256 fingerprint and the command that
trusts it once the fingerprint has been checked out of band.  There is no
auto-add, no agent and no search of ~/.ssh beyond the default key names.
"""

from __future__ import annotations

import base64
import collections
import getpass
import hashlib
import io
import logging
import shlex
import socket
import threading
from pathlib import Path
from typing import Any

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from lvdeltafs.errors import ConnectionProblem
from lvmirror import bundle
from lvmirror.config import ConfigError, Destination, parse_destination

log = logging.getLogger(__name__)

RESUMES = bundle.RESUMES
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
# aes-gcm is the fastest cipher paramiko has (about 290 MB/s on loopback against 200-260 for ctr).
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr")
# paramiko rekeys after 512 MiB and that rekey times out against OpenSSH (paramiko issue 822).
# OpenSSH itself rekeys by its RekeyLimit (for 128-bit block ciphers, after 2^32 blocks = 64 GiB),
# which paramiko answers fine, so leave the schedule to the server.
REKEY_LIMIT = 1 << 40
# A bigger receive window lets replies and stderr flow without round trips; sends are paced by the
# server's window, which we do not choose.
WINDOW = 8 << 20
KEEPALIVE = 15  # seconds between ssh keepalives: they keep NAT state and let TCP notice a dead peer
DEAD_PEER = 120  # seconds of unacknowledged sending after which the far host counts as gone
# ---------------------------------------------------------------- names, keys, host keys


def parse_ssh_url(url: str) -> Destination:
    """``ssh://[user@]host[:port]/path`` as a Destination (the same parser as the config's)."""
    dest = parse_destination(url)
    if not dest.is_ssh:
        raise ConfigError(f"destination: {url!r} is not an ssh:// URL")
    return dest


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH files a host under: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` and OpenSSH's prompts print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def default_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def load_key(path: str | Path | None) -> paramiko.PKey:
    """The private key the config names, or the first of ~/.ssh/id_{ed25519,ecdsa,rsa}."""
    if path is None:
        found = [p for name in DEFAULT_KEYS if (p := Path.home() / ".ssh" / name).exists()]
        if not found:
            raise ConnectionProblem(f"no ssh key: set ssh_key in the config (none of "
                                    f"{', '.join(DEFAULT_KEYS)} exists in {Path.home() / '.ssh'})")
        path = found[0]
    try:
        return _read_private_key(str(path))
    except FileNotFoundError:
        raise ConnectionProblem(f"ssh key {path} does not exist (check ssh_key in the config)") from None
    except paramiko.PasswordRequiredException:
        raise ConnectionProblem(f"ssh key {path} is protected by a passphrase; lvmirror runs unattended "
                                "and uses no agent: give it a key without a passphrase (restrict it in "
                                "authorized_keys on the far side)") from None
    except (paramiko.SSHException, OSError, ValueError) as e:
        raise ConnectionProblem(f"cannot load ssh key {path}: {e}") from None


# The key types OpenSSH makes today, most likely first (DSA is gone from OpenSSH and paramiko).
KEY_TYPES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _read_private_key(path: str) -> paramiko.PKey:
    """Each key type in turn: paramiko's PKey.from_path is 3.2 and later, and Debian 12 has 2.12."""
    wrong_type: paramiko.SSHException | None = None
    for kind in KEY_TYPES:
        try:
            return kind.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            raise
        except paramiko.SSHException as e:  # not this type, or not a key at all
            wrong_type = e
    assert wrong_type is not None
    raise wrong_type


class KnownHosts:
    """A known_hosts file: plain entries, plus ``@revoked`` keys, which are always refused.

    paramiko's own loader raises on marker lines; ``@cert-authority`` is not supported and is
    skipped (a host known only through a CA is then refused as unknown, which is safe).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys = paramiko.HostKeys()
        self.revoked: list[paramiko.PKey] = []
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []  # every host is unknown; the refusal says how to add it
        except OSError as e:
            raise ConnectionProblem(f"cannot read known_hosts file {self.path}: {e}") from None
        for lineno, line in enumerate(lines, 1):
            self._add_line(line.strip(), lineno)

    def _add_line(self, line: str, lineno: int) -> None:
        if not line or line.startswith("#"):
            return
        marker = ""
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
        try:
            entry = HostKeyEntry.from_line(line.strip(), lineno)
        except (paramiko.SSHException, InvalidHostKey) as e:
            log.debug("%s line %d skipped: %s", self.path, lineno, e)
            return
        if entry is None:
            return
        if marker == "@revoked":
            self.revoked.append(entry.key)
        elif marker:
            log.debug("%s line %d: %s is not supported, skipped", self.path, lineno, marker)
        else:
            for name in entry.hostnames:
                self.keys.add(name, entry.key.get_name(), entry.key)

    def known_types(self, name: str) -> list[str]:
        return list(self.keys.lookup(name) or {})

    def check(self, host: str, port: int, key: paramiko.PKey) -> None:
        """Accept ``key`` for the host, or raise ConnectionProblem saying why not and what to do."""
        name = known_hosts_name(host, port)
        blob = key.asbytes()
        if any(r.asbytes() == blob for r in self.revoked):
            raise ConnectionProblem(f"the host key of {name} ({key.get_name()} {fingerprint(key)}) is "
                                    f"marked @revoked in {self.path}: refusing to connect")
        known = self.keys.lookup(name) or {}
        if key.get_name() in known:
            if known[key.get_name()].asbytes() == blob:
                return
            raise self._changed(name, host, port, key, known[key.get_name()])
        raise self._unknown(name, host, port, key, list(known))

    def _keyscan(self, host: str, port: int, key: paramiko.PKey) -> str:
        port_opt = "" if port == 22 else f"-p {port} "
        return (f"ssh-keyscan {port_opt}-t {key.get_name()} {shlex.quote(host)} "
                f">> {shlex.quote(str(self.path))}")

    def _unknown(self, name: str, host: str, port: int, key: paramiko.PKey,
                 other_types: list[str]) -> ConnectionProblem:
        also = (f" (it lists {name} only with key types {', '.join(other_types)})" if other_types else "")
        return ConnectionProblem(
            f"the host key of {name} is not in {self.path}{also}: the server offered "
            f"{key.get_name()} {fingerprint(key)}. Check that fingerprint out of band (on the host: "
            f"ssh-keygen -lf /etc/ssh/ssh_host_{_short_type(key)}_key.pub); if it matches, trust it with: "
            f"{self._keyscan(host, port, key)}")

    def _changed(self, name: str, host: str, port: int, key: paramiko.PKey,
                 old: paramiko.PKey) -> ConnectionProblem:
        return ConnectionProblem(
            f"the HOST KEY of {name} HAS CHANGED: {self.path} has {old.get_name()} {fingerprint(old)}, the "
            f"server offered {fingerprint(key)}. Someone may be intercepting the connection, or the host "
            "was reinstalled. Check the new fingerprint out of band; if it is right, replace the old key "
            f"with: ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(self.path))} && "
            f"{self._keyscan(host, port, key)}")


def _short_type(key: paramiko.PKey) -> str:
    """``ed25519`` for ssh-ed25519, as in /etc/ssh/ssh_host_ed25519_key.pub."""
    name = key.get_name()
    return "ecdsa" if name.startswith("ecdsa") else name.removeprefix("ssh-")


# ---------------------------------------------------------------- connecting


def _open_socket(host: str, port: int, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise ConnectionProblem(f"cannot resolve ssh host {host}: {e.strerror}") from None
    except ConnectionRefusedError:
        raise ConnectionProblem(f"{host} port {port} refused the connection (is sshd running there, "
                                "and is the port in the destination right?)") from None
    except TimeoutError:
        raise ConnectionProblem(f"no answer from {host} port {port} within {timeout:g} s") from None
    except OSError as e:
        raise ConnectionProblem(f"cannot connect to {host} port {port}: {e.strerror or e}") from None
    # Request/reply frames must not wait for Nagle.  A reply may rightly take hours (the apply of a
    # TiB), so there is no read timeout; instead a far host that vanished is noticed by TCP: the ssh
    # keepalives we send every few seconds go unacknowledged, and TCP_USER_TIMEOUT drops the
    # connection after DEAD_PEER seconds of that (the kernel default would retry for ~15 minutes).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER * 1000)
    return sock


def _prefer(available: tuple[str, ...], first: list[str]) -> tuple[str, ...]:
    head = [a for a in first if a in available]
    return tuple(head + [a for a in available if a not in head])


def _tune(transport: paramiko.Transport, known_types: list[str], compress: bool) -> None:
    opts = transport.get_security_options()
    opts.ciphers = _prefer(opts.ciphers, list(FAST_CIPHERS))
    # Ask for a host key type known_hosts has, as OpenSSH does, so a host with several keys is
    # checked against the one on file rather than refused as unknown.
    if "ssh-rsa" in known_types:
        known_types = ["rsa-sha2-512", "rsa-sha2-256", *known_types]
    opts.key_types = _prefer(opts.key_types, known_types)
    transport.use_compression(compress)
    transport.packetizer.REKEY_BYTES = REKEY_LIMIT
    transport.packetizer.REKEY_PACKETS = REKEY_LIMIT
    _skip_slow_asbytes(transport.packetizer)


def _skip_slow_asbytes(packetizer: paramiko.Packetizer) -> None:
    """Hand paramiko 2.x's packetizer bytes, not Messages: it turns each into bytes by a slow path.

    Before 3.0, ``Packetizer.send_message`` calls ``asbytes(msg)``, which first tries ``b(msg)``;
    that raises a TypeError whose text is ``repr(msg)``, the whole 32 KiB packet formatted as a
    Python literal, before falling back to ``msg.asbytes()``.  That was three quarters of the
    sender's CPU: with Debian 12's paramiko 2.12, 1.2 s per 64 MiB sent, 0.3 s without it.
    Bytes pass straight through ``asbytes``; 3.0 and later call ``msg.asbytes()`` themselves and
    take only Messages, so they are left alone.
    """
    if int(paramiko.__version__.split(".")[0]) >= 3:
        return
    send = packetizer.send_message

    def send_message(data: Any) -> None:
        send(data.asbytes() if isinstance(data, paramiko.Message) else data)

    packetizer.send_message = send_message  # type: ignore[method-assign]


def connect(host: str, port: int, user: str, key: paramiko.PKey, known_hosts: KnownHosts, *,
            timeout: float = 20.0, keepalive: int = KEEPALIVE, compress: bool = False) -> paramiko.Transport:
    """An authenticated transport to user@host:port, its host key checked against ``known_hosts``."""
    sock = _open_socket(host, port, timeout)
    transport = paramiko.Transport(sock, default_window_size=WINDOW)
    try:
        _tune(transport, known_hosts.known_types(known_hosts_name(host, port)), compress)
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ConnectionProblem(f"ssh handshake with {host} port {port} failed: {e or type(e).__name__}"
                                    ) from None
        known_hosts.check(host, port, transport.get_remote_server_key())
        _authenticate(transport, host, user, key)
        transport.set_keepalive(keepalive)
        return transport
    except BaseException:
        transport.close()
        raise


def offered_host_key(host: str, port: int, known_hosts: KnownHosts, timeout: float = 20.0) -> paramiko.PKey:
    """The host key the server offers (asking for a type known_hosts has, as connect does); no login.

    :mod:`lvmirror.openssh` uses it to explain a host key that OpenSSH refused in the very words
    of :meth:`KnownHosts.check`: fingerprint, and the command that trusts it.
    """
    transport = paramiko.Transport(_open_socket(host, port, timeout))
    try:
        _tune(transport, known_hosts.known_types(known_hosts_name(host, port)), False)
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise ConnectionProblem(f"ssh handshake with {host} port {port} failed: {e or type(e).__name__}"
                                ) from None
    finally:
        transport.close()


def _authenticate(transport: paramiko.Transport, host: str, user: str, key: paramiko.PKey) -> None:
    try:
        transport.auth_publickey(user, key)
    except paramiko.AuthenticationException:
        raise key_refused(host, user, key) from None
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise ConnectionProblem(f"ssh authentication with {host} failed: {e}") from None


def key_refused(host: str, user: str, key: paramiko.PKey) -> ConnectionProblem:
    return ConnectionProblem(
        f"{host} refused the ssh key ({key.get_name()} {fingerprint(key)}) for user {user}: add its "
        f"public key to ~{user}/.ssh/authorized_keys there, or set ssh_key to a key that is there")


# ---------------------------------------------------------------- the channel as byte streams


class RemoteLink:
    """One exec channel running the shipped receiver: byte streams, diagnosis, close.

    Every paramiko or socket failure while reading or writing becomes a ConnectionProblem that
    names the host and says the next run resumes.  An end of stream before the receiver said
    goodbye is explained from its exit status and the tail of its stderr: 127 means the remote
    python was not found.
    """

    STDERR_TAIL = 64 << 10

    def __init__(self, transport: paramiko.Transport, host: str, remote_python: str, *,
                 io_timeout: float | None = None, open_timeout: float = 20.0):
        self.transport = transport
        self.host = host
        self.remote_python = remote_python
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self._stderr_lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lost: ConnectionProblem | None = None
        try:
            self.channel = transport.open_session(window_size=WINDOW, timeout=open_timeout)
            self.channel.settimeout(io_timeout)
            self.channel.exec_command(bundle.remote_command(remote_python))
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ConnectionProblem(f"cannot start a command on {host} over ssh: {e}") from None
        self._drainer = threading.Thread(target=self._drain_stderr, name=f"ssh-stderr-{host}", daemon=True)
        self._drainer.start()
        self.reader = io.BufferedReader(_ChannelReader(self), buffer_size=1 << 20)
        self.writer = io.BufferedWriter(_ChannelWriter(self), buffer_size=1 << 20)

    def ship(self, blob: bytes) -> None:
        """Send the bootstrap its modules and the receiver's arguments."""
        self.writer.write(blob)
        self.writer.flush()

    def _drain_stderr(self) -> None:
        # stdout and stderr share one window: unread stderr would stall the protocol, so keep reading.
        while True:
            try:
                data = self.channel.recv_stderr(32768)
            except TimeoutError:
                if self.channel.closed:
                    return
                continue
            except Exception:  # the transport went away; the protocol side reports it
                return
            if not data:
                return
            for line in data.decode(errors="replace").splitlines():
                if line.strip():
                    log.info("receiver on %s: %s", self.host, line[:1000])
            with self._stderr_lock:
                self._stderr.append(data)
                self._stderr_size += len(data)
                while self._stderr_size > self.STDERR_TAIL and len(self._stderr) > 1:
                    self._stderr_size -= len(self._stderr.popleft())

    def stderr_tail(self) -> str:
        """The last ~64 KiB the far side wrote to stderr (to explain a receiver that went away)."""
        with self._stderr_lock:
            return b"".join(self._stderr).decode(errors="replace").strip()

    def exit_status(self, wait: float = 5.0) -> int | None:
        """The remote command's exit status, waiting up to ``wait`` s for it; None when none came."""
        if self.channel.status_event.wait(wait):
            return self.channel.exit_status
        return None

    def lost(self, what: str) -> ConnectionProblem:
        """The error for an end of the stream or a failure of the link, as exact as we can make it.

        Diagnosed once: later reads and writes of a dead link repeat the first verdict at once.
        """
        if self._lost is None:
            self._lost = self._diagnose(what)
        return self._lost

    def _diagnose(self, what: str) -> ConnectionProblem:
        status = self.exit_status() if self.transport.is_active() else None
        self._drainer.join(2.0)
        last = (self.stderr_tail().splitlines() or [""])[-1]
        return bundle.exit_problem(self.host, self.remote_python, status, last, what)

    def guard(self, what: str, exc: BaseException) -> ConnectionProblem:
        if isinstance(exc, TimeoutError):
            return ConnectionProblem(f"no progress from the receiver on {self.host} within "
                                     f"{self.channel.gettimeout():g} s while {what}; {RESUMES}")
        return self.lost(f"{what}: {str(exc) or type(exc).__name__}")

    def close(self, wait: float = 30.0) -> int | None:
        """End our side, give the receiver ``wait`` s to finish, close the connection; its exit status."""
        status = None
        try:
            if not self.writer.closed:
                self.writer.flush()
            self.channel.shutdown_write()
            status = self.exit_status(wait)
        except (paramiko.SSHException, EOFError, OSError, ConnectionProblem):
            pass  # closing after a failure: the failure was already reported
        finally:
            self.channel.close()
            self.transport.close()
        return status

    def abort(self) -> None:
        """Drop the connection now (tests cut links with this; so can a signal handler)."""
        self.transport.close()


class _ChannelReader(io.RawIOBase):
    def __init__(self, link: RemoteLink):
        self.link = link

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        try:
            data = self.link.channel.recv(len(buf))
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self.link.guard("waiting for a reply", e) from None
        if not data:
            # The protocol never reads past a reply it expects: an end here is a failure.
            raise self.link.lost("the receiver closed its output")
        n = len(data)
        buf[:n] = data
        self.link.bytes_received += n
        return n


class _ChannelWriter(io.RawIOBase):
    def __init__(self, link: RemoteLink):
        self.link = link

    def writable(self) -> bool:
        return True

    def write(self, buf: Any) -> int:
        chan = self.link.channel
        if chan.closed or chan.eof_received and chan.exit_status_ready():
            raise self.link.lost("the receiver exited")
        try:
            chan.sendall(buf)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self.link.guard("sending", e) from None
        n = len(buf)
        self.link.bytes_sent += n
        return n


def open_link(dest: Destination, *, key: str | Path | None = None, known_hosts: str | Path | None = None,
              argv: list[str] | None = None, remote_python: str = "python3", compress: bool = False,
              timeout: float = 20.0, io_timeout: float | None = None) -> RemoteLink:
    """Connect to ``dest``, start the bootstrap and ship the receiver with ``argv`` (default: the path)."""
    hosts = KnownHosts(known_hosts or default_known_hosts())
    pkey = load_key(key)
    user = dest.user or getpass.getuser()
    transport = connect(dest.host, dest.port, user, pkey, hosts, timeout=timeout, compress=compress)
    try:
        link = RemoteLink(transport, dest.host, remote_python, io_timeout=io_timeout, open_timeout=timeout)
        link.ship(bundle.blob(argv if argv is not None else [dest.path]))
        return link
    except BaseException:
        transport.close()
        raise
