"""The lvdeltafs tree driven directly, with no FUSE: file pairs and a fake LVM listing."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from lvdeltafs import delta as deltamod
from lvdeltafs import deltacache, discovery, replies, tree, vfs
from lvdeltafs.errors import CommandFailed, SnapshotUnusable
from lvdeltafs.formats.files import NAMES, DeltaFiles
from lvdeltafs.lvm import LogicalVolume
from lvdeltafs.pairs import compare_delta

MiB = 1 << 20
SIZE = 4 * MiB


def make_lv(name: str, vg: str = "vg0", origin: str = "", creation: int = 1_700_000_000,
            path: str = "", attr: str | None = None) -> LogicalVolume:
    attr = attr or ("swi-a-s---" if origin else "owi-a-----")
    return LogicalVolume(uuid=f"uuid-{vg}-{name}", name=name, vg=vg, attr=attr, origin=origin,
                         origin_uuid="", pool="", thin_id=None, size=SIZE, chunk_size=65536,
                         snap_percent=None, data_percent=None, time="", creation=creation,
                         dm_path="", path=path, tags=(), active=True)


class FakeLvm:
    """A volume ``lv`` with snapshots whose contents are image files; lvs answers from a list."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.images: dict[str, str] = {}
        self.opened: list[tuple[str, str]] = []
        self.lvs: list[LogicalVolume] = []
        self.fail_lvs = False
        content = bytearray(SIZE)
        self.add("lv", bytes(content), creation=0)
        # Created in this order; "s10" sorts before "s9" by name, but not by time.
        for i, name in enumerate(["s9", "s10", "s11"]):
            content[i * MiB + 4096:i * MiB + 4096 + 70_000] = os.urandom(70_000)
            self.add(name, bytes(content), creation=1_700_000_000 + i, origin="lv")
        content[3 * MiB:3 * MiB + 100] = b"\xee" * 100
        self.write("lv", bytes(content))

    def write(self, name: str, data: bytes) -> None:
        path = self.tmp / f"{name}.img"
        path.write_bytes(data)
        self.images[f"vg0/{name}"] = str(path)

    def add(self, name: str, data: bytes, creation: int, origin: str = "") -> None:
        self.write(name, data)
        self.lvs.append(make_lv(name, origin=origin, creation=creation, path=self.images[f"vg0/{name}"]))

    def list_lvs(self, vg: str | None = None) -> list[LogicalVolume]:
        if self.fail_lvs:
            raise CommandFailed(["lvs"], 5, "lvs: broken")
        return [x for x in self.lvs if vg is None or x.vg == vg]

    def open(self, base: str, target: str):
        self.opened.append((base, target))
        delta = compare_delta(self.images[base], self.images[target], block_size=65536)
        delta.point_in_time = target != "vg0/lv"
        return delta

    def remove(self, name: str) -> None:
        self.lvs = [x for x in self.lvs if x.name != name]

    def invalidate(self, name: str) -> None:
        self.lvs = [replace(x, attr="swi-I-s---") if x.name == name else x for x in self.lvs]


@pytest.fixture
def lvm(tmp_path) -> FakeLvm:
    return FakeLvm(tmp_path)


def make_fs(lvm: FakeLvm, **kw) -> vfs.Vfs:
    disc = discovery.Discovery(list_lvs=lvm.list_lvs, ttl=0)
    return vfs.Vfs(discovery=disc, lvm_opener=lvm.open, **kw)


def walk(fs: vfs.Vfs, path: str) -> replies.Attr:
    attr = fs.getattr(vfs.ROOT_INO)
    for part in path.split("/"):
        if part:
            attr = fs.lookup(attr.ino, part)
    return attr


def names(fs: vfs.Vfs, path: str) -> list[str]:
    return [n for n, _ in fs.readdir(walk(fs, path).ino)]


def read_all(fs: vfs.Vfs, path: str) -> bytes:
    fh = fs.open(walk(fs, path).ino)
    try:
        out, off = [], 0
        while chunk := fs.read(fh, off, 300_000):
            out.append(chunk)
            off += len(chunk)
        return b"".join(out)
    finally:
        fs.release(fh)


