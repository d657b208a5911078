"""The bandwidth cap on a slow link for real: `lvmirror apply --bwlimit` over ssh through a shaped veth.

The far side is a real sshd inside a network namespace, reached over a veth
pair that tbf shapes to 80 Mbit/s (about 9.5 MiB/s) each way.  The cap, 4 MiB/s,
is well under the link: if the cap did not hold, the link would let the
transfer run more than twice as fast, so what is measured is lvmirror's pacing,
not the shaper's.  The receiver writes what it verifies to its staging file,
and the test reads that file's growth (the delta bytes that crossed) over a
30 s window; the host side's veth counters give the bytes on the wire, every
50 ms, for the smoothness check.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from lvdeltafs.delta import Identity
from lvdeltafs.formats.stream import KIND_DATA
from tests.encoder import write_stream
from tests.harness import BIN, BLOCK, VOL, sha256_of

pytestmark = [pytest.mark.ssh, pytest.mark.netns]

MiB = 1 << 20
CAP = 4 * MiB
WINDOW = 30.0  # seconds over which the average must be the cap, within 10%
LEAD = 1.0  # seconds after the first staged bytes before the window opens (ssh start, the first burst)
# 136 MiB: 34 s at the cap, so the window closes with about 3 s of the transfer left.
SIZE = 136 * MiB
SAMPLE = 0.05


def make_delta(tmp_path: Path) -> tuple[Path, Path]:
    """(a random source image, the `delta` stream of its full copy), written piece by piece."""
    image = tmp_path / "source.img"
    with open(image, "wb") as f:
        for _ in range(SIZE // (8 * MiB)):
            f.write(os.urandom(8 * MiB))  # incompressible: nothing on the way may shrink it
    ident = Identity(VOL, "", "vol@1", 0, SIZE, BLOCK, "cow")
    stream = tmp_path / "full.delta"
    fd = os.open(image, os.O_RDONLY)
    try:
        with open(stream, "wb") as out:
            for blk in write_stream(ident.to_dict(), SIZE, [(0, SIZE, KIND_DATA)],
                                    lambda off, n: os.pread(fd, n, off), delta_id=ident.delta_id):
                out.write(blk)
    finally:
        os.close(fd)
    return image, stream


def at(samples: list[tuple[float, int, int]], t: float) -> tuple[float, int, int]:
    """The first sample taken at or after ``t``."""
    return next(s for s in samples if s[0] >= t)


def test_the_cap_holds_within_ten_percent_over_30_s_on_a_shaped_link(shaped_sshd, tmp_path):
    link, sshd = shaped_sshd
    assert "tbf" in link.qdisc() and "80Mbit" in link.qdisc()
    image, stream = make_delta(tmp_path)
    dest = tmp_path / "mirror.img"
    staging = Path(f"{dest}.lvmirror-staging")
    url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{dest}"
    argv = [str(BIN / "lvmirror"), "apply", str(stream), url, "--ssh-key", str(sshd.client_key),
            "--known-hosts", str(sshd.known_hosts), "--bwlimit", "4M"]
    log = tmp_path / "apply.log"
    samples: list[tuple[float, int, int]] = []  # (time, staged bytes, bytes on the wire)
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 3 * SIZE / CAP
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the capped apply took more than three times too long"
                try:
                    staged = staging.stat().st_size
                except FileNotFoundError:
                    staged = -1  # not yet, or already applied and removed
                samples.append((time.monotonic(), staged, link.tx_bytes()))
                time.sleep(SAMPLE)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    assert sha256_of(dest) == sha256_of(image), "the mirror is not byte-exact"

    full = max(staged for _, staged, _ in samples)
    assert full > SIZE // 2, f"the staging file was seen at {full} bytes at most: too few samples"
    first = next(t for t, staged, _ in samples if staged > 0)
    done = next(t for t, staged, _ in samples if staged == full)  # then the receiver applies
    start = at(samples, first + LEAD)
    span = min(WINDOW, done - start[0])
    end = at(samples, start[0] + span)
    rate = (end[1] - start[1]) / (end[0] - start[0])
    wire = (end[2] - start[2]) / (end[0] - start[0])
    print(f"\ncap {CAP / MiB:.2f} MiB/s: {rate / MiB:.3f} MiB/s staged over {end[0] - start[0]:.1f} s "
          f"({100 * rate / CAP:.1f}% of the cap), {wire / MiB:.3f} MiB/s on the wire")
    assert span >= WINDOW, (f"the transfer ended {WINDOW - span:.1f} s before a {WINDOW:.0f} s window "
                            f"closed: {rate / MiB:.2f} MiB/s, the cap of {CAP / MiB:.0f} MiB/s did not hold")
    assert abs(rate - CAP) <= 0.10 * CAP, f"{rate / MiB:.2f} MiB/s over {WINDOW:.0f} s, cap {CAP / MiB} MiB/s"

    # Smooth: no second in the window saw much more than the cap on the wire (bursts, then sleeps,
    # would show as seconds at the link's 9.5 MiB/s between idle ones).
    window = [s for s in samples if start[0] <= s[0] <= end[0]]
    peaks = []
    for i, (t0, _, w0) in enumerate(window):
        later = next((s for s in window[i:] if s[0] - t0 >= 1.0), None)
        if later is not None:
            peaks.append((later[2] - w0) / (later[0] - t0))
    peak = max(peaks)
    print(f"busiest second on the wire: {peak / MiB:.3f} MiB/s ({100 * peak / CAP:.1f}% of the cap); "
          f"quietest: {min(peaks) / MiB:.3f} MiB/s")
    assert peak <= 1.5 * CAP, f"a second at {peak / MiB:.2f} MiB/s on the wire: not smooth"
