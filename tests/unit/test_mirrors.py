"""The @mirrors tree driven directly, with no FUSE: kept points of a mirror against the model."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from pathlib import Path

import pytest

from lvdeltafs import vfs
from lvdeltafs.formats.files import NAMES
from lvdeltafs.formats.verify import verify_path
from lvdeltafs.mirrors import Mirror
from lvmirror.remote.destination import Destination
from tests.mirrorkit import history_entry, make_mirror, write_state

SIZES = {2: 50_000, 5: 61_440, 7: 40_000}  # point 5 grew, point 7 shrank, the present is larger again
PRESENT = 9


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def folder(tmp_path) -> Path:
    f = tmp_path / "mirror"
    f.mkdir(mode=0o700)
    return f


@pytest.fixture
def mirror(folder):
    image, kept = make_mirror(folder, 7, SIZES, random.Random(1).randbytes(70_000), PRESENT)
    return image, kept


def make_fs(image: Path, clock: Clock | None = None, **kw) -> vfs.Vfs:
    m = Mirror("data", Destination(str(image)), clock=clock or Clock(), ttl=0 if clock is None else 2.0)
    return vfs.Vfs(mirrors={"data": m}, **kw)


def walk(fs: vfs.Vfs, path: str):
    attr = fs.getattr(vfs.ROOT_INO)
    for part in path.split("/"):
        if part:
            attr = fs.lookup(attr.ino, part)
    return attr


def names(fs: vfs.Vfs, path: str) -> list[str]:
    return [n for n, _ in fs.readdir(walk(fs, path).ino)]


def read_all(fs: vfs.Vfs, path: str, step: int = 9_000) -> bytes:
    fh = fs.open(walk(fs, path).ino)
    try:
        out, off = [], 0
        while chunk := fs.read(fh, off, step):
            out.append(chunk)
            off += len(chunk)
        return b"".join(out)
    finally:
        fs.release(fh)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the errno is what is checked
        return getattr(e, "errno", -1)
    raise AssertionError("no error")


def test_points_list_with_exact_sizes_and_read_as_the_model(mirror):
    image, kept = mirror
    fs = make_fs(image)
    assert names(fs, "") == ["@mirrors"]
    assert names(fs, "@mirrors") == ["data"]
    assert names(fs, "@mirrors/data") == ["2", "5", "7"]
    assert names(fs, "@mirrors/data/5") == ["image", "undo"]
    assert names(fs, "@mirrors/data/5/undo") == list(NAMES)
    rng = random.Random(3)
    for k in kept:
        attr = walk(fs, f"@mirrors/data/{k.generation}/image")
        assert (attr.size, attr.mode, attr.is_dir) == (k.size, 0o400, False)
        assert attr.mtime_ns == int((1796000000.0 + k.generation) * 1e9)
        assert read_all(fs, f"@mirrors/data/{k.generation}/image") == k.content
        fh = fs.open(attr.ino)
        for _ in range(30):
            off, n = rng.randrange(0, k.size + 10), rng.randrange(0, 20_000)
            assert fs.read(fh, off, n) == k.content[off:off + n]
        fs.release(fh)
    assert walk(fs, "@mirrors/data").mode == 0o500
    fs.close()


def test_a_point_undo_directory_is_a_delta_directory_that_verifies(mirror, tmp_path):
    image, kept = mirror
    fs = make_fs(image)
    for k in kept:
        out = tmp_path / f"copy{k.generation}"
        out.mkdir()
        for name in NAMES:
            data = read_all(fs, f"@mirrors/data/{k.generation}/undo/{name}", step=1 << 20)
            assert len(data) == walk(fs, f"@mirrors/data/{k.generation}/undo/{name}").size
            (out / name).write_bytes(data)
        # `delta` is the receiver's file itself; the others describe it.
        assert (out / "delta").read_bytes() == k.undo.read_bytes()
        summary = verify_path(str(out))
        assert summary["delta_id"] == f"undo-{k.generation}" and summary["target_size"] == k.size
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"] == "undo" and manifest["identity"]["target"] == f"snap{k.generation}"
        data = (out / "data").read_bytes()
        for line in (out / "ranges").read_text().splitlines():
            off, ln, kind = line.split()
            off, ln = int(off), int(ln)
            want = k.content[off:off + ln] if kind == "data" else bytes(ln)
            assert data[off:off + ln] == want
    fs.close()


@pytest.mark.parametrize("bad", [
    {"generation": "2"}, {"generation": -1}, {"generation": True}, {"size": 1.5}, {"size": None},
    {"undo": "../data.img.lvmirror-undo-2"}, {"undo": "data.img.lvmirror-undo-3"}, {"undo": "/etc/shadow"},
    {"generation": 99}, {"snapshot": "a\x1b[2Jb"}, {"extra": 1},  # the receiver's rules, checked by its code
])
def test_a_bad_history_entry_hides_the_points_with_one_warning(mirror, bad, caplog):
    image, kept = mirror
    entries = [history_entry(image, k) for k in kept]
    entries[0] = {**entries[0], **bad}
    write_state(image, PRESENT, entries)
    fs = make_fs(image)
    with caplog.at_level(logging.WARNING, "lvdeltafs.mirrors"):
        for _ in range(3):
            assert names(fs, "@mirrors/data") == []
            assert errno_of(walk, fs, "@mirrors/data/5") == errno.ENOENT
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be trusted" in warnings[0].getMessage()
    fs.close()


def test_a_history_that_is_no_list_or_out_of_order_hides_the_points(mirror):
    image, kept = mirror
    entries = [history_entry(image, k) for k in kept]
    for history in ({"2": entries[0]}, [entries[1], entries[0]], [entries[0], entries[0]], ["x"]):
        write_state(image, PRESENT, history)  # type: ignore[arg-type]
        fs = make_fs(image)
        assert names(fs, "@mirrors/data") == []
        fs.close()


def test_a_point_not_before_the_present_generation_hides_the_points(mirror):
    image, kept = mirror
    write_state(image, max(SIZES), [history_entry(image, k) for k in kept])  # the newest point is the present
    fs = make_fs(image)
    assert names(fs, "@mirrors/data") == []
    fs.close()


def test_a_damaged_undo_delta_is_eio_for_the_points_that_need_it_only(mirror, caplog):
    image, kept = mirror
    raw = bytearray(kept[0].undo.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    kept[0].undo.write_bytes(bytes(raw))
    fs = make_fs(image)
    ino = walk(fs, "@mirrors/data/2/image").ino
    with caplog.at_level(logging.WARNING, "lvdeltafs.mirrors"):
        assert errno_of(fs.open, ino) == errno.EIO
        assert errno_of(fs.open, ino) == errno.EIO
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and str(kept[0].undo) in said[0] and "damaged" in said[0]
    # The size still shows (it is the state's); newer points and the listing are untouched.
    assert walk(fs, "@mirrors/data/2/image").size == kept[0].size
    assert names(fs, "@mirrors/data") == ["2", "5", "7"]
    for k in kept[1:]:
        assert read_all(fs, f"@mirrors/data/{k.generation}/image") == k.content
    assert errno_of(walk, fs, "@mirrors/data/2/undo/ranges") == errno.EIO
    fs.close()


def test_an_undo_file_of_another_size_than_the_state_says_is_eio(mirror):
    image, kept = mirror
    with open(kept[1].undo, "ab") as f:
        f.write(b"x")
    fs = make_fs(image)
    assert errno_of(fs.open, walk(fs, "@mirrors/data/5/image").ino) == errno.EIO
    assert errno_of(fs.open, walk(fs, "@mirrors/data/2/image").ino) == errno.EIO  # it needs 5's undo too
    assert read_all(fs, "@mirrors/data/7/image") == kept[2].content
    fs.close()


def test_a_planted_symlink_as_an_undo_file_is_refused(mirror, tmp_path, caplog):
    image, kept = mirror
    real = tmp_path / "elsewhere"
    kept[0].undo.rename(real)
    kept[0].undo.symlink_to(real)  # the same bytes, through a link: still refused
    fs = make_fs(image)
    with caplog.at_level(logging.WARNING, "lvdeltafs.mirrors"):
        assert errno_of(fs.open, walk(fs, "@mirrors/data/2/image").ino) == errno.EIO
    assert any("symbolic link" in r.getMessage() for r in caplog.records)
    assert read_all(fs, "@mirrors/data/5/image") == kept[1].content
    fs.close()


def test_undo_deltas_that_do_not_chain_are_eio(mirror, folder):
    image, kept = mirror
    from tests.mirrorkit import write_undo
    # Point 5's undo delta rewritten to lead back from a snapshot point 7 does not restore.
    raw_size = kept[1].size
    write_undo(kept[1].undo, 5, raw_size, [], b"", base="snapX", target="snap5")
    entries = [history_entry(image, k) for k in kept]
    write_state(image, PRESENT, entries)
    fs = make_fs(image)
    assert errno_of(fs.open, walk(fs, "@mirrors/data/5/image").ino) == errno.EIO
    assert read_all(fs, "@mirrors/data/7/image") == kept[2].content
    fs.close()


def test_generation_names_have_one_spelling(mirror):
    image, _kept = mirror
    fs = make_fs(image)
    top = walk(fs, "@mirrors/data").ino
    for bad in ["02", "+2", "2.0", " 2", "\u0662", "-0", "", "image", "9", "1" * 40]:
        assert errno_of(fs.lookup, top, bad) == errno.ENOENT, bad
    assert errno_of(fs.lookup, walk(fs, "@mirrors").ino, "other") == errno.ENOENT
    assert errno_of(fs.lookup, walk(fs, "@mirrors/data/2").ino, "current") == errno.ENOENT
    fs.close()


def test_a_write_to_the_mirror_fails_open_files_and_a_new_state_shows_new_points(mirror):
    image, kept = mirror
    clock = Clock()
    fs = make_fs(image, clock)
    fh = fs.open(walk(fs, "@mirrors/data/7/image").ino)
    assert fs.read(fh, 0, 100) == kept[2].content[:100]
    # A sync starts writing the mirror: noticed by the next read, before the state is read again.
    with open(image, "r+b") as f:
        f.write(b"\xff" * 10)
    assert errno_of(fs.read, fh, 0, 100) == errno.EIO
    fs.release(fh)
    # The sync commits: a new state, one more point (the bytes before it: generation 9).
    present = image.read_bytes()
    old = bytearray(present)
    old[:10] = random.Random(1).randbytes(70_000)[:10]
    from tests.mirrorkit import Kept, write_undo
    undo = image.parent / "data.img.lvmirror-undo-9"
    write_undo(undo, 9, len(old), [(0, 10, 0)], bytes(old), base="snap11", target="snap9")
    entries = [history_entry(image, k) for k in [*kept, Kept(9, len(old), bytes(old), undo)]]
    write_state(image, 11, entries)
    assert names(fs, "@mirrors/data") == ["2", "5", "7"]  # the state is read again only after the ttl
    clock.t += 5
    assert names(fs, "@mirrors/data") == ["2", "5", "7", "9"]
    assert read_all(fs, "@mirrors/data/9/image") == bytes(old)
    for k in kept:
        assert read_all(fs, f"@mirrors/data/{k.generation}/image") == k.content
    fs.close()


def test_points_are_not_shown_while_the_state_is_not_trusted(mirror):
    image, kept = mirror
    os.utime(image, ns=(1, 1))  # written behind lvmirror's back: the binding differs
    fs = make_fs(image)
    assert names(fs, "@mirrors/data") == []
    fs.close()


def test_an_open_undo_file_outlives_a_state_change(mirror):
    image, kept = mirror
    clock = Clock()
    fs = make_fs(image, clock)
    fh = fs.open(walk(fs, "@mirrors/data/5/undo/delta").ino)
    write_state(image, PRESENT, [history_entry(image, k) for k in kept[1:]])  # retention dropped point 2
    clock.t += 5
    assert names(fs, "@mirrors/data") == ["5", "7"]
    # The old chain is retired but held by the open file: its undo file is still open and whole.
    assert fs.read(fh, 0, 1 << 20) == kept[1].undo.read_bytes()
    fs.release(fh)
    assert errno_of(walk, fs, "@mirrors/data/2") == errno.ENOENT
    fs.close()


def test_points_list_but_do_not_read_while_a_sync_is_applied(mirror):
    image, kept = mirror
    dest = Destination(str(image))
    from lvmirror.remote.state import Files
    state = Files(dest).state()
    Files(dest).write_state({**state, "applying": {"delta_id": "x", "binding": state["binding"]}})
    fs = make_fs(image)
    assert names(fs, "@mirrors/data") == ["2", "5", "7"]
    assert errno_of(fs.open, walk(fs, "@mirrors/data/7/image").ino) == errno.EIO
    fs.close()


def test_mount_options_are_checked_before_anything_is_served(mirror, folder):
    from lvdeltafs.errors import BadInput
    from lvdeltafs.mirrors import open_mirrors
    image, _kept = mirror
    assert list(open_mirrors([f"data={image}"], None)) == ["data"]
    folder.chmod(0o777)  # others could plant files beside the mirror: refused, as by the receiver
    with pytest.raises(BadInput, match="can be written by users other than its owner"):
        open_mirrors([f"data={image}"], None)
