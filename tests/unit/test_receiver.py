"""The receiver (lvmirror.remote) through its client (lvmirror.client), on image files.

Every test runs the real receiver as lvmirror does locally: the shipped bundle
in a `python3 -I` subprocess.  The helpers (targets, deltas, hashes) are in tests/harness.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from lvdeltafs.delta import Identity
from lvdeltafs.errors import Busy, ConnectionProblem, CorruptDelta, LvError, Refused
from lvdeltafs.formats import stream as S
from lvdeltafs.formats.stream import HEAD_SIZE, MAX_DATA
from lvmirror.client import FileSource
from lvmirror.transports import LocalTransport
from tests.encoder import write_stream
from tests.harness import (
    BLOCK,
    V1,
    V2,
    VOL,
    BytesSource,
    MiB,
    changed,
    delta,
    image,
    loop_device,
    sha,
    sha_file,
    staging_files,
    sync,
)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "mirror.img"


@pytest.fixture
def at_v1(dest: Path) -> Path:
    ident, blob = delta(None, V1, "", "vol@1")
    sync(dest, ident, blob)
    assert sha_file(dest) == sha(V1)
    return dest


# ---------------------------------------------------------------- init, sync, sizes


def test_init_of_a_new_image_is_exact_and_sparse(dest: Path):
    ident, blob = delta(None, V1, "", "vol@1")
    result = sync(dest, ident, blob)
    assert sha_file(dest) == sha(V1)
    data_bytes = (64 << 10) + 2 * MiB + 100
    assert os.stat(dest).st_blocks * 512 <= data_bytes + (256 << 10), "holes were filled"
    state = json.loads(Path(f"{dest}.lvmirror-state").read_text())
    assert state["snapshot"] == "vol@1" and state["volume"] == VOL and state["size"] == len(V1)
    assert state["generation"] == 1 and "applying" not in state
    assert result["state"] == state
    assert staging_files(dest) == []


def test_sync_applies_a_delta(at_v1: Path):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    sync(at_v1, ident, blob)
    assert sha_file(at_v1) == sha(V2)
    with LocalTransport(str(at_v1)) as rc:
        h = rc.hello()
    assert h.state["snapshot"] == "vol@2" and h.state["generation"] == 2
    assert h.staged is None and h.size == len(V2) and h.kind == "file"


@pytest.mark.parametrize("new_size", [11 * MiB + 513, 2 * MiB + 7, 8 * MiB - 4096])
def test_grown_and_shrunk_targets(at_v1: Path, new_size: int):
    new = (V2 + image(new_size, [(8 * MiB, 2 * MiB)], seed=3)[len(V2):])[:new_size]
    ident, blob = delta(V1, new, "vol@1", "vol@2")
    sync(at_v1, ident, blob)
    assert os.path.getsize(at_v1) == new_size
    assert sha_file(at_v1) == sha(new)


def test_all_zero_data_records_punch_holes(at_v1: Path):
    """A data record that holds only zeros reads the same as a hole: keep the file sparse."""
    new = bytes(len(V1))
    ident, blob = delta(V1, new, "vol@1", "vol@2", pieces=[(0, len(new), S.KIND_DATA)])
    sync(at_v1, ident, blob)
    assert sha_file(at_v1) == sha(new)
    assert os.stat(at_v1).st_blocks * 512 <= 64 << 10


def test_forced_init_over_an_existing_unmanaged_file_defines_every_byte(dest: Path):
    dest.write_bytes(b"\xff" * (3 * MiB))
    ident, blob = delta(None, V1, "", "vol@1")
    sync(dest, ident, blob, force=True)
    assert sha_file(dest) == sha(V1)


# ---------------------------------------------------------------- refusals


def assert_untouched(dest: Path, content: bytes, generation: int) -> None:
    assert sha_file(dest) == sha(content)
    assert json.loads(Path(f"{dest}.lvmirror-state").read_text())["generation"] == generation
    assert staging_files(dest) == []


@pytest.mark.parametrize("base,volume,base_size", [
    ("vol@0", VOL, len(V1)),          # another snapshot
    ("vol@1", "other-volume", len(V1)),  # another volume
])
def test_refuses_a_delta_whose_base_is_not_held(at_v1: Path, base: str, volume: str, base_size: int):
    ident, blob = delta(V1, V2, base, "vol@2", volume=volume)
    with LocalTransport(str(at_v1)) as rc, pytest.raises(Refused) as e:
        rc.send_delta(BytesSource(blob), ident.delta_id)
    msg = str(e.value)
    assert "vol@1" in msg and VOL in msg and "nothing was staged" in msg, msg
    assert_untouched(at_v1, V1, 1)


def test_refuses_a_base_of_the_wrong_size(at_v1: Path):
    ident = Identity(VOL, "vol@1", "vol@2", len(V1) + 4096, len(V2), BLOCK, "cow")
    blob = b"".join(write_stream(ident.to_dict(), len(V2), changed(V1, V2), lambda o, n: V2[o:o + n],
                                 delta_id=ident.delta_id))
    with LocalTransport(str(at_v1)) as rc, pytest.raises(Refused):
        rc.send_delta(BytesSource(blob), ident.delta_id)
    assert_untouched(at_v1, V1, 1)


def test_refuses_an_init_over_a_mirror_and_a_delta_onto_nothing(at_v1: Path, tmp_path: Path):
    ident, blob = delta(None, V2, "", "vol@2")
    with LocalTransport(str(at_v1)) as rc, pytest.raises(Refused, match="initial full copy"):
        rc.send_delta(BytesSource(blob), ident.delta_id)
    assert_untouched(at_v1, V1, 1)
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    empty = tmp_path / "empty.img"
    with LocalTransport(str(empty)) as rc, pytest.raises(Refused, match="lvmirror init"):
        rc.send_delta(BytesSource(blob), ident.delta_id)
    assert not empty.exists()


def test_force_applies_onto_another_base_and_asks_for_a_check(at_v1: Path):
    ident, blob = delta(V1, V2, "vol@0", "vol@2")
    result = sync(at_v1, ident, blob, force=True)
    assert sha_file(at_v1) == sha(V2)
    assert result["state"]["needs_check"] is True
    # A repair (compare) delta from what it now holds clears the flag.
    rep, rblob = delta(V2, V2, "vol@2", "vol@2", source="compare", pieces=[(0, MiB, S.KIND_DATA)])
    with LocalTransport(str(at_v1)) as rc:
        rc.send_delta(BytesSource(rblob), rep.delta_id)
        assert rc.apply()["state"]["needs_check"] is False
    assert sha_file(at_v1) == sha(V2)


def test_apply_with_nothing_or_half_staged_is_an_error(at_v1: Path):
    with LocalTransport(str(at_v1)) as rc, pytest.raises(LvError, match="nothing is staged"):
        rc.apply()
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(at_v1)) as rc:
        with pytest.raises(CorruptDelta):
            rc.send_delta(BytesSource(blob[:len(blob) // 2]), ident.delta_id)
        with pytest.raises(LvError, match="send the rest"):
            rc.apply()
    assert sha_file(at_v1) == sha(V1)


# ---------------------------------------------------------------- corruption, truncation, resume


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1:]


def test_corrupt_stream_is_refused_and_dest_untouched(at_v1: Path):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    bad = flip(blob, len(blob) // 2)
    with LocalTransport(str(at_v1)) as rc:
        with pytest.raises(CorruptDelta, match="corrupt at byte"):
            rc.send_delta(BytesSource(bad), ident.delta_id)
        staged = rc.hello().staged
        # What was verified before the damage is kept; nothing after it.
        assert staged.delta_id == ident.delta_id and not staged.complete
        assert staged.verified <= len(blob) // 2
        assert os.path.getsize(f"{at_v1}.lvmirror-staging") == staged.verified
        assert blob[:staged.verified] == Path(f"{at_v1}.lvmirror-staging").read_bytes()
        # The session is still in step: the good stream resumes and applies.
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == len(blob) - staged.verified
        rc.apply()
    assert sha_file(at_v1) == sha(V2)


def test_trailing_garbage_and_foreign_streams_are_refused(at_v1: Path):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(at_v1)) as rc:
        with pytest.raises(CorruptDelta, match="trailing garbage"):
            rc.send_delta(BytesSource(blob + b"x"), ident.delta_id)
        with pytest.raises(CorruptDelta, match="not a delta stream"):
            rc.send_delta(BytesSource(b"rbd diff v1\n" + bytes(100)), ident.delta_id)
        assert not rc.hello().staged.complete
    assert sha_file(at_v1) == sha(V1)


def test_receiver_checks_the_header_against_the_announced_delta(at_v1: Path):
    """A client that announces one delta and sends another: nothing is staged."""
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    other, _ = delta(V1, V1, "vol@1", "vol@1b")
    with LocalTransport(str(at_v1)) as rc:
        rc.request("receive", delta_id=other.delta_id, from_offset=0, identity=other.to_dict(),
                   stream_size=len(blob), force=False)
        with pytest.raises(CorruptDelta, match="not the announced"):
            rc._stream_bulk(BytesSource(blob), 0, None, None)
        assert rc.hello().staged is None
    assert staging_files(at_v1) == []


@pytest.mark.parametrize("cut_fraction", [0.01, 0.3, 0.55, 0.999])
def test_resume_sends_at_most_one_record_again(at_v1: Path, cut_fraction: float):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    cut = int(len(blob) * cut_fraction)
    with LocalTransport(str(at_v1)) as rc, pytest.raises(CorruptDelta, match="truncated"):
        rc.send_delta(BytesSource(blob[:cut]), ident.delta_id)
    # A new session: the receiver says what it holds, and only the rest is sent.
    with LocalTransport(str(at_v1)) as rc:
        held = rc.hello().staged.verified
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == len(blob) - held
        assert rc.bytes_sent <= len(blob) - cut + HEAD_SIZE + MAX_DATA
        rc.apply()
    assert sha_file(at_v1) == sha(V2)
    assert staging_files(at_v1) == []


def test_a_complete_staged_delta_is_not_sent_again(at_v1: Path, tmp_path: Path):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    path = tmp_path / "delta"
    path.write_bytes(blob)
    with LocalTransport(str(at_v1)) as rc:
        assert rc.send_delta(FileSource(str(path)), ident.delta_id)["complete"]
    with LocalTransport(str(at_v1)) as rc:
        assert rc.send_delta(FileSource(str(path)), ident.delta_id)["complete"]
        assert rc.bytes_sent == 0
        rc.apply()
    assert sha_file(at_v1) == sha(V2)


def test_a_new_delta_replaces_a_stale_staged_one(at_v1: Path):
    stale, sblob = delta(V1, image(len(V1), [(0, 3 * MiB)], seed=9), "vol@1", "vol@1x")
    with LocalTransport(str(at_v1)) as rc, pytest.raises(CorruptDelta):
        rc.send_delta(BytesSource(sblob[:len(sblob) // 2]), stale.delta_id)
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(at_v1)) as rc:
        assert rc.hello().staged.delta_id == stale.delta_id
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == len(blob)
        rc.apply()
    assert sha_file(at_v1) == sha(V2)


# ---------------------------------------------------------------- replay of an interrupted apply


def test_replay_of_an_interrupted_apply_gives_the_exact_target(at_v1: Path):
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(at_v1)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
    # Simulate a crash mid-apply: the state says "applying", the dest is half old, half new.
    state_path = Path(f"{at_v1}.lvmirror-state")
    state = json.loads(state_path.read_text())
    state["applying"] = {"delta_id": ident.delta_id, "target": "vol@2", "started": "x"}
    state_path.write_text(json.dumps(state))
    half = V2[:5 * MiB] + V1[5 * MiB:]
    at_v1.write_bytes(half)
    with LocalTransport(str(at_v1)) as rc:
        h = rc.hello()
    assert h.replayed == ident.delta_id and not h.problem
    assert h.state["snapshot"] == "vol@2" and h.state["generation"] == 2
    assert "applying" not in h.state
    assert sha_file(at_v1) == sha(V2)
    assert staging_files(at_v1) == []


def test_applying_state_without_its_staged_delta_is_reported(at_v1: Path):
    state_path = Path(f"{at_v1}.lvmirror-state")
    state = json.loads(state_path.read_text())
    state["applying"] = {"delta_id": "gone", "target": "vol@2", "started": "x"}
    state_path.write_text(json.dumps(state))
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(at_v1)) as rc:
        assert "no longer staged" in rc.hello().problem
        with pytest.raises(Refused, match="lvmirror discard"):
            rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.send_delta(BytesSource(blob), ident.delta_id, force=True)
        assert rc.apply()["state"]["needs_check"] is True
    assert sha_file(at_v1) == sha(V2)


# ---------------------------------------------------------------- digests, state, lock


@pytest.mark.parametrize("block_size,count", [(MiB, 100), (64 << 10, 5), (3 * MiB, 100), (4096, 0)])
def test_digests_are_sha256_prefixes_of_the_blocks(dest: Path, block_size: int, count: int):
    data = V1 + b"tail"  # a short last block
    dest.write_bytes(data)
    with LocalTransport(str(dest)) as rc:
        size, raw = rc.digests(block_size, count)
    end = min(len(data), count * block_size)
    want = b"".join(hashlib.sha256(data[o:min(o + block_size, end)]).digest()[:16]
                    for o in range(0, end, block_size))
    assert size == len(data) and raw == want


def test_digests_agree_with_compare(dest: Path):
    from lvdeltafs.sources import compare
    dest.write_bytes(V2 + b"x" * 100)
    with LocalTransport(str(dest)) as rc:
        size, raw = rc.digests(MiB, 100)
    here = compare.block_digests(str(dest), MiB)
    theirs = compare.digests_from_bytes(bytes(raw), MiB, size)
    assert (here == theirs).all()


def test_state_and_a_second_session_is_busy(at_v1: Path):
    with LocalTransport(str(at_v1)) as rc:
        assert rc.hello().state["snapshot"] == "vol@1"
        with LocalTransport(str(at_v1)) as rc2, pytest.raises(Busy, match="busy"):
            rc2.hello()
    with LocalTransport(str(at_v1)) as rc:
        assert rc.hello().state["generation"] == 1


def test_protocol_errors_keep_the_session_alive(at_v1: Path):
    with LocalTransport(str(at_v1)) as rc:
        with pytest.raises(LvError, match="unknown request"):
            rc.request("frobnicate")
        with pytest.raises(LvError, match="resume"):
            rc.request("receive", delta_id="x", from_offset=100)
        assert rc.hello().state["snapshot"] == "vol@1"


# ---------------------------------------------------------------- shipped as a bundle


def test_the_bundle_runs_only_shipped_modules_and_the_standard_library(dest: Path):
    """Locally as over ssh: `python3 -I`, the blob's modules in memory, nothing from the virtualenv."""
    from lvmirror import bundle
    probe = ("import sys, json\n"
             "def main(argv):\n"
             "    mods = [m for m in list(sys.modules.values()) if m.__name__.startswith('lv')]\n"
             "    sys.stdout.write(json.dumps(sorted(getattr(m, '__file__', '') for m in mods)))\n"
             "    return 0\n")
    blob = bundle.blob([], [*bundle.shipped_sources(), ("probe", probe)], "probe")
    run = subprocess.run(bundle.local_argv(), input=blob, capture_output=True, check=True)
    loaded = json.loads(run.stdout)
    assert all(f == "" or f.startswith("<lvmirror ") for f in loaded), loaded
    assert "site-packages" not in run.stderr.decode()
    with LocalTransport(str(dest)) as rc:
        assert rc.hello().kind == "file"
        ident, blob = delta(None, V1, "", "vol@1")
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
    assert sha_file(dest) == sha(V1)


