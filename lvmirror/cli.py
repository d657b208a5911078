"""`lvmirror`: keep mirrors of LVM volumes in step by moving only the changed chunks."""

from __future__ import annotations

import logging
import stat
import sys
from collections.abc import Callable

import click

from lvdeltafs import __version__
from lvdeltafs.clisupport import (
    VERBOSE_HELP,
    Duration,
    SafeName,
    check_input,
    printable,
    run_group,
    setup_logging,
)
from lvdeltafs.errors import EXIT_STALE, LvError, Mismatch
from lvmirror.completion import volume_names
from lvmirror.compression import MODES as COMPRESS_MODES
from lvmirror.config import ConfigError

log = logging.getLogger("lvmirror")

DRY_RUN_HELP = "Say what would be sent and how much; keep no snapshot, write nothing."
NAME = SafeName()  # refused if it holds control characters; shown escaped in every message
CONFIG_HELP = "Configuration file (default: $LVMIRROR_CONFIG, else /etc/lvmirror/lvmirror.toml)."
BWLIMIT_HELP = ("Cap the bytes sent per second for this run (12M, 500k, 1.5G: binary units; or plain "
                "bytes), over the config's bwlimit; 0 lifts the cap.")


class Rate(click.ParamType):
    """A --bwlimit value: bytes per second, 0 for no cap (the option not given: the config decides)."""

    name = "rate"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from lvmirror.bwlimit import parse_rate
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value)
        try:
            return parse_rate(text) or 0
        except ValueError as e:
            self.fail(f"{printable(text)}: {e}", param, ctx)


bwlimit_option = click.option("--bwlimit", type=Rate(), metavar="RATE", help=BWLIMIT_HELP)
compress_option = click.option("--compress", type=click.Choice(COMPRESS_MODES),
                               help="Compress the stream: auto, off, zlib or zstd, over the config's "
                                    "`compress`.")
ssh_transport_option = click.option(
    "--ssh-transport", type=click.Choice(["paramiko", "openssh"]), default="paramiko", show_default=True,
    help="How to reach an ssh:// DEST: paramiko, or the system's OpenSSH ssh client (same key, same "
    "known_hosts, strict host key checking).")


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


def _locked(ctx: click.Context, name: str, job: Callable[..., object], *, record: str = "",
            bwlimit: int | None = None, compress: str | None = None,
            multi: Callable[..., object] | None = None, **kwargs: object) -> object:
    """Run one pipeline for one volume under its lock.

    ``record``: the command to keep in the volume's record of runs (:mod:`lvmirror.runlog`), which
    `status` and the metrics file read; a dry run records nothing, nor a run that found the lock held.
    ``bwlimit``: --bwlimit, over the volume's configured cap for this run (0 lifts it; None keeps it);
    ``compress``: --compress, over the volume's configured mode (None keeps it);
    ``multi``: the job for a volume with several destinations (lvmirror.multisync), recorded per destination.
    """
    import dataclasses

    from lvmirror import runlog
    from lvmirror.lock import volume_lock
    cfg = _config(ctx)
    vol = cfg.volume(name)
    if bwlimit is not None:
        vol = dataclasses.replace(vol, bwlimit=bwlimit or None)
    if compress is not None:
        vol = dataclasses.replace(vol, compress=compress)
    with volume_lock(cfg.lock_dir, vol.name):
        if multi is not None and vol.several:
            try:
                return _run_multi(vol, multi, record, bool(kwargs.get("dry_run")))
            finally:
                if not kwargs.get("dry_run"):
                    _metrics(ctx)
        if not record or kwargs.get("dry_run"):
            return job(vol, **kwargs)
        try:
            with runlog.recording(vol.name, vol.work_dir, record) as run:
                outcome = job(vol, **kwargs)
                run.outcome(outcome)  # every recorded job returns a pipelines.Outcome
                return outcome
        finally:
            _metrics(ctx)


