"""The lvdeltafs command line fuzzed in process: never a traceback, a documented exit code, never a hang.

Argument lists are built from the real subcommands and options and from
paths of every awkward kind (missing, a directory, a FIFO, a socket, a
symlink loop, a path under a file, a name too long, a damaged delta
directory), control characters, undecodable bytes and huge or negative
numbers.  Each runs through the same ``main`` the console script runs (so the
exit codes are those of run_group), in a fresh folder, under a timer that
turns a hang into a failure.  Nothing is mounted: the FUSE entry points are
stubbed; everything before them (every argument check) is real.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvdeltafs import cli, fuse
from lvdeltafs.errors import CommandFailed
from tests.harness import CliResult, assert_clean_exit
from tests.harness import run_cli as harness_run_cli

TIMEOUT = 20  # seconds; an open() of a FIFO would wait forever
KiB = 1 << 10

SUBCOMMANDS = ["ranges", "export", "verify", "mount", "umount"]
OPTIONS = ["-v", "-vv", "-q", "-h", "--help", "--version", "--source", "--vg", "--pair", "-f",
           "--foreground", "--allow-other", "--cache", "--threads", "--read-ahead-kb", "--log-file",
           "--debug-fuse", "--ready-fd", "-z", "--lazy", "--bogus", "-x", "--", "-"]
# Relative to the folder each example runs in (see pool()).
PATHS = ["img", "img2", "empty", "cow", "cowtable", "garbage", "deltadir", "deltadir/delta", "deepdir",
         "fifo", "socket", "loop", "dir", "img/x", "no/such", "nothere", "out", ".", "..", "/dev/zero",
         "/dev/null", "x" * 300, "d/" * 2100 + "x", "deltadir/data"]
NAMES = ["vg0/snap1", "vg/lv", "bad vg/x", "vg/-x", "@pairs", "s1..s2", "", " ", "\x1b[2J", "a\nb",
         "tab\t", "\x7f", "\x9b31m", "\x00", "\udcff", "\u202e", "é/ü", "auto", "cow", "compare"]
NUMBERS = ["0", "-1", "1", "7", "4096", "99999999999999999999999999", "-99999999999999999999", "1e9", "0x10",
           "nan", "3.5"]

token = st.one_of(st.sampled_from(SUBCOMMANDS), st.sampled_from(OPTIONS), st.sampled_from(PATHS),
                  st.sampled_from(NAMES), st.sampled_from(NUMBERS),
                  st.integers(-(2**70), 2**70).map(str),
                  # Never a "/": a random absolute path could name something real.
                  st.text(st.characters(blacklist_characters="/"), max_size=12))
USABLE = ["img", "img2", "cow", "cowtable", "empty", "garbage", "deltadir", "deltadir/delta", "dir", "out"]
# A third of the paths usable ones, so the fuzzing gets past the argument checks into the work.
path = st.one_of(st.sampled_from(USABLE), st.sampled_from(PATHS), st.sampled_from(NAMES))


def _wellformed() -> st.SearchStrategy[list[str]]:
    """Commands with the right shape, so the fuzzing reaches past click into each command."""
    source = st.one_of(st.just([]), st.sampled_from(["auto", "cow", "compare", "bad", ""]).map(
        lambda s: ["--source", s]))
    mount_opt = st.one_of(
        st.tuples(st.just("--pair"), path, path), st.tuples(st.just("--vg"), path), source.map(tuple),
        st.tuples(st.sampled_from(["--cache", "--threads", "--read-ahead-kb", "--ready-fd"]),
                  st.sampled_from(NUMBERS)),
        st.tuples(st.just("--log-file"), path), st.tuples(st.sampled_from(["-f", "--allow-other"])))
    return st.one_of(
        st.tuples(st.just(["ranges"]), path, path, source).map(lambda t: [*t[0], t[1], t[2], *t[3]]),
        st.tuples(st.just(["export"]), path, path, path, source).map(lambda t: [*t[0], *t[1:4], *t[4]]),
        st.tuples(st.just("verify"), path).map(list),
        st.tuples(st.lists(mount_opt, max_size=4), path).map(
            lambda t: ["mount", *[a for opt in t[0] for a in opt], t[1]]),
        st.tuples(st.lists(st.sampled_from(["-z", "--lazy"]), max_size=1), path).map(
            lambda t: ["umount", *t[0], t[1]]),
    )


argv = st.one_of(
    _wellformed(),
    st.tuples(st.lists(st.sampled_from(["-v", "-q", "-vv"]), max_size=2), _wellformed()).map(
        lambda t: [*t[0], *t[1]]),
    st.lists(token, max_size=8),
    st.tuples(st.sampled_from(SUBCOMMANDS), st.lists(token, max_size=7)).map(lambda t: [t[0], *t[1]]),
)


# ---- the folder each example runs in ------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Images and a real delta directory, made once; each example gets a copy."""
    top = tmp_path_factory.mktemp("pristine")
    rng = random.Random(7)
    img = bytearray(rng.randbytes(256 * KiB))
    (top / "img").write_bytes(img)
    img[70 * KiB:71 * KiB] = rng.randbytes(KiB)
    (top / "img2").write_bytes(img)
    (top / "empty").write_bytes(b"")
    (top / "cow").write_bytes(b"SnAp" + rng.randbytes(64 * KiB))
    # A valid COW header (magic, valid, version 1, 8-sector chunks) over an exception table of noise.
    header = struct.pack("<IIII", 0x70416E53, 1, 1, 8)
    (top / "cowtable").write_bytes(header + bytes(4 * KiB - len(header)) + rng.randbytes(60 * KiB))
    (top / "garbage").write_bytes(rng.randbytes(3 * KiB + 5))
    with CliRunner().isolation():
        cli.main(["export", str(top / "img"), str(top / "img2"), str(top / "deltadir")])
    assert (top / "deltadir" / "manifest.json").is_file()
    shutil.copytree(top / "deltadir", top / "deepdir")
    (top / "deepdir" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return top


@contextlib.contextmanager
def pool(pristine: Path) -> Iterator[Path]:
    """A fresh folder holding every kind of path in PATHS, made the working directory."""
    top = Path(tempfile.mkdtemp(prefix="lvdeltafs-fuzz-"))
    here = top / "cwd"  # ".." is then still a folder of ours
    shutil.copytree(pristine, here)
    os.mkfifo(here / "fifo")
    os.symlink("loop", here / "loop")
    (here / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(here / "socket"))
    old = os.getcwd()
    os.chdir(here)
    try:
        yield here
    finally:
        os.chdir(old)
        sock.close()
        shutil.rmtree(top)


# ---- running the command line in process ---------------------------------------------

def run_cli(args: list[str]) -> CliResult:
    return harness_run_cli(cli.main, args, timeout=TIMEOUT)


@pytest.fixture
def no_fuse(monkeypatch) -> list[str]:
    """Mount and unmount do everything up to the kernel, then stop; what reached it is listed."""
    reached: list[str] = []

    def serve(fs, mountpoint, **kw):
        reached.append(f"serve {mountpoint}")
        fs.close()

    def start_background(argv, timeout=120.0):
        reached.append(f"background {argv}")
        return 0

    def fusermount(argv, **kw):
        reached.append(f"fusermount {argv}")
        raise CommandFailed(argv, 1, f"fusermount3: failed to unmount {argv[-1]}: Device or resource busy")

    monkeypatch.setattr(fuse, "serve", serve)
    monkeypatch.setattr(fuse, "start_background", start_background)
    monkeypatch.setattr(fuse, "run", fusermount)
    return reached


def check(result: CliResult, args: list[str], caplog: pytest.LogCaptureFixture) -> None:
    assert_clean_exit(result, "lvdeltafs", args)
    for rec in caplog.records:  # a traceback goes to the debug log only
        assert not rec.exc_info or rec.levelno <= logging.DEBUG, (args, rec.getMessage())


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=argv)
def test_fuzzed_command_lines(pristine, no_fuse, caplog, args):
    caplog.clear()
    with pool(pristine):
        result = run_cli(args)
    check(result, args, caplog)


