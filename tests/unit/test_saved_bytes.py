"""What a sync saved, end to end on the host: marked changed, really different, and on the wire.

A real ``lvmirror init`` and ``sync`` run in process over tests/fakelvm.py (the origin an image file,
snapshots copies of it, a COW-like list of the chunks written) to a local image through the real
receiver.  The workload rewrites 4 MiB with the bytes already there and changes 16 KiB for real: the
snapshot marks 4 MiB.  The run record, `status` (text and ``--json``) and the metrics file (read back
by the exposition-format checker of test_monitoring) must say how much of it differed and how much went
on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.exposition import parse_exposition
from tests.fakelvm import FakeLvm, configured, lvmirror
from tests.harness import sha, sha_file, text

MiB = 1 << 20
SIZE = 8 * MiB
CHANGED = 16 << 10


def faked_volume(tmp: Path, monkeypatch, **keys) -> tuple[FakeLvm, Path, Path]:
    (tmp / "node").mkdir()
    dest = tmp / "mirror.img"
    fake, cfg = configured(tmp, monkeypatch, dest, size=SIZE,  # its text compresses about 3:1
                           defaults=f'metrics_file = "{tmp}/node/lvmirror.prom"\n',
                           volume="".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    return fake, cfg, dest


def rewrite_same_bytes_and_change_a_little(fake: FakeLvm) -> None:
    data = fake.read()
    fake.write(MiB, data[MiB:5 * MiB])  # marked changed, the same bytes
    fake.write(2 * MiB, text(CHANGED, 2))  # really changed (inside the rewrite)


@pytest.mark.parametrize("keys, differed", [
    ({"exact": True, "compress": "zlib"}, CHANGED),  # exact = true refines the delta; zlib shrinks it
    ({"exact": False, "compress": "zlib"}, CHANGED),  # compressing: the encoder compares with the base
    ({"exact": True, "compress": "off"}, CHANGED),  # nothing compressed: the wire carries what differed
    ({"exact": False, "compress": "off"}, 4 * MiB),  # neither: everything marked is sent
])
def test_marked_differed_and_wire_bytes_are_recorded_shown_and_exported(tmp_path, monkeypatch, keys,
                                                                         differed):
    fake, cfg, dest = faked_volume(tmp_path, monkeypatch, **keys)
    lvmirror(cfg, "init", "data")
    rewrite_same_bytes_and_change_a_little(fake)
    lvmirror(cfg, "sync", "data")
    assert sha_file(dest) == sha(fake.read())

    record = json.loads((tmp_path / "work" / "runs" / "data.json").read_text())["last_success"]
    assert record["action"] == "sync"
    assert record["marked_bytes"] == 4 * MiB
    assert record["differed_bytes"] == differed
    if keys["compress"] == "zlib":
        assert 0 < record["wire_bytes"] < 0.6 * differed, record
    else:
        assert record["wire_bytes"] == differed
    # The run's other figures stand: bytes_sent is the delta's ranges (refined by exact = true).
    assert record["bytes_sent"] == (CHANGED if keys["exact"] else 4 * MiB)

    doc = json.loads(lvmirror(cfg, "status", "--json"))
    (vol,) = doc["volumes"]
    assert doc["schema"] == "lvmirror-status/1"
    for key in ("marked_bytes", "differed_bytes", "wire_bytes"):
        assert vol["last_success"][key] == vol["last_run"][key] == record[key]
    shown = lvmirror(cfg, "status")
    assert "  its data:      4.0 MiB marked changed, " in shown, shown

    fams = parse_exposition((tmp_path / "node" / "lvmirror.prom").read_text())
    for key in ("marked", "differed", "wire"):
        fam = fams[f"lvmirror_last_success_{key}_bytes"]
        assert fam["type"] == "gauge" and fam["help"]
        assert fam["samples"] == {(("volume", "data"),): float(record[f"{key}_bytes"])}


def test_an_init_records_what_it_read_and_sent(tmp_path, monkeypatch):
    fake, cfg, dest = faked_volume(tmp_path, monkeypatch, compress="zlib")
    lvmirror(cfg, "init", "data")
    record = json.loads((tmp_path / "work" / "runs" / "data.json").read_text())["last_run"]
    # An init has no base: what is marked is every non-zero block, and all of it is sent.
    assert record["marked_bytes"] == record["differed_bytes"] == record["bytes_sent"] == SIZE
    assert record["wire_bytes"] < 0.6 * SIZE
    assert sha_file(dest) == sha(fake.read())


def test_an_older_record_without_the_fields_still_reads(tmp_path):
    from lvmirror import runlog
    work = str(tmp_path / "work")
    runlog.record("web", work, runlog.Run("sync", 990.0, 1000.0, 10.0, 0, action="sync", bytes_sent=5))
    path = tmp_path / "work" / "runs" / "web.json"
    doc = json.loads(path.read_text())
    for key in ("marked_bytes", "differed_bytes", "wire_bytes", "resumed_bytes"):
        del doc["last_run"][key]
    path.write_text(json.dumps(doc))
    runs = runlog.read("web", work)
    assert not runs.problem and runs.last_run.marked_bytes is None and runs.last_run.bytes_sent == 5
    assert runs.last_run.resumed_bytes == 0


def test_a_run_that_finishes_an_interrupted_delta_records_what_it_did_not_send_again(tmp_path, monkeypatch):
    fake, cfg, dest = faked_volume(tmp_path, monkeypatch, compress="off")
    lvmirror(cfg, "init", "data")
    fake.write(MiB, text(2 * MiB, 3))
    # The receiver dies writing the sync's undo delta: the whole stream is staged, nothing applied yet.
    monkeypatch.setenv("LVMIRROR_TEST_KILL_AT", "undo:1")
    lvmirror(cfg, "sync", "data", expect=8)
    monkeypatch.delenv("LVMIRROR_TEST_KILL_AT")
    progress = json.loads((tmp_path / "mirror.img.lvmirror-staging.progress").read_text())
    assert progress["complete"] and progress["verified"] > 2 * MiB
    # The next run finishes that delta (nothing of it sent again), then syncs what changed since: nothing.
    lvmirror(cfg, "sync", "data")
    assert sha_file(dest) == sha(fake.read())
    record = json.loads((tmp_path / "work" / "runs" / "data.json").read_text())["last_success"]
    assert record["bytes_sent"] == 0 and record["resumed_bytes"] == progress["verified"]
    doc = json.loads(lvmirror(cfg, "status", "--json"))
    assert doc["volumes"][0]["last_run"]["resumed_bytes"] == progress["verified"]
    assert "of a delta the destination held from an interrupted run" in lvmirror(cfg, "status")
    fams = parse_exposition((tmp_path / "node" / "lvmirror.prom").read_text())
    fam = fams["lvmirror_last_success_resumed_bytes"]
    assert fam["type"] == "gauge" and fam["help"]
    assert fam["samples"] == {(("volume", "data"),): float(progress["verified"])}
    # A sync that resumes nothing records 0.
    fake.write(0, text(MiB, 4))
    lvmirror(cfg, "sync", "data")
    last = json.loads((tmp_path / "work" / "runs" / "data.json").read_text())["last_run"]
    assert last["ok"] and last["resumed_bytes"] == 0
