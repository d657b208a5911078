"""`lvmirror history` and `lvmirror rewind` end to end on the host: real init and syncs in process over
tests/fakelvm.py to a local image through the real receiver, each sync's content recorded then; every
kept point must compose to it, rewind must give it back byte for byte, and the next sync must bring the
mirror up to date again (a compare resync: the point's snapshot is gone from the source)."""

from __future__ import annotations

import json

from tests.fakelvm import lvmirror
from tests.harness import sha, sha_file, text
from tests.historykit import composed, five_syncs, history_setup, state

MiB = 1 << 20


def test_history_lists_three_points_each_composing_to_what_the_mirror_held(tmp_path, monkeypatch):
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    held = five_syncs(fake, cfg, dest)
    doc = json.loads(lvmirror(cfg, "history", "data", "--json"))
    assert [p["generation"] for p in doc["points"]] == [3, 4, 5]
    assert doc["keep"] == {"points": 3, "age": 0, "size": 0} and doc["drops_next"] == [3]
    assert doc["undo_bytes"] == sum(p["undo_bytes"] for p in doc["points"]) > 0
    for p in doc["points"]:
        assert sha(composed(dest, p["generation"])) == held[p["generation"]]
    out = lvmirror(cfg, "history", "data")
    assert "(dropped by the next sync)" in out and "3 points" in out and "keeps at most 3 points" in out


def test_rewind_then_sync_again(tmp_path, monkeypatch):
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    held = five_syncs(fake, cfg, dest)
    lvmirror(cfg, "rewind", "data", "--to", "4")
    assert sha_file(dest) == held[4]
    st = state(dest)
    assert st["source"] == "rewind" and [e["generation"] for e in st["history"]] == [3]
    assert sha(composed(dest, 3)) == held[3]
    # By snapshot name too; then a point that is not kept changes nothing.
    lvmirror(cfg, "rewind", "data", "--to", st["history"][0]["snapshot"])
    assert sha_file(dest) == held[3]
    out = lvmirror(cfg, "rewind", "data", "--to", "5", expect=3)
    assert "no kept point '5'" in out and sha_file(dest) == held[3]
    # The next sync finds the point's snapshot gone from the source and resyncs by comparing; what the
    # mirror held before it (point 3) becomes a point again.
    lvmirror(cfg, "sync", "data")
    st = state(dest)
    assert st["source"] == "compare" and sha_file(dest) == sha(fake.read())
    assert sha(composed(dest, st["history"][-1]["generation"])) == held[3]


def test_history_points_0_keeps_none(tmp_path, monkeypatch):
    fake, cfg, dest = history_setup(tmp_path, monkeypatch, "history_points = 0\n")
    lvmirror(cfg, "init", "data")
    fake.write(0, text(MiB, 5))
    lvmirror(cfg, "sync", "data")
    assert state(dest)["history"] == [] and not list(tmp_path.glob("*undo*"))
    assert json.loads(lvmirror(cfg, "history", "data", "--json"))["points"] == []


def test_the_mount_composes_the_receivers_own_points(tmp_path, monkeypatch):
    """What lvdeltafs's @mirrors tree reads (lvdeltafs.mirrors, no FUSE) from a real receiver's files."""
    from lvdeltafs.mirrors import open_mirrors
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    held = five_syncs(fake, cfg, dest)
    mirror = open_mirrors([f"data={dest}"], None)["data"]
    try:
        assert [p.generation for p in mirror.points()] == [3, 4, 5]
        for p in mirror.points():
            with mirror.chain() as chain:
                assert sha(chain.read(p.generation, 0, p.size + 1)) == held[p.generation]
    finally:
        mirror.close()


def test_a_repair_keeps_the_history_and_its_points_compose_after_it(tmp_path, monkeypatch):
    """Bit rot in the mirror (its bytes change, its file's times do not): check finds it, --repair mends it;
    no point is added, none dropped, and every point still composes to what the mirror held."""
    import os
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    held = five_syncs(fake, cfg, dest)
    st = os.stat(dest)
    with open(dest, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xff" * 8192)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    lvmirror(cfg, "check", "data", expect=6)
    lvmirror(cfg, "check", "--repair", "data")
    assert sha_file(dest) == sha(fake.read())
    st = state(dest)
    assert [e["generation"] for e in st["history"]] == [3, 4, 5]
    for e in st["history"]:
        assert sha(composed(dest, e["generation"])) == held[e["generation"]]


def test_status_shows_a_history_that_cannot_be_read_as_a_problem(tmp_path, monkeypatch):
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    five_syncs(fake, cfg, dest)
    assert "problem:" not in lvmirror(cfg, "status")
    st = state(dest)
    (tmp_path / st["history"][1]["undo"]).unlink()
    out = lvmirror(cfg, "status", expect=1)
    assert "  problem:       its history cannot be read: the undo delta" in out
    assert "of point 4 is missing" in out
    doc = json.loads(lvmirror(cfg, "status", "--json", expect=1))
    assert any("of point 4 is missing" in p for p in doc["volumes"][0]["problems"])
    # A hand-edited entry: the state is damaged.
    st["history"][0]["extra"] = 1
    (tmp_path / "mirror.img.lvmirror-state").write_text(json.dumps(st))
    out = lvmirror(cfg, "status", expect=1)
    assert "problem:       its history cannot be read:" in out and "is damaged (a history entry" in out