def enoent(fn, *args) -> int:
    with pytest.raises(replies.VfsError) as e:
        fn(*args)
    return e.value.errno


def test_tree_lists_volumes_snapshots_in_creation_order_and_pairs(lvm):
    fs = make_fs(lvm)
    assert names(fs, "") == ["vg0"]
    assert names(fs, "vg0") == ["lv"]
    assert names(fs, "vg0/lv") == ["snapshots", "s9..s10", "s10..s11", "s11..@origin"]
    assert names(fs, "vg0/lv/snapshots") == ["s9", "s10", "s11"]
    facts = json.loads(read_all(fs, "vg0/lv/snapshots/s10"))
    assert facts["uuid"] == "uuid-vg0-s10" and facts["kind"] == "classic"
    assert walk(fs, "vg0/lv/snapshots/s10").mtime_ns == 1_700_000_001 * 10**9
    assert walk(fs, "vg0/lv/s9..s10").mtime_ns == 1_700_000_001 * 10**9
    assert names(fs, "vg0/lv/s9..s10") == list(NAMES)
    root = fs.getattr(vfs.ROOT_INO)
    assert root.is_dir and root.mode == 0o500


def test_deltas_open_lazily_and_once(lvm):
    fs = make_fs(lvm)
    names(fs, "vg0/lv")
    walk(fs, "vg0/lv/s9..s10")
    assert lvm.opened == []  # listing volumes and pair directories reads no COW table
    walk(fs, "vg0/lv/s9..s10/data")
    walk(fs, "vg0/lv/s9..s10/chunks")
    read_all(fs, "vg0/lv/s9..s10/ranges")
    assert lvm.opened == [("vg0/s9", "vg0/s10")]


def test_any_ordered_pair_resolves_by_name_and_bad_names_do_not(lvm):
    fs = make_fs(lvm)
    lv = walk(fs, "vg0/lv").ino
    assert fs.lookup(lv, "s9..s11").is_dir
    assert fs.lookup(lv, "s9..@origin").is_dir
    for bad in ["s11..s9", "s9..s9", "a..", "..b", "..", ".", "x..y", "s9..", "..s9", "s9...s10",
                "s9..s10..s11", "@origin..s9", "s9..snapshots", "s9", "nope", "s9..s10/x", "\udcff..s9"]:
        assert enoent(fs.lookup, lv, bad) == errno.ENOENT, bad
    assert enoent(fs.lookup, vfs.ROOT_INO, "vg1") == errno.ENOENT
    assert enoent(fs.lookup, walk(fs, "vg0").ino, "s9") == errno.ENOENT  # snapshots are not volumes
    assert enoent(fs.lookup, walk(fs, "vg0/lv/s9..s10").ino, "other") == errno.ENOENT
    assert enoent(fs.getattr, 99999) == errno.ENOENT
    assert lvm.opened == []


def test_files_match_the_delta_views_and_the_target(lvm):
    fs = make_fs(lvm)
    delta = lvm.open("vg0/s9", "vg0/s11")
    files = DeltaFiles(delta)
    for name in NAMES:
        attr = walk(fs, f"vg0/lv/s9..s11/{name}")
        assert attr.size == files[name].size, name
        assert attr.mode == 0o400
    data = walk(fs, "vg0/lv/s9..s11/data")
    assert data.blocks * 512 == delta.extents.data_bytes  # du shows the delta, not the volume
    assert data.mtime_ns == 1_700_000_002 * 10**9
    body = read_all(fs, "vg0/lv/s9..s11/data")
    target = Path(lvm.images["vg0/s11"]).read_bytes()
    expect = bytearray(SIZE)
    for off, length, _kind in delta.extents:
        expect[off:off + length] = target[off:off + length]
    assert body == bytes(expect)
    assert read_all(fs, "vg0/lv/s9..s11/chunks") == files["chunks"].pread(0, files["chunks"].size)
    manifest = json.loads(read_all(fs, "vg0/lv/s9..s11/manifest.json"))
    assert manifest["delta_id"] == delta.identity.delta_id and manifest["point_in_time"] is True
    assert read_all(fs, "vg0/lv/s9..s11/delta") == b"".join(files["delta"].blocks())
    delta.close()


