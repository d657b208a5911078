"""`lvdeltafs`: the changes between two snapshots, as files (mount) or without FUSE."""

from __future__ import annotations

import os
import stat
import sys

import click

from lvdeltafs import __version__
from lvdeltafs.clisupport import (
    VERBOSE_HELP,
    SafeName,
    check_input,
    check_output_dir,
    check_output_file,
    printable,
    run_group,
    setup_logging,
)
from lvdeltafs.errors import BadInput

NAME = SafeName()
SIDE_KINDS = (stat.S_IFREG, stat.S_IFBLK)
SOURCE_CHOICE = click.Choice(["auto", "cow", "compare"])
PAIR_HELP = ("BASE and TARGET are two snapshots of one LVM volume (vg/lv, classic or thin), "
             "a COW store (device or image file) and the target's image, or any two images.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lvdeltafs")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Show the changes between two LVM snapshots (or two images) as ordinary files."""
    setup_logging("lvdeltafs", verbose, quiet)


def _open(base: str, target: str, source: str):
    from lvdeltafs.pairs import open_delta
    base, target = check_pair(base, target, source)
    return open_delta(base, target, source=None if source == "auto" else source)


def check_pair(base: str, target: str, source: str = "auto", option: str = "") -> tuple[str, str]:
    """BASE and TARGET checked before anything reads them; file sides come back absolute.

    Two ``vg/lv`` names, or two regular files or block devices (a FIFO would
    block the first read forever; /dev/zero would never end).
    """
    from lvdeltafs import lvm
    from lvdeltafs.pairs import looks_like_lv
    is_lv = [looks_like_lv(x) for x in (base, target)]
    if any(is_lv) and not all(is_lv):
        raise BadInput(f"{option}{printable(base)} and {printable(target)}: name two LVM volumes (vg/lv) "
                       "or two files, not one of each")
    if all(is_lv):
        if source != "auto":
            raise BadInput(f"--source {source} is for file arguments; {printable(base)} and "
                           f"{printable(target)} are read from LVM")
        for name in (base, target):
            vg, lv = name.split("/")
            lvm.check_name(vg, "volume group")
            lvm.check_name(lv, "logical volume")
        return base, target
    for what, name in ((f"{option}base", base), (f"{option}target", target)):
        check_input(name, what, SIDE_KINDS, missing="no such file, device or vg/lv volume")
    return os.path.abspath(base), os.path.abspath(target)


@cli.command(help="Print the changed ranges from BASE to TARGET, one per line: OFFSET LENGTH data|zero "
             "(decimal bytes, ascending). " + PAIR_HELP)
@click.argument("base", type=NAME)
@click.argument("target", type=NAME)
@click.option("--source", type=SOURCE_CHOICE, default="auto", show_default=True,
              help="How to read file arguments: a COW store, or a block compare.")
def ranges(base: str, target: str, source: str) -> None:
    delta = _open(base, target, source)
    try:
        # Block by block to the byte stream: millions of lines never become one string.
        sys.stdout.flush()
        delta.extents.write_text(sys.stdout.buffer.write)
        sys.stdout.buffer.flush()
    finally:
        delta.close()


@cli.command(help="Write the delta files (ranges, data, chunks, manifest.json, delta) into DIRECTORY. "
             + PAIR_HELP)
@click.argument("base", type=NAME)
@click.argument("target", type=NAME)
@click.argument("directory", type=NAME)
@click.option("--source", type=SOURCE_CHOICE, default="auto", show_default=True,
              help="How to read file arguments: a COW store, or a block compare.")
def export(base: str, target: str, directory: str, source: str) -> None:
    from lvdeltafs.formats.export import export as export_files
    from lvdeltafs.formats.files import NAMES
    # Checked before the delta is computed: a compare of two large images takes a while.
    check_output_dir(directory, "directory", replaces=NAMES)
    delta = _open(base, target, source)
    try:
        export_files(delta, directory)
    finally:
        delta.close()
    ext = delta.extents
    click.echo(f"{printable(directory)}: {ext.data_count} data ranges ({ext.data_bytes} bytes), "
               f"{ext.zero_count} zero ranges ({ext.zero_bytes} bytes), delta {delta.identity.delta_id}",
               err=True)


@cli.command()
@click.argument("path", type=NAME)
def verify(path: str) -> None:
    """Check a delta stream file or a delta directory; exit 3 if it is damaged."""
    from lvdeltafs.formats.verify import verify_path
    check_input(path, "delta", (stat.S_IFREG, stat.S_IFDIR), missing="does not exist")
    s = verify_path(path)
    click.echo(f"{printable(path)}: OK: delta {s['delta_id']}, target size {s['target_size']}, "
               f"{s['data_bytes']} bytes of data, {s['zero_bytes']} bytes of zeros, "
               f"{s['stream_bytes']} stream bytes")


main = run_group(cli, "lvdeltafs")


MOUNT_HELP = """Show snapshot pairs as directories of delta files at MOUNTPOINT.