def _run_multi(vol, job: Callable[..., object], command: str, dry_run: bool) -> object:
    """init or sync of a volume with several destinations: each destination's run recorded on its own.

    The others are done whatever one does; if any failed, the exit code is the first failure's.
    """
    from lvdeltafs.clisupport import exit_status
    from lvmirror import runlog
    from lvmirror.multisync import DestinationsFailed
    from lvmirror.progress import human
    recs = {} if dry_run else {v.record_name: runlog.Recording(v.record_name, v.work_dir, command)
                               for v in vol.views()}
    try:
        result = job(vol, dry_run=dry_run)
    except BaseException as e:  # before any destination was worked on (no source volume, ...)
        for rec in recs.values():
            rec.finish(*exit_status(e))
        raise
    for run in result.runs:
        rec = recs.get(run.view.record_name)
        if run.outcome is not None:
            run.outcome.source_bytes_read = result.source_bytes_read
            _report(run.outcome)
        if rec is None or run.skipped:
            continue  # a destination an init left alone: nothing was done to it
        if run.error is not None:
            rec.holding(run.holds)
            rec.finish(*exit_status(run.error))
        else:
            rec.outcome(run.outcome)
            rec.finish(0)
    if result.snapshot:
        log.info("%s: %s %s of the new snapshot for %d destinations", vol.name,
                 "would read" if dry_run else "read", human(result.source_bytes_read),
                 sum(r.outcome is not None for r in result.runs))
    failed = result.failed
    if failed:
        first = failed[0]
        code, why = exit_status(first.error)
        done = [r.view.destination.raw for r in result.runs if r.outcome is not None]
        raise DestinationsFailed(
            f"{vol.name}: {len(failed)} of {len(result.runs)} destinations failed: "
            + "; ".join(f"{r.view.destination.raw}: {exit_status(r.error)[1]}" for r in failed)
            + (f" (done: {', '.join(done)})" if done else ""), code)
    return result


def _views(ctx: click.Context, name: str, dest: str | None) -> list:
    """The destinations of a volume a command works on: every one, or the one --dest names."""
    from lvmirror.config import parse_destination
    vol = _config(ctx).volume(name)
    if dest is None:
        return vol.views()
    return [vol.view(parse_destination(dest, f"--dest {printable(dest)}"))]


def _one_view(ctx: click.Context, volume: str, dest: str | None):
    """The view of VOLUME's one destination (--dest); a volume with several must name it."""
    vol = _config(ctx).volume(volume)
    if vol.several and not dest:
        raise click.UsageError(f"{volume} has {len(vol.destinations)} destinations: name the one with "
                               "--dest (" + ", ".join(printable(d.raw) for d in vol.destinations) + ")")
    (view,) = _views(ctx, volume, dest) if dest else [vol]
    return view


def _metrics(ctx: click.Context, *, now: bool = False) -> None:
    """Rewrite the metrics file (if configured) after a run; `sync --all` writes it once, at its end."""
    if ctx.obj.get("metrics_later") and not now:
        ctx.obj["metrics_due"] = True
        return
    from lvmirror import metrics
    metrics.write_quietly(_config(ctx))


def _report(outcome) -> None:
    if not hasattr(outcome, "notes"):
        return  # several destinations: each one's outcome was reported as it was recorded
    for note in outcome.notes:
        log.info("%s: %s", outcome.volume, note)
    if outcome.dry_run:
        click.echo(outcome.summary())
    else:
        log.info("%s", outcome.summary())


@cli.command()
@click.argument("volume", type=NAME, shell_complete=volume_names)
@click.option("-n", "--dry-run", is_flag=True, help=DRY_RUN_HELP)
@bwlimit_option
@compress_option
@click.pass_context
def init(ctx: click.Context, volume: str, dry_run: bool, bwlimit: int | None = None,
         compress: str | None = None) -> None:
    """First full copy of VOLUME to its destination (zero runs skipped)."""
    from lvmirror import multisync, pipelines
    _report(_locked(ctx, volume, pipelines.init, record="init", bwlimit=bwlimit, compress=compress,
                    multi=multisync.init, dry_run=dry_run))


@cli.command()
@click.argument("volume", type=NAME, required=False, shell_complete=volume_names)
@click.option("-a", "--all", "all_", is_flag=True, help="Every configured volume, one after another.")
@click.option("--initial", is_flag=True, help="The same as `lvmirror init VOLUME`.")
@click.option("--check", "check_", is_flag=True, help="The same as `lvmirror check VOLUME`.")
@click.option("--repair", is_flag=True, help="With --check: send the blocks that differ.")
@click.option("--dest", type=NAME, metavar="DEST",
              help="With --check: only this one of VOLUME's destinations.")
