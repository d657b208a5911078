"""The lvmirror command line fuzzed in process: never a traceback, a documented exit code, never a hang.

Argument lists are built from the real commands and options, volume names
(configured, unknown, with control characters), paths of every awkward kind
(missing, a directory, a FIFO, a damaged or valid delta, a file under a
file), ssh URLs that are wrong in every way, and numbers.  Each runs through
the console script's own ``main`` against a real config in a fresh folder.
There is no LVM on this host (it runs in the VM), so commands that reach it
stop at `lvs` with exit 5, after every argument check, which is the point.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvmirror import cli
from tests.harness import V1, assert_clean_exit, delta, run_cli

COMMANDS = ["init", "sync", "check", "status", "apply", "discard"]
OPTIONS = ["-v", "-q", "-h", "--help", "--version", "-c", "--config", "-a", "--all", "--initial", "--check",
           "--repair", "-n", "--dry-run", "--force", "--state-dir", "--ssh-key", "--known-hosts", "--dest",
           "--ssh-transport", "openssh", "paramiko", "--json", "--max-age", "--bwlimit", "--compress",
           "--bogus", "--", "-"]
PATHS = ["cfg", "delta", "deltadir", "garbage", "fifo", "socket", "dir", "mirror.img", "cfg/x", "no/such",
         ".", "/dev/null", "/dev/zero", "x" * 300, "d/" * 2100 + "x"]
NAMES = ["web", "db", "nosuch", "", " ", "\x1b[2J", "a\nb", "\x7f", "\x9b31m", "\x00", "\udcff", "\u202e"]
URLS = ["ssh://h/x", "ssh://h:0/x", "ssh://h:99999/x", "ssh://-oProxyCommand=x/y", "ssh://u@h:22/",
        "ssh://h\n/x", "ssh://[::1/x", "ssh://user:pw@h/x", "ssh:///x", "host:/x", "ssh://u;id@h/x"]

token = st.one_of(st.sampled_from(COMMANDS), st.sampled_from(OPTIONS), st.sampled_from(PATHS),
                  st.sampled_from(NAMES), st.sampled_from(URLS), st.integers(-(2**70), 2**70).map(str),
                  st.text(st.characters(blacklist_characters="/"), max_size=10))
where = st.one_of(st.sampled_from(PATHS), st.sampled_from(URLS), st.sampled_from(NAMES))
volume = st.sampled_from(["web", "web", "nosuch", "\x1b[2J", "a\nb"])
# Commands of the right shape with awkward values, so the runs get past click into the work.
wellformed = st.one_of(
    st.tuples(st.sampled_from(PATHS), where).map(lambda t: ["apply", *t]),
    st.tuples(st.sampled_from(["--force", "--state-dir", "--ssh-key", "--known-hosts"]),
              st.sampled_from(PATHS), st.sampled_from(PATHS), where).map(lambda t: ["apply", *t]),
    st.tuples(st.sampled_from(["openssh", "paramiko", "OpenSSH", ""]), st.sampled_from(PATHS), where)
    .map(lambda t: ["apply", "--ssh-transport", *t]),
    st.tuples(st.sampled_from(["init", "sync", "check", "discard"]), volume).map(list),
    st.tuples(st.sampled_from(["sync", "check"]), volume, st.sampled_from(["--repair", "-n", "--check"]))
    .map(list),
    where.map(lambda w: ["discard", "--dest", w]),
    st.lists(volume, max_size=3).map(lambda v: ["status", *v]),
    st.tuples(st.sampled_from(["26h", "0", "-1h", "1y", "9" * 30, "2d\n", "", "1.5h"]), volume,
              st.sampled_from([[], ["--json"]])).map(lambda t: ["status", "--max-age", t[0], t[1], *t[2]]),
)
argv = st.one_of(
    wellformed, wellformed,
    st.lists(token, max_size=7),
    st.tuples(st.sampled_from(COMMANDS), st.lists(token, max_size=5)).map(lambda t: [t[0], *t[1]]),
    st.tuples(st.sampled_from(["-c", "--config"]), st.sampled_from(PATHS), st.sampled_from(COMMANDS),
              st.lists(token, max_size=4)).map(lambda t: [t[0], t[1], t[2], *t[3]]),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The folder every example starts from: a config, deltas good and bad, and awkward entries."""
    root = tmp_path_factory.mktemp("lvmirror-cli")
    ident, blob = delta(None, V1, "", "vol@1")
    (root / "delta").write_bytes(blob)
    (root / "deltadir").mkdir()
    (root / "deltadir" / "delta").write_bytes(blob[:100])
    (root / "garbage").write_bytes(os.urandom(4096))
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    return root


