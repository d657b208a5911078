"""The delta files as views: exact sizes, random reads against a naive materialisation, export, verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvdeltafs.delta import Delta, Identity
from lvdeltafs.errors import CorruptDelta, Refused
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.formats.export import export
from lvdeltafs.formats.files import NAMES, DeltaFiles
from lvdeltafs.formats.reader import iter_records
from lvdeltafs.formats.stream import MAX_DATA
from lvdeltafs.formats.verify import verify_path
from tests.harness import MemoryReader


def make_delta(size, ranges, seed=0, point_in_time=True):
    target = random.Random(seed).randbytes(size)
    ext = Extents.from_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges], size)
    ident = Identity(volume="vol", base="b@1", target="t@2", base_size=size, target_size=size,
                     chunk_size=4096, source="thin")
    return Delta(ident, ext, MemoryReader(target), point_in_time=point_in_time), target


def naive(delta, target):
    """Every file built the obvious way, from the whole target."""
    e = delta.extents
    ranges = "".join(f"{o} {n} {'data' if k == DATA else 'zero'}\n" for o, n, k in e).encode()
    data = bytearray(delta.identity.target_size)
    chunks = bytearray()
    for o, n, k in e:
        if k == DATA:
            data[o:o + n] = target[o:o + n]
            chunks += target[o:o + n]
    return {"ranges": ranges, "data": bytes(data), "chunks": bytes(chunks)}


CASE = (3 * MAX_DATA + 5000, [(0, 100, DATA), (100, 4000, ZERO), (8192, 2 * MAX_DATA + 7, DATA),
                              (3 * MAX_DATA, 10, ZERO), (3 * MAX_DATA + 100, 4900, DATA)])


@st.composite
def delta_st(draw):
    size = draw(st.integers(0, 3 * MAX_DATA))
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=10))))
    ranges = [(a, b - a, draw(st.sampled_from([DATA, ZERO]))) for a, b in zip(cuts, cuts[1:], strict=False)
              if draw(st.booleans())]
    return size, ranges


@settings(max_examples=40, deadline=None)
@given(delta_st(), st.randoms(use_true_random=False))
def test_views_match_naive(case, rnd):
    size, ranges = case
    delta, target = make_delta(size, ranges)
    files = DeltaFiles(delta)
    want = naive(delta, target)
    full_stream = b"".join(files["delta"].blocks())
    want["delta"] = full_stream
    manifest = files["manifest.json"]
    want["manifest.json"] = manifest.content()
    assert set(files) == set(NAMES)
    for name in NAMES:
        view = files[name]
        assert view.size == len(want[name]), name
        assert view.pread(0, view.size + 10) == want[name]
        for _ in range(10):
            off = rnd.randrange(view.size + 5)
            n = rnd.choice([0, 1, 13, 4096, 131072, MAX_DATA + 100])
            assert view.pread(off, n) == want[name][off:off + n], (name, off, n)
    assert files["data"].changed_bytes == len(want["chunks"])
    m = json.loads(want["manifest.json"])
    assert m["chunks_sha256"] == hashlib.sha256(want["chunks"]).hexdigest()


def test_manifest_size_known_before_digest():
    delta, target = make_delta(*CASE)
    files = DeltaFiles(delta)
    man = files["manifest.json"]
    size = man.size  # no data read yet
    assert man._sha is None
    m = json.loads(man.content())
    assert len(man.content()) == size
    assert m["delta_id"] == delta.identity.delta_id
    assert m["identity"] == delta.identity.to_dict()
    nrec = len(list(iter_records(io.BytesIO(b"".join(files["delta"].blocks())))))
    assert m["counts"] == {"extents": 5, "data_extents": 3, "zero_extents": 2, "stream_records": nrec}
    assert m["bytes"]["delta"] == files["delta"].size
    assert m["point_in_time"] is True
    assert m["tool"] == "lvdeltafs"


def test_sizes_need_no_reads():
    class NoRead(MemoryReader):
        def pread(self, offset, length):
            raise AssertionError("read during stat")

    delta, _ = make_delta(*CASE)
    delta.target = NoRead(b"")
    files = DeltaFiles(delta)
    assert all(files[n].size > 0 for n in NAMES)
    assert files["ranges"].pread(0, 1000)  # ranges never reads the target


@pytest.fixture
def exported(tmp_path):
    delta, target = make_delta(*CASE)
    d = tmp_path / "delta-dir"
    sizes = export(delta, str(d))
    return delta, target, d, sizes


def test_export_writes_views(exported):
    delta, target, d, sizes = exported
    files = DeltaFiles(delta)
    for name in NAMES:
        assert (d / name).read_bytes() == files[name].pread(0, files[name].size), name
        assert sizes[name] == files[name].size
    assert not [p for p in os.listdir(d) if p.startswith(".")], "no temp files left"
    st_ = os.stat(d / "data")
    assert st_.st_blocks * 512 < st_.st_size, "data is sparse"


def test_export_then_verify(exported):
    _, _, d, _ = exported
    s = verify_path(str(d))
    assert s["kind"] == "directory"
    s = verify_path(str(d / "delta"))
    assert s["kind"] == "stream" and s["data_bytes"] == CASE[1][0][1] + CASE[1][2][1] + CASE[1][4][1]


def flip_hex(b, i):
    b[i] = ord("1") if b[i] == ord("0") else ord("0")


def corrupt_copy(src, dst, name, how):
    shutil.copytree(src, dst)
    p = dst / name
    b = bytearray(p.read_bytes())
    how(b)
    p.write_bytes(bytes(b))
    return dst


@pytest.mark.parametrize("name, how, match", [
    ("chunks", lambda b: b.__setitem__(5, b[5] ^ 1), "sha256|differ"),
    ("chunks", lambda b: b.pop(), "chunks is"),
    ("data", lambda b: b.__setitem__(50, b[50] ^ 1), "data and chunks differ"),
    ("delta", lambda b: b.__setitem__(len(b) // 2, b[len(b) // 2] ^ 4), "corrupt"),
    ("delta", lambda b: b.__delitem__(slice(len(b) - 10, None)), "truncated"),
    ("ranges", lambda b: b.__setitem__(0, ord("x")), "ranges line 1"),
    ("manifest.json", lambda b: flip_hex(b, b.index(b'"chunks_sha256": "') + 20), "sha256"),
    ("manifest.json", lambda b: flip_hex(b, b.index(b'"data_extents": ') + 16), "data_extents"),
    ("manifest.json", lambda b: b.__setitem__(0, ord("[")), "JSON"),
])
def test_corrupted_copy_fails_verify(exported, tmp_path, name, how, match):
    _, _, d, _ = exported
    bad = corrupt_copy(d, tmp_path / "bad", name, how)
    with pytest.raises(CorruptDelta, match=match):
        verify_path(str(bad))


def test_ranges_disagreeing_with_stream(exported, tmp_path):
    """A consistent-looking ranges/chunks pair that the stream does not carry is caught."""
    _, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    text = (bad / "ranges").read_text().replace(f"{3 * MAX_DATA} 10 zero", f"{3 * MAX_DATA} 11 zero")
    (bad / "ranges").write_text(text)
    with pytest.raises(CorruptDelta):
        verify_path(str(bad))


def test_missing_file(exported, tmp_path):
    _, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    os.unlink(bad / "chunks")
    with pytest.raises(CorruptDelta, match="chunks is missing"):
        verify_path(str(bad))


def test_touching_ranges_of_one_kind_still_verify(exported, tmp_path):
    """A hand-split ranges line is legal input (as parse_ranges has it): coalesced before comparing."""
    _, _, d, _ = exported
    ok = tmp_path / "split"
    shutil.copytree(d, ok)
    first = f"8192 {2 * MAX_DATA + 7} data\n"
    text = (ok / "ranges").read_text()
    assert first in text
    (ok / "ranges").write_text(text.replace(first, f"8192 7 data\n8199 {2 * MAX_DATA} data\n"))
    assert verify_path(str(ok))["extents"] == len(CASE[1])


@pytest.mark.parametrize("line, match", [
    (b"1" * 5000 + b"\n", "ranges line 1 is malformed"),
    (b"0 5 data\n0 5 data\n", "ranges line 2: offset 0 is before"),
    (b"0 99999999999 data\n", "ranges line 1: range 0\\+99999999999 ends past"),
])
def test_bad_ranges_lines_name_their_line(exported, tmp_path, line, match):
    _, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "ranges").write_bytes(line)
    with pytest.raises(CorruptDelta, match=match):
        verify_path(str(bad))


@pytest.mark.parametrize("where", [
    100,                      # the first byte of a zero range
    150,                      # inside a zero range
    8191,                     # the last byte of a plain gap, just before a data range
    8192 + 2 * MAX_DATA + 7,  # the first byte after a data range
    3 * MAX_DATA + 5,         # a zero range near the end
    3 * MAX_DATA + 50,        # the gap before the last data range
])
def test_verify_refuses_bytes_outside_the_data_ranges(exported, tmp_path, where):
    """`data` must read as zeros outside its data ranges; the first offending offset is named."""
    _, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    with open(bad / "data", "r+b") as f:
        f.seek(where)
        f.write(b"\x01")
    with pytest.raises(CorruptDelta, match=f"non-zero byte at offset {where},"):
        verify_path(str(bad))


def test_verify_finds_a_byte_in_a_large_sparse_gap(tmp_path):
    """Gaps over 1 MiB are read only where the file has data (SEEK_DATA), and still checked."""
    size = 64 * MAX_DATA
    delta, _ = make_delta(size, [(0, 10, DATA), (size - 10, 10, DATA)])
    export(delta, str(tmp_path / "d"))
    assert verify_path(str(tmp_path / "d"))["data_bytes"] == 20
    with open(tmp_path / "d" / "data", "r+b") as f:
        f.seek(37 * MAX_DATA + 12345)
        f.write(b"\x00\x00\x09")
    with pytest.raises(CorruptDelta, match=f"non-zero byte at offset {37 * MAX_DATA + 12347},"):
        verify_path(str(tmp_path / "d"))


def test_deeply_nested_or_huge_manifest_is_corrupt(exported, tmp_path):
    _, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CorruptDelta, match="manifest.json is not valid JSON"):
        verify_path(str(bad))
    (bad / "manifest.json").write_bytes(b" " * (2 << 20) + b"{}")
    with pytest.raises(CorruptDelta, match="manifest.json is over"):
        verify_path(str(bad))


class Pattern:
    """A target of any size whose bytes are never zero (cheap to make, any offset)."""

    def __init__(self, size: int):
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        return bytes((offset + i) % 251 + 1 for i in range(length))

    def close(self) -> None:
        pass


RSS_PROBE = """
import resource, sys
from lvdeltafs.formats.verify import verify_path
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
verify_path(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_verify_memory_does_not_grow_with_the_ranges_file(tmp_path):
    """80,000 ranges lines (1.6 MB): verify streams them; parsing the whole text at once took 8x its size."""
    import subprocess
    import sys

    import numpy as np

    n, size = 40_000, 1 << 40
    offsets = 10**11 + np.arange(2 * n, dtype=np.uint64)
    kinds = np.tile(np.array([DATA, ZERO], np.uint8), n)
    ext = Extents.from_ranges(offsets, np.ones(2 * n, np.uint64), kinds, size)
    ident = Identity(volume="image", base="a", target="b", base_size=size, target_size=size,
                     chunk_size=4096, source="compare")
    export(Delta(ident, ext, Pattern(size)), str(tmp_path / "d"))
    assert (tmp_path / "d" / "ranges").stat().st_size == 1_600_000
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "d")], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    grew_kib = int(out.stdout)
    assert grew_kib < 5 * 1024, f"verify grew by {grew_kib} KiB"


