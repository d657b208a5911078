"""What both command lines share: error reporting, exit codes and logging set-up."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import click

from lvdeltafs.errors import EXIT_FAILURE, LvError


def setup_logging(prog: str, verbose: int, quiet: bool) -> None:
    """Plain lines on stderr: journald and cron mail keep them as they are."""
    level = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"{stamp}{prog}: %(levelname)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")


def run_group(group: click.Group, prog: str) -> Callable[[], None]:
    """Wrap a click group: project errors become one clear line and their exit code."""

    def main() -> None:
        try:
            group.main(prog_name=prog, standalone_mode=False)
        except click.exceptions.Abort:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except LvError as exc:
            click.echo(f"{prog}: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(EXIT_FAILURE)

    return main
