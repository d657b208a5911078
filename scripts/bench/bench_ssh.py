#!/usr/bin/env python3
"""Benchmark: lvmirror's staging over ssh against OpenSSH's own single stream, side by side.

Starts a temporary sshd on 127.0.0.1 (tests.harness.start_sshd, as the test
fixture does: its own host key, known_hosts and user key), builds an image of
mixed data (random blocks and text-like blocks), and times, alternating, in one run:

- OpenSSH: `ssh -c CIPHER host 'cat > /dev/null'` of the same bytes, for
  aes128-gcm (what the openssh transport picks) and aes128-ctr (what Debian 12's
  paramiko 2.12 has to use, having no GCM);
- a raw paramiko channel running `cat > /dev/null` (lvmirror.ssh.connect: its
  cipher choice, raised rekey limits);
- lvmirror staging an initial sync of the image (send_delta: send + verify +
  fsync on the receiver) over paramiko (ssh_transport = "paramiko") and over
  OpenSSH's ssh (ssh_transport = "openssh"); locally too, for scale.

Each raw stream is timed from the first byte (the handshake is excluded: the remote
command says "go" first).  Rates are stream bytes per second, medians of --reps
runs, with ratios to OpenSSH with the cipher paramiko negotiated.  Peak RSS: this
process (the sender, every run) and the openssh transport's ssh client.  On loopback both ends
share this host's CPUs (sshd and the receiver too), so staging rates are lower
bounds for two hosts.

    .venv/bin/python scripts/bench/bench_ssh.py --size-mib 256 --reps 5 [--json PATH]
    .venv-debian/bin/python scripts/bench/bench_ssh.py --size-mib 256 --reps 5   # Debian's paramiko 2.12
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import benchjson  # noqa: E402  (scripts/bench, this script's own directory)
import paramiko  # noqa: E402

from lvdeltafs.delta import Delta, FileReader, Identity  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvmirror import ssh  # noqa: E402
from lvmirror.encoder import DeltaStream  # noqa: E402
from lvmirror.openssh import OpenSshTransport  # noqa: E402
from lvmirror.transports import LocalTransport, SshTransport  # noqa: E402
from tests.harness import Sshd, start_sshd  # noqa: E402

MiB = 1 << 20
READY = "echo go; exec cat > /dev/null"  # the remote says "go" once the channel is up: time from there


def text_block(rnd: random.Random) -> bytes:
    """A MiB of log-like text: what database pages and VM disks full of files often look like."""
    words = ["GET", "POST", "/index.html", "/api/v1/items", "200", "404", "user", "session", "INFO",
             "WARN", "db", "commit", "rollback", "query", "select", "from", "where", "id"]
    lines = []
    size = 0
    while size < MiB:
        line = (f"2024-05-{rnd.randint(1, 28):02d} {rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d} "
                + " ".join(rnd.choice(words) for _ in range(8)) + f" {rnd.randint(0, 1 << 30)}\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:MiB]


def build_image(path: Path, size_mib: int, text_frac: float) -> None:
    rnd = random.Random(7)
    texts = [text_block(rnd) for _ in range(8)]
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(rnd.choice(texts) if rnd.random() < text_frac else os.urandom(MiB))


def init_source(path: Path) -> tuple[DeltaStream, str, FileReader]:
    size = path.stat().st_size
    ident = Identity(volume="bench", base="", target="bench@1", base_size=0, target_size=size,
                     chunk_size=MiB, source="compare")
    reader = FileReader(str(path), size)
    delta = Delta(ident, Extents.from_ranges([0], [size], [DATA], size), reader)
    return DeltaStream(delta), ident.delta_id, reader


SSH_PEAK_KIB = [0]  # the largest VmHWM of an ssh client the openssh transport ran


def stage(transport, image: Path) -> tuple[float, int]:
    """(seconds to stage the image's initial delta on the receiver, stream bytes)."""
    source, delta_id, reader = init_source(image)
    try:
        with transport as rc:
            rc.hello()
            t0 = time.perf_counter()
            rc.send_delta(source, delta_id)
            seconds = time.perf_counter() - t0
            proc = getattr(getattr(transport, "link", None), "proc", None)
            if proc is not None:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))
                SSH_PEAK_KIB[0] = max(SSH_PEAK_KIB[0], hwm)
            return seconds, source.size
    finally:
        reader.close()


def raw_paramiko(server: Sshd, blocks: list[bytes]) -> tuple[float, str]:
    """Seconds to push ``blocks`` through `cat > /dev/null` on one paramiko channel; the cipher used."""
    t = ssh.connect(server.host, server.port, server.user, ssh.load_key(server.client_key),
                    ssh.KnownHosts(server.known_hosts))
    try:
        chan = t.open_session(window_size=ssh.WINDOW)
        chan.exec_command(READY)
        assert chan.makefile("rb").readline() == b"go\n"
        t0 = time.perf_counter()
        for blk in blocks:
            chan.sendall(blk)
        chan.shutdown_write()
        chan.recv_exit_status()
        return time.perf_counter() - t0, t.remote_cipher
    finally:
        t.close()