@click.option("-n", "--dry-run", is_flag=True, help=DRY_RUN_HELP)
@bwlimit_option
@compress_option
@click.pass_context
def sync(ctx: click.Context, volume: str | None, all_: bool, initial: bool, check_: bool, repair: bool,
         dry_run: bool, bwlimit: int | None, compress: str | None, dest: str | None = None) -> None:
    """Bring VOLUME's destination (or --all) up to a new snapshot, sending only what changed."""
    if bool(volume) == all_:
        raise click.UsageError("name one VOLUME or give --all")
    if initial and check_:
        raise click.UsageError("--initial and --check exclude each other")
    if repair and not check_:
        raise click.UsageError("--repair goes with --check")
    if dest and not (check_ and volume):
        raise click.UsageError("--dest goes with --check and one VOLUME")
    names = sorted(_config(ctx).volumes) if all_ else [volume]
    if not names:
        raise ConfigError(f"{_config(ctx).path}: no [volume.NAME] tables, so --all has nothing to sync")
    failures: list[LvError] = []
    ctx.obj["metrics_later"] = all_  # one metrics file for the whole round, written at its end
    try:
        for name in names:
            try:
                if check_:
                    ctx.invoke(check, volume=name, repair=repair, bwlimit=bwlimit, compress=compress,
                               dest=dest)
                elif initial:
                    ctx.invoke(init, volume=name, dry_run=dry_run, bwlimit=bwlimit, compress=compress)
                else:
                    from lvmirror import multisync, pipelines
                    _report(_locked(ctx, name, pipelines.sync, record="sync", bwlimit=bwlimit,
                                    compress=compress, multi=multisync.sync, dry_run=dry_run))
            except LvError as e:
                if not all_:
                    raise
                log.error("%s: %s", name, e)
                failures.append(e)
    finally:
        if ctx.obj.pop("metrics_due", False):
            _metrics(ctx, now=True)
    if failures:
        log.error("%d of %d volumes failed", len(failures), len(names))
        sys.exit(failures[0].exit_code)


@cli.command()
@click.argument("volume", type=NAME, shell_complete=volume_names)
@click.option("--repair", is_flag=True, help="Send just the blocks that differ, from the snapshot.")
@click.option("--dest", type=NAME, metavar="DEST",
              help="Only this one of VOLUME's destinations (default: each).")
@bwlimit_option
@compress_option
@click.pass_context
def check(ctx: click.Context, volume: str, repair: bool, bwlimit: int | None = None,
          compress: str | None = None, dest: str | None = None) -> None:
    """Compare VOLUME's destinations with the snapshot each should hold; exit 6 on differences.

    Prints the ranges that differ, one per line: OFFSET LENGTH data|zero
    (after a line `# DEST` when the volume has several destinations).
    """
    views = _views(ctx, volume, dest)
    if not _config(ctx).volume(volume).several:
        _locked(ctx, volume, _check, record="repair" if repair else "check", bwlimit=bwlimit,
                compress=compress, repair=repair)
        return
    _locked(ctx, volume, _check_each, bwlimit=bwlimit, compress=compress, views=views,
            record_as="repair" if repair else "check", repair=repair)


def _check_each(vol, *, views: list, record_as: str, repair: bool) -> None:
    """`check` of several destinations, one after another under the volume's lock, each recorded apart."""
    import dataclasses

    from lvdeltafs.clisupport import exit_status
    from lvmirror import runlog
    from lvmirror.multisync import DestinationsFailed
    failed = []
    for view in views:
        # --bwlimit and --compress were applied to vol: carried to each view.
        view = dataclasses.replace(view, bwlimit=vol.bwlimit, compress=vol.compress)
        sys.stdout.write(f"# {view.destination.raw}\n")
        try:
            with runlog.recording(view.record_name, view.work_dir, record_as) as run:
                run.outcome(_check(view, repair=repair))
        except LvError as e:
            log.error("%s -> %s: %s", vol.name, view.destination.raw, e)
            failed.append((view, e))
    if failed:
        raise DestinationsFailed(f"{vol.name}: {len(failed)} of {len(views)} destinations failed the check: "
                                 + "; ".join(f"{v.destination.raw}: {exit_status(e)[1]}" for v, e in failed),
                                 failed[0][1].exit_code)


