"""The receiver under faults: SIGKILL at many points, and a destination filesystem that runs full.

The promise checked: after any fault, the next session leaves the destination
equal to the old or the new target byte for byte (never a mix), and a further
sync completes.  Kills use the receiver's test hook
``LVMIRROR_TEST_KILL_AT=PHASE:N`` (see lvmirror/remote/faults.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvdeltafs.errors import ConnectionProblem, NoSpace
from tests.faultkit import SMALL_NEW, SMALL_OLD, fill, init_small, session
from tests.harness import BytesSource, MiB, delta, image, memory_delta, sha, sha_file, staging_files

# Many records and writes: islands of assorted sizes, some over 1 MiB, and ranges that become zeros.
OLD = image(12 * MiB, [(i * MiB + 4096 * i, 300_000 + 50_000 * i) for i in range(0, 12, 2)], seed=11)
NEW = bytearray(image(12 * MiB, [(i * MiB // 2 + 512 * i, 200_000 + 90_000 * i) for i in range(1, 22, 2)],
                      seed=12))
NEW[2 * MiB:2 * MiB + 3 * MiB // 2] = image(3 * MiB // 2, [(0, 3 * MiB // 2)], seed=13)  # > 1 MiB extent
NEW = bytes(NEW)
NEWER = NEW[:5 * MiB] + image(7 * MiB + 4096, [(MiB, MiB)], seed=14)  # grown

def state(dest: Path) -> dict:
    return json.loads(Path(f"{dest}.lvmirror-state").read_text())


@pytest.fixture
def at_old(tmp_path: Path) -> Path:
    dest = tmp_path / "mirror.img"
    ident, blob = delta(None, OLD, "", "vol@1")
    with session(dest) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
    assert sha_file(dest) == sha(OLD)
    return dest


def finish_and_sync_further(dest: Path, ident, blob: bytes) -> None:
    """A new session after a fault: finish NEW (resuming), then NEW -> NEWER completes."""
    with session(dest) as rc:
        h = rc.hello()
        assert sha_file(dest) in (sha(OLD), sha(NEW)), "the destination is a mix after recovery"
        if h.state["snapshot"] == "vol@1":
            assert sha_file(dest) == sha(OLD)
            rc.send_delta(BytesSource(blob), ident.delta_id)
            rc.apply()
        assert sha_file(dest) == sha(NEW)
        assert rc.hello().state["generation"] == 2
        nident, nblob = delta(NEW, NEWER, "vol@2", "vol@3")
        rc.send_delta(BytesSource(nblob), nident.delta_id)
        rc.apply()
    assert sha_file(dest) == sha(NEWER)
    assert state(dest)["generation"] == 3 and staging_files(dest) == []


@pytest.mark.parametrize("kill_at", ["receive:1", "receive:2", "receive:3", "receive:7", "receive:12",
                                     "sync:1", "sync:3"])
def test_killed_while_receiving(at_old: Path, kill_at: str):
    ident, blob = delta(OLD, NEW, "vol@1", "vol@2")
    with session(at_old, kill_at) as rc, pytest.raises(ConnectionProblem):
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()  # reached only if the kill point was never hit
    assert sha_file(at_old) == sha(OLD)
    with session(at_old) as rc:
        staged = rc.hello().staged
        held = staged.verified if staged else 0
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == len(blob) - held
        if kill_at.startswith("sync"):
            assert held > 0, "a saved staging progress was not used"
    finish_and_sync_further(at_old, ident, blob)


@pytest.mark.parametrize("kill_at", ["receive:2", "receive:5", "receive:9", "sync:1", "sync:2"])
def test_killed_while_receiving_a_compressed_stream(at_old: Path, kill_at: str):
    """A compressed stream resumes from the receiver's verifier state and re-sends only the rest."""
    import numpy as np

    from lvmirror.compression import Policy
    from lvmirror.encoder import DeltaStream
    text = np.frombuffer((bytes(range(32, 127)) * (len(NEW) // 95 + 1))[:len(NEW)], np.uint8)
    raw = np.frombuffer(NEW, np.uint8)
    new = np.where(raw == 0, raw, text).tobytes()  # NEW's islands, but text: it compresses
    d = memory_delta(OLD, new, "vol@1", "vol@2")
    whole = b"".join(DeltaStream(d, Policy("zlib")).read_from(0))
    with session(at_old, kill_at) as rc, pytest.raises(ConnectionProblem):
        rc.send_delta(DeltaStream(d, Policy("zlib")), d.identity.delta_id)
        rc.apply()
    assert sha_file(at_old) == sha(OLD)
    with session(at_old) as rc:
        staged = rc.hello().staged
        held = staged.verified if staged else 0
        assert staged is None or staged.version == 2
        rc.send_delta(DeltaStream(d, Policy("zlib")), d.identity.delta_id)
        assert rc.bytes_sent == len(whole) - held < len(whole) * (0.8 if held else 1.01)
        if kill_at.startswith("sync"):
            assert held > 0, "a saved staging progress was not used"
        rc.apply()
    assert sha_file(at_old) == sha(new)


@pytest.mark.parametrize("kill_at", ["apply:1", "apply:2", "apply:5", "apply:9", "apply:14",
                                     "applied:1", "committed:1"])
def test_killed_while_applying(at_old: Path, kill_at: str):
    ident, blob = delta(OLD, NEW, "vol@1", "vol@2")
    with session(at_old, kill_at) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(ConnectionProblem):
            rc.apply()
    with session(at_old) as rc:
        h = rc.hello()
        if not kill_at.startswith("committed"):
            assert h.replayed == ident.delta_id
        assert h.state["snapshot"] == "vol@2" and "applying" not in h.state
        assert h.staged is None
    assert sha_file(at_old) == sha(NEW)
    finish_and_sync_further(at_old, ident, blob)


def test_killed_again_while_replaying(at_old: Path):
    """A replay is itself an apply: killing it leaves a state the next session replays again."""
    ident, blob = delta(OLD, NEW, "vol@1", "vol@2")
    with session(at_old, "apply:3") as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(ConnectionProblem):
            rc.apply()
    with session(at_old, "apply:2") as rc, pytest.raises(ConnectionProblem):
        rc.hello()
    assert state(at_old)["applying"]["delta_id"] == ident.delta_id
    finish_and_sync_further(at_old, ident, blob)


def test_killed_while_initialising(tmp_path: Path):
    dest = tmp_path / "new.img"
    ident, blob = delta(None, OLD, "", "vol@1")
    with session(dest, "apply:4") as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(ConnectionProblem):
            rc.apply()
    with session(dest) as rc:
        assert rc.hello().replayed == ident.delta_id
    assert sha_file(dest) == sha(OLD) and state(dest)["generation"] == 1


# ---------------------------------------------------------------- a full filesystem


def test_staging_runs_out_of_space(small_fs: Path):
    dest = small_fs / "mirror.img"
    init_small(dest)
    filler = fill(small_fs, leave=MiB)
    ident, blob = delta(SMALL_OLD, SMALL_NEW, "vol@1", "vol@2")
    with session(dest) as rc:
        with pytest.raises(NoSpace) as e:
            rc.send_delta(BytesSource(blob), ident.delta_id)
        msg = str(e.value)
        assert "no space left on" in msg and "nothing was applied" in msg and "free space" in msg, msg
        assert f"{dest}'s filesystem" in msg
        # The session is still usable, and nothing changed.
        assert rc.hello().state["generation"] == 1
    assert sha_file(dest) == sha(SMALL_OLD)
    filler.unlink()
    with session(dest) as rc:
        staged = rc.hello().staged
        held = staged.verified if staged else 0
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == len(blob) - held
        rc.apply()
    assert sha_file(dest) == sha(SMALL_NEW) and state(dest)["generation"] == 2
    assert staging_files(dest) == []


def test_apply_runs_out_of_space_before_writing_anything(small_fs: Path):
    dest = small_fs / "mirror.img"
    init_small(dest)
    ident, blob = delta(SMALL_OLD, SMALL_NEW, "vol@1", "vol@2")
    with session(dest) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        # Staged (3 MiB); now leave less than the hole the delta fills.
        filler = fill(small_fs, leave=MiB // 2)
        with pytest.raises(NoSpace) as e:
            rc.apply()
        msg = str(e.value)
        assert "no space left on" in msg and "nothing was applied" in msg, msg
        h = rc.hello()
        assert h.state["generation"] == 1 and "applying" not in h.state
        assert h.staged is not None and h.staged.complete
    assert sha_file(dest) == sha(SMALL_OLD)
    filler.unlink()
    with session(dest) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == 0
        rc.apply()
    assert sha_file(dest) == sha(SMALL_NEW) and staging_files(dest) == []
