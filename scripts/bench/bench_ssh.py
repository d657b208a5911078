#!/usr/bin/env python3
"""Benchmark: a sync over ssh against the same sync locally and against raw channel throughput.

Starts a temporary sshd on 127.0.0.1 (tests.harness.start_sshd, as the test
fixture does), builds an image of mixed data (random blocks and text-like
blocks), and times in one run:

- the same initial sync (send_delta, then apply) through LocalTransport and
  through SshTransport, with and without compression;
- raw `cat > /dev/null` over one paramiko exec channel (lvmirror.ssh.connect:
  aes128-gcm, raised rekey limits) with and without compression, and with
  aes128-ctr;
- raw `cat > /dev/null` over OpenSSH's own `ssh` client.

Reports the receive phase of the ssh sync as a ratio of paramiko's raw rate
(target >= 80%), and whether compression pays on this data.  On loopback
both ends share this host's CPUs, so the numbers are lower bounds for a real
link between two hosts.  Needs root-free sshd and ssh (openssh-server).

    .venv/bin/python scripts/bench/bench_ssh.py [--size-mib 256] [--text 0.5]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lvdeltafs.delta import Delta, FileReader, Identity  # noqa: E402
from lvdeltafs.extents import DATA, Extents  # noqa: E402
from lvmirror import ssh  # noqa: E402
from lvmirror.encoder import DeltaStream  # noqa: E402
from lvmirror.transports import LocalTransport, SshTransport  # noqa: E402
from tests.harness import Sshd, start_sshd  # noqa: E402

MiB = 1 << 20


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


def timed_sync(transport, source: DeltaStream, delta_id: str) -> tuple[float, float]:
    """(seconds to stage the stream on the receiver, seconds to apply it)."""
    with transport as rc:
        t0 = time.perf_counter()
        rc.send_delta(source, delta_id)
        t1 = time.perf_counter()
        rc.apply()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def raw_paramiko(server: Sshd, blocks: list[bytes], *, compress: bool = False,
                 ciphers: tuple[str, ...] | None = None) -> tuple[float, str]:
    """Seconds to push ``blocks`` through `cat > /dev/null` on one paramiko channel; the cipher used."""
    saved = ssh.FAST_CIPHERS
    if ciphers:
        ssh.FAST_CIPHERS = ciphers
    try:
        t = ssh.connect(server.host, server.port, server.user, ssh.load_key(server.client_key),
                        ssh.KnownHosts(server.known_hosts), compress=compress)
    finally:
        ssh.FAST_CIPHERS = saved
    try:
        chan = t.open_session(window_size=ssh.WINDOW)
        chan.exec_command("cat > /dev/null")
        t0 = time.perf_counter()
        for blk in blocks:
            chan.sendall(blk)
        chan.shutdown_write()
        chan.recv_exit_status()
        return time.perf_counter() - t0, t.remote_cipher
    finally:
        t.close()


def raw_openssh(server: Sshd, blocks: list[bytes], cipher: str | None = None) -> float:
    argv = ["ssh", "-i", str(server.client_key), "-o", f"UserKnownHostsFile={server.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(server.port)]
    if cipher:
        argv += ["-c", cipher]
    proc = subprocess.Popen([*argv, f"{server.user}@{server.host}", "cat > /dev/null"],
                            stdin=subprocess.PIPE)
    t0 = time.perf_counter()
    for blk in blocks:
        proc.stdin.write(blk)
    proc.stdin.close()
    proc.wait()
    return time.perf_counter() - t0


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:7.1f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--text", type=float, default=0.5, help="fraction of text-like blocks (rest random)")
    ap.add_argument("--reps", type=int, default=3, help="syncs per transport, alternating; best is shown")
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
    print(f"data: {args.size_mib} MiB, {args.text:.0%} text-like blocks, {os.cpu_count()} CPUs, loopback")

    print("\nraw `cat > /dev/null`, one channel:")
    raw_s, cipher = raw_paramiko(server, blocks)
    print(f"  paramiko {cipher:30s} {rate(total, raw_s)}")
    ctr_s, cipher = raw_paramiko(server, blocks, ciphers=("aes128-ctr",))
    print(f"  paramiko {cipher:30s} {rate(total, ctr_s)}")
    zraw_s, cipher = raw_paramiko(server, blocks, compress=True)
    print(f"  paramiko {cipher + ' +zlib':30s} {rate(total, zraw_s)}")
    for c in (None, "aes128-gcm@openssh.com"):
        print(f"  OpenSSH  {c or 'default cipher':30s} {rate(total, raw_openssh(server, blocks, c))}")

    print(f"\ninitial sync of the image, best of {args.reps} (stream bytes; stage = send + verify + fsync "
          "on the receiver, then apply):")
    url = f"ssh://{server.user}@{server.host}:{server.port}"
    makers = {
        "local": lambda d: LocalTransport(str(d)),
        "ssh": lambda d: SshTransport(f"{url}{d}", str(server.client_key), str(server.known_hosts)),
        "ssh+zlib": lambda d: SshTransport(f"{url}{d}", str(server.client_key), str(server.known_hosts),
                                           compress=True),
    }
    results: dict[str, tuple[float, float]] = {}
    stream_size = 0
    for _ in range(args.reps):
        for name, make in makers.items():
            dest = work / f"dest-{name}.img"
            source, delta_id, reader = init_source(image)
            stream_size = source.size
            try:
                stage, apply = timed_sync(make(dest), source, delta_id)
            finally:
                reader.close()
            results[name] = min(results.get(name, (stage, apply)), (stage, apply))
            for p in (dest, Path(f"{dest}.lvmirror-state")):
                p.unlink()
    for name, (stage, apply) in results.items():
        print(f"  {name:9s} stage {rate(stream_size, stage)}  apply {apply:5.2f} s  "
              f"whole {rate(stream_size, stage + apply)}")

    stage_ssh = results["ssh"][0]
    ratio = raw_s / stage_ssh * stream_size / total
    print(f"\nssh stage rate / paramiko raw rate: {ratio:.0%} (target >= 80%)")
    print(f"ssh stage rate / local stage rate:  {results['local'][0] / stage_ssh:.0%}")
    pays = results["ssh+zlib"][0] < stage_ssh
    print(f"compression {'pays' if pays else 'does not pay'} on this data over loopback: stage "
          f"{results['ssh+zlib'][0]:.2f} s with zlib vs {stage_ssh:.2f} s without (on a slow link "
          "it pays by the compression ratio of the data)")


if __name__ == "__main__":
    main()