def _check(vol, *, repair: bool):
    """`check` under the volume's lock, so that differences found are recorded as this run's failure."""
    from lvdeltafs.extents import format_ranges
    from lvmirror import pipelines
    volume = pipelines.label(vol)
    result, repaired = pipelines.check(vol, repair=repair)
    if result.ok:
        log.info("%s: destination matches snapshot %s (%d bytes)", volume, result.snapshot,
                 result.checked_bytes)
        return pipelines.Outcome(volume, "check", result.snapshot)
    sys.stdout.write(format_ranges(result.mismatched))
    what = (f"{len(result.mismatched)} ranges ({result.mismatched.data_bytes + result.mismatched.zero_bytes} "
            f"bytes) differ from snapshot {result.snapshot}")
    if repaired is None:
        dest = f" --dest {vol.destination.raw}" if vol.dest_key else ""
        raise Mismatch(f"{volume}: {what}; `lvmirror check --repair{dest} {vol.name}` sends just those")
    log.warning("%s: %s; repaired", volume, what)
    _report(repaired)
    return repaired


@cli.command()
@click.argument("volumes", type=NAME, nargs=-1, shell_complete=volume_names)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document on stdout (its schema: docs/status-json.md).")
@click.option("--max-age", type=Duration(), metavar="DURATION",
              help="Exit 2 naming each volume whose last good sync is older than DURATION "
              "(90m, 26h, 2d, 1w, or seconds), or that has none: a Nagios/Icinga check as it is.")
@click.pass_context
def status(ctx: click.Context, volumes: tuple[str, ...], as_json: bool, max_age: int | None) -> None:
    """Each volume's base snapshot, COW use, destination state, last sync, last failure.

    Exits 1 if a volume has a problem (its last run failed, among others), 2 with --max-age if one is stale.
    """
    import json
    import time

    from lvmirror import status as report
    cfg = _config(ctx)
    names = volumes or tuple(sorted(cfg.volumes))
    statuses = []
    for name in names:
        st = report.status(cfg.volume(name))
        statuses.append(st)
        if not as_json and max_age is None:
            click.echo(_status_text(st))  # as each is known: a far destination may take a while
    now = time.time()
    if as_json:
        click.echo(json.dumps(report.as_json(statuses, now, max_age), indent=2))
    elif max_age is not None:
        # The verdict first: a monitoring plugin's first line is its summary.
        for line in report.stale_lines(statuses, now, max_age) + [_status_text(st) for st in statuses]:
            click.echo(line)
    if max_age is not None and any(st.stale(now, max_age) for st in statuses):
        sys.exit(EXIT_STALE)
    if any(st.problems for st in statuses):
        sys.exit(1)


def _room(st) -> str:
    """How full the base snapshot's space is: its COW (classic), or its thin pool's data and metadata."""
    if st.pool:
        data = "?" if st.pool_data_percent is None else f"{st.pool_data_percent:.1f}%"
        meta = "?" if st.pool_metadata_percent is None else f"{st.pool_metadata_percent:.1f}%"
        return f", thin pool {st.pool}: data {data}, metadata {meta} used"
    return "" if st.cow_percent is None else f", COW {st.cow_percent:.1f}% full"


