"""`lvdeltafs ranges | export | verify` on file pairs: a block compare and a COW store image."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lvdeltafs.extents import DATA, ZERO, parse_ranges
from lvdeltafs.sources.cowimage import write_cow_image
from tests.harness import apply_stream

LVDELTAFS = str(Path(sys.executable).parent / "lvdeltafs")
MiB = 1 << 20


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LVDELTAFS, *args], capture_output=True, text=True)


def make_pair(tmp_path: Path, size: int = 5 * MiB + 4096, grow: int = 0) -> tuple[Path, Path]:
    rng = random.Random(42)
    base = bytearray(rng.randbytes(size))
    target = bytearray(base) + bytearray(rng.randbytes(grow))
    target[0:1] = b"\x00" if base[0] else b"\x01"            # first byte
    target[3 * MiB + 17:3 * MiB + 5000] = rng.randbytes(4983)  # straddles nothing, mid-block
    target[MiB:2 * MiB] = bytes(MiB)                         # a block that now reads as zeros
    target[size - 1:size] = b"\x7f"                          # the last, partial block
    (tmp_path / "base.img").write_bytes(base)
    (tmp_path / "target.img").write_bytes(target)
    return tmp_path / "base.img", tmp_path / "target.img"


@pytest.mark.parametrize("grow", [0, 3 * MiB + 512])
def test_compare_pair_export_reproduces_target(tmp_path, grow):
    base, target = make_pair(tmp_path, grow=grow)
    out = run("ranges", str(base), str(target))
    assert out.returncode == 0, out.stderr
    ext = parse_ranges(out.stdout)
    kinds = {(o // MiB, k) for o, n, k in ext}
    assert (1, ZERO) in kinds and (0, DATA) in kinds and (3, DATA) in kinds
    exp = run("export", str(base), str(target), str(tmp_path / "d"))
    assert exp.returncode == 0, exp.stderr
    assert (tmp_path / "d" / "ranges").read_text() == out.stdout
    assert run("verify", str(tmp_path / "d")).returncode == 0
    assert run("verify", str(tmp_path / "d" / "delta")).returncode == 0
    rebuilt = tmp_path / "rebuilt.img"
    rebuilt.write_bytes(base.read_bytes())
    apply_stream(rebuilt, tmp_path / "d" / "delta")
    assert hashlib.sha256((tmp_path / "rebuilt.img").read_bytes()).digest() == \
        hashlib.sha256(target.read_bytes()).digest()


def test_cow_image_pair(tmp_path):
    chunk = 16384
    size = 4 * MiB
    target = tmp_path / "target.img"
    target.write_bytes(random.Random(1).randbytes(size))
    chunks = [0, 5, 6, 7, 200, size // chunk - 1]
    write_cow_image(tmp_path / "cow.img", chunk, chunks)
    out = run("ranges", str(tmp_path / "cow.img"), str(target))
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"0 {chunk} data\n{5 * chunk} {3 * chunk} data\n{200 * chunk} {chunk} data\n"
                          f"{size - chunk} {chunk} data\n")


def test_corrupt_copy_is_rejected_with_exit_3(tmp_path):
    base, target = make_pair(tmp_path)
    assert run("export", str(base), str(target), str(tmp_path / "d")).returncode == 0
    stream = bytearray((tmp_path / "d" / "delta").read_bytes())
    stream[len(stream) // 2] ^= 0x10
    (tmp_path / "bad.delta").write_bytes(stream)
    res = run("verify", str(tmp_path / "bad.delta"))
    assert res.returncode == 3
    assert res.stderr.startswith("lvdeltafs: error: ") and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "short.delta").write_bytes(stream[: len(stream) // 3])
    assert run("verify", str(tmp_path / "short.delta")).returncode == 3


def test_missing_and_mixed_arguments_are_clear_errors(tmp_path):
    res = run("ranges", str(tmp_path / "nope.img"), str(tmp_path / "nope2.img"))
    assert res.returncode == 3 and "no such file" in res.stderr
    (tmp_path / "a.img").write_bytes(b"x" * 4096)
    res = run("ranges", "vg0/snap1", str(tmp_path / "a.img"))
    assert res.returncode == 3 and "not one of each" in res.stderr
