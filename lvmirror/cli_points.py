"""`lvmirror history` and `lvmirror rewind`: a mirror's kept points (docs/history.md), on the CLI."""

from __future__ import annotations

import json

import click

from lvdeltafs.clisupport import format_duration, printable
from lvmirror.cli import NAME, _locked, _one_view, log
from lvmirror.completion import volume_names
from lvmirror.progress import human

DEST_HELP = "Which of the volume's destinations (a volume with several must name one)."


@click.command()
@click.argument("volume", type=NAME, shell_complete=volume_names)
@click.option("--dest", type=NAME, metavar="DEST", help=DEST_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def history(ctx: click.Context, volume: str, dest: str | None, as_json: bool) -> None:
    """The earlier points VOLUME's mirror keeps, the space they use, and what retention drops next."""
    import time

    from lvmirror import points
    view = _one_view(ctx, volume, dest)
    report = _locked(ctx, volume, lambda vol: points.history_of(view))
    if as_json:
        click.echo(json.dumps({"format": "lvmirror-history/1", "volume": volume, "destination": report.dest,
                               "points": [p.as_entry() for p in report.points],
                               "undo_bytes": report.undo_bytes, "keep": report.keep.as_dict(),
                               "drops_next": report.drops_next}, indent=2))
        return
    now = time.time()
    cur = report.current
    click.echo(f"{volume} -> {printable(report.dest)}")
    if cur.get("snapshot"):
        click.echo(f"  now:   generation {cur.get('generation')}, {printable(str(cur.get('snapshot')))}, "
                   f"synced {cur.get('synced')}")
    else:
        click.echo("  now:   nothing lvmirror knows of (no points are kept for it)")
    for p in reversed(report.points):
        drop = "  (dropped by the next sync)" if p.generation in report.drops_next else ""
        click.echo(f"  {p.generation:>5}  {p.synced}  {format_duration(now - p.synced_epoch)} ago  "
                   f"{human(p.undo_bytes)} undo  {printable(p.snapshot)}{drop}")
    keep = report.keep
    limits = [f"{keep.points} points"] + ([f"{format_duration(keep.age)}"] if keep.age else []) + \
        ([human(keep.size)] if keep.size else [])
    click.echo(f"  {len(report.points)} points, {human(report.undo_bytes)} of undo deltas; keeps at most "
               + ", ".join(limits))


@click.command()
@click.argument("volume", type=NAME, shell_complete=volume_names)
@click.option("--to", "point", type=NAME, required=True, metavar="POINT",
              help="The kept point: its generation (as `lvmirror history` shows) or its snapshot name.")
@click.option("--dest", type=NAME, metavar="DEST", help=DEST_HELP)
@click.pass_context
def rewind(ctx: click.Context, volume: str, point: str, dest: str | None) -> None:
    """Make VOLUME's mirror equal an earlier kept point.

    Crash-safe: an interrupted rewind is finished by the next run.  Newer
    points are dropped; the next `lvmirror sync` resyncs by comparing block
    digests and sends only what differs.
    """
    from lvmirror import points
    view = _one_view(ctx, volume, dest)
    found, _state = _locked(ctx, volume, lambda vol: points.rewind(view, point))
    log.info("%s: the mirror now holds point %d (%s, synced %s); the next sync resyncs by comparing",
             volume, found.generation, found.snapshot, found.synced)


@click.command()
@click.argument("volume", type=NAME, shell_complete=volume_names)
@click.option("--to", "to", type=NAME, required=True, metavar="VG/LV",
              help="The logical volume to write: the volume itself, or a new LV of the point's size.")
@click.option("--point", type=NAME, metavar="POINT",
              help="A kept point (generation or snapshot name); default: what the mirror holds now.")
@click.option("--dest", type=NAME, metavar="DEST", help=DEST_HELP)
@click.option("-n", "--dry-run", is_flag=True, help="Say how much would be read from the mirror; write "
              "nothing.")
@click.pass_context
def restore(ctx: click.Context, volume: str, to: str, point: str | None, dest: str | None,
            dry_run: bool) -> None:
    """Write VOLUME's mirror (or one of its kept points) back onto a logical volume.

    Only what can differ is read from the mirror and only the blocks that
    differ are written.  The LV must not be open or mounted.  A restore that
    is interrupted is run again.
    """
    from lvmirror.restore import restore as run_restore
    view = _one_view(ctx, volume, dest)
    done = _locked(ctx, volume, lambda vol: run_restore(view, point, to, dry_run=dry_run))
    click.echo(done.summary())