# ---------------------------------------------------------------- export's directory


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_export_refuses_a_directory_others_can_write(tmp_path, mode):
    delta, _ = make_delta(*CASE)
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(Refused, match="can be written by users other than its owner"):
        export(delta, str(d))
    assert os.listdir(d) == []


def test_export_into_a_sticky_shared_directory_and_again_over_its_own_files(tmp_path):
    delta, target = make_delta(*CASE)
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    export(delta, str(d))
    other, _ = make_delta(CASE[0], CASE[1][:2], seed=1)
    sizes = export(other, str(d))  # our own files from the first export are replaced
    assert sorted(os.listdir(d)) == sorted(NAMES), "no temporary files left"
    for name in NAMES:
        st_ = os.lstat(d / name)
        assert st_.st_mode & 0o777 == 0o600 and st_.st_uid == os.geteuid()
        assert sizes[name] == st_.st_size
    assert verify_path(str(d))["delta_id"] == other.identity.delta_id


@pytest.mark.parametrize("name", NAMES)
def test_export_refuses_a_link_at_a_final_name(tmp_path, name):
    delta, _ = make_delta(*CASE)
    d = tmp_path / "d"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, d / name)
    with pytest.raises(Refused, match="is a symbolic link"):
        export(delta, str(d))
    assert victim.read_bytes() == b"keep me" and os.readlink(d / name) == str(victim)
    assert os.listdir(d) == [name], "nothing else was written"


def test_export_does_not_create_through_a_dangling_link_at_the_directory(tmp_path):
    delta, _ = make_delta(*CASE)
    os.symlink(tmp_path / "elsewhere", tmp_path / "d")
    with pytest.raises(Refused, match="exists and is not a directory"):
        export(delta, str(tmp_path / "d"))
    assert not (tmp_path / "elsewhere").exists()
