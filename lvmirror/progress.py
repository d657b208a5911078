"""Progress on a terminal: bytes done, rate and time left; silent under cron and systemd."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

REFRESH = 0.5  # seconds between redraws


def human(n: float) -> str:
    """Bytes in binary units, e.g. ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts bytes; draws one self-overwriting line on stderr when it is a terminal.

    ``update`` may be called from worker threads (block digests are computed
    on several), so the count is kept under a lock.  ``cap``: the bandwidth cap
    in bytes per second, shown beside the rate so a slow transfer explains itself.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 cap: int | None = None):
        self.label = label
        self.total = total
        self.cap = cap
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._drawn = False

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._last >= REFRESH:
                self._last = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-6, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        text = f"{self.label}: {human(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f" of {human(self.total)} ({pct:.0f}%)"
        text += f", {human(rate)}/s"
        if self.cap:
            text += f" (cap {human(self.cap)}/s)"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {_duration((self.total - self.done) / rate)} left"
        return text

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + self.line(now))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
