"""`lvmirror`: keep mirrors of LVM volumes in step by moving only the changed chunks."""

from __future__ import annotations

import click

from lvdeltafs import __version__
from lvdeltafs.clisupport import run_group, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lvmirror")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Keep image files or block devices identical to snapshots of LVM volumes."""
    setup_logging("lvmirror", verbose, quiet)


main = run_group(cli, "lvmirror")
