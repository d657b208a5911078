"""History under faults: SIGKILL while an undo delta is written, while a rewind is staged and applied, and a
filesystem too full for the undo delta.  The promise: the mirror is the old or the new content byte for byte,
the history lists only complete undo deltas that compose to what the mirror held, and a rerun finishes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lvdeltafs.errors import ConnectionProblem
from lvmirror.remote.history import Keep
from tests.faultkit import SMALL_NEW, SMALL_OLD, fill, init_small, session
from tests.harness import BytesSource, delta, sha, sha_file, staging_files
from tests.historykit import composed, state, sync_all, versions


@pytest.fixture
def mirror(tmp_path: Path) -> tuple[Path, list[bytes]]:
    dest = tmp_path / "mirror.img"
    vs = versions(5)
    sync_all(dest, vs[:4])  # generation 4, points 1..3 (keep 3)
    return dest, vs


def undo_names(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob("*undo*"))


@pytest.mark.parametrize("kill_at", ["undo:1", "undo:3", "apply:1", "apply:4", "applied:1", "committed:1"])
def test_killed_while_keeping_an_undo_delta_or_applying(mirror, kill_at: str):
    dest, vs = mirror
    ident, blob = delta(vs[3], vs[4], "vol@4", "vol@5")
    with session(dest, kill_at) as rc:
        rc.keep = Keep(3)
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(ConnectionProblem):
            rc.apply()
    with session(dest) as rc:
        rc.keep = Keep(3)
        h = rc.hello()
        assert sha_file(dest) in (sha(vs[3]), sha(vs[4])), "a mix after recovery"
        if h.state["snapshot"] == "vol@4":  # killed before anything was overwritten: apply again
            assert kill_at.startswith("undo") and sha_file(dest) == sha(vs[3])
            rc.send_delta(BytesSource(blob), ident.delta_id)
            assert rc.bytes_sent == 0  # still staged
            rc.apply()
    assert sha_file(dest) == sha(vs[4]) and staging_files(dest) == []
    st = state(dest)
    assert [e["generation"] for e in st["history"]] == [2, 3, 4]
    for e in st["history"]:
        assert composed(dest, e["generation"]) == vs[e["generation"] - 1]
    assert undo_names(dest) == sorted(e["undo"] for e in st["history"])


@pytest.mark.parametrize("kill_at", ["rewind:1", "apply:1", "apply:3", "applied:1", "committed:1"])
def test_killed_while_rewinding(mirror, kill_at: str):
    dest, vs = mirror
    with session(dest, kill_at) as rc, pytest.raises(ConnectionProblem):
        rc.rewind(2)
    with session(dest) as rc:
        h = rc.hello()
        assert sha_file(dest) in (sha(vs[3]), sha(vs[1])), "a mix after recovery"
        if h.state["snapshot"] == "vol@4":  # the rewind was only staged: nothing was overwritten
            assert kill_at == "rewind:1" and sha_file(dest) == sha(vs[3])
            rc.rewind(2)
    assert sha_file(dest) == sha(vs[1]) and staging_files(dest) == []
    st = state(dest)
    assert st["snapshot"] == "vol@2" and [e["generation"] for e in st["history"]] == [1]
    assert composed(dest, 1) == vs[0]
    assert undo_names(dest) == [st["history"][0]["undo"]]


def test_no_room_for_the_undo_delta_the_sync_is_still_exact_and_history_is_dropped_with_a_warning(
        small_fs: Path, caplog):
    dest = small_fs / "mirror.img"
    init_small(dest)
    ident, blob = delta(SMALL_OLD, SMALL_NEW, "vol@1", "vol@2")
    with session(dest) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        filler = fill(small_fs, leave=3 * (1 << 20) // 2)  # room for the apply, not for 2 MiB of undo
        with caplog.at_level(logging.WARNING):
            rc.apply()
    assert sha_file(dest) == sha(SMALL_NEW) and state(dest)["generation"] == 2
    assert state(dest)["history"] == [] and undo_names(dest) == []
    assert any("history was dropped" in r.getMessage() for r in caplog.records)
    filler.unlink()
