"""The receiver against what is planted, deleted or damaged around a destination, and against a hostile peer.

Every case runs the real receiver (the shipped bundle in a `python3 -I`
subprocess, or the real `lvmirror` command line) and asserts what matters:
the mirror's bytes, its state, and that nothing outside the destination
changed.  Planting is done as the unprivileged user nobody.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lvdeltafs.delta import Identity
from lvdeltafs.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED, BadInput, LvError, Refused
from lvmirror.client import ReceiverClient
from lvmirror.transports import LocalTransport
from tests.encoder import write_stream
from tests.harness import (
    BIN,
    PLANT_FILES,
    PLANT_LINKS,
    V1,
    V2,
    VICTIM,
    VOL,
    BytesSource,
    MiB,
    as_nobody,
    changed,
    delta,
    loop_device,
    sha,
    sha_file,
    sync,
)

LVMIRROR = str(BIN / "lvmirror")
SIDE_FILES = ["m.img.lvmirror-lock", "m.img.lvmirror-state", "m.img.lvmirror-staging",
              "m.img.lvmirror-staging.progress", f"m.img.lvmirror-state.tmp{os.getpid()}"]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([LVMIRROR, *argv], capture_output=True, text=True, timeout=120)


def one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert all(w in res.stderr for w in words), res.stderr


def stream_file(tmp_path: Path, ident: Identity, blob: bytes, name: str = "delta") -> str:
    path = tmp_path / name
    path.write_bytes(blob)
    return str(path)


def state_of(dest: Path) -> dict:
    return json.loads(Path(f"{dest}.lvmirror-state").read_text())


# ------------------------------------------------------------ 1. nothing beside the destination is followed


@pytest.mark.parametrize("name", SIDE_FILES)
def test_a_link_planted_beside_a_destination_is_not_followed(shared: Path, victim: Path, tmp_path: Path,
                                                             name: str):
    dest = shared / "m.img"
    as_nobody(PLANT_LINKS, str(victim), str(shared), name)
    ident, blob = delta(None, V1, "", "vol@1")
    res = run("apply", stream_file(tmp_path, ident, blob), str(dest))
    assert victim.read_bytes() == VICTIM
    assert "Traceback" not in res.stderr
    if name.endswith(("staging", f".tmp{os.getpid()}")):
        # The staging file is removed before a new delta is staged (a link is removed, never
        # followed), and temporaries get fresh random names: the apply goes through.
        assert res.returncode == EXIT_OK, res.stderr
        assert sha_file(dest) == sha(V1)
    else:
        one_line_error(res, EXIT_REFUSED, "symbolic link")
        assert not dest.exists()


def test_a_link_planted_at_the_destination_itself_is_refused(shared: Path, victim: Path, tmp_path: Path):
    as_nobody(PLANT_LINKS, str(victim), str(shared), "m.img")
    ident, blob = delta(None, V1, "", "vol@1")
    res = run("apply", "--force", stream_file(tmp_path, ident, blob), str(shared / "m.img"))
    one_line_error(res, EXIT_REFUSED, "symbolic link", "uid")
    assert victim.read_bytes() == VICTIM


PLANT_FIFO = """
import os, sys
os.mkfifo(os.path.join(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("name", ["m.img.lvmirror-state", "m.img.lvmirror-staging.progress", "m.img"])
def test_a_fifo_planted_beside_a_destination_is_refused_not_waited_on(shared: Path, tmp_path: Path,
                                                                       name: str):
    as_nobody(PLANT_FIFO, str(shared), name)
    ident, blob = delta(None, V1, "", "vol@1")
    res = run("apply", stream_file(tmp_path, ident, blob), str(shared / "m.img"))
    one_line_error(res, EXIT_REFUSED, "m.img")


def test_files_planted_by_another_user_are_not_trusted(shared: Path, tmp_path: Path):
    """A forged state (a regular file of nobody's) in a sticky folder: refused, never read as ours."""
    dest = shared / "m.img"
    ident, blob = delta(None, V1, "", "vol@1")
    sync(dest, ident, blob)
    os.unlink(f"{dest}.lvmirror-state")
    as_nobody(PLANT_FILES, str(shared), "m.img.lvmirror-state")
    ident2, blob2 = delta(V1, V2, "vol@1", "vol@2")
    res = run("apply", stream_file(tmp_path, ident2, blob2), str(dest))
    one_line_error(res, EXIT_REFUSED, "belongs to uid")
    assert sha_file(dest) == sha(V1)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_destination_folder_others_can_write_is_refused(tmp_path: Path, mode: int):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(mode)
    ident, blob = delta(None, V1, "", "vol@1")
    res = run("apply", stream_file(tmp_path, ident, blob), str(folder / "m.img"))
    one_line_error(res, EXIT_REFUSED, str(folder), "chmod go-w")
    assert os.listdir(folder) == []


def test_a_missing_destination_folder_is_named(tmp_path: Path):
    ident, blob = delta(None, V1, "", "vol@1")
    res = run("apply", stream_file(tmp_path, ident, blob), str(tmp_path / "nope" / "m.img"))
    one_line_error(res, EXIT_REFUSED, f"{tmp_path / 'nope'} does not exist")
    assert "lvmirror-lock" not in res.stderr


def test_a_symlinked_destination_means_its_target_with_one_lock_and_one_state(tmp_path: Path):
    """Decision: a link (root's or ours) is resolved once; lock and state follow the real file."""
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias.img"
    alias.symlink_to(real / "m.img")
    ident, blob = delta(None, V1, "", "vol@1")
    sync(alias, ident, blob)
    assert alias.is_symlink() and sha_file(real / "m.img") == sha(V1)
    assert state_of(real / "m.img")["snapshot"] == "vol@1"
    assert not Path(f"{alias}.lvmirror-state").exists()
    with LocalTransport(str(real / "m.img")) as rc:
        rc.hello()
        with LocalTransport(str(alias)) as rc2, pytest.raises(LvError, match="busy"):
            rc2.hello()


# ---------------------------------------------------------------- 2. the state is bound to its destination


def damage_deleted(dest: Path) -> None:
    dest.unlink()


def damage_truncated(dest: Path) -> None:
    os.truncate(dest, 0)


def damage_shrunk(dest: Path) -> None:
    os.truncate(dest, len(V1) // 2)


def damage_swapped(dest: Path) -> None:
    other = dest.with_name("other.img")
    other.write_bytes(V1)  # the same bytes, another file
    os.replace(other, dest)


def damage_written(dest: Path) -> None:
    with open(dest, "r+b") as f:
        f.seek(MiB)
        f.write(b"behind lvmirror's back")


@pytest.mark.parametrize("damage", [damage_deleted, damage_truncated, damage_shrunk, damage_swapped,
                                    damage_written])
def test_an_incremental_onto_a_changed_destination_is_refused(tmp_path: Path, damage):
    dest = tmp_path / "m.img"
    ident, blob = delta(None, V1, "", "vol@1")
    sync(dest, ident, blob)
    damage(dest)
    before = dest.read_bytes() if dest.exists() else None
    ident2, blob2 = delta(V1, V2, "vol@1", "vol@2")
    res = run("apply", stream_file(tmp_path, ident2, blob2), str(dest))
    one_line_error(res, EXIT_REFUSED, "refusing delta")
    assert (dest.read_bytes() if dest.exists() else None) == before
    # The way back: a compare resync against what is there now gives the exact target.
    from lvmirror import deltas
    target = tmp_path / "v2.img"
    target.write_bytes(V2)
    with LocalTransport(str(dest)) as rc:
        greeting = rc.hello()
        assert greeting.unknown and not greeting.holds
        d = deltas.compare_delta(rc, greeting, VOL, "vol@2", str(target), len(V2))
        from lvmirror.pipelines import send
        send(rc, d, "resync")
        d.close()
        assert rc.hello().holds == "vol@2"
    assert sha_file(dest) == sha(V2)


def test_a_compare_delta_applies_only_to_the_content_it_was_computed_against(tmp_path: Path):
    dest = tmp_path / "m.img"
    ident, blob = delta(None, V1, "", "vol@1")
    sync(dest, ident, blob)
    target = tmp_path / "v2.img"
    target.write_bytes(V2)
    from lvmirror import deltas
    with LocalTransport(str(dest)) as rc:
        d = deltas.compare_delta(rc, rc.hello(), VOL, "vol@2", str(target), len(V2))
    damage_written(dest)  # the destination changes between the digests and the apply
    mid = dest.read_bytes()
    from lvmirror.encoder import DeltaStream
    with LocalTransport(str(dest)) as rc, pytest.raises(Refused, match="changed since"):
        rc.send_delta(DeltaStream(d), d.identity.delta_id)
    d.close()
    assert dest.read_bytes() == mid


def test_two_block_device_spellings_share_one_state_and_two_devices_never_do(tmp_path: Path):
    state_dir = tmp_path / "state"
    with loop_device(tmp_path / "a", len(V1)) as a, loop_device(tmp_path / "b", len(V1)) as b:
        alias = tmp_path / "alias"
        alias.symlink_to(a)
        ident, blob = delta(None, V1, "", "vol@1", pieces=_all(V1))
        sync(a, ident, blob, state_dir=str(state_dir))
        with LocalTransport(str(alias), str(state_dir)) as rc:
            assert rc.hello().holds == "vol@1"  # the same device, spelt another way
        with LocalTransport(b, str(state_dir)) as rc:
            assert rc.hello().holds == ""  # another device: its own (empty) state
        assert len(list(state_dir.glob("*.json"))) == 1


def test_a_block_device_swapped_in_at_the_same_path_holds_nothing_known(tmp_path: Path):
    """The path now names another device: what the old one held is reported, as unknown; compare mends it."""
    state_dir = tmp_path / "state"
    with loop_device(tmp_path / "a", len(V1)) as a, loop_device(tmp_path / "b", len(V1)) as b:
        path = tmp_path / "mirror-dev"
        path.symlink_to(a)
        sync(path, *delta(None, V1, "", "vol@1", pieces=_all(V1)), state_dir=str(state_dir))
        path.unlink()
        path.symlink_to(b)  # the admin's /dev/vg/mirror is now another LV
        with LocalTransport(str(path), str(state_dir)) as rc:
            greeting = rc.hello()
            assert not greeting.holds and "another device" in greeting.unknown
            assert greeting.recorded["snapshot"] == "vol@1"
            ident, blob = delta(V1, V2, "vol@1", "vol@2")
            with pytest.raises(Refused, match="another device"):
                rc.send_delta(BytesSource(blob), ident.delta_id)
            target = tmp_path / "v2.img"
            target.write_bytes(V2)
            from lvmirror import deltas
            from lvmirror.pipelines import send
            d = deltas.compare_delta(rc, greeting, VOL, "vol@2", str(target), len(V2))
            send(rc, d, "resync")
            d.close()
            assert rc.hello().holds == "vol@2"
        assert sha_file(b) == sha(V2) and sha_file(a) == sha(V1)


def _all(data: bytes) -> list[tuple[int, int, int]]:
    """Every block of ``data`` (an init of a block device must define every byte)."""
    return [(o, min(4096, len(data) - o), 0 if data[o:o + 4096].strip(b"\0") else 1)
            for o in range(0, len(data), 4096)]


# ---------------------------------------------------------------- 3, 6. streams that lie


def forged(identity: dict, header_size: int, data: bytes, delta_id: str | None = None) -> bytes:
    """A stream with valid checksums whose header says what we like."""
    return b"".join(write_stream(identity, header_size, changed(None, data), lambda o, n: data[o:o + n],
                                 delta_id=delta_id or Identity(**identity).delta_id))


def test_a_header_whose_size_disagrees_with_its_identity_is_refused(tmp_path: Path):
    dest = tmp_path / "m.img"
    ident = Identity(VOL, "", "vol@1", 0, len(V1), 4096, "cow")
    blob = forged(ident.to_dict(), len(V1) + MiB, V1 + bytes(MiB))
    with LocalTransport(str(dest)) as rc, pytest.raises(BadInput):
        rc.send_delta(BytesSource(blob), ident.delta_id)
    assert not dest.exists()


@pytest.mark.parametrize("field,value", [("target", "vol@1\n"), ("target", "\x1b[2Jvol"),
                                         ("volume", "a\rb"), ("target_size", 1 << 63),
                                         ("base_size", -1), ("chunk_size", "4096")])
def test_identities_with_control_characters_or_impossible_sizes_are_refused(tmp_path: Path, field: str,
                                                                             value):
    dest = tmp_path / "m.img"
    doc = Identity(VOL, "", "vol@1", 0, len(V1), 4096, "cow").to_dict()
    doc[field] = value
    with LocalTransport(str(dest)) as rc:
        with pytest.raises(LvError) as e:
            rc.request("receive", delta_id="0" * 32, from_offset=0, identity=doc, stream_size=100)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
        assert rc.hello().staged is None  # the session goes on, nothing staged
    assert not dest.exists()


def test_a_resume_continues_only_the_same_delta(tmp_path: Path):
    """A target changed in place gets another id (content-named, see lvdeltafs.pairs): never mixed."""
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    first, fblob = delta(V1, V2, "vol@1", "image:v2")
    other = bytearray(V2)
    other[7 * MiB:7 * MiB + 100] = b"\xaa" * 100
    second, sblob = delta(V1, bytes(other), "vol@1", "image:v2-changed")
    with LocalTransport(str(dest)) as rc, pytest.raises(BadInput):
        rc.send_delta(BytesSource(fblob[:len(fblob) // 2]), first.delta_id)
    with LocalTransport(str(dest)) as rc:
        assert rc.hello().staged.delta_id == first.delta_id
        # Announced under the first's id, the second stream's header is refused...
        with pytest.raises(BadInput):
            rc.send_delta(BytesSource(sblob), first.delta_id)
        # ...and under its own id it is sent whole: the first's prefix is not reused.
        rc.send_delta(BytesSource(sblob), second.delta_id)
        assert rc.bytes_sent == len(sblob)
        rc.apply()
    assert sha_file(dest) == sha(bytes(other))


# ---------------------------------------------------------------- 5. nothing wedges a mirror


def test_a_target_too_large_for_the_filesystem_is_refused_before_anything(tmp_path: Path, small_ext4: Path):
    dest = small_ext4 / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    huge = 17 << 40  # past ext4's 16 TiB file size limit
    ident = Identity(VOL, "vol@1", "vol@huge", len(V1), huge, 4096, "cow")
    blob = b"".join(write_stream(ident.to_dict(), huge, [(huge - 4096, 4096, 0)], lambda o, n: b"\x01" * n,
                                 delta_id=ident.delta_id))
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with pytest.raises(Refused, match="cannot hold a file"):
            rc.apply()
        assert rc.hello().holds == "vol@1" and not rc.hello().problem
    assert sha_file(dest) == sha(V1) and "applying" not in state_of(dest)
    # Not wedged: a good delta goes through next.
    sync(dest, *delta(V1, V2, "vol@1", "vol@2"))
    assert sha_file(dest) == sha(V2)


@pytest.fixture
def small_ext4(tmp_path: Path):
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"\x00\xff" * 10, b"[" * 100000 + b"]" * 100000,
                                     json.dumps({"format": "lvmirror-state", "size": "big"}).encode(),
                                     json.dumps({"format": "lvmirror-state", "snapshot": "a\nb"}).encode()],
                         # Short ids: pytest 7 (Debian 12's) puts the whole id in PYTEST_CURRENT_TEST,
                         # and a 200 kB one makes every subprocess fail with E2BIG.
                         ids=["not-json", "a-list", "binary", "nested-deeply", "size-a-string",
                              "newline-in-name"])
def test_a_damaged_state_file_is_named_and_discard_is_the_way_out(tmp_path: Path, content: bytes):
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    Path(f"{dest}.lvmirror-state").write_bytes(content)
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    res = run("apply", stream_file(tmp_path, ident, blob), str(dest))
    one_line_error(res, EXIT_BAD_INPUT, f"{dest}.lvmirror-state is damaged", "lvmirror discard")
    assert sha_file(dest) == sha(V1)
    res = run("discard", "--dest", str(dest))
    assert res.returncode == 0, res.stderr
    with LocalTransport(str(dest)) as rc:
        greeting = rc.hello()
    assert not greeting.holds and "discard" in greeting.unknown
    assert sha_file(dest) == sha(V1)


@pytest.mark.parametrize("edit", [
    lambda p: {**p, "verified": p["verified"] + 10 ** 6},
    lambda p: {**p, "reader": {**p["reader"], "position": "x"}},
    lambda p: {**p, "delta_id": "f" * 32},
    lambda p: {**p, "identity": {**p["identity"], "target_size": 1 << 64}},
])
def test_a_hand_edited_progress_file_is_refused_not_followed(tmp_path: Path, edit):
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(dest)) as rc, pytest.raises(BadInput):
        rc.send_delta(BytesSource(blob[:len(blob) // 2]), ident.delta_id)
    progress = Path(f"{dest}.lvmirror-staging.progress")
    progress.write_text(json.dumps(edit(json.loads(progress.read_text()))))
    res = run("apply", stream_file(tmp_path, ident, blob), str(dest))
    assert res.returncode in (EXIT_OK, EXIT_BAD_INPUT), res.stderr
    assert "Traceback" not in res.stderr
    if res.returncode == EXIT_OK:
        assert sha_file(dest) == sha(V2)  # the staged prefix was not trusted: sent again, whole
    else:
        assert "is damaged" in res.stderr and sha_file(dest) == sha(V1)
        assert run("discard", "--dest", str(dest)).returncode == 0
        assert run("apply", "--force", stream_file(tmp_path, ident, blob), str(dest)).returncode == 0
        assert sha_file(dest) == sha(V2)


def test_a_damaged_staged_copy_during_replay_is_reported_and_discard_unwedges(tmp_path: Path):
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
    state = state_of(dest)
    state["applying"] = {"delta_id": ident.delta_id, "target": "vol@2", "started": "x"}
    Path(f"{dest}.lvmirror-state").write_text(json.dumps(state))
    staging = Path(f"{dest}.lvmirror-staging")
    raw = bytearray(staging.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    staging.write_bytes(bytes(raw))
    with LocalTransport(str(dest)) as rc:
        greeting = rc.hello()
        assert "damaged" in greeting.problem and "lvmirror discard" in greeting.problem
        with pytest.raises(LvError, match="lvmirror discard"):
            rc.apply()
    assert run("discard", "--dest", str(dest)).returncode == 0
    with LocalTransport(str(dest)) as rc:
        greeting = rc.hello()
        assert not greeting.problem and not greeting.holds and greeting.staged is None


def _last_data_payload(blob: bytes) -> tuple[int, int, int]:
    """(stream offset of the last data record's payload, its target offset, its length)."""
    import io

    from lvdeltafs.formats.reader import iter_records
    from lvdeltafs.formats.stream import HEAD_SIZE
    last = [r for r in iter_records(io.BytesIO(blob)) if r.type == "data"][-1]
    return last.start + HEAD_SIZE, last.offset, last.length


def test_damage_to_a_copy_staged_whole_in_this_session_never_reaches_the_destination(tmp_path: Path):
    """A delta received whole is applied without a second reading; the apply's own reading still checks
    every record, so a byte changed on the staging disk stops the apply before that record is written,
    and the next session names the way out."""
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    at, offset, length = _last_data_payload(blob)
    staging = Path(f"{dest}.lvmirror-staging")
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        with open(staging, "r+b") as f:
            f.seek(at + length // 2)
            byte = f.read(1)
            f.seek(at + length // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(LvError, match="damaged"):
            rc.apply()
    got = dest.read_bytes()
    assert all(g in (a, b) for g, a, b in zip(got, V1, V2, strict=True)), "a byte from nowhere"
    assert got[offset:offset + length] == V1[offset:offset + length], "the damaged record was written"
    assert got != V1, "found before the apply: this session's copy was read twice"
    with LocalTransport(str(dest)) as rc:
        assert "lvmirror discard" in rc.hello().problem


def test_a_copy_staged_by_an_earlier_session_is_verified_again_before_anything_is_written(tmp_path: Path):
    dest = tmp_path / "m.img"
    sync(dest, *delta(None, V1, "", "vol@1"))
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)  # staged whole, not applied
    at, _, length = _last_data_payload(blob)
    staging = Path(f"{dest}.lvmirror-staging")
    raw = bytearray(staging.read_bytes())
    raw[at + length // 2] ^= 0xFF
    staging.write_bytes(bytes(raw))
    with LocalTransport(str(dest)) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        assert rc.bytes_sent == 0  # held complete: nothing re-sent, and nothing re-verified on the way
        with pytest.raises(LvError, match="damaged"):
            rc.apply()
    assert sha_file(dest) == sha(V1)
    assert "applying" not in json.loads(Path(f"{dest}.lvmirror-state").read_text())


# ---------------------------------------------------------------- 7. the receiver survives any peer


def raw_session(dest: Path) -> subprocess.Popen:
    from lvmirror import bundle
    from lvmirror.transports import receiver_argv
    proc = subprocess.Popen(bundle.local_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(bundle.blob(receiver_argv(str(dest), None)))
    proc.stdin.flush()
    return proc


@pytest.mark.parametrize("line", [
    b"[" * 200000 + b"]" * 200000,
    b'{"op": "receive", "delta_id": "x", "from_offset": "abc"}',
    b'{"op": "receive", "delta_id": "x", "from_offset": -5}',
    b'{"op": "digests", "block_size": 1073741824}',
    b'{"op": "digests", "block_size": 4096, "count": "many"}',
    b'{"op": ["hello"]}',
    b'"just a string"',
    b"\xff\xfe not utf-8",
    b'{"op": "apply", "x": ' + b"1" * 5000 + b"}",
], ids=lambda line: repr(line[:40]))  # short: pytest 7 puts the whole id in PYTEST_CURRENT_TEST (E2BIG)
def test_malformed_requests_get_an_error_reply_and_the_session_goes_on(tmp_path: Path, line: bytes):
    dest = tmp_path / "m.img"
    proc = raw_session(dest)
    out, err = proc.communicate(line + b"\n" + b'{"op": "hello"}\n{"op": "bye"}\n', timeout=60)
    replies = [json.loads(x) for x in out.splitlines()]
    assert replies[0]["ok"] is False and replies[0]["error"] in ("protocol", "state"), replies[0]
    assert replies[1]["ok"] is True and replies[1]["kind"] == "file"
    assert proc.returncode == 0 and b"Traceback" not in err, err
    assert not dest.exists()


def test_huge_requests_are_bounded_and_so_is_the_receivers_memory(tmp_path: Path):
    """The largest digest block, a count of 2^62, a 1 MiB request line: the receiver stays small."""
    dest = tmp_path / "m.img"
    dest.write_bytes(V1)
    proc = raw_session(dest)
    requests = [{"op": "digests", "block_size": 16 << 20, "count": 1 << 62},
                {"op": "digests", "block_size": 1 << 30, "count": 1},
                {"op": "receive", "delta_id": "x" * 1000, "from_offset": 1 << 62}]
    for req in requests:
        proc.stdin.write(json.dumps(req).encode() + b"\n")
    proc.stdin.write(b'{"op": "hello", "pad": "' + b"x" * ((1 << 20) - 64) + b'"}\n')
    proc.stdin.write(b'{"op": "hello"}\n')
    proc.stdin.flush()
    replies = []
    while len(replies) < 5:
        replies.append(json.loads(proc.stdout.readline()))
        if replies[-1].get("count"):
            proc.stdout.read(4 + 16 + 4)  # the one digest's frame and the end frame
    peak_kib = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text()).group(1))
    out, err = proc.communicate(b'{"op": "bye"}\n', timeout=60)
    assert replies[0]["ok"] and replies[0]["count"] == 1
    assert [r["ok"] for r in replies[1:]] == [False, False, True, True], replies
    assert proc.returncode == 0, err
    # Python itself, one 16 MiB block, a 1 MiB line: far below what the requests asked for.
    assert peak_kib < 96 << 10, f"the receiver peaked at {peak_kib} KiB"


def test_a_hostile_far_side_cannot_make_the_sender_hold_its_digests(tmp_path: Path):
    """A fake receiver announces a huge count and floods frames: refused by what was asked, not read whole."""
    fake = ("import sys, json, struct\n"
            "sys.stdin.readline()\n"
            "out = sys.stdout.buffer\n"
            "out.write(json.dumps({'ok': True, 'count': 1 << 40, 'size': 1 << 60}).encode() + b'\\n')\n"
            "for _ in range(10000):\n"
            "    out.write(struct.pack('<I', 1 << 20) + bytes(1 << 20))\n"
            "out.flush()\n")
    proc = subprocess.Popen([sys.executable, "-I", "-c", fake], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rc = ReceiverClient(proc.stdout, proc.stdin, on_close=proc.kill)
    with pytest.raises(LvError):
        rc.digests(1 << 20, 8)
    rc.close()
