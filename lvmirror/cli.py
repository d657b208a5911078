"""`lvmirror`: keep mirrors of LVM volumes in step by moving only the changed chunks."""

from __future__ import annotations

import logging
import stat
import sys
from collections.abc import Callable

import click

from lvdeltafs import __version__
from lvdeltafs.clisupport import VERBOSE_HELP, SafeName, check_input, run_group, setup_logging
from lvdeltafs.errors import LvError, Mismatch
from lvmirror.config import ConfigError

log = logging.getLogger("lvmirror")

DRY_RUN_HELP = "Say what would be sent and how much; keep no snapshot, write nothing."
NAME = SafeName()  # refused if it holds control characters; shown escaped in every message
CONFIG_HELP = "Configuration file (default: $LVMIRROR_CONFIG, else /etc/lvmirror/lvmirror.toml)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lvmirror")
@click.option("-c", "--config", "config_path", type=NAME, metavar="PATH", help=CONFIG_HELP)
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: bool) -> None:
    """Keep image files or block devices identical to snapshots of LVM volumes."""
    setup_logging("lvmirror", verbose, quiet)
    ctx.obj = {"config_path": config_path}


def _config(ctx: click.Context):
    from lvmirror import config
    cached = ctx.obj.get("config")
    if cached is None:
        cached = ctx.obj["config"] = config.load(ctx.obj["config_path"])
    return cached


def _locked(ctx: click.Context, name: str, job: Callable[..., object], **kwargs: object) -> object:
    """Run one pipeline for one volume under its lock."""
    from lvmirror.lock import volume_lock
    cfg = _config(ctx)
    vol = cfg.volume(name)
    with volume_lock(cfg.lock_dir, vol.name):
        return job(vol, **kwargs)


def _report(outcome) -> None:
    for note in outcome.notes:
        log.info("%s: %s", outcome.volume, note)
    if outcome.dry_run:
        click.echo(outcome.summary())
    else:
        log.info("%s", outcome.summary())


@cli.command()
@click.argument("volume", type=NAME)
@click.option("-n", "--dry-run", is_flag=True, help=DRY_RUN_HELP)
@click.pass_context
def init(ctx: click.Context, volume: str, dry_run: bool) -> None:
    """First full copy of VOLUME to its destination (zero runs skipped)."""
    from lvmirror import pipelines
    _report(_locked(ctx, volume, pipelines.init, dry_run=dry_run))


@cli.command()
@click.argument("volume", type=NAME, required=False)
@click.option("-a", "--all", "all_", is_flag=True, help="Every configured volume, one after another.")
@click.option("--initial", is_flag=True, help="The same as `lvmirror init VOLUME`.")
@click.option("--check", "check_", is_flag=True, help="The same as `lvmirror check VOLUME`.")
@click.option("--repair", is_flag=True, help="With --check: send the blocks that differ.")
@click.option("-n", "--dry-run", is_flag=True, help=DRY_RUN_HELP)
@click.pass_context
def sync(ctx: click.Context, volume: str | None, all_: bool, initial: bool, check_: bool, repair: bool,
         dry_run: bool) -> None:
    """Bring VOLUME's destination (or --all) up to a new snapshot, sending only what changed."""
    if bool(volume) == all_:
        raise click.UsageError("name one VOLUME or give --all")
    if initial and check_:
        raise click.UsageError("--initial and --check exclude each other")
    if repair and not check_:
        raise click.UsageError("--repair goes with --check")
    names = sorted(_config(ctx).volumes) if all_ else [volume]
    if not names:
        raise ConfigError(f"{_config(ctx).path}: no [volume.NAME] tables, so --all has nothing to sync")
    failures: list[LvError] = []
    for name in names:
        try:
            if check_:
                ctx.invoke(check, volume=name, repair=repair)
            elif initial:
                ctx.invoke(init, volume=name, dry_run=dry_run)
            else:
                from lvmirror import pipelines
                _report(_locked(ctx, name, pipelines.sync, dry_run=dry_run))
        except LvError as e:
            if not all_:
                raise
            log.error("%s: %s", name, e)
            failures.append(e)
    if failures:
        log.error("%d of %d volumes failed", len(failures), len(names))
        sys.exit(failures[0].exit_code)


@cli.command()
@click.argument("volume", type=NAME)
@click.option("--repair", is_flag=True, help="Send just the blocks that differ, from the snapshot.")
@click.pass_context
def check(ctx: click.Context, volume: str, repair: bool) -> None:
    """Compare VOLUME's destination with the snapshot it should hold; exit 6 on differences.

    Prints the ranges that differ, one per line: OFFSET LENGTH data|zero.
    """
    from lvdeltafs.extents import format_ranges
    from lvmirror import pipelines
    result, repaired = _locked(ctx, volume, pipelines.check, repair=repair)
    if result.ok:
        log.info("%s: destination matches snapshot %s (%d bytes)", volume, result.snapshot,
                 result.checked_bytes)
        return
    sys.stdout.write(format_ranges(result.mismatched))
    what = (f"{len(result.mismatched)} ranges ({result.mismatched.data_bytes + result.mismatched.zero_bytes} "
            f"bytes) differ from snapshot {result.snapshot}")
    if repaired is None:
        raise Mismatch(f"{volume}: {what}; `lvmirror check --repair {volume}` sends just those")
    log.warning("%s: %s; repaired", volume, what)
    _report(repaired)


