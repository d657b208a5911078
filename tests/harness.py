"""What the suites share: a loop-device VG, a real sshd (on 127.0.0.1, or behind a shaped link in a network
namespace), mount waits, deltas for the receiver, a hostile user, and lvmirror on real LVM (the fixtures
in conftest.py are built on these)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lvdeltafs import lvm
from lvdeltafs.delta import Identity
from lvdeltafs.formats import stream as S
from lvdeltafs.pairs import device_size
from tests.encoder import write_stream


def write_at(path: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of a device or file and make it durable."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str | Path, size: int | None = None) -> str:
    """sha256 of a file or device (its first ``size`` bytes, if given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else 1 << 62
        while left > 0 and (block := f.read(min(1 << 20, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def apply_stream(image: Path, stream_path: Path) -> None:
    """Apply a delta stream to an image: the tests' own minimal applier, independent of lvmirror's."""
    from lvdeltafs.formats.reader import iter_records
    with open(stream_path, "rb") as s, open(image, "r+b") as out:
        for rec in iter_records(s):
            if rec.type == "size":
                out.truncate(rec.offset)
            elif rec.type == "data":
                out.seek(rec.offset)
                out.write(rec.data)
            elif rec.type == "zero":
                out.seek(rec.offset)
                out.write(bytes(rec.length))


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run a command (no shell); return stdout; on failure raise with its stderr."""
    proc = subprocess.run(list(argv), capture_output=True, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace")


@dataclass
class VolumeGroup:
    """A VG on a sparse file attached to a loop device (inside the VM)."""

    name: str
    pv: str
    backing: Path

    @classmethod
    def create(cls, name: str, size_mb: int, extent_size: str | None = None) -> VolumeGroup:
        fd, path = tempfile.mkstemp(prefix="pv-", suffix=".img", dir="/tmp")
        os.close(fd)
        os.truncate(path, size_mb << 20)
        loop = sh("losetup", "-f", "--show", path).strip()
        sh("pvcreate", "-q", loop)
        sh("vgcreate", "-q", *(["-s", extent_size] if extent_size else []), name, loop)
        return cls(name, loop, Path(path))

    def run(self, *argv: str) -> str:
        return sh(*argv)

    def dm(self, lv: str) -> str:
        """The device-mapper name of an LV of this VG ('-' doubled)."""
        return f"{self.name.replace('-', '--')}-{lv.replace('-', '--')}"

    def lv_path(self, lv: str) -> str:
        return f"/dev/{self.name}/{lv}"

    def destroy(self) -> str:
        """Remove the VG and its PV; returns a problem description, or '' when clean."""
        problems = []
        for argv in (["vgchange", "-an", self.name], ["vgremove", "-ff", "-y", self.name],
                     ["losetup", "-d", self.pv]):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
        self.backing.unlink(missing_ok=True)
        return "; ".join(problems)


@dataclass
class Sshd:
    """A running sshd and the files a client needs to reach it strictly."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    host_key_pub: str
    process: subprocess.Popen
    workdir: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    sh("ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-C", "lvmirror-test", "-f", str(path))


def start_sshd(workdir: Path, host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> Sshd:
    """Start sshd -D listening on ``host`` with fresh keys; returns once it sends its banner.

    ``prefix`` runs it through another command, such as ``ip netns exec NS`` (see :class:`ShapedLink`).
    """
    workdir.chmod(0o700)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_key", workdir / "client_key"
    keygen(host_key)
    keygen(client_key)
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "client_key.pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    host_pub = (workdir / "host_key.pub").read_text().split()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_pub[0]} {host_pub[1]}\n")
    with open(workdir / "sshd.log", "wb") as log:
        proc = _popen_sshd(port, host_key, authorized, log, host, prefix)
    wait_for_banner(port, proc, workdir / "sshd.log", host=host)
    return Sshd(host, port, os.environ.get("USER") or "root", client_key, known_hosts,
                f"{host_pub[0]} {host_pub[1]}", proc, workdir)


def _popen_sshd(port: int, host_key: Path, authorized: Path, log, host: str = "127.0.0.1",
                prefix: Sequence[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", str(port),
         "-o", f"HostKey={host_key}", "-o", f"AuthorizedKeysFile={authorized}",
         "-o", f"ListenAddress={host}", "-o", "PidFile=none", "-o", "PermitRootLogin=prohibit-password",
         "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
         "-o", "MaxStartups=100", "-o", "MaxSessions=50",
         # The keys live under /tmp (sticky, world-writable), which StrictModes refuses.
         "-o", "StrictModes=no",
         "-o", "Subsystem sftp internal-sftp"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for_banner(port: int, proc: subprocess.Popen, logfile: Path, timeout: float = 15.0,
                    host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited ({proc.returncode}): {logfile.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0"):
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sshd sent no banner within {timeout} s: {logfile.read_text()}")


_links = itertools.count()


@dataclass
class ShapedLink:
    """A slow link on this host: a network namespace behind a veth pair shaped by tbf at both ends.

    The host side is ``host_ip``/30 on ``host_dev``; inside the namespace, ``ns_ip``/30 on
    ``ns_dev``, and ``lo`` up.  What the host sends into the namespace leaves through
    ``host_dev``'s tbf, what comes back through ``ns_dev``'s.  Names carry this process's id
    and the subnet is derived from it, so two test runs on one host do not collide.
    ``destroy()`` deletes the namespace, and the veth pair goes with it.
    """

    netns: str
    host_dev: str
    ns_dev: str
    host_ip: str
    ns_ip: str
    rate: str

    @classmethod
    def create(cls, rate: str = "80mbit", burst: str = "64kb", latency: str = "50ms") -> ShapedLink:
        n = next(_links)
        pid = os.getpid()
        base = ((pid * 4 + n) % 16384) * 4  # a /30 of 10.213.0.0/16
        net = f"10.213.{base >> 8}"
        link = cls(f"lvm-shaped-{pid}-{n}", f"lvs{pid}x{n}h", f"lvs{pid}x{n}n", f"{net}.{(base & 255) + 1}",
                   f"{net}.{(base & 255) + 2}", rate)
        sh("ip", "netns", "add", link.netns)
        try:
            sh("ip", "link", "add", link.host_dev, "type", "veth", "peer", "name", link.ns_dev,
               "netns", link.netns)
            sh("ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_dev)
            sh("ip", "link", "set", link.host_dev, "up")
            inside = link.exec_prefix()
            sh(*inside, "ip", "addr", "add", f"{link.ns_ip}/30", "dev", link.ns_dev)
            sh(*inside, "ip", "link", "set", link.ns_dev, "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            tbf = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
            sh("tc", "qdisc", "add", "dev", link.host_dev, *tbf)
            sh(*inside, "tc", "qdisc", "add", "dev", link.ns_dev, *tbf)
        except BaseException:
            link.destroy()
            raise
        return link

    def exec_prefix(self) -> list[str]:
        """Run a command inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    def qdisc(self) -> str:
        """``tc qdisc show`` of the host side (the data direction): proof the shaper is there."""
        return sh("tc", "qdisc", "show", "dev", self.host_dev)

    def tx_bytes(self) -> int:
        """Bytes the host has sent into the namespace (everything: IP, TCP and ssh framing too)."""
        return int(Path(f"/sys/class/net/{self.host_dev}/statistics/tx_bytes").read_text())

    def destroy(self) -> str:
        """Remove the namespace (and so the veth pair); returns a problem description, or '' when clean."""
        proc = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True)
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)  # normally gone already
        problems = [] if proc.returncode == 0 else [f"ip netns del {self.netns}: {proc.stderr.strip()}"]
        if os.path.exists(f"/sys/class/net/{self.host_dev}"):
            problems.append(f"{self.host_dev} is still there")
        return "; ".join(problems)


def wait_for_mount(mountpoint: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return
        if proc.poll() is not None and not os.path.ismount(mountpoint):
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"FUSE process exited ({proc.returncode}) before mounting: {out}")
        time.sleep(0.05)
    raise AssertionError(f"{mountpoint} was not mounted within {timeout} s")


# ---------------------------------------------------------------- deltas for the receiver's tests

class BytesSource:
    """A delta stream held in memory, sent as lvmirror sends any stream source."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def header(self) -> dict:
        from lvmirror.client import stream_header
        return stream_header(self)

    def read_from(self, offset: int, resume=None) -> Iterator[bytes]:
        view = memoryview(self.data)
        for p in range(offset, self.size, 1 << 20):
            yield bytes(view[p:p + (1 << 20)])


MiB = 1 << 20
BLOCK = 4096
VOL = "vol-uuid"




def image(size: int, islands: list[tuple[int, int]], seed: int) -> bytes:
    """Zeros with random data in each (offset, length) island."""
    rnd = random.Random(seed)
    out = bytearray(size)
    for off, ln in islands:
        out[off:off + ln] = rnd.randbytes(ln)
    return bytes(out)


def changed(old: bytes | None, new: bytes) -> list[tuple[int, int, int]]:
    """Extents that turn ``old`` into ``new`` at 4 KiB granularity.

    Blocks that differ become DATA, or ZERO when the new block is all zeros.
    An init (no old side) sends only non-zero blocks: the rest stays holes.
    Bytes past the old size read as zeros after the receiver grows the file.
    """
    out = []
    for off in range(0, len(new), BLOCK):
        nb = new[off:off + BLOCK]
        ob = old[off:off + len(nb)] if old is not None else bytes(len(nb))
        ob = ob + bytes(len(nb) - len(ob))
        if nb == ob:
            continue
        out.append((off, len(nb), S.KIND_ZERO if nb.count(0) == len(nb) else S.KIND_DATA))
    return out


def delta(old: bytes | None, new: bytes, base: str, target: str, *, source: str = "cow",
          volume: str = VOL, pieces: list[tuple[int, int, int]] | None = None) -> tuple[Identity, bytes]:
    """(identity, stream bytes) of the delta from ``old`` (snapshot ``base``) to ``new``."""
    ident = Identity(volume, base, target, len(old) if old is not None else 0, len(new), BLOCK, source)
    pieces = changed(old, new) if pieces is None else pieces
    blob = b"".join(write_stream(ident.to_dict(), len(new), pieces, lambda o, n: new[o:o + n],
                                 delta_id=ident.delta_id))
    return ident, blob


_WORDS = [b"lvm", b"snapshot", b"mirror", b"chunk", b"delta", b"volume", b"\n", b"exception", b" ",
          b"thin", b"0123", b"ext4"]


def text(size: int, seed: int) -> bytes:
    """Bytes that compress about 3:1 with zlib, like a filesystem's text and metadata."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(_WORDS) + rnd.choice(_WORDS)
    return bytes(out[:size])


class MemoryReader:
    """A target held in memory, read as lvmirror reads a snapshot (``pread``, from any thread)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def close(self) -> None:
        pass


def memory_delta(old: bytes | None, new: bytes, base: str, target: str, *, source: str = "cow"):
    """The Delta object (not its stream) from ``old`` to ``new``, as a sync would send it."""
    from lvdeltafs.delta import Delta
    from lvdeltafs.extents import Extents
    ident = Identity(VOL, base, target, len(old) if old is not None else 0, len(new), BLOCK, source)
    pieces = changed(old, new)
    extents = Extents.from_ranges([p[0] for p in pieces], [p[1] for p in pieces], [p[2] for p in pieces],
                                  len(new))
    return Delta(ident, extents, MemoryReader(new))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sync(dest: str | Path, ident: Identity, blob: bytes, **kw) -> dict:
    """One session of the real receiver (the shipped bundle in a subprocess): stage the delta and apply it."""
    from lvmirror.transports import LocalTransport
    with LocalTransport(str(dest), kw.get("state_dir")) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id, force=kw.get("force", False))
        return rc.apply()


def staging_files(dest: str | Path) -> list[str]:
    return [p for p in (f"{dest}.lvmirror-staging", f"{dest}.lvmirror-staging.progress") if os.path.exists(p)]


V1 = image(8 * MiB, [(0, 64 << 10), (3 * MiB, 2 * MiB + 100)], seed=1)
V2 = image(8 * MiB, [(0, 64 << 10), (3 * MiB, 2 * MiB + 100), (6 * MiB, MiB)], seed=2)
V2 = V2[:3 * MiB + 4096] + bytes(8192) + V2[3 * MiB + 12288:]  # a range that becomes zeros


# ------------------------------------------------------------ the console scripts under test

# The console scripts under test: the virtualenv's, beside this Python, or the installed package's
# (scripts/test sets LVMIRROR_TEST_BIN=/usr/bin for its run against the Debian package).
BIN = Path(os.environ.get("LVMIRROR_TEST_BIN") or Path(sys.executable).parent)
LVDELTAFS = str(BIN / "lvdeltafs")


def run(*argv: str | Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc


# ------------------------------------------------------------ a hostile local user (the adversarial suite)

VICTIM = b"root's file: must never change\n"
HOSTILE = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

PLANT_LINKS = """
import os, sys
target, folder, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    os.symlink(target, os.path.join(folder, name))
"""

PLANT_FILES = """
import os, sys
folder, names = sys.argv[1], sys.argv[2:]
for name in names:
    with open(os.path.join(folder, name), "w") as f:
        f.write("nobody's " + name)
"""


def as_nobody(script: str, *args: str) -> None:
    """Run a Python snippet as the unprivileged user nobody (the tests run as root)."""
    import sys
    out = subprocess.run([*HOSTILE, sys.executable, "-I", "-c", script, *args], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


@contextlib.contextmanager
def loop_device(backing: Path, size: int = 12 << 20, fill: bytes = b"\xee") -> Iterator[str]:
    """A loop device over a new file full of ``fill`` (zero ranges must really be written); detached after."""
    backing.write_bytes(fill * size)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# ------------------------------------------------------------ lvmirror on real LVM (the VM suites)

VOLUME_MB = 32  # the VM tests' volumes: small, every VM minute counts


def seeded_writes(path: str, size: int, seed: int, count: int = 12) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 300_000])
        offset = rng.randrange(0, size - length) // 512 * 512
        write_at(path, offset, rng.randbytes(length))


@contextlib.contextmanager
def writing_to(path: str, size: int, seed: int):
    """A thread writing 4 KiB blocks to the origin for as long as the block runs."""
    stop, done = threading.Event(), []

    def run() -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_WRONLY)
        try:
            while not stop.is_set() and len(done) < 400:
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
                done.append(1)
                if len(done) % 8 == 0:
                    os.fsync(fd)
                stop.wait(0.01)
        finally:
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join()


class Mirror:
    """One configured volume with an image-file destination under /tmp."""

    def __init__(self, tmp: Path, vg: str, lv: str, snapshot_size: str | None = "16M", keep: int = 1,
                 url: str | None = None, extra: str = "", device: str | None = None):
        """``url``: reach the image through this destination (ssh://...) instead of its path.

        ``device``: the mirror is this block device, its state kept in ``tmp/state``.
        """
        self.tmp, self.vg, self.lv, self.name = tmp, vg, lv, lv
        self.image = Path(device) if device else tmp / f"{lv}.img"
        self.state_dir = tmp / "state" if device else None
        if device:
            url = device
            extra += f'state_dir = "{self.state_dir}"\n'
        self.cfg = tmp / "lvmirror.toml"
        if snapshot_size:
            extra += f'snapshot_size = "{snapshot_size}"\n'
        self.cfg.write_text(f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\nkeep = {keep}\n'
                            f'[volume.{lv}]\nvg = "{vg}"\nlv = "{lv}"\n'
                            f'destination = "{url or self.image}"\n' + extra)
        self.cfg.chmod(0o600)

    @property
    def origin(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "lvmirror"), "-c", str(self.cfg), *args], capture_output=True,
                             text=True)
        assert out.returncode == expect, f"lvmirror {' '.join(args)} -> {out.returncode}:\n{out.stderr}"
        return out

    def state(self) -> dict:
        if self.state_dir:
            (path,) = self.state_dir.glob("*.json")
        else:
            path = Path(f"{self.image}.lvmirror-state")
        return json.loads(path.read_text())

    def owned(self) -> list[lvm.LogicalVolume]:
        tags = {"lvmirror", f"lvmirror_vol_{self.name}"}
        return [x for x in lvm.list_lvs(self.vg) if tags <= set(x.tags)]

    def assert_matches_base(self) -> lvm.LogicalVolume:
        """The mirror equals the snapshot its state names, and that is the only snapshot left."""
        state = self.state()
        owned = self.owned()
        assert [s.snapshot_id for s in owned] == [state["snapshot"]], (owned, state)
        base = owned[0]
        assert device_size(str(self.image)) == device_size(base.path) == state["size"]
        assert sha256_of(base.path) == sha256_of(self.image), f"mirror differs from {base.vg_lv}"
        return base


# ------------------------------------------------------------ a command line run in process (the fuzz suites)

EXIT_CODES = set(range(10))  # lvdeltafs/errors.py, README "Exit codes"
RAW_CONTROLS = "\x1b\x07\x7f\x9b\x00\u202e"  # never to reach a terminal raw


class Hung(BaseException):
    """Raised by the timer: a BaseException, so no handler of the program under test catches it."""


@dataclass
class CliResult:
    code: int
    output: str


def run_cli(main, args: list[str], timeout: float = 20.0) -> CliResult:
    """Run a console script's ``main(args)`` in this process, as its console script would; a hang fails."""
    import logging
    import signal

    from click.testing import CliRunner

    def alarm(signum, frame):
        raise Hung(f"{args!r} still running after {timeout} s")

    root = logging.getLogger()
    handlers = list(root.handlers)
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    # color=True: the runner must not strip escape sequences the program might print raw.
    # click 8.2 yields (stdout, stderr, both); Debian 12's 8.1 yields (both, None), stderr mixed in.
    with CliRunner().isolation(color=True) as streams:
        mixed = streams[2] if len(streams) == 3 else streams[0]
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            for h in root.handlers[:]:  # a handler bound to this run's stderr must not outlive it
                if h not in handlers:
                    root.removeHandler(h)
        return CliResult(code, mixed.getvalue().decode("utf-8", "backslashreplace"))


def assert_clean_exit(result: CliResult, prog: str, args: list[str], *, single_error: bool = True) -> None:
    """No traceback, a documented exit code, nothing raw on the terminal, an error line on failure.

    ``single_error``: exactly one ``PROG: error:`` line (not for runs over several volumes, which log
    one line per failing volume, nor for ``status``, which lists problems).
    """
    out = result.output
    assert "Traceback" not in out, (args, out)
    assert "error: internal error" not in out, (args, out)  # the last line of defence is not an answer
    assert result.code in EXIT_CODES, (args, result.code, out)
    assert not any(c in out for c in RAW_CONTROLS), (args, out)
    errors = [line for line in out.splitlines() if line.startswith(f"{prog}: error: ")]
    stale = "--max-age" in args and (out.startswith("stale: ") or '"stale": true' in out)
    if result.code == 2 and stale:  # status --max-age: a volume is stale (a monitoring plugin's CRITICAL)
        assert not errors, (args, out)
    elif result.code == 2:  # click's usage error (or, with no command at all, the help)
        assert ("Error: " in out or out.startswith("Usage:")) and not errors, (args, out)
    elif single_error and result.code not in (0, 6):  # 6: a check's differences, listed on stdout
        assert len(errors) == 1, (args, out)
    elif result.code not in (0, 6):
        assert "error" in out.lower() or "problem" in out.lower(), (args, out)
