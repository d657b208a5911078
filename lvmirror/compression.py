"""When to compress: ``compress = "off" | "zlib" | "zstd" | "auto"``, and what a dry run estimates.

``auto`` compresses with the fastest codec both ends have (zstd where both
pythons have it, else zlib: :func:`lvdeltafs.formats.codecs.best`).

``auto`` compresses only while that makes the transfer faster, which it
finds out by measuring, not by guessing: the encoder tells :meth:`Policy.observe`
how long each batch held the line (waiting for the workers to build it,
then for the link to take it), and the policy keeps the recent rate, in
uncompressed bytes per second, of each way of sending.  It sends in
runs (RUN_BYTES) the faster way and now and then tries the other for a
short run (PROBE_BYTES), because either can change: the data may stop
compressing, the link may get busy.  The way in use changes only when the
other was measured ``MARGIN`` (25%) faster: measurements are noisy, the
far side's work is not in them, and where the two are close, following
the noise costs.  A probe that loses doubles the number of runs to the
next one (up to ``MAX_INTERVAL``), so on a link where compression never
pays (a fast LAN) it costs a few percent at most; one that wins brings the
next probe close.

It starts sending raw, a short first run (``FIRST_BYTES``), and tries
compression only while the host's CPU had room to spare then (``IDLE_MIN``): when sending raw
already keeps the CPU busy (the loopback, a fast LAN, a busy host), the
CPU, not the link, is the bottleneck, and compressing could only add to it.

A local destination is a pipe, never the bottleneck, and one over ssh to a
loopback address shares this host's CPU: ``auto`` does not compress there,
and sends a version-1 stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lvdeltafs.formats import codecs

MODES = ("auto", "off", *codecs.BY_NAME)
# auto works in runs: consecutive batches sent one way.  The first SKIP_BYTES of a run are not
# measured: they were built while the run before was on the line, under its conditions (the
# encoder keeps about that much in flight).  A probe of the other way is a short run.
SKIP_BYTES = 4 << 20
PROBE_BYTES = 8 << 20
RUN_BYTES = 32 << 20
# The first run, raw, only has to show how busy the CPU is and the raw rate: short, since on a slow
# link every byte of it sent raw costs (measured: a 32 MiB first run left auto at 1.53x off over a
# 50 MB/s link, where always compressing with zstd was 1.89x).
FIRST_BYTES = SKIP_BYTES + PROBE_BYTES
# The way that is not being used must be this much faster to take over.  Measured rates are noisy,
# and the sender's measure does not see the far side's work (decompressing); over a slow link
# compressing wins by 2x or more.  (On the loopback, where both ends share the CPU, compressing was
# measured faster run by run yet took 1.08-1.17x off's time in all, with this margin or 10%: a
# receiver on this host is therefore treated as local, lvmirror.transports.on_this_host.)
MARGIN = 1.25
FIRST_INTERVAL = 2  # runs between probes at first, and after a probe wins
MAX_INTERVAL = 32
# Compressing costs CPU: while the host had less than this share of its CPU time idle during a run
# sent raw, the CPU, not the link, is the bottleneck, and compression is not even tried.
IDLE_MIN = 0.25


def host_cpu() -> tuple[int, int] | None:
    """(idle, total) CPU time of the host so far, in clock ticks (/proc/stat); None where unreadable."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu" or len(fields) < 6:
        return None
    ticks = [int(x) for x in fields[1:] if x.isdigit()]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, everything


