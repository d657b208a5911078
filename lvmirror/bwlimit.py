"""A bandwidth cap: a token bucket that paces the delta bytes sent to a receiver.

``bwlimit = "12M"`` (per volume, in ``[defaults]``, or ``--bwlimit``) is a rate
in bytes per second.  :meth:`ReceiverClient._stream_bulk
<lvmirror.client.ReceiverClient>` is the one place every delta byte leaves
through (init, sync, resync, repair, apply; local or over ssh): it asks the
bucket before each write, so the cap holds for all of them alike.

Invariants of a :class:`TokenBucket`:

- ``rate`` > 0 bytes per second; ``burst`` = max(64 KiB, rate / 20).
- ``tokens`` never exceeds ``burst``: an idle sender saves up at most one burst,
  never a backlog to catch up with.
- ``take(n)`` returns only once ``n`` bytes may go; a take larger than
  ``burst`` is paid in ``burst``-sized instalments.  So over any interval
  of length T the bytes let through are at most ``burst + rate * T``.
- A sleep that overshoots is not lost: a take pays its bytes up front (the
  tokens may go below zero, a debt) and then sleeps the debt off, so the next
  take is credited with all the time that really passed, up to one burst.
  Over many takes the rate is the cap, however coarse the sleeps.
- The clock and the sleep are injected (the unit tests drive it on a fake clock).

Why a burst of rate/20, at least 64 KiB: a burst is ~50 ms of data, so
nothing on the link sees more than a twentieth of a second's worth at once (a
queue in front of a slow link, a shaper, another flow's latency), while each
write is still large enough that the per-write cost (a syscall, an ssh
packet of up to 32 KiB, a frame header) stays negligible.  Below 1.25 MiB/s
the 64 KiB floor rules, and a burst is a little longer than 50 ms.
Callers write at most one burst per take and flush it at once, so the flow is
a steady pulse of bursts, not frame-sized gulps followed by long sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lvdeltafs.lvm import size_in_bytes
from lvmirror.progress import human

MIN_BURST = 64 << 10
BURST_PER_SECOND = 20  # burst = rate / 20: 50 ms of data
MIN_RATE = 1 << 10  # below this a cap is a typo ("12" meaning 12M): every delta would take days
MAX_RATE = 1 << 40  # 1 TiB/s: no link is faster, so more is a typo too
RATE_FORMS = ('bytes per second, as a number with an optional unit k, m, g or t (binary: "12M" is '
              '12 MiB/s), or plain bytes ("1000000"); 0 or "off" for no cap')
NEGATIVE = 'a rate cannot be negative (0 or "off" means no cap)'


def parse_rate(value: Any) -> int | None:
    """Bytes per second in ``"12M"``, ``"500k"``, ``"1.5G"``, ``"1000000"`` or an integer; None for no cap.

    Units are LVM's (lvcreate's ``-L``): k, m, g, t, either case, binary
    multiples; a plain number is bytes (not MiB, as it would be for lvcreate:
    a rate is not a volume size).  ``0``, ``"0"`` and ``"off"`` lift the cap.
    ValueError, saying what is accepted, for anything else: a negative rate,
    a unit lvmirror does not take (``s``, sectors, reads as seconds), a rate
    below 1 KiB/s or above 1 TiB/s.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a rate: use {RATE_FORMS}")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "off":
            return None
        if text.startswith("-"):
            raise ValueError(NEGATIVE)
        if text[-1:].lower() in ("s", "p", "e"):
            raise ValueError(f"not a rate: use {RATE_FORMS}")
        try:
            value = size_in_bytes(text, default_unit="b")
        except ValueError:
            raise ValueError(f"not a rate: use {RATE_FORMS}") from None
    if value < 0:
        raise ValueError(NEGATIVE)
    if value == 0:
        return None
    if value < MIN_RATE:
        raise ValueError(f"{value} bytes per second is below the least cap, 1 KiB/s (a plain number is bytes "
                         "per second: did you mean a unit, such as 12M?)")
    if value > MAX_RATE:
        raise ValueError("more than 1 TiB/s is not a cap (0 or \"off\" means no cap)")
    return value


def shown_rate(rate: float) -> str:
    """``12.0 MiB/s``."""
    return f"{human(rate)}/s"


def estimate(nbytes: int, rate: int) -> str:
    """How long sending takes at the cap: ``at the cap of 12.0 MiB/s sending 1.2 GiB takes about 1m 42s``.

    ``nbytes`` is the delta stream's size (its data and record headers; zeros
    are a header each): what would cross the link, so what the cap paces.
    """
    from lvdeltafs.clisupport import format_duration
    seconds = nbytes / rate
    took = "under a second" if seconds < 1 else f"about {format_duration(seconds)}"
    return f"at the cap of {shown_rate(rate)} sending {human(nbytes)} takes {took}"


class TokenBucket:
    """Paces one sender to ``rate`` bytes per second (see the module's invariants).

    One sending thread per bucket: the send loop calls :meth:`take` before each
    write of at most :attr:`burst` bytes.
    """

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.clock, self.sleep = clock, sleep
        self._last = clock()
        self.rate, self.burst = _sized(rate)
        self.tokens = float(self.burst)  # the first burst goes at once
        self.slept = 0.0  # seconds spent waiting, for the log

    def set_rate(self, rate: int) -> None:
        """A new cap from now on (the time already passed is credited at the old one)."""
        self._refill()
        self.rate, self.burst = _sized(rate)
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, n: int) -> None:
        """Return once ``n`` more bytes may be sent; a take over one burst is paid a burst at a time."""
        while n > 0:
            piece = min(n, self.burst)
            self._refill()
            self.tokens -= piece
            if self.tokens < 0:
                wait = -self.tokens / self.rate
                self.sleep(wait)
                self.slept += wait
            n -= piece


def _sized(rate: int) -> tuple[int, int]:
    """(rate, burst) for a cap of ``rate`` bytes per second."""
    if rate <= 0:
        raise ValueError(f"a rate must be positive, not {rate}")
    return rate, max(MIN_BURST, rate // BURST_PER_SECOND)
