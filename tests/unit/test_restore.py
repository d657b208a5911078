"""`lvmirror restore` on the host: real syncs in process over tests/fakelvm.py to a local image through
the real receiver, then a point written back onto the origin (only the changes since the base and the undo
ranges read) or onto a new LV (block digests of both sides); the bytes must equal what the mirror held at
that point, and an LV that is open, of the wrong size, missing or a snapshot is refused untouched."""

from __future__ import annotations

import io
import json
import os

import pytest

from lvdeltafs.errors import EXIT_CONNECTION, ConnectionProblem
from lvmirror import restore as restoring
from lvmirror.client import ReceiverClient
from lvmirror.remote import wire
from tests.fakelvm import lvmirror
from tests.harness import sha, sha_file, text
from tests.historykit import SIZE, five_syncs, history_setup, state

MiB = 1 << 20


@pytest.fixture
def synced(tmp_path, monkeypatch):
    fake, cfg, dest = history_setup(tmp_path, monkeypatch)
    held = five_syncs(fake, cfg, dest)
    return fake, cfg, dest, held


def test_a_point_restored_onto_the_origin_reads_only_what_can_differ(synced):
    fake, cfg, dest, held = synced
    fake.write(3 * MiB, text(MiB // 2, 99))  # today's damage on the origin, after the last sync
    out = lvmirror(cfg, "restore", "data", "--point", "4", "--to", "vgfake/data")
    assert sha(fake.read()) == held[4]
    assert "the changes since the base snapshot" in out
    # What was read: the damage (marked by 64 KiB chunk) and the undo ranges back to point 4, far below SIZE.
    read = _figure(out, "read")
    assert 0.5 * MiB <= read < SIZE / 4, out
    assert _figure(out, "wrote") <= read
    # The mirror and its history were not touched; the next sync brings the mirror to the restored volume.
    mirror_before = sha_file(dest)
    assert [e["generation"] for e in state(dest)["history"]] == [3, 4, 5]
    # The fake's COW list sees only its own writes (real LVM sees the restore's): mark the whole volume.
    fake.write(0, fake.read())
    lvmirror(cfg, "sync", "data")
    assert sha_file(dest) == held[4] and mirror_before != held[4]


def test_the_present_content_restored_onto_the_origin(synced):
    fake, cfg, dest, held = synced
    fake.write(0, text(MiB, 98))
    lvmirror(cfg, "restore", "data", "--to", "vgfake/data")
    assert sha(fake.read()) == held[6] == sha_file(dest)


def test_a_point_restored_onto_a_new_lv_by_block_digests(synced):
    fake, cfg, dest, held = synced
    new = fake.add_lv("restored", SIZE)
    out = lvmirror(cfg, "restore", "data", "--point", "3", "--to", "vgfake/restored")
    assert sha_file(new) == held[3] and "block digests" in out
    # Run again: nothing differs any more, nothing is read or written.
    out = lvmirror(cfg, "restore", "data", "--point", "3", "--to", "vgfake/restored")
    assert _figure(out, "read") == 0 and _figure(out, "wrote") == 0 and sha_file(new) == held[3]


def test_a_restore_cut_short_is_finished_by_running_it_again(synced, monkeypatch):
    fake, cfg, dest, held = synced
    fake.write(2 * MiB, text(2 * MiB, 97))
    calls = {"n": 0}
    real = restoring._write_differing

    def dies_on_the_third(fd, offset, new):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a run cut short half way: some ranges written, some not
        return real(fd, offset, new)

    monkeypatch.setattr(restoring, "_write_differing", dies_on_the_third)
    lvmirror(cfg, "restore", "data", "--point", "4", "--to", "vgfake/data", expect=130)
    assert sha(fake.read()) not in (held[4],)
    monkeypatch.setattr(restoring, "_write_differing", real)
    lvmirror(cfg, "restore", "data", "--point", "4", "--to", "vgfake/data")
    assert sha(fake.read()) == held[4]


@pytest.mark.parametrize("case, message", [
    ("open", "is open"),
    ("small", "resize it"),
    ("missing", "lvcreate -L"),
    ("snapshot", "is a snapshot"),
    ("point", "no kept point"),
])
def test_refused_targets_are_left_untouched(synced, case, message):
    fake, cfg, dest, held = synced
    before = sha(fake.read())
    target, point = "vgfake/data", "4"
    if case == "open":
        fake.set_open("data")
    elif case == "small":
        fake.add_lv("small", SIZE - 4096)
        target = "vgfake/small"
    elif case == "missing":
        target = "vgfake/nothere"
    elif case == "snapshot":
        target = f"vgfake/{next(lv.name for lv in fake.list_lvs() if lv.is_snapshot)}"
    else:
        point = "1"
    out = lvmirror(cfg, "restore", "data", "--point", point, "--to", target, expect=3 if case in (
        "missing", "point") else 4)
    assert message in out and sha(fake.read()) == before


def test_dry_run_writes_nothing(synced):
    fake, cfg, dest, held = synced
    fake.write(0, text(MiB, 96))
    before = sha(fake.read())
    out = lvmirror(cfg, "restore", "data", "--point", "3", "--to", "vgfake/data", "--dry-run")
    assert "would read" in out and sha(fake.read()) == before


def _figure(out: str, verb: str) -> int:
    """The bytes a summary line says were read or written ("read 1.5 MiB", "wrote 0 B")."""
    import re
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    m = re.search(rf"{verb} ([0-9.]+) (B|KiB|MiB|GiB)", out)
    assert m, out
    return int(float(m.group(1)) * units[m.group(2)])


# ---- a far side that sends more than it announced (a hand-written one: the real receiver never does)


def _far_side(*replies: tuple[dict, list[bytes]]) -> io.BytesIO:
    """What a far side sends: for each request, its reply line, then its frames and the end frame."""
    out = bytearray()
    for reply, frames in replies:
        out += json.dumps(reply).encode() + b"\n"
        for frame in frames:
            out += wire.FRAME.pack(len(frame)) + frame
        out += wire.FRAME.pack(0)
    return io.BytesIO(bytes(out))


@pytest.mark.parametrize("extra", [b"!", bytes(4096)])
def test_read_bytes_beyond_what_was_announced_are_refused_and_never_written(tmp_path, monkeypatch, extra):
    monkeypatch.setattr(restoring, "BATCH_BYTES", 8192)  # two reads: one honest, then one that sends more
    target = tmp_path / "lv"
    target.write_bytes(bytes(16384))
    honest = ({"ok": True, "bytes": 8192}, [b"a" * 4096, b"b" * 4096])
    greedy = ({"ok": True, "bytes": 8192}, [b"c" * 4096, b"d" * 4096 + extra])
    client = ReceiverClient(_far_side(honest, greedy), io.BytesIO(), where="receiver")
    fd = os.open(target, os.O_RDWR)
    try:
        with pytest.raises(ConnectionProblem) as err:
            restoring._copy(client, 4, [(0, 16384)], fd)
    finally:
        os.close(fd)
    assert err.value.exit_code == EXIT_CONNECTION
    assert str(err.value) == ("the receiver sent more than the 8192 bytes of the point's data it announced; "
                              "nothing of that read was written")
    # The honest read was written; nothing of the one that sent more, not even its announced part.
    assert target.read_bytes() == b"a" * 4096 + b"b" * 4096 + bytes(8192)
