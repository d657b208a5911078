"""The project's own exceptions.

Every error a user can meet is one of these, with a message written for a
sysadmin at 3 a.m.: what happened, and what to do about it.  The command
lines turn them into one line on stderr and the exit code of the class.
"""

from __future__ import annotations

# Documented exit codes (README.md, "Exit codes").  2 is click's usage error.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_REFUSED = 4
EXIT_EXTERNAL = 5
EXIT_MISMATCH = 6
EXIT_BUSY = 7
EXIT_CONNECTION = 8
EXIT_NO_SPACE = 9
# `lvmirror status --max-age`: a mirror's last good sync is older than allowed.  It shares 2 with
# usage errors on purpose: 2 is a monitoring plugin's CRITICAL (and status's 1, a problem, its WARNING),
# so the command is a Nagios/Icinga check as it is; a check given wrong arguments is critical too.
EXIT_STALE = 2


class LvError(Exception):
    """Base of every error this project reports to its user."""

    exit_code = EXIT_FAILURE


class BadInput(LvError):
    """Input that is corrupt, truncated, foreign or otherwise unusable."""

    exit_code = EXIT_BAD_INPUT


class CorruptDelta(BadInput):
    """A delta stream or delta directory failed verification."""


class NotACowStore(BadInput):
    """A device or file that should hold a classic snapshot's exception store does not."""


class UnsupportedFormat(BadInput):
    """A format version or feature this release does not understand."""


class SnapshotUnusable(LvError):
    """A snapshot that cannot give a correct delta: invalidated, merging, gone, written to."""

    exit_code = EXIT_REFUSED


class Refused(LvError):
    """An action refused to protect data: wrong base, unsafe config, and the like."""

    exit_code = EXIT_REFUSED


class CommandFailed(LvError):
    """An external command (lvs, lvcreate, dmsetup, thin_delta, ...) failed or timed out."""

    exit_code = EXIT_EXTERNAL

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, hint: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out" if returncode is None else f"failed with exit code {returncode}"
        msg = f"{argv[0]} {what}"
        if self.stderr:
            msg += f": {self.stderr.splitlines()[-1]}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class Mismatch(LvError):
    """A check found differences between a source and its mirror."""

    exit_code = EXIT_MISMATCH


class Busy(LvError):
    """Another run holds the lock, or a resource is in use."""

    exit_code = EXIT_BUSY


class ConnectionProblem(LvError):
    """The link to a remote destination failed: refused, dropped, host key unknown or changed."""

    exit_code = EXIT_CONNECTION


class NoSpace(LvError):
    """The destination's filesystem (or the staging area) ran out of space; nothing was applied."""

    exit_code = EXIT_NO_SPACE