def test_quick_reads_of_data_are_the_same_bytes_and_only_where_no_io_is_needed(lvm, image_pair):
    """The FUSE adapter answers a handle's quick() reads on its own thread: they must be the
    bytes pread gives, given only where nothing changed, and never for an image pair (whose
    reads stat the images)."""
    fs = make_fs(lvm)
    delta = lvm.open("vg0/s9", "vg0/s11")
    fh = fs.open(walk(fs, "vg0/lv/s9..s11/data").ino)
    h = fs.handle(fh)
    assert h.quick is not None
    answered = 0
    for off in range(0, SIZE + 4096, 4096):
        got = h.quick(off, 4096)
        if got is not None:
            answered += 1
            assert got == h.pread(off, 4096) and not got.strip(b"\0")
        else:
            assert any(o < off + 4096 and off < o + n for o, n, _ in delta.extents)
    assert answered
    fs.release(fh)
    assert fs.handle(fs.open(walk(fs, "vg0/lv/s9..s11/chunks").ino)).quick is None
    ifs, _base, _target, pair = image_pair
    assert ifs.handle(ifs.open(walk(ifs, f"{pair}/data").ino)).quick is None
    delta.close()


def test_inline_reads_from_the_page_cache_are_the_same_bytes(lvm):
    """Handles the FUSE adapter may read on its own thread (inside cached_only) give what a
    worker's read gives; manifest.json (which reads all of chunks once) is never one of them."""
    fs = make_fs(lvm)
    for name in NAMES:
        fh = fs.open(walk(fs, f"vg0/lv/s9..s11/{name}").ino)
        h = fs.handle(fh)
        assert h.inline == (name != "manifest.json"), name
        if h.inline:
            for off in range(0, h.size + 4096, 65536):
                want = h.pread(off, 100_000)
                try:
                    with deltamod.cached_only():
                        got = h.pread(off, 100_000)
                except deltamod.WouldBlock:
                    continue  # not in the page cache (or no RWF_NOWAIT here): a worker reads it
                assert got == want, (name, off)
        fs.release(fh)


def test_cached_only_reads_what_is_cached_and_refuses_the_rest(tmp_path, monkeypatch):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(300_000))
    with deltamod.FileReader(str(path)) as r:
        r.pread(0, 300_000)  # now cached, wherever tmp_path is
        try:
            with deltamod.cached_only():
                assert r.pread(1000, 200_000) == path.read_bytes()[1000:201_000]
        except deltamod.WouldBlock:
            assert not r.nowait  # a filesystem without RWF_NOWAIT: every such read goes to a worker
        with deltamod.cached_only(), pytest.raises(deltamod.WouldBlock):
            r.pread(299_000, 2000)  # past the end: a worker's pread reports the short read
        with pytest.raises(OSError, match="short read"):
            r.pread(299_000, 2000)

        def would_block(*args):
            raise BlockingIOError(errno.EAGAIN, "not cached")
        monkeypatch.setattr(deltamod.os, "preadv", would_block)
        r.nowait = True
        with deltamod.cached_only(), pytest.raises(deltamod.WouldBlock):
            r.pread(0, 10)
        assert r.nowait and r.pread(0, 10) == path.read_bytes()[:10]  # outside cached_only: reads

        def unsupported(*args):
            raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")
        monkeypatch.setattr(deltamod.os, "preadv", unsupported)
        with deltamod.cached_only(), pytest.raises(deltamod.WouldBlock):
            r.pread(0, 10)
        assert not r.nowait  # asked once, then never again


def test_reads_past_the_end_and_bad_handles(lvm):
    fs = make_fs(lvm)
    attr = walk(fs, "vg0/lv/s9..s10/chunks")
    fh = fs.open(attr.ino)
    assert fs.read(fh, attr.size, 4096) == b""
    assert fs.read(fh, attr.size + 10**12, 4096) == b""
    assert len(fs.read(fh, attr.size - 10, 4096)) == 10
    assert enoent(fs.read, fh, -1, 10) == errno.EINVAL
    fs.release(fh)
    assert enoent(fs.read, fh, 0, 10) == errno.EBADF
    fs.release(fh)  # twice is harmless


