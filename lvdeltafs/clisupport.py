"""What both command lines share: error reporting, exit codes, logging set-up and safe names."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import click
from click.shell_completion import CompletionItem

from lvdeltafs.errors import (
    EXIT_BUSY,
    EXIT_CONNECTION,
    EXIT_FAILURE,
    EXIT_NO_SPACE,
    BadInput,
    LvError,
)

VERBOSE_HELP = "Debug detail on stderr, and the traceback of an internal error."

# Categories escaped in every message: C0/C1 controls, format characters (bidi overrides),
# lone surrogates (undecodable bytes of a file name) and the line/paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# OSErrors whose project class is obvious; any other is exit 1.
_OS_EXIT = {errno.ENOSPC: EXIT_NO_SPACE, errno.EDQUOT: EXIT_NO_SPACE, errno.EBUSY: EXIT_BUSY,
            errno.ETXTBSY: EXIT_BUSY, errno.ECONNREFUSED: EXIT_CONNECTION,
            errno.ECONNRESET: EXIT_CONNECTION, errno.ETIMEDOUT: EXIT_CONNECTION,
            errno.EHOSTUNREACH: EXIT_CONNECTION, errno.ENETUNREACH: EXIT_CONNECTION}


def printable(text: str) -> str:
    """``text`` safe for a terminal or a log: control characters become ``\\xNN`` escapes.

    A name given on the command line may hold escape sequences that would
    redraw the terminal or forge a log line; an undecodable byte (a lone
    surrogate) would make the write itself fail.  Idempotent: escapes are plain text.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if unicodedata.category(ch) not in _UNPRINTABLE:
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def control_characters(text: str) -> bool:
    """True if ``text`` holds characters a name must not: C0/C1 controls, DEL, line separators."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


class SafeName(click.ParamType):
    """A path or name from the command line, refused if it holds control characters.

    Every later message names the argument, so it is refused before anything
    else looks at it; the message shows it escaped, never raw.
    """

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
        if control_characters(text):
            self.fail(f"{printable(text)} holds control characters: rename it", param, ctx)
        if not text:
            self.fail("an empty name", param, ctx)
        return text

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[CompletionItem]:
        """Most names are paths: the shell completes file names (volume names complete their own way)."""
        return [CompletionItem(incomplete, type="file")]


KINDS = {stat.S_IFREG: "a regular file", stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
         stat.S_IFCHR: "a character device", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
         stat.S_IFLNK: "a symbolic link"}


def check_input(path: str, what: str, allowed: tuple[int, ...],
                missing: str = "no such file or directory") -> os.stat_result:
    """Stat ``path``, refuse it unless of an ``allowed`` kind (``stat.S_IFREG``...), then try to open it.

    Stat comes first: opening a FIFO for reading waits for a writer forever, and
    a character device such as /dev/zero never ends.  The trial open (which
    cannot block: O_NONBLOCK) turns "permission denied" into a message now
    rather than a failure halfway through the work.
    """
    shown = printable(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{what} {shown}: {missing}") from None
    except OSError as e:
        raise BadInput(f"{what} {shown}: {e.strerror}") from None
    kind = stat.S_IFMT(st.st_mode)
    if kind not in allowed:
        raise BadInput(f"{what} {shown} is {KINDS.get(kind, 'of an unknown kind')}; it must be "
                       + " or ".join(KINDS[k] for k in allowed))
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_DIRECTORY if kind == stat.S_IFDIR else 0)
    try:
        os.close(os.open(path, flags))
    except OSError as e:
        raise BadInput(f"cannot read {what} {shown}: {e.strerror}") from None
    return st


def check_output_dir(path: str, what: str, replaces: tuple[str, ...] = ()) -> None:
    """Refuse a directory to write into unless it exists, or can be made in an existing parent.

    ``replaces`` are the names of files that will be renamed into it over what
    is there, so none of them may be a directory.
    """
    shown = printable(path)
    st = _stat_output(path, what)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} {shown} is {KINDS.get(stat.S_IFMT(st.st_mode), 'not a directory')}, "
                       "not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write into {what} {shown}: permission denied")
    for name in replaces:
        if os.path.isdir(os.path.join(path, name)):
            raise BadInput(f"{shown}/{name} is a directory: move it away, a file of that name is written "
                           "there")


def check_output_file(path: str, what: str) -> None:
    """Refuse a file to append to unless it is a regular file (or can be created in an existing folder).

    A FIFO would block the first write until someone reads it; a directory cannot be opened.
    """
    st = _stat_output(path, what)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{what} {printable(path)} is {KINDS.get(stat.S_IFMT(st.st_mode), 'not a file')}; "
                       "it must be a regular file")
    if not os.access(path, os.W_OK):
        raise BadInput(f"cannot write to {what} {printable(path)}: permission denied")


def _stat_output(path: str, what: str) -> os.stat_result | None:
    """What is at an output path now; None (its parent checked) if nothing is there yet."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        _check_parent(path, what)
        return None
    except OSError as e:
        raise BadInput(f"{what} {printable(path)}: {e.strerror}") from None


