"""The Prometheus textfile (``metrics_file``): each volume's last runs, for node_exporter to read.

Written after every run that is not a dry run (init, sync, check, repair;
once at the end of ``sync --all``), and regenerated whole from every configured
volume's run records (:mod:`lvmirror.runlog`): one volume's run never drops
another's series.  It is replaced atomically, a temporary file beside it
renamed over it, as node_exporter asks (the collector reads only ``*.prom``
files, so it never sees the temporary ``.NAME.*.tmp``).  Mode 0644 whatever
the umask: the file holds counts and times, no data, and the collector runs
as another user.  Its format is Prometheus' text exposition format, version
0.0.4; the metric names are listed in README.md, "Monitoring".

A failure to write it is a warning: the run's own result and exit code stand.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from lvdeltafs.clisupport import exit_status
from lvdeltafs.errors import BadInput, Busy, LvError, Refused
from lvdeltafs.fsio import Folder, Locked, UnsafePath
from lvmirror import runlog
from lvmirror.config import Config, VolumeConfig
from lvmirror.lock import ENV_LOCK_DIR

if TYPE_CHECKING:
    from lvmirror.status import VolumeStatus

log = logging.getLogger(__name__)

# Runs writing the file one at a time; no volume's lock can have this name (they cannot start with ".").
LOCK_NAME = ".metrics.lock"
LOCK_WAIT = 60.0

# name, HELP text; every family is a gauge, labelled by volume (the thin pool ones by pool too; those of a
# volume with several destinations by destination too).
FAMILIES: dict[str, str] = {
    "lvmirror_last_success_timestamp_seconds":
        "When the last successful init or sync of the volume finished (Unix time; 0: none recorded).",
    "lvmirror_last_success_duration_seconds": "How long the last successful init or sync took.",
    "lvmirror_last_success_sent_bytes": "Data bytes the last successful init or sync sent (zeros cost none).",
    "lvmirror_last_success_resumed_bytes":
        "Stream bytes the last successful init or sync did not send again: the destination held them "
        "verified from an interrupted run.",
    "lvmirror_last_success_marked_bytes":
        "Data bytes the snapshot marked changed for the last successful init or sync (before exact).",
    "lvmirror_last_success_differed_bytes":
        "Of those, bytes that differed from the base and were sent as data (after exact).",
    "lvmirror_last_success_wire_bytes":
        "What those data bytes took in the stream, after compression.",
    "lvmirror_generation": "The destination's generation after the last successful init or sync.",
    "lvmirror_last_run_timestamp_seconds": "When the last run (init, sync, check, repair) finished.",
    "lvmirror_last_run_duration_seconds": "How long the last run took.",
    "lvmirror_last_run_exit_code": "The last run's exit code (0: success; README.md, Exit codes).",
    "lvmirror_last_failure_timestamp_seconds": "When the last failed run finished (Unix time).",
    "lvmirror_last_sync_base_cow_ratio":
        "How full (0-1) a classic base snapshot's COW space was when the last successful sync replaced it.",
    "lvmirror_snapshot_cow_ratio":
        "How full (0-1) the classic base snapshot's COW space was when this file was written.",
    "lvmirror_thin_pool_data_ratio":
        "How full (0-1) the thin pool's data space was when this file was written.",
    "lvmirror_thin_pool_metadata_ratio":
        "How full (0-1) the thin pool's metadata space was when this file was written.",
}

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, list[tuple[Labels, float]]]
SpaceOf = Callable[[VolumeConfig, str], "VolumeStatus | None"]


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(samples: Samples) -> str:
    """The text of the file: each family once, HELP and TYPE before its samples; empty families left out."""
    out = []
    for name, help_text in FAMILIES.items():
        rows = samples.get(name)
        if not rows:
            continue
        out.append(f"# HELP {name} {escape_help(help_text)}")
        out.append(f"# TYPE {name} gauge")
        for labels, value in rows:
            text = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels)
            out.append(f"{name}{{{text}}} {format_value(value)}")
    return "\n".join(out) + "\n"


def lvm_space(vol: VolumeConfig, base_id: str) -> VolumeStatus | None:
    from lvmirror.status import local_space  # the LVM adapter, only when the file is written
    return local_space(vol, base_id)


def collect(cfg: Config, space: SpaceOf = lvm_space) -> Samples:
    """Every configured volume's series, from its run records and (guarded) its base snapshot's room."""
    samples: Samples = {name: [] for name in FAMILIES}

    def add(name: str, vol: str, value: float | None, *extra: tuple[str, str]) -> None:
        if value is not None:
            samples[name].append(((("volume", vol), *extra), value))

    for name in sorted(cfg.volumes):
        for vol in cfg.volumes[name].views():
            # A volume with several destinations: each one's series, told apart by a destination label.
            dest = (("destination", vol.destination.raw),) if vol.dest_key else ()
            _collect_one(vol, dest, add, space)
    return samples


def _collect_one(vol: VolumeConfig, dest: Labels, add: Callable[..., None], space: SpaceOf) -> None:
    name = vol.name
    runs = runlog.read(vol.record_name, vol.work_dir)
    if runs.problem:
        log.warning("%s: %s", vol.record_name, runs.problem)
    good, last, bad = runs.last_success, runs.last_run, runs.last_failure
    # Always there, 0 when unknown: an alert on its age then fires for a volume never synced too.
    add("lvmirror_last_success_timestamp_seconds", name, good.finished if good else 0, *dest)
    if good is not None:
        add("lvmirror_last_success_duration_seconds", name, good.duration, *dest)
        add("lvmirror_last_success_sent_bytes", name, good.bytes_sent, *dest)
        add("lvmirror_last_success_resumed_bytes", name, good.resumed_bytes, *dest)
        add("lvmirror_last_success_marked_bytes", name, good.marked_bytes, *dest)
        add("lvmirror_last_success_differed_bytes", name, good.differed_bytes, *dest)
        add("lvmirror_last_success_wire_bytes", name, good.wire_bytes, *dest)
        add("lvmirror_generation", name, good.generation, *dest)
        add("lvmirror_last_sync_base_cow_ratio", name,
            None if good.base_cow_percent is None else good.base_cow_percent / 100, *dest)
    if last is not None:
        add("lvmirror_last_run_timestamp_seconds", name, last.finished, *dest)
        add("lvmirror_last_run_duration_seconds", name, last.duration, *dest)
        add("lvmirror_last_run_exit_code", name, last.exit_code, *dest)
    if bad is not None:
        add("lvmirror_last_failure_timestamp_seconds", name, bad.finished, *dest)
    # What the destination holds: the last run's snapshot, else the last good sync's.
    base = next((r.snapshot for r in (last, good) if r is not None and r.snapshot), "")
    if base:
        _add_space(add, vol, base, space, dest)


def _add_space(add: Callable[..., None], vol: VolumeConfig, base: str, space: SpaceOf,
               dest: Labels = ()) -> None:
    try:
        st = space(vol, base)
    except (LvError, OSError) as e:
        log.warning("%s: the metrics leave out its snapshot's COW and thin pool use: %s", vol.name,
                    exit_status(e)[1])
        return
    if st is None:
        return
    add("lvmirror_snapshot_cow_ratio", vol.name, None if st.cow_percent is None else st.cow_percent / 100,
        *dest)
    if st.pool:
        for which, used in (("data", st.pool_data_percent), ("metadata", st.pool_metadata_percent)):
            add(f"lvmirror_thin_pool_{which}_ratio", vol.name, None if used is None else used / 100,
                ("pool", st.pool), *dest)


def write(cfg: Config, space: SpaceOf = lvm_space) -> None:
    """Regenerate ``cfg.metrics_file`` from every volume's records; one writer at a time."""
    if not cfg.metrics_file:
        return
    directory, name = os.path.split(cfg.metrics_file)
    lock_dir = os.environ.get(ENV_LOCK_DIR) or cfg.lock_dir
    try:
        with Folder(lock_dir, create=True) as locks:
            fd = locks.lock(LOCK_NAME, wait=LOCK_WAIT)
        try:
            text = render(collect(cfg, space))
            # Not created: node_exporter's folder is made by its package, readable by the collector.
            with Folder(directory) as folder:
                folder.replace(name, text.encode(), 0o644)  # 0644 under cron's or systemd's umask too
        finally:
            os.close(fd)
    except Locked as e:
        raise Busy(f"another lvmirror run has been writing the metrics file for {LOCK_WAIT:g} s "
                   f"({e.path}); this run's record is kept, and the next run writes it") from None
    except UnsafePath as e:
        raise Refused(f"the folder of metrics_file is unsafe: {e}") from None
    except FileNotFoundError as e:
        if e.filename not in (directory, os.path.abspath(directory)):
            raise
        raise BadInput(f"metrics_file {cfg.metrics_file}: its folder {directory} does not exist: create it "
                       "(node_exporter's textfile collector reads the folder its --collector.textfile."
                       "directory names)") from None


def write_quietly(cfg: Config, space: SpaceOf = lvm_space) -> None:
    """:func:`write`, a failure only warned about: the run's result and exit code stand."""
    try:
        write(cfg, space)
    except (LvError, OSError) as e:
        log.warning("could not write the metrics file (the run's result stands): %s", exit_status(e)[1])
