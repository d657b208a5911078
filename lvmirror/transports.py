"""How lvmirror reaches a receiver: the shipped bundle in a local subprocess, or over ssh.

Over ssh by paramiko (:class:`SshTransport`, the default) or by OpenSSH's own client
(:class:`lvmirror.openssh.OpenSshTransport`, ``ssh_transport = "openssh"``).

Both transports run the same bytes (:mod:`lvmirror.bundle`): the local one
starts the system's ``python3 -I`` with the bootstrap and feeds it the blob,
exactly as the ssh one does on the far host, so the host's tests exercise
what a far host runs.  ``connect()`` returns a :class:`~lvmirror.client.ReceiverClient`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lvdeltafs.errors import ConnectionProblem
from lvmirror import bundle
from lvmirror.client import ReceiverClient

SSH_TRANSPORTS = ("paramiko", "openssh")  # ssh_transport: paramiko (the default) or OpenSSH's ssh client


@dataclass(frozen=True)
class SshOptions:
    """How to reach an ssh:// destination: the private key, the known_hosts file, the ssh transport."""

    key: str | None = None
    known_hosts: str | None = None
    transport: str = "paramiko"


def receiver_argv(path: str, state_dir: str | None) -> list[str]:
    """The receiver's arguments: sent as data in the blob, never through a shell."""
    return [path, *(["--state-dir", state_dir] if state_dir else [])]


def on_this_host(host: str) -> bool:
    """Whether ``host`` is this host by its addresses (every one a loopback address): a receiver there
    shares this host's CPU, so, as for a local destination, ``compress = "auto"`` does not compress
    (measured: the sender's view of the link hides the far side's work, and on the loopback compressing
    with zstd looked faster run by run yet took 1.17x off's time in all)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    try:
        return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback
                                   for i in infos)
    except ValueError:
        return False


PIPE_BYTES = 1 << 20  # a whole 1 MiB frame; Linux's default pipe-max-size


def widen_pipe(fd: int) -> None:
    """Let the pipe to the receiver hold a whole frame (Linux: F_SETPIPE_SZ).

    At the default 64 KiB each 1 MiB frame took 16 hand-offs between the two
    processes, and the data path waited on them: measured, a local sync's
    send and stage 0.55 s for 164 MiB from the page cache.  Elsewhere, or over
    the limit, the pipe stays as it is."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class LocalTransport:
    """The receiver bundle in a subprocess on this host.

    One subprocess per session; ``connect()`` starts it and returns the client.
    ``env`` adds environment variables (the fault tests' kill hook);
    ``modules`` replaces the shipped modules (a test that proves the importer's rule).
    """

    def __init__(self, dest: str, state_dir: str | None = None, *, env: dict[str, str] | None = None,
                 modules: list[tuple[str, str]] | None = None, main: str | None = None):
        self.dest = os.path.abspath(dest)
        self.state_dir = os.path.abspath(state_dir) if state_dir else None
        self.env, self.modules, self.main = env, modules, main
        self.proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self.client: ReceiverClient | None = None

    def connect(self) -> ReceiverClient:
        if self.client is not None:
            return self.client
        # stderr to a file, never a pipe nobody reads (a full pipe would stall the receiver).
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _end()
        env = {**os.environ, **(self.env or {})}
        blob = bundle.blob(receiver_argv(self.dest, self.state_dir), self.modules,
                           *([self.main] if self.main else []), compiled=True)
        self.proc = subprocess.Popen(bundle.local_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env, cwd="/")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        widen_pipe(self.proc.stdin.fileno())
        try:
            self.proc.stdin.write(blob)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._end()
            why = self.diagnostics()
            raise ConnectionProblem(f"the receiver for {self.dest} did not start: {why}") from None
        self.client = ReceiverClient(self.proc.stdout, self.proc.stdin, where=f"receiver for {self.dest}",
                                     on_close=self._end, diagnostics=self.diagnostics)
        self.client.local = True
        return self.client

    def diagnostics(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _end(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        else:
            self._end()

    def __enter__(self) -> ReceiverClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SshTransport:
    """The receiver bundle shipped over ssh and run with the far host's python3 (see :mod:`lvmirror.ssh`).

    ``url`` is ``ssh://[user@]host[:port]/path`` (or a parsed config Destination); ``key`` the
    private key (default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa); ``known_hosts`` the file the host
    key must be in (default ~/.ssh/known_hosts).  ``state_dir`` is a folder on the far host.
    One connection and one channel per session; ``connect()`` returns the client.
    """

    def __init__(self, url: Any, key: str | None = None, known_hosts: str | None = None, *,
                 state_dir: str | None = None, remote_python: str = "python3", compress: bool = False,
                 timeout: float = 20.0):
        from lvmirror.ssh import parse_ssh_url

        self.dest = parse_ssh_url(url) if isinstance(url, str) else url
        self.key, self.known_hosts, self.state_dir = key, known_hosts, state_dir
        self.remote_python, self.compress, self.timeout = remote_python, compress, timeout
        self.link: Any = None
        self.client: ReceiverClient | None = None

    def argv(self) -> list[str]:
        return receiver_argv(self.dest.path, self.state_dir)

    def connect(self) -> ReceiverClient:
        if self.client is not None:
            return self.client
        from lvmirror.ssh import open_link  # paramiko is imported only when a destination needs it

        self.link = open_link(self.dest, key=self.key, known_hosts=self.known_hosts, argv=self.argv(),
                              remote_python=self.remote_python, compress=self.compress, timeout=self.timeout)
        self.client = ReceiverClient(self.link.reader, self.link.writer,
                                     where=f"receiver on {self.dest.host} for {self.dest.path}",
                                     on_close=self.link.close, diagnostics=self.link.stderr_tail)
        self.client.local = on_this_host(self.dest.host)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        elif self.link is not None:
            self.link.close()

    def __enter__(self) -> ReceiverClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def receiver_for(dest: str, state_dir: str | None, ssh: SshOptions | None = None,
                 bwlimit: int | None = None) -> Iterator[ReceiverClient]:
    """A receiver for ``dest`` for the length of the block: a local subprocess, or shipped over ssh.

    ``bwlimit``: a cap on the delta bytes sent per second, for either transport (a local
    USB disk may need one as much as a slow link).
    """
    transport: Any
    if dest.startswith("ssh://"):
        ssh = ssh or SshOptions()
        if ssh.transport == "openssh":
            from lvmirror.openssh import OpenSshTransport
            transport = OpenSshTransport(dest, ssh.key, ssh.known_hosts, state_dir=state_dir)
        else:
            transport = SshTransport(dest, ssh.key, ssh.known_hosts, state_dir=state_dir)
    else:
        transport = LocalTransport(dest, state_dir)
    with transport as client:
        client.set_bwlimit(bwlimit)
        yield client