def test_writes_are_refused_and_directories_are_not_files(lvm):
    fs = make_fs(lvm)
    ino = walk(fs, "vg0/lv/s9..s10/data").ino
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert enoent(fs.open, ino, flags) == errno.EROFS
    assert enoent(fs.open, walk(fs, "vg0/lv").ino) == errno.EISDIR
    assert enoent(fs.readdir, ino) == errno.ENOTDIR


def test_identity_as_extended_attributes(lvm):
    fs = make_fs(lvm)
    ino = walk(fs, "vg0/lv/s10..s11/data").ino
    listed = fs.listxattr(ino)
    assert set(listed) == {f"user.lvdeltafs.{k}" for k in
                           ("delta_id", "volume", "base", "target", "source", "point_in_time")}
    delta = lvm.open("vg0/s10", "vg0/s11")
    assert fs.getxattr(ino, "user.lvdeltafs.delta_id") == delta.identity.delta_id.encode()
    assert fs.getxattr(walk(fs, "vg0/lv/s10..s11").ino, "user.lvdeltafs.source") == b"compare"
    assert enoent(fs.getxattr, ino, "user.other") == errno.ENODATA
    assert fs.listxattr(walk(fs, "vg0").ino) == []
    delta.close()


def test_live_origin_pair_says_it_is_not_point_in_time(lvm):
    fs = make_fs(lvm)
    manifest = json.loads(read_all(fs, "vg0/lv/s11..@origin/manifest.json"))
    assert manifest["point_in_time"] is False
    assert lvm.opened[-1] == ("vg0/s11", "vg0/lv")
    ino = walk(fs, "vg0/lv/s11..@origin/data").ino
    assert fs.getxattr(ino, "user.lvdeltafs.point_in_time") == b"false"


def test_target_is_open_only_while_a_file_is(lvm):
    fs = make_fs(lvm)
    ino = walk(fs, "vg0/lv/s9..s10/chunks").ino
    entry = next(iter(fs.cache._entries.values()))
    assert entry.delta.target.fd < 0  # an idle mount must not keep snapshots busy
    fh1, fh2 = fs.open(ino), fs.open(ino)
    assert entry.delta.target.fd >= 0 and entry.refs == 2
    fs.release(fh1)
    assert entry.delta.target.fd >= 0
    fs.release(fh2)
    assert entry.delta.target.fd < 0
    assert read_all(fs, "vg0/lv/s9..s10/chunks")  # reopens


def test_cache_is_bounded_and_never_closes_under_a_reader(lvm):
    fs = make_fs(lvm, cache_size=1)
    fh = fs.open(walk(fs, "vg0/lv/s9..s10/chunks").ino)
    walk(fs, "vg0/lv/s10..s11/chunks")
    walk(fs, "vg0/lv/s9..s11/chunks")
    assert fs.read(fh, 0, 100)  # the entry in use survived the others
    fs.release(fh)
    walk(fs, "vg0/lv/s10..s11/chunks")
    walk(fs, "vg0/lv/s9..s10/chunks")
    assert lvm.opened.count(("vg0/s9", "vg0/s10")) == 2  # evicted once idle, opened again
    assert len(fs.cache._entries) == 1


def test_removed_snapshot_gives_enoent_and_the_rest_goes_on(lvm):
    fs = make_fs(lvm)
    gone = walk(fs, "vg0/lv/s10..s11/data").ino
    kept = walk(fs, "vg0/lv/s9..s10/data").ino
    fh = fs.open(gone)
    lvm.remove("s11")
    assert enoent(fs.getattr, gone) == errno.ENOENT
    assert enoent(fs.open, gone) == errno.ENOENT
    assert enoent(fs.lookup, walk(fs, "vg0/lv").ino, "s10..s11") == errno.ENOENT
    assert fs.read(fh, 0, 10) is not None  # a file already open keeps what it had
    fs.release(fh)
    assert names(fs, "vg0/lv") == ["snapshots", "s9..s10", "s10..@origin"]
    assert fs.getattr(kept).size == SIZE
    assert read_all(fs, "vg0/lv/s9..s10/data")
    lvm.remove("s9")
    lvm.remove("s10")
    assert enoent(fs.lookup, vfs.ROOT_INO, "vg0") == errno.ENOENT  # no snapshots left in it
    assert names(fs, "") == []


