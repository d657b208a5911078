"""The bandwidth cap: the token bucket on a fake clock, the rate parser, the config key, --bwlimit,
the progress line, the dry run's estimate, and the cap wired into the one send loop.

No timing here: the bucket's clock and sleep are injected, so every rate below
is computed from a fake clock that only moves when the code under test sleeps
or the test says time passed.  The real link is tests/ssh/test_bwlimit_link.py.
"""

from __future__ import annotations

import logging
import random
import textwrap

import numpy as np
import pytest

from lvmirror import cli, pipelines
from lvmirror import config as cfg
from lvmirror.bwlimit import MIN_BURST, TokenBucket, estimate, parse_rate
from lvmirror.config import ConfigError
from lvmirror.progress import Progress
from lvmirror.transports import LocalTransport
from tests.harness import V1, BytesSource, assert_clean_exit, delta, run_cli, sha, sha_file

MiB = 1 << 20


class FakeClock:
    """A clock that moves only when slept on or told to; each sleep is kept (with ``over``: overslept)."""

    def __init__(self, over: float = 0.0, extra: float = 0.0):
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.over, self.extra = over, extra

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds * (1 + self.over) + self.extra

    def bucket(self, rate: int) -> TokenBucket:
        return TokenBucket(rate, clock=self, sleep=self.sleep)


def released(bucket: TokenBucket, clock: FakeClock, sizes: list[int], work: float = 0.0,
             seed: int = 1) -> list[tuple[float, int]]:
    """(time, bytes) of each take as it returns; between takes the "write" takes up to ``work`` s."""
    rnd = random.Random(seed)
    out = []
    for n in sizes:
        bucket.take(n)
        out.append((clock.now, n))
        clock.now += rnd.uniform(0, work)
    return out


def rate_of(events: list[tuple[float, int]], start: float) -> float:
    return sum(n for _, n in events) / (events[-1][0] - start)


# ---- the token bucket ---------------------------------------------------------------------


def test_burst_is_fifty_milliseconds_of_data_but_never_below_64_kib():
    clock = FakeClock()
    assert clock.bucket(12 * MiB).burst == 12 * MiB // 20
    assert clock.bucket(MiB).burst == MIN_BURST == 64 << 10
    with pytest.raises(ValueError):
        clock.bucket(0)


@pytest.mark.parametrize("rate", [4 * MiB, 12 * MiB, 200 << 10, 1 << 30])
@pytest.mark.parametrize("work", [0.0, 0.01])
def test_the_rate_holds_over_many_takes_within_one_percent(rate, work):
    clock = FakeClock()
    bucket = clock.bucket(rate)
    start = clock.now
    rnd = random.Random(rate)
    sizes = [rnd.randint(1, bucket.burst) for _ in range(3000)]
    events = released(bucket, clock, sizes, work=min(work, bucket.burst / rate / 2))
    assert rate_of(events, start) == pytest.approx(rate, rel=0.01)


def test_oversleeping_is_not_lost():
    # A real sleep returns late; the debt each take pays up front means the next take is
    # credited with the time that really passed, so the rate still holds.
    clock = FakeClock(over=0.2, extra=0.001)
    bucket = clock.bucket(4 * MiB)
    start = clock.now
    events = released(bucket, clock, [bucket.burst] * 2000)
    assert rate_of(events, start) == pytest.approx(4 * MiB, rel=0.01)


def test_no_window_ever_sees_more_than_one_burst_over_the_rate():
    clock = FakeClock()
    bucket = clock.bucket(4 * MiB)
    rnd = random.Random(7)
    # Pauses as long as a second let the bucket fill: the bound must hold right after them too.
    sizes = [rnd.choice([4096, 65536, bucket.burst, 3 * bucket.burst]) for _ in range(600)]
    events = []
    for n in sizes:
        bucket.take(n)
        events.append((clock.now, n))
        clock.now += rnd.choice([0.0, 0.0, 0.003, 1.0])
    times = np.array([t for t, _ in events])
    sums = np.concatenate([[0], np.cumsum([n for _, n in events])])
    # Bytes released at times t_i..t_j, against what the bucket allows over t_j - t_i.
    i, j = np.triu_indices(len(events))
    sent = sums[j + 1] - sums[i]
    allowed = bucket.burst + 4 * MiB * (times[j] - times[i])
    # A take of three bursts is paid in instalments but handed back whole: count it at its end.
    big = 3 * bucket.burst
    assert (sent <= allowed + big).all()
    singles = np.array([n for _, n in events]) <= bucket.burst
    ok = singles[i] & singles[j]
    assert (sent[ok] <= allowed[ok] + 1e-6).all()


