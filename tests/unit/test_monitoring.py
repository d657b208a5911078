"""Monitoring: the record of runs, `status --json` and `--max-age`, and the Prometheus textfile.

No LVM here: the records, the JSON and the metrics are driven with plain
objects, and the command line runs in process against a config whose volume
group does not exist (so a sync fails at `lvs`, which is a run to record).
The textfile is read back by a parser written here from the text exposition
format's rules, not by the code that wrote it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import click
import pytest

from lvdeltafs.clisupport import Duration, format_duration, parse_duration
from lvdeltafs.errors import EXIT_STALE, CommandFailed, Mismatch
from lvmirror import cli, metrics, runlog
from lvmirror import config as cfg
from lvmirror import status as report
from lvmirror.status import VolumeStatus
from tests.exposition import parse_exposition
from tests.harness import assert_clean_exit, run_cli

DAY = 86400.0


def write_config(tmp: Path, names=("web",), metrics_file: str | None = "node/lvmirror.prom") -> Path:
    path = tmp / "lvmirror.toml"
    text = f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\n'
    if metrics_file:
        (tmp / os.path.dirname(metrics_file)).mkdir(exist_ok=True)
        text += f'metrics_file = "{tmp}/{metrics_file}"\n'
    for name in names:
        text += (f'[volume.{name}]\nvg = "vgnone"\nlv = "{name}"\ndestination = "{tmp}/{name}.img"\n'
                 'snapshot_size = "1G"\n')
    path.write_text(text)
    path.chmod(0o600)
    return path


def run(command: str, exit_code: int = 0, finished: float | None = None, **kw) -> runlog.Run:
    finished = time.time() if finished is None else finished
    return runlog.Run(command, finished - 10, finished, 10.0, exit_code, **kw)


def runs_file(work: Path, name: str = "web") -> Path:
    return work / "runs" / f"{name}.json"


# ---- the record of runs -------------------------------------------------------------------


def test_a_failure_after_a_success_keeps_both(tmp_path):
    work = str(tmp_path / "work")
    good = run("sync", finished=1000.0, action="sync", bytes_sent=4096, generation=6, snapshot="U@1",
               base_cow_percent=42.5)
    runlog.record("web", work, good)
    bad = run("sync", 5, finished=2000.0, error="lvcreate failed: Volume group vg0 has insufficient space")
    log = runlog.record("web", work, bad)
    assert (log.last_success, log.last_failure, log.last_run) == (good, bad, bad)
    assert runlog.read("web", work) == log
    # A check that passes is the last run, but not a good sync: that stays the sync's.
    checked = runlog.record("web", work, run("check", finished=3000.0, action="check"))
    assert (checked.last_success, checked.last_failure) == (good, bad)
    # The file is replaced atomically: nothing but the record is left in the folder, and it is private.
    assert sorted(os.listdir(tmp_path / "work" / "runs")) == ["web.json"]
    assert runs_file(tmp_path / "work").stat().st_mode & 0o777 == 0o600

    st = VolumeStatus("web", "vg0/web", "/m.img", runs=checked)
    doc = report.as_json([st], now=3600.0)
    vol = doc["volumes"][0]
    assert doc["schema"] == "lvmirror-status/1" and doc["max_age"] is None
    assert vol["last_success"]["finished"] == 1000.0 and vol["last_success"]["bytes_sent"] == 4096
    assert vol["last_success"]["generation"] == 6 and vol["last_success"]["ok"] is True
    assert vol["last_failure"]["exit_code"] == 5 and "insufficient space" in vol["last_failure"]["error"]
    assert vol["last_run"]["command"] == "check"
    assert (vol["last_good_sync"], vol["age"], vol["stale"]) == (1000.0, 2600.0, None)
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN or Infinity


def test_error_messages_are_one_line_and_escaped(tmp_path):
    work = str(tmp_path / "work")
    runlog.record("web", work, run("sync", 3, error="line one\nline two \x1b[2J" + "x" * 5000))
    error = runlog.read("web", work).last_failure.error
    assert "\n" not in error and "\x1b" not in error and "\\x0a" in error
    assert len(error) <= runlog.MAX_TEXT + 200


DAMAGED = [
    b"",
    b"{not json",
    b"\xff\xfe",
    b"[" * 60000,
    b"[]",
    b'{"format": "lvmirror-runs/9", "volume": "web"}',
    b'{"format": "lvmirror-runs/1", "volume": "db"}',
    b'{"format": "lvmirror-runs/1", "volume": "web", "last_run": 5}',
    b'{"format": "lvmirror-runs/1", "volume": "web", "last_run": {"command": "rm -rf"}}',
]


def _doc(**changes) -> bytes:
    good = run("sync", finished=1000.0).as_dict()
    good.update(changes)
    return json.dumps({"format": runlog.FORMAT, "volume": "web", "last_run": good, "last_success": good,
                       "last_failure": None}).encode()


DAMAGED += [_doc(started=float("nan")), _doc(finished=-1), _doc(finished=10**30), _doc(exit_code=300),
            _doc(exit_code=True), _doc(ok=False), _doc(bytes_sent="lots"), _doc(generation=-1),
            _doc(error=["a"]), _doc(base_cow_percent=250), _doc(command="check"), _doc(duration=None)]


@pytest.mark.parametrize("raw", DAMAGED)
def test_a_damaged_record_is_a_problem_not_a_traceback(tmp_path, raw):
    folder = tmp_path / "work" / "runs"
    folder.mkdir(parents=True)
    runs_file(tmp_path / "work").write_bytes(raw)
    log = runlog.read("web", str(tmp_path / "work"))
    assert log.last_run is None and log.last_success is None
    assert "damaged" in log.problem and str(folder / "web.json") in log.problem, log.problem
    assert "\n" not in log.problem and "\x1b" not in log.problem
    # The next run replaces it (and says it did).
    new = runlog.record("web", str(tmp_path / "work"), run("init"))
    assert new.last_success is not None and runlog.read("web", str(tmp_path / "work")).problem == ""


@pytest.mark.parametrize("kind", ["fifo", "dir", "symlink", "huge"])
def test_an_odd_entry_at_the_record_is_a_problem(tmp_path, kind):
    folder = tmp_path / "work" / "runs"
    folder.mkdir(parents=True)
    target = folder / "web.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(_doc())
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.write_bytes(b" " * (runlog.MAX_FILE + 1))
    log = runlog.read("web", str(tmp_path / "work"))
    assert log.problem and log.last_run is None


def test_no_record_yet_is_no_problem(tmp_path):
    assert runlog.read("web", str(tmp_path / "nowhere")) == runlog.RunLog()


# ---- staleness -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("30s", 30), ("90m", 5400), ("26h", 93600),
                                           ("2d", 172800), ("1w", 604800), (" 5m ", 300)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-5m", "1.5h", "5x", "5 m", "h", "1h30m", "9" * 13, "5M"])
def test_bad_durations_are_refused_naming_the_forms(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    with pytest.raises(click.BadParameter, match="90m, 26h, 2d, 1w|longer than 0"):
        Duration().convert(text, None, None)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (90, "1m 30s"), (3600, "1h"),
                                           (93784, "1d 2h"), (8 * DAY, "8d")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_stale_and_fresh_volumes(tmp_path):
    now = 10 * DAY
    fresh = VolumeStatus("fresh", "vg0/a", "/a.img",
                         runs=runlog.RunLog(last_success=run("sync", finished=now - 3600)))
    old = VolumeStatus("old", "vg0/b", "/b.img",
                       runs=runlog.RunLog(last_success=run("sync", finished=now - 3 * DAY)))
    never = VolumeStatus("never", "vg0/c", "/c.img")
    # No record yet (synced by an older lvmirror): the destination's own state says when.
    legacy = VolumeStatus("legacy", "vg0/d", "/d.img", state={"synced_epoch": int(now - 600)})
    statuses = [fresh, old, never, legacy]
    lines = report.stale_lines(statuses, now, 26 * 3600)
    assert lines == ["stale: old: last good sync 3d ago, at 1970-01-08 00:00:00 UTC (allowed: 1d 2h)",
                     "stale: never: no good sync recorded (allowed: 1d 2h)"]
    doc = report.as_json(statuses, now, 26 * 3600)
    assert [v["stale"] for v in doc["volumes"]] == [False, True, True, False]
    assert doc["volumes"][2]["age"] is None and doc["volumes"][3]["age"] == 600.0
    assert report.stale_lines([fresh, legacy], now, 26 * 3600) == [
        "fresh: 2 volumes, each synced within 1d 2h"]


def test_the_receivers_state_is_shown_not_trusted():
    st = VolumeStatus("web", "vg0/web", "/m.img", state={"generation": "7; rm", "size": True,
                                                         "synced_epoch": float("inf"), "needs_check": 1})
    vol = report.as_json([st], now=0.0)["volumes"][0]
    assert (vol["generation"], vol["size"], vol["synced"], vol["needs_check"]) == (None, None, None, False)


# ---- the command line -----------------------------------------------------------------------


def test_a_failed_sync_is_recorded_with_its_exit_code_and_message(tmp_path):
    conf = write_config(tmp_path)
    args = ["-c", str(conf), "sync", "web"]
    result = run_cli(cli.main, args)
    assert_clean_exit(result, "lvmirror", args)
    assert result.code != 0
    log = runlog.read("web", str(tmp_path / "work"))
    assert log.last_run == log.last_failure and log.last_success is None
    assert log.last_failure.command == "sync" and log.last_failure.exit_code == result.code
    assert f"lvmirror: error: {log.last_failure.error}" in result.output
    # A dry run records nothing.
    runs_file(tmp_path / "work").unlink()
    run_cli(cli.main, ["-c", str(conf), "sync", "-n", "web"])
    assert not runs_file(tmp_path / "work").exists()


def test_a_check_that_finds_differences_is_a_recorded_failure(tmp_path, monkeypatch):
    from lvmirror import pipelines
    conf = write_config(tmp_path)

    def differs(vol, *, repair):
        raise Mismatch(f"{vol.name}: 2 ranges (8192 bytes) differ from snapshot U@1")

    monkeypatch.setattr(pipelines, "check", differs)
    result = run_cli(cli.main, ["-c", str(conf), "check", "web"])
    assert result.code == 6
    bad = runlog.read("web", str(tmp_path / "work")).last_failure
    assert (bad.command, bad.exit_code) == ("check", 6) and "differ from snapshot" in bad.error


def _status_from_records(monkeypatch):
    # status without a receiver or LVM: what the record of runs says, no other problem.
    def fake(vol):
        st = VolumeStatus(vol.name, vol.vg_lv, vol.destination.raw)
        report.add_runs(st, vol)
        return st
    monkeypatch.setattr(report, "status", fake)


def test_max_age_is_red_for_a_stale_mirror_and_green_for_a_fresh_one(tmp_path, monkeypatch):
    _status_from_records(monkeypatch)
    conf = write_config(tmp_path, names=("db", "web"))
    work = str(tmp_path / "work")
    runlog.record("web", work, run("sync", finished=time.time() - 2 * DAY))
    runlog.record("db", work, run("sync", finished=time.time() - 600))

    red = run_cli(cli.main, ["-c", str(conf), "status", "--max-age", "26h"])
    assert red.code == EXIT_STALE == 2
    first = red.output.splitlines()[0]
    assert first.startswith("stale: web: last good sync 2d ago") and "(allowed: 1d 2h)" in first, red.output
    assert "stale: db" not in red.output

    doc = json.loads(run_cli(cli.main, ["-c", str(conf), "status", "--json", "--max-age", "1d"]).output)
    assert {v["name"]: v["stale"] for v in doc["volumes"]} == {"db": False, "web": True}
    assert doc["max_age"] == DAY

    runlog.record("web", work, run("sync", finished=time.time() - 60))
    green = run_cli(cli.main, ["-c", str(conf), "status", "--max-age", "26h"])
    assert green.code == 0 and green.output.startswith("fresh: 2 volumes"), green.output
    assert run_cli(cli.main, ["-c", str(conf), "status", "web", "--max-age", "30s"]).code == 2

    # The last run failed: a problem (1, a WARNING) while the mirror is still fresh enough.
    runlog.record("web", work, run("sync", 8, error="ssh: connection reset"))
    warn = run_cli(cli.main, ["-c", str(conf), "status", "--max-age", "26h"])
    assert warn.code == 1 and "the last run failed: sync" in warn.output and "exit code 8" in warn.output


def test_max_age_refuses_a_bad_duration(tmp_path):
    conf = write_config(tmp_path)
    args = ["-c", str(conf), "status", "--max-age", "soon"]
    result = run_cli(cli.main, args)
    assert_clean_exit(result, "lvmirror", args)
    assert result.code == 2 and "not a duration" in result.output and "26h" in result.output


def test_status_json_without_lvm_reports_problems_as_json(tmp_path):
    conf = write_config(tmp_path)
    result = run_cli(cli.main, ["-c", str(conf), "status", "--json"], timeout=60)
    assert result.code == 1
    doc = json.loads(result.output[result.output.index("{"):])
    (vol,) = doc["volumes"]
    assert vol["name"] == "web" and vol["source"] == "vgnone/web" and vol["problems"]
    assert vol["last_run"] is None and vol["generation"] is None


# ---- the Prometheus textfile ------------------------------------------------------------------




def fake_space(vol, base_id):
    if vol.name == "web":
        return VolumeStatus(vol.name, vol.vg_lv, "", base="vg0/web-lvm-1", base_id=base_id, cow_percent=12.5)
    if vol.name == "db":
        return VolumeStatus(vol.name, vol.vg_lv, "", base="vg0/db-lvm-1", base_id=base_id, pool="vg0/pool",
                            pool_data_percent=85.0, pool_metadata_percent=10.0)
    raise CommandFailed(["lvs"], 5, "Cannot process volume group vgnone")


def test_the_textfile_follows_the_exposition_format(tmp_path, caplog):
    conf = cfg.load(str(write_config(tmp_path, names=("db", "web", "gone"))))
    work = str(tmp_path / "work")
    runlog.record("web", work, run("sync", finished=1000.0, action="sync", bytes_sent=4096, generation=6,
                                   snapshot="W@1", base_cow_percent=40.0))
    runlog.record("web", work, run("sync", 5, finished=2000.0, error="lvs failed"))
    runlog.record("db", work, run("init", finished=1500.0, action="init", bytes_sent=1 << 40,
                                  generation=1, snapshot="D@1"))
    runlog.record("gone", work, run("check", finished=1600.0, action="check", snapshot="G@1"))
    old = os.umask(0o077)
    try:
        metrics.write(conf, fake_space)
    finally:
        os.umask(old)
    prom = Path(conf.metrics_file)
    assert sorted(os.listdir(prom.parent)) == ["lvmirror.prom"]  # replaced atomically: no temp left
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter reads it as another user
    fams = parse_exposition(prom.read_text())
    assert all(name.startswith("lvmirror_") for name in fams)
    assert all(f["help"] and f["type"] == "gauge" for f in fams.values())

    def value(name, volume, **extra):
        return fams[name]["samples"][(("volume", volume), *extra.items())]

    assert value("lvmirror_last_success_timestamp_seconds", "web") == 1000.0
    assert value("lvmirror_last_success_timestamp_seconds", "gone") == 0  # no good sync: 0, so alerts fire
    assert value("lvmirror_last_success_sent_bytes", "db") == 1 << 40
    assert value("lvmirror_last_run_exit_code", "web") == 5
    assert value("lvmirror_last_run_duration_seconds", "db") == 10.0
    assert value("lvmirror_generation", "web") == 6
    assert value("lvmirror_last_failure_timestamp_seconds", "web") == 2000.0
    assert value("lvmirror_last_sync_base_cow_ratio", "web") == 0.4
    assert value("lvmirror_snapshot_cow_ratio", "web") == 0.125
    assert value("lvmirror_thin_pool_data_ratio", "db", pool="vg0/pool") == 0.85
    assert value("lvmirror_thin_pool_metadata_ratio", "db", pool="vg0/pool") == 0.1
    # LVM failing for one volume leaves out only its space series, with a warning.
    assert "gone: the metrics leave out" in caplog.text
    assert (("volume", "gone"),) not in fams["lvmirror_snapshot_cow_ratio"]["samples"]


def test_label_values_and_help_are_escaped():
    odd = 'we"b\\x\nend'
    samples = {"lvmirror_last_run_exit_code": [((("volume", odd),), 3)],
               "lvmirror_snapshot_cow_ratio": [((("volume", "web"),), math.nan), ((("volume", "db"),), 0.5)]}
    text = metrics.render(samples)
    assert 'volume="we\\"b\\\\x\\nend"' in text
    fams = parse_exposition(text)
    assert fams["lvmirror_last_run_exit_code"]["samples"] == {(("volume", odd),): 3.0}
    assert math.isnan(fams["lvmirror_snapshot_cow_ratio"]["samples"][(("volume", "web"),)])
    assert metrics.escape_help("a\\b\nc") == "a\\\\b\\nc"
    assert set(fams) == set(samples)  # families without samples are left out


def test_each_run_rewrites_the_file_for_every_volume(tmp_path):
    conf = write_config(tmp_path, names=("db", "web"))
    work = str(tmp_path / "work")
    runlog.record("db", work, run("sync", finished=1000.0, snapshot="D@1"))
    result = run_cli(cli.main, ["-c", str(conf), "sync", "web"])
    assert result.code not in (0, 2)
    fams = parse_exposition((tmp_path / "node" / "lvmirror.prom").read_text())
    # web's failure is in, and db's success (recorded by an earlier run) was not dropped.
    assert fams["lvmirror_last_run_exit_code"]["samples"][(("volume", "web"),)] == result.code
    assert fams["lvmirror_last_success_timestamp_seconds"]["samples"][(("volume", "db"),)] == 1000.0
    assert sorted(os.listdir(tmp_path / "node")) == ["lvmirror.prom"]
    # sync --all: every volume once, and one file at the end.
    result = run_cli(cli.main, ["-c", str(conf), "sync", "--all"])
    fams = parse_exposition((tmp_path / "node" / "lvmirror.prom").read_text())
    assert set(fams["lvmirror_last_run_exit_code"]["samples"]) == {(("volume", "db"),), (("volume", "web"),)}


def test_a_metrics_file_that_cannot_be_written_does_not_change_the_exit_code(tmp_path, caplog):
    (tmp_path / "plain").mkdir()
    expected = run_cli(cli.main, ["-c", str(write_config(tmp_path / "plain", metrics_file=None)),
                                  "sync", "web"]).code
    conf = write_config(tmp_path, metrics_file="node/lvmirror.prom")
    (tmp_path / "node").rmdir()
    result = run_cli(cli.main, ["-c", str(conf), "sync", "web"])
    assert result.code == expected
    # (The warning goes to the log: here pytest's, in place of stderr.)
    assert "could not write the metrics file" in caplog.text and "node does not exist" in caplog.text
    assert runlog.read("web", str(tmp_path / "work")).last_failure.exit_code == expected


# ---- what README.md and docs/status-json.md promise ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _table_fields(text: str, heading: str) -> list[str]:
    """The first-column names of the table under ``heading`` (up to the next heading)."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, re.M)