def test_invalid_snapshot_gives_eio(lvm):
    fs = make_fs(lvm)
    ino = walk(fs, "vg0/lv/s9..s10/data").ino
    lvm.invalidate("s9")
    assert enoent(fs.getattr, ino) == errno.EIO
    assert enoent(fs.open, ino) == errno.EIO
    assert read_all(fs, "vg0/lv/s10..s11/ranges")  # pairs without it are untouched


def test_failed_open_is_an_error_remembered_briefly(lvm, monkeypatch):
    calls = []

    def broken(base, target):
        calls.append(base)
        raise SnapshotUnusable("snapshot vg0/s9 is not active")

    fs = vfs.Vfs(discovery=discovery.Discovery(list_lvs=lvm.list_lvs, ttl=0), lvm_opener=broken)
    pair = walk(fs, "vg0/lv/s9..s10").ino
    for _ in range(3):
        with pytest.raises(SnapshotUnusable) as e:
            fs.lookup(pair, "data")
        assert replies.errno_of(e.value) == errno.EIO
    assert len(calls) == 1
    monkeypatch.setattr(deltacache, "FAILURE_TTL", 0.0)
    with pytest.raises(SnapshotUnusable):
        fs.lookup(pair, "data")
    assert len(calls) == 2


def test_lvm_that_cannot_be_listed_leaves_explicit_pairs(lvm):
    lvm.fail_lvs = True
    pairs = tree.explicit_pairs([(lvm.images["vg0/s9"], lvm.images["vg0/s10"]),
                                 (lvm.images["vg0/s9"], lvm.images["vg0/s10"])])
    fs = vfs.Vfs(discovery=discovery.Discovery(list_lvs=lvm.list_lvs, ttl=0), pairs=pairs)
    assert names(fs, "") == ["@pairs"]
    assert names(fs, "@pairs") == ["s9.img..s10.img", "s9.img..s10.img-2"]
    assert read_all(fs, "@pairs/s9.img..s10.img/ranges") == read_all(fs, "@pairs/s9.img..s10.img-2/ranges")
    assert replies.errno_of(pytest.raises(CommandFailed, fs.lookup, vfs.ROOT_INO, "vg0").value) == errno.EIO


def test_only_named_vgs_show(lvm):
    lvm.lvs.append(make_lv("other", vg="vg1"))
    lvm.lvs.append(make_lv("snap", vg="vg1", origin="other", path=lvm.images["vg0/s9"]))
    fs = make_fs(lvm)
    assert names(fs, "") == ["vg0", "vg1"]
    fs = vfs.Vfs(discovery=discovery.Discovery(["vg1", "empty"], list_lvs=lvm.list_lvs, ttl=0),
                 lvm_opener=lvm.open)
    assert names(fs, "") == ["empty", "vg1"]
    assert names(fs, "empty") == []
    assert enoent(fs.lookup, vfs.ROOT_INO, "vg0") == errno.ENOENT


def test_private_by_default_to_the_mounting_user(lvm):
    fs = make_fs(lvm, uid=1234, gid=5678)
    for path in ["", "vg0", "vg0/lv", "vg0/lv/snapshots", "vg0/lv/s9..s10"]:
        attr = walk(fs, path)
        assert (attr.mode, attr.uid, attr.gid) == (0o500, 1234, 5678), path
    for path in ["vg0/lv/snapshots/s9", "vg0/lv/s9..s10/data"]:
        attr = walk(fs, path)
        assert (attr.mode, attr.uid, attr.gid) == (0o400, 1234, 5678), path


AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="gives files away with chown: needs root")