@cli.command()
@click.argument("volumes", type=NAME, nargs=-1)
@click.pass_context
def status(ctx: click.Context, volumes: tuple[str, ...]) -> None:
    """Each volume's base snapshot, COW use, destination state and last sync."""
    from lvmirror.status import status as volume_status
    cfg = _config(ctx)
    names = volumes or tuple(sorted(cfg.volumes))
    problems = 0
    for name in names:
        st = volume_status(cfg.volume(name))
        click.echo(_status_text(st))
        problems += bool(st.problems)
    if problems:
        sys.exit(1)


def _room(st) -> str:
    """How full the base snapshot's space is: its COW (classic), or its thin pool's data and metadata."""
    if st.pool:
        data = "?" if st.pool_data_percent is None else f"{st.pool_data_percent:.1f}%"
        meta = "?" if st.pool_metadata_percent is None else f"{st.pool_metadata_percent:.1f}%"
        return f", thin pool {st.pool}: data {data}, metadata {meta} used"
    return "" if st.cow_percent is None else f", COW {st.cow_percent:.1f}% full"


def _status_text(st) -> str:
    state = st.state
    lines = [f"{st.name}: {st.source} -> {st.destination}"]
    if state.get("snapshot"):
        lines.append(f"  base snapshot: {st.base or '(missing)'} {st.base_id}{_room(st)}")
        lines.append(f"  destination:   generation {state.get('generation')}, {state.get('size')} bytes, "
                     f"last sync {state.get('synced')} ({state.get('source')})")
        if state.get("needs_check"):
            lines.append(f"  needs a check: a forced apply was made; run `lvmirror check {st.name}`")
    elif not st.problems:
        lines.append(f"  destination:   not initialised (run `lvmirror init {st.name}`)")
    if st.snapshots:
        lines.append(f"  snapshots:     {', '.join(st.snapshots)}")
    lines.extend(f"  problem:       {p}" for p in st.problems)
    return "\n".join(lines)


@cli.command()
@click.argument("delta", type=NAME)
@click.argument("dest", type=NAME)
@click.option("--state-dir", type=NAME, metavar="DIR", help="Where a block device DEST keeps its state.")
@click.option("--force", is_flag=True, help="Apply even if DEST does not hold the delta's base; a full "
              "check follows when the target snapshot is on this host.")
@click.option("--ssh-key", type=NAME, help="Private key for an ssh:// DEST "
              "(default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa).")
@click.option("--known-hosts", type=NAME, help="known_hosts file for an ssh:// DEST "
              "(default: ~/.ssh/known_hosts); the host key must be in it.")
def apply(delta: str, dest: str, state_dir: str | None, force: bool, ssh_key: str | None,
          known_hosts: str | None) -> None:
    """Apply DELTA (a delta directory or stream file) to DEST with the receiver's checks.

    DEST is an image file, a block device, or ssh://[user@]host[:port]/path.
    """
    from lvmirror import pipelines
    check_input(delta, "delta", (stat.S_IFREG, stat.S_IFDIR), missing="no such delta file or directory")
    ssh = _ssh_options(ssh_key, known_hosts)
    outcome = pipelines.apply_file(delta, dest, state_dir, force=force, ssh=ssh)
    _report(outcome)
    if force:
        pipelines.check_after_force(outcome, dest, state_dir, ssh)


@cli.command()
@click.argument("volume", type=NAME, required=False)
@click.option("--dest", type=NAME, metavar="DEST",
              help="A destination that is not in the config (as given to `apply`).")
@click.option("--state-dir", type=NAME, metavar="DIR",
              help="With --dest: where a block device DEST keeps its state.")
@click.option("--ssh-key", type=NAME, help="With an ssh:// --dest: the private key.")
@click.option("--known-hosts", type=NAME,
              help="With an ssh:// --dest: the known_hosts file.")
@click.pass_context
def discard(ctx: click.Context, volume: str | None, dest: str | None, state_dir: str | None,
            ssh_key: str | None, known_hosts: str | None) -> None:
    """The way out of a stuck mirror: set aside what is staged for VOLUME's destination (or --dest).

    Drops a staged or half-applied delta and what the state says the
    destination holds, even a damaged state; the destination is left as it is.
    The next `lvmirror sync` then resyncs it by comparing block digests.
    """
    from lvmirror import pipelines
    if bool(volume) == bool(dest):
        raise click.UsageError("name one VOLUME or give --dest DEST")
    if volume:
        _locked(ctx, volume, pipelines.discard_volume)
    else:
        assert dest is not None
        pipelines.discard(dest, state_dir, _ssh_options(ssh_key, known_hosts))
    log.info("%s: what was staged and recorded is set aside; the next sync resyncs by comparing block "
             "digests", volume or dest)


def _ssh_options(key: str | None, known_hosts: str | None):
    """--ssh-key and --known-hosts, each a readable regular file (a FIFO would hang the key loader)."""
    from lvmirror.transports import SshOptions
    for path, what in ((key, "ssh key"), (known_hosts, "known_hosts file")):
        if path is not None:
            check_input(path, what, (stat.S_IFREG,))
    return SshOptions(key, known_hosts)


main = run_group(cli, "lvmirror")