def test_the_json_schema_document_names_every_field():
    doc = (ROOT / "docs" / "status-json.md").read_text()
    assert f"`{report.SCHEMA}`" in doc.split("\n", 1)[0]
    runs = runlog.RunLog(run("sync"), run("sync"), run("sync", 3))
    st = VolumeStatus("web", "vg0/web", "/m.img", runs=runs)
    out = report.as_json([st], now=0.0, max_age=60)
    assert _table_fields(doc, "## The document") == list(out)
    assert _table_fields(doc, "## A volume") == list(out["volumes"][0])
    assert _table_fields(doc, "## A run object") == list(out["volumes"][0]["last_run"])
    assert "[docs/status-json.md](docs/status-json.md)" in (ROOT / "README.md").read_text()


def test_readme_names_every_metric_and_the_stale_exit_code():
    readme = (ROOT / "README.md").read_text()
    assert _table_fields(readme, "| metric | what |") == list(metrics.FAMILIES)
    (row,) = [line for line in readme.splitlines() if line.startswith(f"| {EXIT_STALE} |")]
    assert "--max-age" in row
    # The example line is what the code prints.
    import calendar
    last = calendar.timegm((2024, 5, 2, 2, 0, 12))
    st = VolumeStatus("web", "vg0/web", "/m.img", runs=runlog.RunLog(last_success=run("sync", finished=last)))
    (line,) = report.stale_lines([st], last + 2 * DAY + 3 * 3600, 26 * 3600)
    assert f"`{line}`" in " ".join(readme.split()), line