@AS_ROOT
def test_allow_other_gives_each_entry_its_sources_owner_and_read_bits(lvm):
    for name, (uid, gid, mode) in {"lv": (0, 6, 0o660), "s9": (0, 6, 0o640), "s10": (0, 6, 0o660),
                                   "s11": (1000, 6, 0o600)}.items():
        os.chown(lvm.images[f"vg0/{name}"], uid, gid)
        os.chmod(lvm.images[f"vg0/{name}"], mode)
    fs = make_fs(lvm, allow_other=True, uid=1234, gid=5678)
    # Names anyone may list (as /dev/VG does); the LV's directory follows its device.
    assert [(walk(fs, p).mode, walk(fs, p).uid) for p in ["", "vg0"]] == [(0o555, 1234)] * 2
    assert (walk(fs, "vg0/lv").mode, walk(fs, "vg0/lv").gid) == (0o550, 6)
    assert walk(fs, "vg0/lv/snapshots/s9").mode == 0o440
    # A pair: the newer side's owner and group; its read bits, narrowed by the older side's.
    pair = walk(fs, "vg0/lv/s9..s10")
    assert (pair.mode, pair.uid, pair.gid) == (0o550, 0, 6)  # s9 lets its group read, not write: no w
    data = walk(fs, "vg0/lv/s9..s10/data")
    assert (data.mode, data.uid, data.gid) == (0o440, 0, 6)
    # s11 is its owner's alone (uid 1000), and s10's owner is root: only root reads their delta.
    assert walk(fs, "vg0/lv/s10..s11/ranges").mode & 0o444 == 0
    assert walk(fs, "vg0/lv/s10..s11/ranges").uid == 1000
    os.chmod(lvm.images["vg0/s10"], 0o644)  # readable by all: the older side narrows nothing
    assert walk(fs, "vg0/lv/s10..s11/ranges").mode == 0o400
    assert walk(fs, "vg0/lv/s10..s11").mode == 0o500
    os.chmod(lvm.images["vg0/s11"], 0o664)
    assert walk(fs, "vg0/lv/s10..s11/ranges").mode == 0o444
    os.unlink(lvm.images["vg0/s9"])  # a side that cannot be looked at: root's alone
    assert (walk(fs, "vg0/lv/snapshots/s9").mode, walk(fs, "vg0/lv/snapshots/s9").uid) == (0, 0)


@AS_ROOT
def test_allow_other_on_explicit_image_pairs(tmp_path):
    base, target = tmp_path / "base.img", tmp_path / "target.img"
    base.write_bytes(bytes(MiB))
    target.write_bytes(b"x" * MiB)
    os.chown(target, 0, 0)
    for b_mode, t_mode, want in [(0o600, 0o600, 0o400), (0o644, 0o644, 0o444), (0o600, 0o644, 0o400),
                                 (0o640, 0o604, 0o404 & 0o400), (0o444, 0o640, 0o440)]:
        base.chmod(b_mode)
        target.chmod(t_mode)
        fs = vfs.Vfs(pairs=tree.explicit_pairs([(str(base), str(target))]), allow_other=True)
        assert walk(fs, "@pairs/base.img..target.img/ranges").mode == want, (oct(b_mode), oct(t_mode))
        assert walk(fs, "@pairs/base.img..target.img").mode == want | want >> 2
        assert walk(fs, "@pairs").mode == 0o555


# ---- an image of a --pair changed in place ------------------------------------

@pytest.fixture
def image_pair(tmp_path):
    base, target = tmp_path / "base.img", tmp_path / "target.img"
    content = bytearray(os.urandom(SIZE))
    base.write_bytes(content)
    content[MiB:MiB + 5000] = os.urandom(5000)
    target.write_bytes(content)
    fs = vfs.Vfs(pairs=tree.explicit_pairs([(str(base), str(target))]))
    return fs, base, target, "@pairs/base.img..target.img"


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    # Coarse file timestamps may not tick between two writes this close; a real writer
    # changes something stat shows (see freshness.Stamp for that limit).
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))


