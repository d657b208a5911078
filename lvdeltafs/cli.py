"""`lvdeltafs`: the changes between two snapshots, as files (mount) or without FUSE."""

from __future__ import annotations

import click

from lvdeltafs import __version__
from lvdeltafs.clisupport import run_group, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lvdeltafs")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Show the changes between two LVM snapshots (or two images) as ordinary files."""
    setup_logging("lvdeltafs", verbose, quiet)


main = run_group(cli, "lvdeltafs")