@contextlib.contextmanager
def pool(pristine: Path) -> Iterator[Path]:
    """A fresh copy of the pristine folder as the working directory (a run may write in it)."""
    here = Path(tempfile.mkdtemp(prefix="lvmirror-fuzz-"))
    old = os.getcwd()
    try:
        for entry in pristine.iterdir():
            if entry.is_fifo():
                os.mkfifo(here / entry.name)
            elif entry.is_dir():
                shutil.copytree(entry, here / entry.name)
            else:
                shutil.copy(entry, here / entry.name)
        (here / "cfg").write_text(f'[defaults]\nlock_dir = "{here}/lock"\nwork_dir = "{here}/work"\n\n'
                                  f'[volume.web]\nvg = "vgnone"\nlv = "web"\ndestination = "{here}/web.img"\n'
                                  'snapshot_size = "1G"\n')
        (here / "cfg").chmod(0o600)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(here / "socket"))
        os.chdir(here)
        # The default config path must not be this host's real one.
        with _env("LVMIRROR_CONFIG", str(here / "cfg")):
            yield here
    finally:
        os.chdir(old)
        sock.close()
        shutil.rmtree(here, ignore_errors=True)


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def single_error(args: list[str]) -> bool:
    # --all and status report one line per volume.
    return not ({"--all", "-a", "status"} & set(args))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=argv)
def test_fuzzed_command_lines(pristine, args):
    with pool(pristine):
        result = run_cli(cli.main, args, timeout=60)
    assert_clean_exit(result, "lvmirror", args, single_error=single_error(args))


@pytest.mark.parametrize("args, code, words", [
    (["apply", "fifo", "mirror.img"], 3, "FIFO"),
    (["apply", "socket", "mirror.img"], 3, "socket"),
    (["apply", "garbage", "mirror.img"], 3, "not a delta stream"),
    (["apply", "deltadir", "mirror.img"], 3, "deltadir"),
    (["apply", "no/such", "mirror.img"], 3, "no such delta"),
    (["apply", "delta", "dir/missing/m.img"], 4, "dir/missing does not exist"),
    (["apply", "delta", "a\nb"], 2, "control characters"),
    (["apply", "--ssh-key", "fifo", "delta", "ssh://h/x"], 3, "FIFO"),
    (["apply", "delta", "ssh://h:0/x"], 3, "port"),
    (["-c", "fifo", "status"], 3, "FIFO"),
    (["-c", "dir", "status"], 3, "directory"),
    (["sync", "\x1b[2J"], 2, "control characters"),
    (["sync", "nosuch"], 3, "no volume named"),
    (["discard"], 2, "VOLUME"),
    (["apply", "delta", "mirror.img"], 0, ""),
])
def test_known_awkward_command_lines(pristine, args, code, words):
    with pool(pristine):
        result = run_cli(cli.main, args, timeout=60)
    assert_clean_exit(result, "lvmirror", args)
    assert result.code == code and words in result.output, (args, result.code, result.output)


def test_sync_all_with_no_volumes_says_so(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text('[defaults]\nkeep = 1\n')
    cfg.chmod(0o600)
    result = run_cli(cli.main, ["-c", str(cfg), "sync", "--all"])
    assert result.code == 3 and "no [volume.NAME] tables" in result.output, result.output