def test_a_take_larger_than_the_burst_is_paid_a_burst_at_a_time():
    clock = FakeClock()
    bucket = clock.bucket(4 * MiB)
    start = clock.now
    bucket.take(10 * bucket.burst)
    # The first burst was in the bucket; each further one waits its own 50 ms, never longer.
    assert len(clock.sleeps) == 9
    assert all(s == pytest.approx(bucket.burst / (4 * MiB)) for s in clock.sleeps)
    assert clock.now - start == pytest.approx(9 * bucket.burst / (4 * MiB))
    assert bucket.slept == pytest.approx(clock.now - start)


def test_an_idle_sender_saves_up_one_burst_and_no_more():
    clock = FakeClock()
    bucket = clock.bucket(4 * MiB)
    bucket.take(bucket.burst)
    clock.now += 3600  # an hour of nothing
    bucket.take(bucket.burst)
    assert clock.sleeps == []
    bucket.take(bucket.burst)
    assert clock.sleeps == [pytest.approx(bucket.burst / (4 * MiB))]


def test_a_rate_change_takes_effect_from_then_on():
    clock = FakeClock()
    bucket = clock.bucket(8 * MiB)
    released(bucket, clock, [bucket.burst] * 200)
    bucket.set_rate(MiB)
    assert bucket.burst == MIN_BURST and bucket.tokens <= bucket.burst
    start = clock.now
    events = released(bucket, clock, [bucket.burst] * 500)
    assert rate_of(events, start) == pytest.approx(MiB, rel=0.01)
    with pytest.raises(ValueError):
        bucket.set_rate(-1)


# ---- the rate: parser, config, option ---------------------------------------------------------


@pytest.mark.parametrize("text, rate", [
    ("12M", 12 * MiB), ("12m", 12 * MiB), ("500k", 500 << 10), ("500K", 500 << 10),
    ("1.5G", 3 << 29), ("1000000", 1_000_000), ("2048b", 2048), ("1T", 1 << 40), (" 4M ", 4 * MiB),
    (4 * MiB, 4 * MiB), ("0", None), (0, None), ("off", None), ("OFF", None), ("0.0M", None),
])
def test_rates_are_bytes_per_second_in_lvm_units(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text, why", [
    ("-4M", "negative"), (-1, "negative"), ("12", "below the least cap"), (1023, "below"),
    ("1.5T", "more than 1 TiB/s"), ("1P", "not a rate"), ("12s", "not a rate"), ("12MB", "not a rate"),
    ("12M/s", "not a rate"), ("", "not a rate"), ("1e6", "not a rate"), ("M", "not a rate"),
    (True, "not a rate"), (1.5, "not a rate"), (None, "not a rate"), ("fast", "not a rate"),
])
def test_bad_rates_are_refused_saying_what_is_accepted(text, why):
    with pytest.raises(ValueError, match=why):
        parse_rate(text)


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "lvmirror.toml"
    path.write_text(f'[defaults]\nlock_dir = "{tmp_path}/lock"\nwork_dir = "{tmp_path}/work"\n'
                    + textwrap.dedent(body))
    path.chmod(0o600)
    return str(path)


VOLUMES = """
[volume.web]
vg = "vgnone"
lv = "web"
destination = "/srv/web.img"
{web}
[volume.db]
vg = "vgnone"
lv = "db"
destination = "/srv/db.img"
"""


def test_config_bwlimit_in_defaults_and_per_volume(tmp_path):
    c = cfg.load(write_config(tmp_path, 'bwlimit = "12M"\n' + VOLUMES.format(web='bwlimit = "off"')))
    assert (c.volume("web").bwlimit, c.volume("db").bwlimit) == (None, 12 * MiB)
    c = cfg.load(write_config(tmp_path, VOLUMES.format(web="bwlimit = 1048576")))
    assert (c.volume("web").bwlimit, c.volume("db").bwlimit) == (MiB, None)


@pytest.mark.parametrize("defaults, web, where, fragment", [
    ('bwlimit = "-1M"', "", "[defaults] bwlimit", "negative"),
    ("", 'bwlimit = "12s"', "[volume.web] bwlimit", "not a rate"),
    ("", 'bwlimit = "2T"', "[volume.web] bwlimit", "1 TiB/s"),
    ("", "bwlimit = 12", "[volume.web] bwlimit", "below the least cap"),
    ("", "bwlimit = 1.5", "[volume.web] bwlimit", "not a rate"),
    ("", "bwlimit = true", "[volume.web] bwlimit", "not a rate"),
    ("", 'bwlimit = "12M\\u001b[2J"', "[volume.web] bwlimit", "control character"),
])
def test_config_errors_name_the_file_table_and_key(tmp_path, defaults, web, where, fragment):
    path = write_config(tmp_path, defaults + "\n" + VOLUMES.format(web=web))
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    assert f"{path}: {where}" in str(err.value) and fragment in str(err.value)
    assert "\x1b" not in str(err.value)


