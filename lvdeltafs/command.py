"""Running external commands (lvs, lvcreate, dmsetup, thin_delta, ...) safely.

Arguments are always a list, never a shell string, every call has a timeout,
and a failure raises CommandFailed carrying the command's stderr.
"""

from __future__ import annotations

import logging
import os
import subprocess

from lvdeltafs.errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # LVM warns about every inherited descriptor; the noise hides real errors.
    env.setdefault("LVM_SUPPRESS_FD_WARNINGS", "1")
    env["LC_ALL"] = "C"
    return env


def run(argv: list[str], *, timeout: float = DEFAULT_TIMEOUT, hint: str = "",
        input: bytes | None = None) -> str:
    """Run ``argv`` and return its stdout as text; raise CommandFailed on failure or timeout."""
    log.debug("running %s", argv)
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              env=_environment())
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, None, (exc.stderr or b"").decode(errors="replace"),
                            hint or f"no answer within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: command not found",
                            hint or "install it (scripts/setup does)") from None
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr.decode(errors="replace"), hint)
    return proc.stdout.decode(errors="replace")