def _status_text(st) -> str:
    from lvmirror.status import points_summary, run_lines
    if st.dests:
        lines = [f"{st.name}: {st.source} -> {len(st.dests)} destinations"]
        for part in st.dests:
            text = _status_text(part).splitlines()
            lines.append(f"  {part.destination}:")
            lines.extend("  " + line for line in text[1:] if not line.startswith("  snapshots:"))
        if st.snapshots:
            lines.append(f"  snapshots:     {', '.join(st.snapshots)}")
        return "\n".join(lines)
    state = st.state
    lines = [f"{st.name}: {st.source} -> {st.destination}"]
    if state.get("snapshot"):
        lines.append(f"  base snapshot: {st.base or '(missing)'} {st.base_id}{_room(st)}")
        lines.append(f"  destination:   generation {state.get('generation')}, {state.get('size')} bytes, "
                     f"last sync {state.get('synced')} ({state.get('source')})")
        points = points_summary(state)
        if points and points["count"]:
            lines.append(f"  history:       {points['count']} points back to generation "
                         f"{points['oldest_generation']}, {points['undo_bytes']} bytes (`lvmirror history`)")
        if state.get("needs_check"):
            lines.append(f"  needs a check: a forced apply was made; run `lvmirror check {st.name}`")
    elif not st.problems:
        lines.append(f"  destination:   not initialised (run `lvmirror init {st.name}`)")
    lines.extend(run_lines(st))
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
@ssh_transport_option
@bwlimit_option
def apply(delta: str, dest: str, state_dir: str | None, force: bool, ssh_key: str | None,
          known_hosts: str | None, ssh_transport: str, bwlimit: int | None) -> None:
    """Apply DELTA (a delta directory or stream file) to DEST with the receiver's checks.

    DEST is an image file, a block device, or ssh://[user@]host[:port]/path.
    """
    from lvmirror import pipelines
    check_input(delta, "delta", (stat.S_IFREG, stat.S_IFDIR), missing="no such delta file or directory")
    ssh = _ssh_options(ssh_key, known_hosts, ssh_transport)
    outcome = pipelines.apply_file(delta, dest, state_dir, force=force, ssh=ssh, bwlimit=bwlimit or None)
    _report(outcome)
    if force:
        pipelines.check_after_force(outcome, dest, state_dir, ssh)


@cli.command()
@click.argument("volume", type=NAME, required=False, shell_complete=volume_names)
@click.option("--dest", type=NAME, metavar="DEST",
              help="Without VOLUME: a destination that is not in the config (as given to `apply`); with "
              "VOLUME: which of its destinations.")
@click.option("--state-dir", type=NAME, metavar="DIR",
              help="With --dest: where a block device DEST keeps its state.")
@click.option("--ssh-key", type=NAME, help="With an ssh:// --dest: the private key.")
@click.option("--known-hosts", type=NAME,
              help="With an ssh:// --dest: the known_hosts file.")
@ssh_transport_option
@click.pass_context
def discard(ctx: click.Context, volume: str | None, dest: str | None, state_dir: str | None,
            ssh_key: str | None, known_hosts: str | None, ssh_transport: str) -> None:
    """The way out of a stuck mirror: set aside what is staged for VOLUME's destination (or --dest).

    A volume with several destinations: name the one with --dest.

    Drops a staged or half-applied delta and what the state says the
    destination holds, even a damaged state; the destination is left as it is.
    The next `lvmirror sync` then resyncs it by comparing block digests.
    """
    from lvmirror import pipelines
    if not volume and not dest:
        raise click.UsageError("name one VOLUME or give --dest DEST")
    if volume:
        view = _one_view(ctx, volume, dest)
        _locked(ctx, volume, lambda _vol: pipelines.discard_volume(view))
    else:
        assert dest is not None
        pipelines.discard(dest, state_dir, _ssh_options(ssh_key, known_hosts, ssh_transport))
    log.info("%s: what was staged and recorded is set aside; the next sync resyncs by comparing block "
             "digests", f"{volume} -> {dest}" if volume and dest else volume or dest)


def _ssh_options(key: str | None, known_hosts: str | None, transport: str = "paramiko"):
    """--ssh-key and --known-hosts, each a readable regular file (a FIFO would hang the key loader)."""
    from lvmirror.transports import SshOptions
    for path, what in ((key, "ssh key"), (known_hosts, "known_hosts file")):
        if path is not None:
            check_input(path, what, (stat.S_IFREG,))
    return SshOptions(key, known_hosts, transport)


from lvmirror.cli_points import history, restore, rewind  # noqa: E402 - they use the helpers above

cli.add_command(history)
cli.add_command(rewind)
cli.add_command(restore)
main = run_group(cli, "lvmirror")