@pytest.mark.parametrize("magic", ["this python's", "another python's"])
def test_the_local_receiver_runs_this_pythons_bytecode_or_compiles_the_sources(magic: str):
    """The local blob carries the shipped modules compiled; a python whose bytecode differs compiles the
    sources instead (what an ssh blob always does)."""
    from lvmirror import bundle
    from lvmirror.remote import SHIPPED
    raw = bundle.blob([], compiled=True)
    doc = json.loads(raw[8:])
    assert sorted(doc["code"]) == sorted(SHIPPED) and "code" not in json.loads(bundle.blob([])[8:])
    if magic != "this python's":
        doc["magic"] = "00000000"
    probe = ("import sys, json\n"
             "def main(argv):\n"
             "    import lvmirror.remote.server as s\n"
             "    sys.stdout.write(json.dumps([s.main.__code__.co_filename, s.__file__]))\n"
             "    return 0\n")
    doc["modules"].append(["probe", probe])
    doc["main"] = "probe"
    body = json.dumps(doc).encode()
    run = subprocess.run(bundle.local_argv(), input=len(body).to_bytes(8, "little") + body,
                         capture_output=True, check=True)
    code_file, module_file = json.loads(run.stdout)
    assert module_file == "<lvmirror lvmirror.remote.server>"
    if magic == "this python's":
        assert code_file.endswith("lvmirror/remote/server.py")  # this installation's own bytecode
    else:
        assert code_file == module_file  # compiled there from the shipped source