def raw_openssh(server: Sshd, blocks: list[bytes], cipher: str) -> float:
    argv = ["ssh", "-F", "none", "-i", str(server.client_key),
            "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "Compression=no",
            "-p", str(server.port), "-c", cipher, "-l", server.user, "--", server.host, READY]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == b"go\n"
    t0 = time.perf_counter()
    for blk in blocks:
        proc.stdin.write(blk)
    proc.stdin.close()
    proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--text", type=float, default=0.5, help="fraction of text-like blocks (rest random)")
    ap.add_argument("--reps", type=int, default=5, help="runs of each, alternating; medians are shown")
    ap.add_argument("--json", metavar="PATH", help="also write the key figures there (scripts/bench/all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ssh-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "sshd").mkdir()
        server = start_sshd(work / "sshd")
        try:
            run(server, work, args)
        finally:
            server.stop()


def run(server: Sshd, work: Path, args: argparse.Namespace) -> None:
    image = work / "source.img"
    build_image(image, args.size_mib, args.text)
    with open(image, "rb") as f:
        blocks = [f.read(MiB) for _ in range(args.size_mib)]
    total = len(blocks) * MiB
    load = os.getloadavg()
    print(f"data: {args.size_mib} MiB, {args.text:.0%} text-like blocks; {os.cpu_count()} CPUs, loopback; "
          f"paramiko {paramiko.__version__}; load average at start {load[0]:.2f}")
    url = f"ssh://{server.user}@{server.host}:{server.port}"
    key, known = str(server.client_key), str(server.known_hosts)
    gcm, ctr = "aes128-gcm@openssh.com", "aes128-ctr"
    cipher_of_paramiko = ""

    def paramiko_raw() -> tuple[float, int]:
        nonlocal cipher_of_paramiko
        seconds, cipher_of_paramiko = raw_paramiko(server, blocks)
        return seconds, total

    n = 0

    def dest() -> Path:
        nonlocal n
        n += 1
        return work / f"dest-{n}.img"

    cases: dict[str, Callable[[], tuple[float, int]]] = {
        f"OpenSSH cat, {gcm}": lambda: (raw_openssh(server, blocks, gcm), total),
        f"OpenSSH cat, {ctr}": lambda: (raw_openssh(server, blocks, ctr), total),
        "paramiko raw channel": paramiko_raw,
        "staging over paramiko": lambda: stage(SshTransport(f"{url}{dest()}", key, known), image),
        "staging over openssh": lambda: stage(OpenSshTransport(f"{url}{dest()}", key, known), image),
        "staging locally": lambda: stage(LocalTransport(str(dest())), image),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, case in cases.items():
            seconds, nbytes = case()
            rates[name].append(nbytes / seconds / 1e6)
            for p in work.glob("dest-*"):
                p.unlink()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    same = f"OpenSSH cat, {cipher_of_paramiko}" if f"OpenSSH cat, {cipher_of_paramiko}" in medians else None
    base = medians[same or f"OpenSSH cat, {gcm}"]
    print(f"\nmedians of {args.reps} (MB/s; ratio to {same or 'OpenSSH cat, ' + gcm}; paramiko negotiated "
          f"{cipher_of_paramiko}):")
    for name, rate in medians.items():
        spread = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name + ':':34s} {rate:7.1f} MB/s  {rate / base:5.0%}   ({spread})")
    print(f"  openssh staging / paramiko staging: "
          f"{medians['staging over openssh'] / medians['staging over paramiko']:.2f}")
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: this process (the sender of every run, with the {args.size_mib} MiB of blocks held "
          f"for the raw streams) {me:.0f} MiB; the openssh transport's ssh client "
          f"{SSH_PEAK_KIB[0] / 1024:.1f} MiB")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"reproduce: {Path(sys.executable).parent.parent.name}/bin/python scripts/bench/bench_ssh.py "
          f"--size-mib {args.size_mib} --text {args.text} --reps {args.reps}")
    anchor = f"OpenSSH `cat > /dev/null`, {cipher_of_paramiko}"
    benchjson.write(args.json, "ssh", [
        benchjson.Figure("staging over paramiko (the default)", medians["staging over paramiko"], "MB/s",
                         anchor, base, (">=", 1.0, "ratio"), "issue 12"),
        benchjson.Figure("staging over openssh", medians["staging over openssh"], "MB/s", anchor, base,
                         (">=", 1.0, "ratio"), "issue 12"),
        benchjson.Figure("raw paramiko channel", medians["paramiko raw channel"], "MB/s", anchor, base),
    ], peak_rss_mib=SSH_PEAK_KIB[0] / 1024,
        peak_rss_of=f"the ssh client; the sender, holding the blocks, {me:.0f}",
        command=benchjson.reproduce("bench_ssh.py"),
        size=f"{args.size_mib} MiB, {args.reps} reps, paramiko {paramiko.__version__}")


if __name__ == "__main__":
    main()