def _check_parent(path: str, what: str) -> None:
    # One level is created, not a tree: a typo must not leave new folders all over as root.
    parent = os.path.dirname(os.path.abspath(path))
    head = f"cannot create {what} {printable(path)}: its parent {printable(parent)}"
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise BadInput(f"{head} does not exist: create it first") from None
    except OSError as e:
        raise BadInput(f"{head} cannot be used: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{head} is {KINDS.get(stat.S_IFMT(st.st_mode), 'not a directory')}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{head} is not writable")


# ``90m``, ``26h``, ``2d``, ``1w``, or plain seconds; twelve digits are plenty (and keep floats exact).
_DURATION = re.compile(r"([0-9]{1,12})([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_FORMS = "a number with a unit s, m, h, d or w (90m, 26h, 2d, 1w), or plain seconds (3600)"


def parse_duration(text: str) -> int:
    """Seconds in ``90m``, ``26h``, ``2d``, ``1w`` or ``3600``: the one parser of durations given by users.

    ValueError (saying which forms are accepted) for anything else, zero included:
    a limit of no time at all is a typo, not a wish.
    """
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: use {DURATION_FORMS}")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be longer than 0")
    return seconds


def format_duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``7m 30s``, ``12s``: the largest unit and the next, for an age or a limit."""
    left = max(0, int(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for (unit, size), (small, small_size) in zip(units, units[1:] + (("", 1),), strict=True):
        if left >= size or unit == "s":
            rest = (left % size) // small_size
            return f"{left // size}{unit}" + (f" {rest}{small}" if rest and small else "")
    raise AssertionError("unreachable: seconds always match")


class Duration(click.ParamType):
    """A duration option (``--max-age 26h``): seconds, or click's usage error naming the forms."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
        try:
            return parse_duration(text)
        except ValueError as e:
            self.fail(f"{printable(text)}: {e}", param, ctx)


def setup_logging(prog: str, verbose: int, quiet: bool) -> None:
    """Plain lines on stderr: journald and cron mail keep them as they are.  One -v is debug."""
    level = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"{stamp}{prog}: %(levelname)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")


def describe_os_error(exc: OSError) -> str:
    """One line naming the file(s) an OSError is about, and what went wrong."""
    what = exc.strerror or str(exc)
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
    if len(names) == 2:
        return printable(f"{names[0]} -> {names[1]}: {what}")
    if names:
        return printable(f"{names[0]}: {what}")
    return printable(what)


def _error(prog: str, message: str, code: int) -> None:
    with contextlib.suppress(OSError):  # stderr itself gone: the exit code is all that is left
        click.echo(f"{prog}: error: {printable(message)}", err=True)
    sys.exit(code)


# click >= 8.2: the group's own help, shown when no command is given; its lines are ours.
_HELP_AS_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _show_click_error(exc: click.ClickException) -> None:
    # click quotes the offending argument (an unknown command, a bad value) into its message.
    if not isinstance(exc, _HELP_AS_ERROR):
        exc.message = printable(exc.message)
    exc.show()


def _quiet_stdout() -> None:
    # The reader of our stdout went away (`| head`): stop writing to it, and keep Python's
    # flush at exit from printing "Exception ignored ... BrokenPipeError".
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def exit_status(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message :func:`run_group` gives ``exc``: what a run's record keeps.

    So the record of a failed run says what its user (or cron's mail) saw.
    """
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        return 130, "interrupted"
    if isinstance(exc, SystemExit):
        return (exc.code if isinstance(exc.code, int) else EXIT_FAILURE), ""
    if isinstance(exc, LvError):
        return exc.exit_code, printable(str(exc))
    if isinstance(exc, OSError):
        return _OS_EXIT.get(exc.errno or 0, EXIT_FAILURE), describe_os_error(exc)
    return EXIT_FAILURE, printable(f"internal error: {type(exc).__name__}: {exc}")


def run_group(group: click.Group, prog: str) -> Callable[..., None]:
    """Wrap a click group: project errors become one clear line and their exit code.

    The last two handlers are a last line of defence, not the way errors are
    reported: an OSError becomes one line naming its file, anything else
    "internal error" (its traceback only with -v).  Neither ever shows a traceback.
    """
    log = logging.getLogger(prog)

    def main(args: Sequence[str] | None = None) -> None:
        try:
            # Not standalone: click would turn our errors into tracebacks or exit 1.
            group.main(args=args, prog_name=prog, standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):
            with contextlib.suppress(OSError):
                click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            _show_click_error(exc)
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except LvError as exc:
            _error(prog, str(exc), exc.exit_code)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(EXIT_FAILURE)
        except OSError as exc:
            log.debug("the error came from here:", exc_info=True)
            _error(prog, describe_os_error(exc), _OS_EXIT.get(exc.errno or 0, EXIT_FAILURE))
        except Exception as exc:  # noqa: BLE001 - the last line of defence; see the docstring
            log.debug("the internal error came from here:", exc_info=True)
            _error(prog, f"internal error: {type(exc).__name__}: {exc} (this is a bug: rerun with -v "
                   "to see where it happened, and report it)", EXIT_FAILURE)

    return main
