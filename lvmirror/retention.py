"""The history keys of a volume's config (docs/history.md): how many points, how old, how much space.

    history_points = 7        # points kept (0: keep no history)
    history_age = "30d"       # optional: drop points older than this
    history_size = "20G"      # optional: drop the oldest points while the undo deltas take more

Retention itself runs in the receiver (:func:`lvmirror.remote.history.retained`),
which owns the undo deltas; this module only reads the keys.
"""

from __future__ import annotations

from typing import Any

from lvdeltafs.clisupport import parse_duration
from lvdeltafs.lvm import size_in_bytes
from lvmirror.destinations import ConfigError
from lvmirror.destinations import shown as shown_value
from lvmirror.remote.history import DEFAULT_POINTS, Keep

KEYS = ("history_points", "history_age", "history_size")
MAX_POINTS = 1000


def parse(merged: dict[str, Any], where: str) -> Keep:
    """The volume's retention from its merged keys; ConfigError naming the key otherwise."""
    points = merged.get("history_points", DEFAULT_POINTS)
    if isinstance(points, bool) or not isinstance(points, int) or not 0 <= points <= MAX_POINTS:
        raise ConfigError(f"{where} history_points must be a whole number from 0 (no history) to "
                          f"{MAX_POINTS}, not {shown_value(points)}")
    return Keep(points, _text(merged, "history_age", where, parse_duration),
                _text(merged, "history_size", where, lambda t: size_in_bytes(t, "m")))


def _text(merged: dict[str, Any], key: str, where: str, parse: Any) -> int:
    value = merged.get(key)
    if value is None:
        return 0
    if not isinstance(value, str):
        raise ConfigError(f"{where} {key} must be a string such as \"30d\" or \"20G\", "
                          f"not {shown_value(value)}")
    try:
        n = parse(value)
    except ValueError as e:
        raise ConfigError(f"{where} {key}: {shown_value(value)}: {e}") from None
    if n <= 0:
        raise ConfigError(f"{where} {key} must be more than 0 (leave it out for no limit)")
    return n