class Policy:
    """Whether each batch is compressed.  ``compresses``: whether the stream may hold compressed records."""

    def __init__(self, mode: str, cpu: Callable[[], tuple[int, int] | None] | None = None, *,
                 codec: str = "zlib"):
        if mode not in MODES:
            raise ValueError(f"compress must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.compresses = mode != "off"
        # The codec compressed batches use: the mode's own, or for auto the one given (codecs.best).
        self.codec_name = mode if mode in codecs.BY_NAME else codec
        self.codec = codecs.BY_NAME[self.codec_name]
        # Measured rates (uncompressed bytes per second) of each way, from its latest run.
        self.rate: dict[bool, float | None] = {True: None, False: None}
        self._measured: dict[bool, list[float]] = {True: [0, 0.0, -1], False: [0, 0.0, -1]}  # bytes, s, run
        # auto starts with a short run sent raw (FIRST_BYTES), to see how busy the CPU is then and the
        # raw rate; a probe of compression follows unless the CPU was nearly all busy.
        self.way = False
        self.run_len = self.run_left = FIRST_BYTES
        self.cpu = cpu or host_cpu
        self._cpu_mark = self.cpu() if mode == "auto" else None
        self.idle: float | None = None  # the host's idle share during the last run (None: unknown)
        self.run_no = 0
        self.probing = False
        self.interval = FIRST_INTERVAL
        self.runs_since_probe = 0
        self.sent = {True: 0, False: 0}  # uncompressed bytes sent each way (for the report)

    @classmethod
    def off(cls) -> Policy:
        return cls("off")

    def choose(self, nbytes: int = 1 << 20) -> tuple[bool, int, int]:
        """(compress the next batch of ``nbytes``?, its run, its place in the run in bytes)."""
        if self.mode != "auto":
            return self.compresses, 0, 0
        if self.run_left <= 0:
            self._next_run()
        place = self.run_len - self.run_left
        self.run_left -= nbytes
        return self.way, self.run_no, place

    def observe(self, compressed: bool, run: int, place: int, raw: int, seconds: float) -> None:
        """A batch of ``raw`` data bytes, the ``place``-th byte of run ``run``, held the line ``seconds``."""
        self.sent[compressed] += raw
        if self.mode != "auto" or raw == 0 or place < SKIP_BYTES:
            return
        got = self._measured[compressed]
        if got[2] != run:
            got[:] = [0, 0.0, run]  # a new run of this way: its rate replaces the last one's
        got[0] += raw
        got[1] += seconds
        self.rate[compressed] = got[0] / max(got[1], 1e-9)

    def _measure_cpu(self) -> None:
        now = self.cpu()
        if now is not None and self._cpu_mark is not None and now[1] > self._cpu_mark[1]:
            self.idle = (now[0] - self._cpu_mark[0]) / (now[1] - self._cpu_mark[1])
        else:
            self.idle = None
        self._cpu_mark = now

    def _cpu_bound(self) -> bool:
        """Was the CPU nearly all busy during a raw run that just ended?  Then compressing cannot help."""
        return not self.way and self.idle is not None and self.idle < IDLE_MIN

    def _next_run(self) -> None:
        self.run_no += 1
        self._measure_cpu()
        if self.rate[True] is None:  # compression not measured yet: try it, unless the CPU is the limit
            self.way = not self._cpu_bound()
            self.probing = self.way  # a probe against raw: it must win by MARGIN
            self.run_len = self.run_left = PROBE_BYTES if self.way else RUN_BYTES
            return
        if self.rate[False] is None:
            self.way, self.probing = False, False
            self.run_len = self.run_left = PROBE_BYTES
            return
        best = self._best()
        if self.probing:  # the probe just ended: did the other way win?
            self.interval = FIRST_INTERVAL if best == self.way else min(self.interval * 2, MAX_INTERVAL)
            self.runs_since_probe = 0
            self.probing = False
        elif self.runs_since_probe >= self.interval and not (self._cpu_bound() and not best):
            self.way, self.probing = not best, True
            self.run_len = self.run_left = PROBE_BYTES
            return
        self.runs_since_probe += 1
        self.way = best
        self.run_len = self.run_left = RUN_BYTES

    def _best(self) -> bool:
        """Compress from now on?  The way in use (before a probe: the way probed against) stays unless the
        other was measured MARGIN times faster."""
        comp, raw = self.rate[True], self.rate[False]
        assert comp is not None and raw is not None
        incumbent = not self.way if self.probing else self.way
        return not raw > MARGIN * comp if incumbent else comp > MARGIN * raw

    def describe(self) -> str:
        """One line for the log: how the bytes went."""
        if not self.compresses:
            return "compression off"
        total = self.sent[True] + self.sent[False]
        share = 100 * self.sent[True] / total if total else 0
        how = f"{self.mode} ({self.codec_name})" if self.mode == "auto" else self.mode
        return f"compress={how}: {share:.0f}% of the data went through the compressor"


def choose_mode(configured: str, *, local: bool, far_codecs: list[str]) -> str:
    """The mode to run: ``auto`` on a local pipe is off; a codec one of the ends lacks falls back to off."""
    if configured == "auto":
        return "off" if local or codecs.best(far_codecs) is None else "auto"
    if configured != "off" and (configured not in far_codecs or configured not in codecs.available()):
        return "off"
    return configured


def policy_for(configured: str, *, local: bool, far_codecs: list[str]) -> Policy:
    """The policy for one link: :func:`choose_mode`'s mode, auto with the best codec both ends have."""
    mode = choose_mode(configured, local=local, far_codecs=far_codecs)
    return Policy(mode, codec=codecs.best(far_codecs) or "zlib")


def sample_ratio(ranges: Iterable[tuple[int, int]], total: int, read: Callable[[int, int], bytes], *,
                 codec: int = codecs.ZLIB, sample_bytes: int = 32 << 20,
                 piece: int = 1 << 20) -> float | None:
    """Compressed size over raw size of about ``sample_bytes``, read in pieces spread over the data.

    ``ranges`` gives (offset, length) of the data ranges in order, ``total``
    their sum; a piece is taken every ``total / (sample_bytes / piece)``
    bytes, so the sample covers the whole delta, not its first ranges.
    None when there is no data.
    """
    if total <= 0:
        return None
    step = max(piece, total // max(1, sample_bytes // piece))
    raw = packed = 0
    at = next_take = 0  # positions in the data ranges laid end to end
    for off, n in ranges:
        while next_take < at + n:
            rel = next_take - at
            size = min(piece, n - rel)
            out = codecs.compress(read(off + rel, size), codec)
            raw += size
            packed += size if out is None else len(out)
            next_take += step
        at += n
    return packed / raw if raw else None