\b
MOUNTPOINT/VG/LV/snapshots/       one file per snapshot, in creation order
MOUNTPOINT/VG/LV/S1..S2/          each consecutive pair; any older..newer pair by name
MOUNTPOINT/VG/LV/SN..@origin/     newest snapshot against the live volume (not point in time)
MOUNTPOINT/@pairs/BASE..TARGET/   each --pair, named by the basenames
MOUNTPOINT/@mirrors/NAME/G/image  each kept point of a --mirror (G: its generation)
MOUNTPOINT/@mirrors/NAME/G/undo/  that point's undo delta
Each pair directory (and undo/) holds ranges, data, chunks, manifest.json and delta.

Volume groups are discovered (all, or each --vg) unless only --pair or --mirror is given.
Returns once the mount is ready and serves in the background; -f stays in the
foreground.  Unmount with `lvdeltafs umount MOUNTPOINT`.
"""


@cli.command(help=MOUNT_HELP)
@click.argument("mountpoint", type=NAME)
@click.option("--vg", "vgs", type=NAME, multiple=True, metavar="VG",
              help="Show this volume group (repeatable).")
@click.option("--pair", "pairs", type=NAME, nargs=2, multiple=True, metavar="BASE TARGET",
              help="Also show this pair under @pairs/ (repeatable). " + PAIR_HELP)
@click.option("--source", type=SOURCE_CHOICE, default="auto", show_default=True,
              help="How to read --pair file arguments: a COW store, or a block compare.")
@click.option("--mirror", "mirrors", type=NAME, multiple=True, metavar="NAME=PATH",
              help="Also show the kept points of this lvmirror mirror (an image file or block device) "
                   "under @mirrors/NAME/ (repeatable).")
@click.option("--mirror-state-dir", type=NAME, metavar="DIR",
              help="Where the state of --mirror block devices is (default: /var/lib/lvmirror/receiver).")
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground until unmounted.")
@click.option("--allow-other", is_flag=True,
              help="Let other users in (needs user_allow_other in /etc/fuse.conf unless root). "
                   "Each file then carries the owner and group of the volume or image it shows, "
                   "and at most its read bits: nobody reads a delta of what they could not read.")
@click.option("--cache", "cache_size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="How many opened deltas to keep.")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True,
              help="How many reads of the target may run at once.")
@click.option("--read-ahead-kb", type=click.IntRange(0, 1 << 20), default=4096, show_default=True,
              help="Read-ahead of the mount (root only; 0 leaves the kernel's 128): larger means "
                   "larger read requests and faster sequential reads.")
@click.option("--log-file", type=NAME, metavar="FILE",
              help="Where the background process logs (default: syslog).")
@click.option("--debug-fuse", is_flag=True, hidden=True)
@click.option("--ready-fd", type=click.IntRange(0, (1 << 31) - 1), hidden=True)
@click.pass_context
def mount(ctx: click.Context, mountpoint: str, vgs: tuple[str, ...], pairs: tuple[tuple[str, str], ...],
          source: str, mirrors: tuple[str, ...], mirror_state_dir: str | None, foreground: bool,
          allow_other: bool, cache_size: int, threads: int, read_ahead_kb: int, log_file: str | None,
          debug_fuse: bool, ready_fd: int | None) -> None:
    from lvdeltafs import fuse, lvm, vfs
    from lvdeltafs.discovery import Discovery
    from lvdeltafs.mirrors import open_mirrors, split_mirror_arg
    from lvdeltafs.tree import explicit_pairs
    mountpoint = os.path.abspath(mountpoint)
    # Everything is checked here, in the foreground: the background process has no terminal
    # to say what is wrong, and runs in /, so every path is made absolute.
    pairs = tuple(check_pair(base, target, source, "--pair ") for base, target in pairs)
    if mirror_state_dir:
        mirror_state_dir = os.path.abspath(mirror_state_dir)
    mirrors = tuple(f"{n}={p}" for n, p in map(split_mirror_arg, mirrors))
    shown = open_mirrors(mirrors, mirror_state_dir)
    if log_file:
        check_output_file(log_file, "--log-file")
        log_file = os.path.abspath(log_file)
    for vg in vgs:
        lvm.check_name(vg, "volume group")
    if ready_fd is not None:
        _check_ready_fd(ready_fd)
    fuse.check_mountpoint(mountpoint)
    if not foreground and ready_fd is None:
        for m in shown.values():
            m.close()
        pid = fuse.start_background(_mount_argv(ctx, mountpoint, vgs, pairs, source, allow_other,
                                                cache_size, threads, log_file)
                                    + ["--read-ahead-kb", str(read_ahead_kb)]
                                    + [a for m in mirrors for a in ("--mirror", m)]
                                    + (["--mirror-state-dir", mirror_state_dir] if mirror_state_dir else []))
        click.echo(f"lvdeltafs: mounted {printable(mountpoint)} (process {pid}); "
                   f"unmount with: lvdeltafs umount {printable(mountpoint)}", err=True)
        return
    discovery = Discovery(vgs) if vgs or not (pairs or mirrors) else None
    fs = vfs.Vfs(discovery=discovery, cache_size=cache_size, allow_other=allow_other,
                 pairs=explicit_pairs(pairs, None if source == "auto" else source), mirrors=shown)
    on_ready = (lambda: fuse.detach(ready_fd, log_file)) if ready_fd is not None else None
    fuse.serve(fs, mountpoint, allow_other=allow_other, debug=debug_fuse, read_threads=threads,
               read_ahead_kb=read_ahead_kb, on_ready=on_ready)


def _check_ready_fd(fd: int) -> None:
    """--ready-fd is how start_background hears the mount is up: a pipe it holds open."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISFIFO(mode):
        raise BadInput(f"--ready-fd {fd} is not an open pipe (it is for lvdeltafs's own use: leave it out)")


