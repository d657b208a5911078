"""Both console scripts: --help and --version, and what run_group makes of every kind of failure."""

from __future__ import annotations

import errno
import logging
import subprocess

import click
import pytest

import lvdeltafs
from lvdeltafs.clisupport import printable, run_group
from lvdeltafs.errors import BadInput
from tests.harness import BIN


@pytest.mark.parametrize("prog", ["lvdeltafs", "lvmirror"])
def test_version_and_help(prog):
    out = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{prog}, version {lvdeltafs.__version__}"
    out = subprocess.run([str(BIN / prog), "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout


@pytest.mark.parametrize("prog", ["lvdeltafs", "lvmirror"])
def test_unknown_command_is_a_usage_error(prog):
    out = subprocess.run([str(BIN / prog), "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "No such command" in out.stderr


def test_verbose_help_says_what_one_v_does():
    out = subprocess.run([str(BIN / "lvdeltafs"), "--help"], capture_output=True, text=True, check=True)
    line = " ".join(out.stdout[out.stdout.index("--verbose"):].split("\n  -", 1)[0].split())
    assert "Debug" in line and "repeat" not in line, line


# ---- run_group, in process ----------------------------------------------------------

@click.group()
@click.option("-v", "--verbose", count=True)
def demo(verbose: int) -> None:
    pass


@demo.command()
@click.argument("what")
def fail(what: str) -> None:
    if what == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", "/var/spool/x")
    if what == "eacces":
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow\x1b[2J")
    if what == "rename":
        raise OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")
    if what == "bug":
        raise KeyError("oops")
    if what == "project":
        raise BadInput("bad thing in \x1b]0;title\x07 here")


def run_demo(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_group(demo, "demo")(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return e.value.code, out.err


@pytest.mark.parametrize("what, code, line", [
    ("enospc", 9, "demo: error: /var/spool/x: No space left on device"),
    ("eacces", 1, "demo: error: /etc/shadow\\x1b[2J: Permission denied"),
    ("rename", 1, "demo: error: /a -> /b: Invalid cross-device link"),
    ("project", 3, "demo: error: bad thing in \\x1b]0;title\\x07 here"),
])
def test_errors_are_one_line_naming_the_file(capsys, what, code, line):
    assert run_demo(capsys, "fail", what) == (code, line + "\n")


def test_an_unexpected_exception_is_an_internal_error_traceback_only_in_the_debug_log(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="demo"):
        code, err = run_demo(capsys, "-v", "fail", "bug")
    assert code == 1
    assert err.startswith("demo: error: internal error: KeyError: 'oops'") and "rerun with -v" in err
    assert len(err.splitlines()) == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug and debug[0].exc_info[0] is KeyError  # the traceback goes to the log, at debug


def test_usage_errors_escape_what_they_quote(capsys):
    code, err = run_demo(capsys, "no\x1b[31mcommand")
    assert code == 2 and "\x1b" not in err and "\\x1b[31m" in err


def test_printable():
    assert printable("plain /path/ü.img") == "plain /path/ü.img"
    assert printable("a\x1b[2J\nb\t\x7f\x9b") == "a\\x1b[2J\\x0ab\\x09\\x7f\\x9b"
    assert printable("\udcff.img") == "\\xff.img"  # an undecodable byte of a file name
    assert printable("\u202eevil") == "\\u202eevil"  # a bidi override
    assert printable(printable("\x1b")) == printable("\x1b")