@pytest.mark.parametrize("args, code", [
    (["ranges", "fifo", "img"], 3), (["ranges", "img", "socket"], 3), (["ranges", "loop", "img"], 3),
    (["ranges", "img", "x" * 300], 3), (["ranges", "img/x", "img"], 3), (["verify", "deepdir"], 3),
    (["verify", "d/" * 2100 + "x"], 3), (["export", "img", "img2", "fifo"], 3),
    (["export", "img", "img2", "deltadir/delta"], 3), (["mount", "-f", "--pair", "img", "img2", "fifo"], 3),
    (["mount", "--ready-fd", "99999999999", "dir"], 2), (["mount", "--cache", "-1", "dir"], 2),
    (["ranges", "img", "img2"], 0), (["verify", "deltadir"], 0), (["umount", "dir"], 3),
])
def test_known_awkward_command_lines(pristine, no_fuse, caplog, args, code):
    with pool(pristine):
        result = run_cli(args)
    check(result, args, caplog)
    assert result.code == code, (args, result.output)


def test_mount_stops_before_the_kernel(pristine, no_fuse, caplog):
    with pool(pristine) as here:
        result = run_cli(["mount", "--pair", "img", "img2", "dir"])
        assert result.code == 0, result.output
        assert len(no_fuse) == 1 and no_fuse[0].startswith("background")
        assert str(here / "img") in no_fuse[0]  # the background process gets absolute paths
        result = run_cli(["umount", "dir"])  # not a mount: refused before fusermount3
        assert result.code == 3 and len(no_fuse) == 1
