"""`lvdeltafs ranges | export | verify` on file pairs (a block compare, a COW store image); bad arguments."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from lvdeltafs.extents import DATA, ZERO, parse_ranges
from tests.cowimage import write_cow_image
from tests.harness import BIN, apply_stream

LVDELTAFS = str(BIN / "lvdeltafs")
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


# ---- bad arguments: one clear line, a documented exit code, never a traceback or a hang ----------

def run_briefly(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """Run lvdeltafs; a hang (a FIFO opened for reading) fails the test instead of blocking it."""
    prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] if user else []
    return subprocess.run([*prefix, LVDELTAFS, *args], capture_output=True, text=True, timeout=30)


def one_error_line(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvdeltafs: error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def odd(tmp_path: Path) -> dict[str, Path]:
    """A pair of images and paths that are anything but: a FIFO, a directory, a path under a file."""
    base, target = make_pair(tmp_path, size=MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    return {"base": base, "target": target, "fifo": fifo, "dir": tmp_path / "dir",
            "under": base / "x", "missing": tmp_path / "no" / "such"}


@pytest.mark.parametrize("args", [
    ("ranges", "{fifo}", "{target}"), ("ranges", "{base}", "{fifo}"),
    ("export", "{fifo}", "{target}", "{dir}/out"), ("verify", "{fifo}"),
    ("mount", "-f", "--pair", "{base}", "{fifo}", "{dir}"),
    ("mount", "-f", "--log-file", "{fifo}", "--pair", "{base}", "{target}", "{dir}")])
def test_a_fifo_is_refused_before_it_is_opened(odd, args):
    res = run_briefly(*(a.format(**odd) for a in args))
    one_error_line(res, 3, "FIFO", str(odd["fifo"]))


@pytest.mark.parametrize("args, words", [
    (("ranges", "{dir}", "{target}"), ["is a directory"]),
    (("ranges", "{base}", "/dev/zero"), ["character device"]),
    (("verify", "/dev/zero"), ["character device"]),
    (("ranges", "{under}", "{under}"), ["Not a directory"]),
    (("ranges", "{missing}", "{target}"), ["no such file"]),
    (("verify", "{missing}"), ["does not exist"]),
    (("verify", "{under}"), ["Not a directory"]),
    (("export", "{base}", "{target}", "{missing}"), ["does not exist: create it first"]),
    (("export", "{base}", "{target}", "{under}"), ["Not a directory"]),
    (("export", "{base}", "{target}", "{base}"), ["regular file, not a directory"]),
    (("mount", "-f", "--pair", "{base}", "{target}", "{base}"), ["not a directory"]),
    (("mount", "-f", "--log-file", "{dir}", "--pair", "{base}", "{target}", "{dir}"), ["a directory"]),
    (("mount", "-f", "--log-file", "{missing}", "--pair", "{base}", "{target}", "{dir}"), ["create it"]),
    (("mount", "-f", "--mirror", "{base}", "{dir}"), ["give NAME=PATH"]),
    (("mount", "-f", "--mirror", "a/b={base}", "{dir}"), ["one directory name"]),
    (("mount", "-f", "--mirror", "..={base}", "{dir}"), ["one directory name"]),
    (("mount", "-f", "--mirror", "m={missing}", "{dir}"), ["no such image file or block device"]),
    (("mount", "-f", "--mirror", "m={fifo}", "{dir}"), ["FIFO"]),
    (("mount", "-f", "--mirror", "m={dir}", "{dir}"), ["a directory"]),
    (("mount", "-f", "--mirror", "m={base}", "--mirror", "m={target}", "{dir}"), ["given twice"]),
])
def test_a_wrong_kind_of_path_is_one_clear_line(odd, args, words):
    one_error_line(run_briefly(*(a.format(**odd) for a in args)), 3, *words)


def test_export_refuses_a_directory_in_place_of_one_of_its_files(odd):
    (odd["dir"] / "data").mkdir()
    res = run_briefly("export", str(odd["base"]), str(odd["target"]), str(odd["dir"]))
    one_error_line(res, 3, "data is a directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as nobody through setpriv: needs root")
def test_unreadable_files_are_named(tmp_path):
    # Tests run as root, who reads everything: the command runs as nobody, in a folder nobody
    # can reach (pytest's own are root's alone).
    public = Path(tempfile.mkdtemp(prefix="lvdeltafs-test-"))
    try:
        public.chmod(0o755)
        base, target = make_pair(public, size=MiB)
        base.chmod(0o600)
        target.chmod(0o644)
        res = run_briefly("ranges", str(base), str(target), user="nobody")
        one_error_line(res, 3, "cannot read base", str(base), "Permission denied")
        res = run_briefly("export", str(target), str(target), str(public / "out"), user="nobody")
        one_error_line(res, 3, "not writable")
    finally:
        shutil.rmtree(public)


def test_deeply_nested_manifest_is_corrupt_not_a_crash(tmp_path):
    base, target = make_pair(tmp_path, size=MiB)
    assert run("export", str(base), str(target), str(tmp_path / "d")).returncode == 0
    (tmp_path / "d" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    one_error_line(run_briefly("verify", str(tmp_path / "d")), 3, "manifest.json is not valid JSON")


@pytest.mark.parametrize("name", ["a\x1b[2Jb", "new\nline", "tab\there", "bell\x07", "del\x7f", "c1\x9b31m"])
def test_control_characters_are_refused_and_never_echoed_raw(tmp_path, name):
    mnt = str(tmp_path)
    # Each command's own arguments are fuzzed in tests/adversarial; here the real terminal output.
    for args in (["ranges", name, "x"], ["mount", "--pair", "a", name, mnt], [name]):
        res = run_briefly(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
        assert name not in res.stderr and not any(c in res.stderr for c in "\x1b\x07\x7f\x9b\t")
        assert "\\" in res.stderr, res.stderr  # escaped: \x1b, or click's own '\n'


def test_undecodable_names_are_shown_escaped(tmp_path):
    res = subprocess.run([LVDELTAFS, "ranges", os.fsencode(tmp_path) + b"/\xff.img", "x"],
                         capture_output=True, timeout=30)
    assert res.returncode == 3 and b"\\xff.img" in res.stderr and b"Traceback" not in res.stderr
