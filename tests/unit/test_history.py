"""Mirror history through the real receiver (the shipped bundle in a subprocess): undo deltas, points,
retention, rewind, and what a damaged or hand-edited history does.  Points are composed with
lvdeltafs.formats.overlay and compared byte for byte with what the mirror held at each sync."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lvdeltafs.errors import LvError
from lvmirror.remote.history import Keep
from lvmirror.transports import LocalTransport
from tests.harness import BytesSource, MiB, delta, loop_device, sha, sha_file, staging_files
from tests.historykit import composed, state, sync_all, versions


def test_five_syncs_keep_three_points_each_equal_to_what_the_mirror_held(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(6)
    sync_all(dest, vs)
    st = state(dest)
    assert st["generation"] == 6 and sha_file(dest) == sha(vs[5])
    assert [e["generation"] for e in st["history"]] == [3, 4, 5]
    for e in st["history"]:
        assert e["snapshot"] == f"vol@{e['generation']}" and e["size"] == len(vs[e["generation"] - 1])
        assert composed(dest, e["generation"]) == vs[e["generation"] - 1], f"point {e['generation']}"
        assert os.stat(dest.parent / e["undo"]).st_mode & 0o077 == 0
        assert os.path.getsize(dest.parent / e["undo"]) == e["undo_bytes"]
    # The dropped points' files are gone, and nothing else of history lies beside the mirror.
    assert sorted(p.name for p in tmp_path.glob("*undo*")) == sorted(e["undo"] for e in st["history"])
    # An undo delta costs about what the sync changed, not the volume.
    assert all(e["undo_bytes"] < 2 * MiB for e in st["history"])


@pytest.mark.parametrize("to", [3, 4, 5])
def test_rewind_makes_the_mirror_equal_the_point_and_drops_newer_points(tmp_path: Path, to: int):
    dest = tmp_path / "mirror.img"
    vs = versions(6)
    sync_all(dest, vs)
    with LocalTransport(str(dest)) as rc:
        reply = rc.rewind(to)
    assert sha_file(dest) == sha(vs[to - 1])
    st = state(dest)
    assert st["snapshot"] == f"vol@{to}" and st["source"] == "rewind" and st["generation"] == 7
    assert [e["generation"] for e in st["history"]] == [g for g in (3, 4, 5) if g < to]
    assert reply["state"]["snapshot"] == f"vol@{to}" and staging_files(dest) == []
    for e in st["history"]:  # the older points still compose
        assert composed(dest, e["generation"]) == vs[e["generation"] - 1]
    assert sorted(p.name for p in tmp_path.glob("*undo*")) == sorted(e["undo"] for e in st["history"])


def test_a_sync_after_a_rewind_needs_the_point_it_holds_as_its_base(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(6)
    sync_all(dest, vs)
    with LocalTransport(str(dest)) as rc:
        rc.rewind(4)
    ident, blob = delta(vs[5], vs[5], "vol@6", "vol@7")
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="holds snapshot vol@4"):
        rc.send_delta(BytesSource(blob), ident.delta_id)
    # From the point it holds, a sync goes on, and the point it left becomes a point again.
    sync_all(dest, vs[:3] + [vs[3], vs[5]], start=4)
    assert sha_file(dest) == sha(vs[5])
    st = state(dest)
    assert st["history"][-1]["snapshot"] == "vol@4"
    assert composed(dest, st["history"][-1]["generation"]) == vs[3]


def test_rewind_to_a_point_not_kept_changes_nothing(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(4)
    sync_all(dest, vs)
    before = sha_file(dest), state(dest)
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="no point with generation 4"):
        rc.rewind(4)  # the generation the mirror holds now is no kept point
    assert (sha_file(dest), state(dest)) == before


def test_history_off_keeps_nothing_and_a_forced_apply_drops_it(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(4)
    sync_all(dest, vs[:3])
    assert len(state(dest)["history"]) == 2
    sync_all(dest, vs, keep=Keep(0), start=3)
    assert state(dest)["history"] == [] and list(tmp_path.glob("*undo*")) == []
    # A mirror written behind lvmirror's back: its history would lead back to bytes never there.
    sync_all(dest, versions(6)[:5], start=4)
    with open(dest, "r+b") as f:
        f.write(b"tampered")
    ident, blob = delta(vs[3], vs[2], "vol@4", "vol@9")
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id, force=True)
        rc.apply()
    assert state(dest)["history"] == [] and list(tmp_path.glob("*undo*")) == []


@pytest.mark.parametrize("edit", [
    lambda e: e.update(undo="../../etc/shadow"),
    lambda e: e.update(undo="mirror.img.lvmirror-state"),
    lambda e: e.update(generation="3"),
    lambda e: e.update(extra=1),
    lambda e: e.update(snapshot="a\x1b[2Jb"),
])
def test_a_hand_edited_history_is_a_damaged_state_and_changes_nothing(tmp_path: Path, edit):
    dest = tmp_path / "mirror.img"
    vs = versions(4)
    sync_all(dest, vs)
    doc = state(dest)
    edit(doc["history"][0])
    Path(f"{dest}.lvmirror-state").write_text(json.dumps(doc))
    before = sha_file(dest)
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="damaged"):
        rc.rewind(doc["history"][-1]["generation"])
    assert sha_file(dest) == before and (tmp_path / "mirror.img.lvmirror-state").exists()


@pytest.mark.parametrize("ahead", [0, 1])
def test_a_point_not_before_the_present_generation_is_a_damaged_state(tmp_path: Path, ahead: int):
    dest = tmp_path / "mirror.img"
    sync_all(dest, versions(4))
    doc = state(dest)
    newest = doc["history"][-1]
    gen = doc["generation"] + ahead
    os.rename(tmp_path / newest["undo"], tmp_path / f"mirror.img.lvmirror-undo-{gen}")
    newest.update(generation=gen, undo=f"mirror.img.lvmirror-undo-{gen}")
    Path(f"{dest}.lvmirror-state").write_text(json.dumps(doc))
    before = sha_file(dest)
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="damaged.*not before the present"):
        rc.rewind(doc["history"][0]["generation"])
    assert sha_file(dest) == before


def test_a_damaged_undo_delta_refuses_the_rewind_and_changes_nothing(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(4)
    sync_all(dest, vs)
    first = state(dest)["history"][0]
    undo = tmp_path / first["undo"]
    raw = bytearray(undo.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    undo.write_bytes(bytes(raw))
    before = sha_file(dest), state(dest)
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="damaged"):
        rc.rewind(first["generation"])
    assert (sha_file(dest), state(dest)) == before
    with LocalTransport(str(dest)) as rc:  # a newer point does not need that file
        rc.rewind(state(dest)["history"][-1]["generation"])
    assert sha_file(dest) == sha(vs[2])


def test_a_link_planted_as_an_undo_delta_is_not_followed(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(4)
    sync_all(dest, vs)
    first = state(dest)["history"][0]
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    (tmp_path / first["undo"]).unlink()
    (tmp_path / first["undo"]).symlink_to(victim)
    with LocalTransport(str(dest)) as rc, pytest.raises(LvError, match="symbolic link"):
        rc.rewind(first["generation"])
    assert victim.read_bytes() == b"x" * 100


def test_debris_of_a_killed_run_is_swept_and_files_of_others_are_not(tmp_path: Path):
    dest = tmp_path / "mirror.img"
    vs = versions(3)
    sync_all(dest, vs)
    for name in ("mirror.img.lvmirror-undo-part", "mirror.img.lvmirror-undo-99"):
        (tmp_path / name).write_bytes(b"debris")
    keep = ("mirror.img.lvmirror-undo-notes.txt", "other.img.lvmirror-undo-1")
    for name in keep:
        (tmp_path / name).write_bytes(b"not ours")
    with LocalTransport(str(dest)) as rc:
        rc.hello()
    assert not (tmp_path / "mirror.img.lvmirror-undo-part").exists()
    assert not (tmp_path / "mirror.img.lvmirror-undo-99").exists()
    assert all((tmp_path / n).read_bytes() == b"not ours" for n in keep)
    assert len(state(dest)["history"]) == 2


def test_a_block_device_keeps_its_undo_deltas_in_its_state_folder(tmp_path: Path):
    vs = versions(5, resize=False)
    state_dir = tmp_path / "state"
    # Zeros in the device: the test init (like a thin init) sends only the blocks that are not.
    with loop_device(tmp_path / "backing", size=len(vs[0]), fill=b"\0") as dev:
        sync_all(Path(dev), vs, state_dir=state_dir)
        (doc_path,) = state_dir.glob("*.json")
        doc = json.loads(doc_path.read_text())
        assert [e["generation"] for e in doc["history"]] == [2, 3, 4]
        stem = doc_path.name.removesuffix(".json")
        assert sorted(p.name for p in state_dir.glob("*undo*")) == [f"{stem}.undo-{g}" for g in (2, 3, 4)]
        assert all(os.stat(state_dir / e["undo"]).st_mode & 0o077 == 0 for e in doc["history"])
        for g in (4, 3, 2):  # newest first: each rewind drops the newer points
            with LocalTransport(dev, str(state_dir)) as rc:
                rc.rewind(g)
            assert sha_file(dev) == sha(vs[g - 1])
        assert not list(state_dir.glob("*undo*"))


def test_retention_by_count_age_and_size_drops_the_oldest_first():
    from lvmirror.remote.history import retained
    entries = [{"generation": g, "synced_epoch": 1000.0 * g, "undo_bytes": 100 * g} for g in range(1, 6)]
    gens = lambda keep, now=5000.0: [e["generation"] for e in retained(entries, keep, now)]  # noqa: E731
    assert gens(Keep(7)) == [1, 2, 3, 4, 5]
    assert gens(Keep(3)) == [3, 4, 5]
    assert gens(Keep(0)) == [] and gens(None) == []
    assert gens(Keep(7, age=2500)) == [3, 4, 5]  # synced 2000 s or less ago
    assert gens(Keep(7, size=900)) == [4, 5]  # 400 + 500 bytes
    assert gens(Keep(2, age=10_000, size=10_000)) == [4, 5]


def test_a_rewind_stages_its_delta_in_one_pass_with_the_verifier_state_of_the_staged_file(tmp_path: Path):
    from lvdeltafs.formats.reader import StreamReader
    from lvmirror.remote import history
    from lvmirror.remote.destination import Destination
    from lvmirror.remote.state import Files

    dest = tmp_path / "mirror.img"
    sync_all(dest, versions(3))
    files = Files(Destination(str(dest)))
    st = files.state()
    entries = history.rewind_layers(files, st, st["history"][0]["generation"])
    folder, opened = files.dest.folder, []
    real_open = folder.open

    def open_(name, flags, *a, **kw):
        opened.append((name, flags & os.O_ACCMODE))
        return real_open(name, flags, *a, **kw)

    folder.open = open_  # type: ignore[method-assign]
    base_fd = os.open(dest, os.O_RDONLY)
    try:
        made, fds = history.compose(files, base_fd, entries)
        try:
            progress = history.stage_rewind(files, st, entries, made)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(base_fd)
    staged = [f for n, f in opened if n == files.dest.staging_name]
    assert staged == [os.O_WRONLY], "the staged stream is written once and not read back"
    with open(tmp_path / files.dest.staging_name, "rb") as f:
        reader = StreamReader(f)
        for _ in reader:
            pass
    assert progress["reader"] == reader.state()
    assert progress["verified"] == reader.pos == progress["stream_size"]