@pytest.fixture
def seen(monkeypatch):
    """The cap each pipeline ran with, the command line's pipelines replaced by recorders."""
    caps: list[tuple[str, int | None]] = []

    def recorder(action):
        def job(vol, **kwargs):
            caps.append((action, vol.bwlimit))
            return pipelines.Outcome(vol.name, action, "snap@1", dry_run=bool(kwargs.get("dry_run")))
        return job

    def check(vol, *, repair):
        caps.append(("repair" if repair else "check", vol.bwlimit))
        return pipelines.CheckResult(vol.name, "snap@1", pipelines.Extents.empty(), 0), None

    monkeypatch.setattr(pipelines, "init", recorder("init"))
    monkeypatch.setattr(pipelines, "sync", recorder("sync"))
    monkeypatch.setattr(pipelines, "check", check)
    return caps


@pytest.mark.parametrize("args, expected", [
    (["sync", "db"], ("sync", 12 * MiB)),
    (["sync", "db", "--bwlimit", "1M"], ("sync", MiB)),
    (["sync", "db", "--bwlimit", "0"], ("sync", None)),
    (["sync", "db", "--bwlimit", "off"], ("sync", None)),
    (["sync", "web", "--bwlimit", "500k"], ("sync", 500 << 10)),
    (["sync", "db", "-n", "--bwlimit", "2M"], ("sync", 2 * MiB)),
    (["init", "db", "--bwlimit", "3M"], ("init", 3 * MiB)),
    (["sync", "db", "--initial", "--bwlimit", "3M"], ("init", 3 * MiB)),
    (["check", "db", "--repair", "--bwlimit", "2M"], ("repair", 2 * MiB)),
    (["sync", "db", "--check", "--repair", "--bwlimit", "2M"], ("repair", 2 * MiB)),
    (["check", "db"], ("check", 12 * MiB)),
])
def test_the_bwlimit_option_overrides_the_config_for_one_run(tmp_path, seen, args, expected):
    conf = write_config(tmp_path, 'bwlimit = "12M"\n' + VOLUMES.format(web=""))
    argv = ["-c", conf, *args]
    result = run_cli(cli.main, argv)
    assert_clean_exit(result, "lvmirror", argv)
    assert result.code == 0, result.output
    assert seen == [expected]


def test_sync_all_caps_every_volume(tmp_path, seen):
    conf = write_config(tmp_path, 'bwlimit = "12M"\n' + VOLUMES.format(web='bwlimit = "1M"'))
    assert run_cli(cli.main, ["-c", conf, "sync", "--all"]).code == 0
    assert run_cli(cli.main, ["-c", conf, "sync", "--all", "--bwlimit", "2M"]).code == 0
    assert seen == [("sync", 12 * MiB), ("sync", MiB), ("sync", 2 * MiB), ("sync", 2 * MiB)]


@pytest.mark.parametrize("command", [["sync", "db"], ["init", "db"], ["check", "db"],
                                     ["apply", "x", "y"]])
@pytest.mark.parametrize("bad", ["-1M", "12s", "2T", "fast", "12"])
def test_a_bad_bwlimit_option_is_a_usage_error(tmp_path, seen, command, bad):
    conf = write_config(tmp_path, VOLUMES.format(web=""))
    argv = ["-c", conf, *command, "--bwlimit", bad]
    result = run_cli(cli.main, argv)
    assert_clean_exit(result, "lvmirror", argv)
    assert result.code == 2 and "--bwlimit" in result.output and seen == []


# ---- what the user sees ------------------------------------------------------------------------


def test_the_progress_line_shows_the_cap():
    p = Progress("web: sync", 40 * MiB, enabled=False, cap=12 * MiB)
    p.update(int(11.9 * MiB))
    line = p.line(p.started + 1.0)
    assert line == "web: sync: 11.9 MiB of 40.0 MiB (30%), 11.9 MiB/s (cap 12.0 MiB/s), 0:02 left"
    assert "cap" not in Progress("web: sync", 40 * MiB, enabled=False).line()


