"""Compressed streams over real ssh: byte-exact over a shaped slow link, and cut then resumed.

The slow link is the shaped veth of tests/conftest.py (tbf, 80 Mbit/s each
way, a real sshd in a network namespace); ``compress = "auto"`` must find
out there that compressing pays.  The cut test drops the ssh connection in
the middle of a compressed stream to the sshd on 127.0.0.1, then a new
session resumes from the receiver's verifier state.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lvdeltafs.errors import ConnectionProblem
from lvdeltafs.formats.stream import HEAD_SIZE, MAX_DATA
from lvmirror.client import FRAME_BYTES
from lvmirror.compression import Policy
from lvmirror.encoder import DeltaStream
from lvmirror.pipelines import send
from lvmirror.transports import SshTransport
from tests.harness import memory_delta, sha, sha_file, staging_files, text

pytestmark = pytest.mark.ssh

MiB = 1 << 20
def mixed(size: int, seed: int, text_share: int = 2) -> bytes:
    """Text and random bytes in 256 KiB runs, ``text_share`` of every 4 runs text (2: about 2:1 overall)."""
    rnd = random.Random(seed)
    run = 256 << 10
    texts = [text(run, seed * 8 + k) for k in range(8)]  # reused: generating text is slow
    return b"".join(rnd.choice(texts) if i % 4 < text_share else rnd.randbytes(run)
                    for i in range(size // run))


def transport(server, path: Path) -> SshTransport:
    # Debian's python3, which has python3-zstandard (scripts/setup), not whatever a login shell's PATH
    # finds first (on the development machine root's .bashrc puts pyenv's python3 there, without it).
    return SshTransport(f"ssh://{server.user}@{server.host}:{server.port}{path}", key=str(server.client_key),
                        known_hosts=str(server.known_hosts), remote_python="/usr/bin/python3")


@pytest.mark.netns
def test_auto_compresses_over_a_shaped_link_and_the_mirror_is_byte_exact(shaped_sshd, tmp_path, monkeypatch):
    link, server = shaped_sshd
    # How busy this host's CPU is decides whether auto tries compressing at all (a unit test covers
    # that); here the link's measured rates must decide, whatever else the machine is doing.
    from lvmirror import compression
    monkeypatch.setattr(compression, "host_cpu", lambda: None)
    # auto sends its first 12 MiB raw (to see how busy the CPU is), then compresses while that pays.
    data = mixed(96 * MiB, 1, text_share=3)
    dest = tmp_path / "mirror.img"
    with transport(server, dest) as rc:
        rc.hello()
        d = memory_delta(None, data, "", "vol@1")
        send(rc, d, "init", compress="auto")
        sent = rc.bytes_sent
        far = rc.codecs
    assert sha_file(dest) == sha(data) and staging_files(dest) == []
    # Both ends have zstd: auto compressed with it (the far side's python3-zstandard, imported there).
    assert far == ("zlib", "zstd"), far
    # 64 MiB after the first run, compressing to about half: auto must have kept at it on this link.
    assert sent < 0.8 * len(data), f"{sent} bytes crossed the link for {len(data)} of data"


def test_auto_does_not_compress_to_a_receiver_on_this_host(sshd, tmp_path):
    """ssh to a loopback address: the receiver shares this host's CPU, as a local one does; auto sends raw
    (a version-1 stream), while an explicit codec still compresses."""
    from lvmirror.transports import on_this_host
    assert on_this_host(sshd.host) and on_this_host("localhost") and not on_this_host("192.0.2.1")
    data = mixed(8 * MiB, 3)
    for mode, shrinks in (("auto", False), ("zstd", True)):
        dest = tmp_path / f"{mode}.img"
        with transport(sshd, dest) as rc:
            rc.hello()
            assert rc.local
            send(rc, memory_delta(None, data, "", "vol@1"), "init", compress=mode)
            sent = rc.bytes_sent
        assert sha_file(dest) == sha(data)
        assert (sent < 0.8 * len(data)) is shrinks, (mode, sent)


class CutAfter:
    """A DeltaStream that cuts the connection once ``limit`` bytes of it have gone to the link."""

    def __init__(self, inner: DeltaStream, limit: int, cut):
        self.inner, self.limit, self.cut = inner, limit, cut
        self.size = inner.size
        self.sent = 0

    def header(self) -> dict:
        return self.inner.header()

    def read_from(self, offset: int, resume=None):
        for blk in self.inner.read_from(offset, resume):
            if self.sent >= self.limit:
                self.cut()
                self.limit = 1 << 62
            self.sent += len(blk)
            yield blk


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_a_compressed_stream_cut_mid_transfer_resumes_with_only_the_unverified_tail(sshd, tmp_path, codec):
    dest = tmp_path / "mirror.img"
    data = mixed(24 * MiB, 2)
    d = memory_delta(None, data, "", "vol@1")
    whole = b"".join(DeltaStream(d, Policy(codec)).read_from(0))
    first = transport(sshd, dest)
    rc = first.connect()
    rc.hello()
    source = CutAfter(DeltaStream(d, Policy(codec)), len(whole) // 2, first.link.abort)
    with pytest.raises(ConnectionProblem):
        rc.send_delta(source, d.identity.delta_id)
    first.close()

    with transport(sshd, dest) as rc2:
        staged = rc2.hello().staged
        assert staged is not None and staged.version == 2 and not staged.complete
        assert codec in rc2.codecs
        verified = staged.verified
        assert verified > 0, "nothing the receiver verified was kept"
        rc2.send_delta(DeltaStream(d, Policy(codec)), d.identity.delta_id)
        resent = rc2.bytes_sent
        rc2.apply()
    assert sha_file(dest) == sha(data)
    assert resent == len(whole) - verified  # the same encoding continued from the receiver's state
    # Read but never verified: at most the record cut in half, what the link held in flight (OpenSSH's
    # 2 MiB session window) and the frame the sender was filling, never the whole delta again.
    assert verified >= len(whole) // 2 - (MAX_DATA + HEAD_SIZE) - 2 * MiB - FRAME_BYTES