def _mount_argv(ctx: click.Context, mountpoint: str, vgs, pairs, source: str, allow_other: bool,
                cache_size: int, threads: int, log_file: str | None) -> list[str]:
    """The foreground command the background process runs: the same mount, paths absolute."""
    parent = ctx.parent.params if ctx.parent else {}
    argv = [*(["-" + "v" * parent["verbose"]] if parent.get("verbose") else []),
            *(["-q"] if parent.get("quiet") else []), "mount", "--foreground", mountpoint,
            "--source", source, "--cache", str(cache_size), "--threads", str(threads)]
    argv += [a for vg in vgs for a in ("--vg", vg)]
    argv += [a for base, target in pairs for a in ("--pair", base, target)]
    argv += (["--allow-other"] if allow_other else []) + (["--log-file", log_file] if log_file else [])
    return argv


@cli.command()
@click.argument("mountpoint", type=NAME)
@click.option("-z", "--lazy", is_flag=True, help="Detach now even if files are open (fusermount3 -u -z).")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount an lvdeltafs mount; also clears one left dead by a crash."""
    from lvdeltafs import fuse
    done = fuse.unmount(mountpoint, lazy)
    click.echo(f"lvdeltafs: {done} {printable(mountpoint)}", err=True)


if __name__ == "__main__":
    main()