def test_changed_image_fails_open_files_with_eio_and_is_computed_again(image_pair, caplog):
    fs, base, target, pair = image_pair
    before = read_all(fs, f"{pair}/ranges")
    assert before == b"%d 65536 data\n" % MiB
    fh = fs.open(walk(fs, f"{pair}/data").ino)
    assert fs.read(fh, MiB, 10) == target.read_bytes()[MiB:MiB + 10]
    write_at(target, 3 * MiB, b"new" * 1000)
    with caplog.at_level("WARNING", logger="lvdeltafs.deltacache"):
        for _ in range(3):  # every read of the open file fails, and stays failed
            with pytest.raises(replies.VfsError) as e:
                fs.read(fh, MiB, 10)
            assert e.value.errno == errno.EIO and e.value.quiet
        after = read_all(fs, f"{pair}/ranges")  # a new lookup computes the delta again
    assert after == b"%d 65536 data\n%d 65536 data\n" % (MiB, 3 * MiB)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # said once, naming the image and what to do
    assert str(target) in warnings[0] and "close and reopen" in warnings[0]
    with pytest.raises(replies.VfsError):
        fs.read(fh, 0, 10)  # the old handle still refuses: its delta is not the new one
    fs.release(fh)
    assert read_all(fs, f"{pair}/data")[3 * MiB:3 * MiB + 3] == b"new"


def test_changed_base_and_replaced_image_are_noticed_too(image_pair):
    fs, base, target, pair = image_pair
    assert read_all(fs, f"{pair}/ranges") == b"%d 65536 data\n" % MiB
    write_at(base, 2 * MiB, b"old" * 10)
    assert read_all(fs, f"{pair}/ranges") == b"%d 65536 data\n%d 65536 data\n" % (MiB, 2 * MiB)
    fresh = target.with_name("fresh.img")
    fresh.write_bytes(base.read_bytes())
    os.replace(fresh, target)  # same size, maybe the same mtime: a new inode
    assert read_all(fs, f"{pair}/ranges") == b""


def test_open_with_attributes_of_the_old_delta_is_estale(image_pair):
    fs, base, target, pair = image_pair
    ino = walk(fs, f"{pair}/ranges").ino
    assert walk(fs, f"{pair}/ranges").size == len(b"%d 65536 data\n" % MiB)
    write_at(target, 3 * MiB, b"new")
    # The kernel holds the old size: it must look the name up again before it reads.
    with pytest.raises(replies.VfsError) as e:
        fs.open(ino)
    assert e.value.errno == errno.ESTALE
    assert fs.lookup(walk(fs, pair).ino, "ranges").size == len(b"%d 65536 data\n" % MiB) * 2
    fs.release(fs.open(ino))


def test_image_changing_while_its_delta_is_computed_is_eio(tmp_path):
    base, target = tmp_path / "base.img", tmp_path / "target.img"
    base.write_bytes(bytes(MiB))
    target.write_bytes(bytes(MiB))
    spec = tree.explicit_pairs([(str(base), str(target))])["base.img..target.img"]
    opener = spec.opener

    def written_meanwhile():
        delta = opener()
        write_at(target, 0, b"busy")
        return delta

    pairs = {"p": replace(spec, opener=written_meanwhile)}
    fs = vfs.Vfs(pairs=pairs)
    pair = walk(fs, "@pairs/p").ino
    with pytest.raises(replies.VfsError) as e:
        fs.lookup(pair, "ranges")
    assert e.value.errno == errno.EIO and str(target) in str(e.value)


def test_split_pair_name():
    assert tree.split_pair_name("a..b") == [("a", "b")]
    assert tree.split_pair_name("a...b") == [("a", ".b"), ("a.", "b")]
    assert tree.split_pair_name("a..b..c") == [("a", "b..c"), ("a..b", "c")]
    assert tree.split_pair_name("..") == []
    assert tree.split_pair_name("ab") == []


def test_errno_mapping():
    assert replies.errno_of(replies.VfsError(errno.ENOENT)) == errno.ENOENT
    assert replies.errno_of(FileNotFoundError(errno.ENOENT, "x")) == errno.ENOENT
    assert replies.errno_of(OSError(errno.EIO, "short read")) == errno.EIO
    assert replies.errno_of(ValueError("negative offset")) == errno.EINVAL
    assert replies.errno_of(SnapshotUnusable("gone")) == errno.EIO
    assert replies.errno_of(RuntimeError("bug")) == errno.EIO