def test_a_dry_run_says_how_long_the_transfer_takes_at_the_cap():
    out = pipelines.Outcome("web", "sync", "snap@2", 600 * MiB, 0, 12, dry_run=True, bwlimit=12 * MiB,
                            stream_bytes=600 * MiB + 4096)
    assert out.summary() == ("web: sync would send 600.0 MiB of data in 12 ranges and 0 B of zeros; "
                             "at the cap of 12.0 MiB/s sending 600.0 MiB takes about 50s")
    out.stream_bytes, out.bwlimit = 5 << 30, 1 * MiB
    assert out.summary().endswith("at the cap of 1.0 MiB/s sending 5.0 GiB takes about 1h 25m")
    out.bwlimit = None
    assert out.summary() == "web: sync would send 600.0 MiB of data in 12 ranges and 0 B of zeros"
    # Not a dry run: what was sent, never an estimate.
    done = pipelines.Outcome("web", "sync", "snap@2", MiB, 0, 1, bwlimit=MiB, stream_bytes=MiB)
    assert "cap" not in done.summary()
    assert estimate(1000, MiB) == "at the cap of 1.0 MiB/s sending 1000 B takes under a second"


# ---- the cap in the one send loop ---------------------------------------------------------------


class Recorder(TokenBucket):
    """A bucket on a fake clock that keeps every take (no real sleeping in a unit test)."""

    made: list[Recorder] = []

    def __init__(self, rate: int, **_: object):
        self.fake = FakeClock()
        super().__init__(rate, clock=self.fake, sleep=self.fake.sleep)
        self.takes: list[int] = []
        Recorder.made.append(self)

    def take(self, n: int) -> None:
        self.takes.append(n)
        super().take(n)


def test_every_delta_byte_is_paced_in_frames_of_at_most_one_burst(tmp_path, monkeypatch):
    monkeypatch.setattr("lvmirror.client.TokenBucket", Recorder)
    Recorder.made = []
    ident, blob = delta(None, V1, "", "vol@1")
    dest = tmp_path / "mirror.img"
    with LocalTransport(str(dest)) as rc:
        rc.set_bwlimit(1 * MiB)
        frames: list[int] = []
        rc.send_delta(BytesSource(blob), ident.delta_id, progress=frames.append)
        rc.apply()
        assert rc.bwlimit == MiB
    (bucket,) = Recorder.made
    assert sum(bucket.takes) == len(blob) and max(bucket.takes) <= bucket.burst == MIN_BURST
    assert frames == bucket.takes  # progress counts each frame as it goes
    # The fake clock says how long it would have taken: the cap, less the one burst it started with.
    assert bucket.fake.now - 1000.0 == pytest.approx((len(blob) - bucket.burst) / MiB)
    assert sha_file(dest) == sha(V1)


def test_no_cap_sends_as_before(tmp_path):
    ident, blob = delta(None, V1, "", "vol@1")
    with LocalTransport(str(tmp_path / "m.img")) as rc:
        rc.set_bwlimit(None)
        assert rc.bwlimit is None and rc.limit is None
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
    assert sha_file(tmp_path / "m.img") == sha(V1)


def test_apply_takes_bwlimit_on_the_command_line(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lvmirror.client")
    monkeypatch.setattr("lvmirror.client.TokenBucket", Recorder)
    Recorder.made = []
    ident, blob = delta(None, V1, "", "vol@1")
    stream = tmp_path / "delta"
    stream.write_bytes(blob)
    dest = tmp_path / "mirror.img"
    argv = ["apply", str(stream), str(dest), "--bwlimit", "2M"]
    result = run_cli(cli.main, argv)
    assert_clean_exit(result, "lvmirror", argv)
    assert result.code == 0, result.output
    assert [b.rate for b in Recorder.made] == [2 * MiB] and sum(Recorder.made[0].takes) == len(blob)
    # Off a terminal there is no progress line: the log says the cap and what it means.
    assert f"to the receiver for {dest}: at the cap of 2.0 MiB/s sending" in caplog.text, caplog.text
    assert sha_file(dest) == sha(V1)



def test_lvm_sizes_are_read_by_one_reader_whose_plain_numbers_are_mib_as_for_lvcreate():
    from lvdeltafs.lvm import size_in_bytes
    assert size_in_bytes("12") == 12 * MiB and size_in_bytes("12", default_unit="b") == 12
    assert size_in_bytes("1.5g") == size_in_bytes("1.5G") == 3 << 29
    assert size_in_bytes("3s") == 1536 and size_in_bytes("0.3k") == 307  # rounded down to whole bytes
    for bad in ("", "1.", ".5M", "1 M", "1MiB", "-1M", "1e6"):
        with pytest.raises(ValueError):
            size_in_bytes(bad)