# ---- a volume with several destinations --------------------------------------------------------


def two_destinations(tmp: Path) -> Path:
    path = tmp / "lvmirror.toml"
    (tmp / "node").mkdir(exist_ok=True)
    path.write_text(f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\n'
                    f'metrics_file = "{tmp}/node/lvmirror.prom"\n'
                    f'[volume.web]\nvg = "vgnone"\nlv = "web"\nsnapshot_size = "1G"\n'
                    f'destinations = ["{tmp}/a.img", "{tmp}/b.img"]\n')
    path.chmod(0o600)
    return path


def test_each_destination_has_its_series_and_its_status(tmp_path):
    conf_path = two_destinations(tmp_path)
    conf = cfg.load(str(conf_path))
    a, b = conf.volume("web").views()
    work = str(tmp_path / "work")
    for view, r in ((a, run("sync", finished=1000.0, action="sync", generation=3, snapshot="W@1")),
                    (b, run("sync", finished=900.0, action="sync", generation=2, snapshot="W@0")),
                    (b, run("sync", 8, finished=1000.0, error="cannot connect", snapshot="W@0"))):
        runlog.record(view.record_name, work, r)
    metrics.write(conf, fake_space)
    fams = parse_exposition(Path(conf.metrics_file).read_text())

    def value(name, dest):
        return fams[name]["samples"][(("volume", "web"), ("destination", dest))]

    assert value("lvmirror_generation", f"{tmp_path}/a.img") == 3
    assert value("lvmirror_generation", f"{tmp_path}/b.img") == 2
    assert value("lvmirror_last_run_exit_code", f"{tmp_path}/b.img") == 8
    assert value("lvmirror_last_success_timestamp_seconds", f"{tmp_path}/b.img") == 900.0
    # status: each destination apart; the volume's own fields are those of the one most behind.
    result = run_cli(cli.main, ["-c", str(conf_path), "status", "--json"], timeout=60)
    assert result.code == 1
    doc = json.loads(result.output[result.output.index("{"):])
    (vol,) = doc["volumes"]
    assert [d["destination"] for d in vol["destinations"]] == [f"{tmp_path}/a.img", f"{tmp_path}/b.img"]
    assert [d["last_success"]["generation"] for d in vol["destinations"]] == [3, 2]
    assert vol["last_good_sync"] == 900.0 and vol["last_run"]["exit_code"] == 8
    assert any(p.startswith(f"{tmp_path}/b.img: the last run failed") for p in vol["problems"])
    text = run_cli(cli.main, ["-c", str(conf_path), "status"], timeout=60).output
    assert "web: vgnone/web -> 2 destinations" in text and f"  {tmp_path}/b.img:" in text


