"""Mirrors with history for the tests: versions of a volume, syncs through the real receiver, points
composed from the undo deltas (as lvdeltafs.formats.overlay composes them), and a faked volume synced five
times by `lvmirror` itself, each sync's content recorded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lvdeltafs.formats.overlay import Composed, index_undo, overlay
from lvmirror.remote.history import Keep
from lvmirror.transports import LocalTransport
from tests.fakelvm import FakeLvm, configured, lvmirror
from tests.harness import BytesSource, MiB, delta, image, sha, sha_file, text

KEEP3 = Keep(3)
SIZE = 8 * MiB  # of the faked volume


def versions(n: int, size: int = 4 * MiB, resize: bool = True) -> list[bytes]:
    """n images, each a few rewritten islands of the one before; sizes change (grow, shrink) on the way."""
    rng = random.Random(7)
    out = [image(size, [(0, 300_000), (2 * MiB, MiB)], seed=1)]
    for i in range(1, n):
        cur = bytearray(out[-1])
        if i == 2 and resize:
            cur += image(MiB + 4096, [(0, MiB)], seed=50)  # grown
        if i == 4 and resize:
            cur = cur[:3 * MiB + 8192]  # shrunk
        for _ in range(5):
            off = rng.randrange(0, len(cur) - 70_000)
            cur[off:off + 65_536] = rng.randbytes(65_536) if rng.random() < 0.8 else bytes(65_536)
        out.append(bytes(cur))
    return out


def state(dest: Path) -> dict:
    return json.loads(Path(f"{dest}.lvmirror-state").read_text())


def sync_all(dest: Path, vs: list[bytes], keep: Keep | None = KEEP3, start: int = 0,
             state_dir: Path | None = None) -> None:
    for i in range(start, len(vs)):
        old = vs[i - 1] if i else None
        ident, blob = delta(old, vs[i], f"vol@{i}" if i else "", f"vol@{i + 1}")
        with LocalTransport(str(dest), str(state_dir) if state_dir else None) as rc:
            rc.keep = keep
            rc.send_delta(BytesSource(blob), ident.delta_id)
            rc.apply()


def composed(dest: Path, generation: int) -> bytes:
    """Point ``generation`` composed from the mirror and its undo deltas, as the mount composes it."""
    entries = state(dest)["history"]
    chain = [e for e in entries if e["generation"] >= generation]
    fds = [os.open(dest.parent / e["undo"], os.O_RDONLY) for e in chain]
    base = os.open(dest, os.O_RDONLY)
    try:
        idx = [index_undo(fd) for fd in fds]
        size = idx[0].target_size
        return Composed(base, os.fstat(base).st_size, fds, overlay([i.ranges for i in idx], size), size).read(
            0, size)
    finally:
        for fd in fds + [base]:
            os.close(fd)


def history_setup(tmp: Path, monkeypatch, extra: str = "history_points = 3\n") -> tuple[FakeLvm, Path, Path]:
    dest = tmp / "mirror.img"
    fake, cfg = configured(tmp, monkeypatch, dest, size=SIZE, volume=extra)
    return fake, cfg, dest


def five_syncs(fake: FakeLvm, cfg: Path, dest: Path) -> dict[int, str]:
    """init and five syncs, each after a few writes; {generation: sha256 of what the mirror then held}."""
    lvmirror(cfg, "init", "data")
    held = {1: sha(fake.read())}
    for i in range(5):
        fake.write((i * 1300 + 7) * 4096 % (SIZE - MiB), text(300_000, 10 + i))
        fake.write(SIZE - 4096 * (i + 1), b"\0" * 4096)
        lvmirror(cfg, "sync", "data")
        assert sha_file(dest) == sha(fake.read())
        held[state(dest)["generation"]] = sha(fake.read())
    return held