@pytest.mark.parametrize("forbidden", ["numpy", "lvdeltafs.extents", "paramiko", "lvmirror.client"])
def test_a_non_stdlib_import_in_the_bundle_fails_here_too(dest: Path, forbidden: str):
    """numpy is installed on this host, and the project is importable: the receiver still may not use them."""
    from lvmirror import bundle
    from lvmirror.remote import MAIN
    shipped = bundle.shipped_sources()
    sources = [(n, f"{src}\nimport {forbidden}\n" if n == MAIN else src) for n, src in shipped]
    transport = LocalTransport(str(dest), modules=sources)
    with pytest.raises(ConnectionProblem, match="neither shipped nor in the standard"), transport as rc:
        rc.hello()
    assert not dest.exists()


# ---------------------------------------------------------------- a block device (a loop device on the host)


@pytest.fixture
def loop_dev(tmp_path: Path):
    """A 12 MiB loop device full of 0xee (so zero ranges must really be written), detached afterwards."""
    with loop_device(tmp_path / "backing") as dev:
        yield dev


def test_block_device_destination(loop_dev: str, tmp_path: Path):
    state_dir = tmp_path / "state"
    old = image(12 * MiB, [(MiB, 3 * MiB)], seed=31)
    new = image(12 * MiB, [(2 * MiB, 5 * MiB + 3)], seed=32)
    # An init of a block device must define every byte: zeros are sent as zero records.
    pieces = [(o, n, S.KIND_ZERO) if k == S.KIND_DATA and old[o:o + n].count(0) == n else (o, n, k)
              for o, n, k in changed(bytes([0xee]) * len(old), old)]
    ident, blob = delta(None, old, "", "vol@1", pieces=pieces)
    with LocalTransport(loop_dev, str(state_dir)) as rc:
        assert rc.hello().kind == "block"
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
    assert sha_file(loop_dev) == sha(old)
    [state] = state_dir.glob("*.json")  # named after the device's identity, not its path
    assert json.loads(state.read_text())["snapshot"] == "vol@1"
    ident, blob = delta(old, new, "vol@1", "vol@2")
    with LocalTransport(loop_dev, str(state_dir)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
        size, raw = rc.digests(MiB, 100)
    assert sha_file(loop_dev) == sha(new) and size == len(new)
    assert not list(state_dir.glob("*.staging*"))
    # A target of another size cannot fit a block device: refused before anything is written.
    bigger = new + bytes(MiB)
    ident, blob = delta(new, bigger, "vol@2", "vol@3")
    with LocalTransport(loop_dev, str(state_dir)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(Refused, match="resize it"):
            rc.apply()
        assert "applying" not in rc.hello().state
    assert sha_file(loop_dev) == sha(new)


def test_init_over_a_foreign_file_is_refused_and_leaves_it_alone(dest: Path):
    """An init rewrites the whole image: never over a file lvmirror did not make."""
    dest.write_bytes(b"somebody's data" * 1000)
    before = sha_file(dest)
    ident, blob = delta(None, V1, "", "vol@1")
    with pytest.raises(Refused, match="has no record"):
        sync(dest, ident, blob)
    assert sha_file(dest) == before
    assert staging_files(dest) == []


def test_new_mirror_and_its_staging_are_private(dest: Path):
    """Both hold the volume's data: readable by their owner only."""
    ident, blob = delta(None, V1, "", "vol@1")
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert os.stat(f"{dest}.lvmirror-staging").st_mode & 0o077 == 0
        rc.apply()
    assert os.stat(dest).st_mode & 0o077 == 0


# ---------------------------------------------------------------- the kernel calls the standard library lacks


def test_start_writeback_is_a_hint_that_never_fails(tmp_path: Path):
    """On a file it starts the disk writing (the bench measures what it saves); on a pipe, a closed
    descriptor or nothing to write it does nothing, and it never raises."""
    from lvdeltafs import fsio
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 65536)
        fsio.start_writeback(fd, 0, 65536)
        fsio.start_writeback(fd, 0, 0)
        assert os.pread(fd, 65536, 0) == b"x" * 65536
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        fsio.start_writeback(w, 0, 4096)
    finally:
        os.close(r)
        os.close(w)
    fsio.start_writeback(fd, 0, 4096)  # closed now: EBADF, ignored
    assert fsio.libc_function("no_such_function_in_libc", []) is None