def test_a_volume_with_one_destination_lists_it_alone(tmp_path):
    conf = write_config(tmp_path)
    result = run_cli(cli.main, ["-c", str(conf), "status", "--json"], timeout=60)
    (vol,) = json.loads(result.output[result.output.index("{"):])["volumes"]
    (only,) = vol.pop("destinations")
    assert only == vol


def test_a_sync_that_fails_before_any_destination_is_recorded_for_each(tmp_path):
    conf_path = two_destinations(tmp_path)
    result = run_cli(cli.main, ["-c", str(conf_path), "sync", "web"], timeout=60)
    assert result.code != 0
    for view in cfg.load(str(conf_path)).volume("web").views():
        runs = runlog.read(view.record_name, str(tmp_path / "work"))
        assert runs.last_run is not None and runs.last_run.exit_code == result.code


def test_dest_must_be_one_of_the_volumes_destinations(tmp_path):
    conf_path = two_destinations(tmp_path)
    result = run_cli(cli.main, ["-c", str(conf_path), "check", "--dest", "/elsewhere.img", "web"], timeout=60)
    assert result.code == 3 and "not one of the volume's destinations" in result.output
    result = run_cli(cli.main, ["-c", str(conf_path), "discard", "web"], timeout=60)
    assert result.code == 2 and "--dest" in result.output
