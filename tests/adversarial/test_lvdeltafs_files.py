"""`lvdeltafs export` and `verify` against a hostile local user and hostile files, through the real CLI.

Tests run as root; the hostile user is ``nobody``, whose every action runs
under ``setpriv``.  The export directory is a sticky, world-writable folder
(like /tmp) where ``nobody`` may create entries; the files its links point
at live outside it and must never change.  Then the chain of image deltas
through ``lvdeltafs export`` and ``lvmirror apply``, and files crafted to make
``verify`` crash or pass when it should refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from lvdeltafs.errors import EXIT_BAD_INPUT, EXIT_REFUSED
from lvdeltafs.formats import stream as S
from lvdeltafs.formats.files import NAMES
from tests.harness import BIN, PLANT_FILES, PLANT_LINKS, as_nobody

LVDELTAFS, LVMIRROR = str(BIN / "lvdeltafs"), str(BIN / "lvmirror")
MiB = 1 << 20
# `shared` (a sticky world-writable folder under /tmp) and `victim` (a file of root's outside it) come
# from this suite's conftest, which also skips the suite unless it runs as root.


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_image(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path, Path]:
    """A, B (A with some blocks changed) and C (B with others changed), 4 MiB + a partial block."""
    rng = random.Random(7)
    a = bytearray(rng.randbytes(4 * MiB + 4321))
    b = bytearray(a)
    b[100:5000] = rng.randbytes(4900)
    b[2 * MiB:2 * MiB + 65536] = bytes(65536)
    c = bytearray(b)
    c[3 * MiB + 7:3 * MiB + 70_000] = rng.randbytes(69_993)
    c[-1:] = b"\x01"
    return (make_image(tmp_path / "a.img", bytes(a)), make_image(tmp_path / "b.img", bytes(b)),
            make_image(tmp_path / "c.img", bytes(c)))


def export(base: Path, target: Path, directory: Path | str) -> subprocess.CompletedProcess:
    return run(LVDELTAFS, "export", str(base), str(target), str(directory))


def assert_links_intact(folder: Path, names: list[str], target: Path) -> None:
    for name in names:
        p = folder / name
        assert p.is_symlink() and os.readlink(p) == str(target), f"{name} was replaced or removed"
        assert os.lstat(p).st_uid == 65534


# ---------------------------------------------------------------- planted entries


@pytest.mark.parametrize("name", NAMES)
def test_a_link_planted_at_a_final_name_is_refused_not_followed(shared, victim, images, name):
    a, b, _ = images
    before = victim.read_bytes()
    as_nobody(PLANT_LINKS, str(victim), str(shared), name)
    out = export(a, b, shared)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "symbolic link" in out.stderr and "Traceback" not in out.stderr
    assert victim.read_bytes() == before and victim.stat().st_uid == 0
    assert_links_intact(shared, [name], victim)
    assert os.listdir(shared) == [name], "nothing written, no temporary file left"


@pytest.mark.parametrize("name", NAMES)
def test_a_file_of_another_user_at_a_final_name_is_refused_not_overwritten(shared, images, name):
    a, b, _ = images
    as_nobody(PLANT_FILES, str(shared), name)
    out = export(a, b, shared)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "belongs to uid 65534" in out.stderr
    st = os.lstat(shared / name)
    assert st.st_uid == 65534 and (shared / name).read_text() == f"nobody's {name}"
    assert os.listdir(shared) == [name]


def test_links_planted_at_every_temporary_name_are_never_used(shared, victim, images):
    """Links at the names a temporary file could have (old .NAME.tmp.PID, fsio's pattern): none is opened.

    The exporter is held before it starts, so its PID (kept by exec) is known
    and the links sit at exactly the names the old code created with O_TRUNC.
    """
    a, b, _ = images
    before = victim.read_bytes()
    proc = subprocess.Popen(["sh", "-c", 'read go && exec "$0" export "$1" "$2" "$3"', LVDELTAFS,
                             str(a), str(b), str(shared)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid = proc.pid
    temps = [f".{n}.tmp.{pid}" for n in NAMES]
    temps += [f".{n}.tmp" for n in NAMES] + [f".{n}.{i:012x}.tmp" for n in NAMES for i in range(64)]
    as_nobody(PLANT_LINKS, str(victim), str(shared), *temps)
    _, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    assert victim.read_bytes() == before
    assert_links_intact(shared, temps, victim)
    for name in NAMES:
        st = os.lstat(shared / name)
        assert st.st_uid == 0 and st.st_mode & 0o7777 == 0o600 and not (shared / name).is_symlink()
    assert sorted(os.listdir(shared)) == sorted(temps + list(NAMES)), "no temporary file of ours left"
    assert run(LVDELTAFS, "verify", str(shared)).returncode == 0


def test_the_export_directory_as_a_link_of_another_user_is_refused(shared, tmp_path, images):
    a, b, _ = images
    elsewhere = tmp_path / "roots-dir"
    elsewhere.mkdir()
    as_nobody(PLANT_LINKS, str(elsewhere), str(shared), "out")
    out = export(a, b, shared / "out")
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "symbolic link made by uid 65534" in out.stderr
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o733])
def test_an_export_directory_others_can_write_is_refused(tmp_path, images, mode):
    a, b, _ = images
    d = tmp_path / "out"
    d.mkdir()
    d.chmod(mode)
    out = export(a, b, d)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "can be written by users other than its owner" in out.stderr and "chmod go-w" in out.stderr
    assert os.listdir(d) == []


def test_an_export_directory_of_another_user_is_refused(shared, images):
    a, b, _ = images
    as_nobody("import os, sys; os.mkdir(sys.argv[1], 0o755)", str(shared / "theirs"))
    out = export(a, b, shared / "theirs")
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "belongs to uid 65534" in out.stderr
    assert os.listdir(shared / "theirs") == []


# ---------------------------------------------------------------- image deltas chain through the CLI


def apply(delta: Path, dest: Path, *flags: str) -> subprocess.CompletedProcess:
    return run(LVMIRROR, "apply", *flags, str(delta), str(dest))


def delta_id(directory: Path) -> str:
    return json.loads((directory / "manifest.json").read_text())["delta_id"]


def test_image_deltas_chain_and_a_base_changed_in_place_is_refused(tmp_path, images):
    """export A B, applied to a copy of A; export B C applies on top; not once B changed in place."""
    a, b, c = images
    dest = tmp_path / "mirror.img"
    shutil.copyfile(a, dest)
    assert export(a, b, tmp_path / "ab").returncode == 0
    # A plain copy carries no state saying it holds A: the first delta needs --force.
    out = apply(tmp_path / "ab", dest, "--force")
    assert out.returncode == 0, out.stderr
    assert sha(dest) == sha(b)

    # B copied elsewhere: the names are the content's, not the path's.
    b_copy = tmp_path / "elsewhere" / "b-copy.img"
    b_copy.parent.mkdir()
    shutil.copyfile(b, b_copy)
    out = export(b_copy, c, tmp_path / "bc")
    assert out.returncode == 0, out.stderr
    out = apply(tmp_path / "bc", dest)
    assert out.returncode == 0, out.stderr
    assert sha(dest) == sha(c)

    # The mirror holds C now; B->C again no longer fits it.
    out = apply(tmp_path / "bc" / "delta", dest)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert sha(dest) == sha(c)


def test_a_delta_from_a_base_changed_in_place_is_refused(tmp_path, images):
    a, b, c = images
    dest = tmp_path / "mirror.img"
    shutil.copyfile(a, dest)
    assert export(a, b, tmp_path / "ab").returncode == 0
    assert apply(tmp_path / "ab", dest, "--force").returncode == 0
    with open(b, "r+b") as f:  # B changed in place after the mirror took it
        f.seek(MiB + 3)
        f.write(b"written later")
    assert export(b, c, tmp_path / "bc").returncode == 0
    out = apply(tmp_path / "bc", dest)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "refusing delta" in out.stderr
    assert sha(dest) != sha(c)


def test_two_exports_of_an_image_changed_in_place_get_different_ids(tmp_path, images):
    a, b, _ = images
    assert export(a, b, tmp_path / "one").returncode == 0
    assert export(a, b, tmp_path / "same").returncode == 0
    with open(b, "r+b") as f:
        f.seek(MiB)
        f.write(b"in place")
    assert export(a, b, tmp_path / "two").returncode == 0
    assert delta_id(tmp_path / "one") == delta_id(tmp_path / "same")
    assert delta_id(tmp_path / "one") != delta_id(tmp_path / "two")


# ---------------------------------------------------------------- hostile files for verify


def test_verify_refuses_data_with_bytes_outside_its_ranges(tmp_path, images):
    a, b, _ = images
    d = tmp_path / "d"
    assert export(a, b, d).returncode == 0
    ranges = [line.split() for line in (d / "ranges").read_text().splitlines()]
    data_ends = [int(o) + int(n) for o, n, k in ranges if k == "data"]
    gap = max(data_ends) + 17 if max(data_ends) + 17 < (d / "data").stat().st_size else 64 * 1024 + 1
    assert not any(int(o) <= gap < int(o) + int(n) for o, n, k in ranges if k == "data")
    with open(d / "data", "r+b") as f:
        f.seek(gap)
        f.write(b"\xff")
    out = run(LVDELTAFS, "verify", str(d))
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert f"non-zero byte at offset {gap}," in out.stderr
    # lvmirror apply verifies a directory before sending it too.
    dest = tmp_path / "mirror.img"
    shutil.copyfile(a, dest)
    out = apply(d, dest, "--force")
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert sha(dest) == sha(a)


def nested_header_stream(depth: int) -> bytes:
    """A stream whose header is deeply nested JSON, every checksum valid."""
    payload = b"[" * depth + b"]" * depth
    prefix, seed = S.stream_prefix(payload, 0)
    body = b"".join(prefix)
    end = S.END_PAYLOAD.pack(0, 0, 0, 0)
    return body + S.record_head(S.T_END, len(end), len(body), 2, zlib.crc32(end), seed) + end


def test_a_deeply_nested_header_is_corrupt_not_a_crash(tmp_path):
    bad = tmp_path / "nested.delta"
    bad.write_bytes(nested_header_stream(30_000))
    out = run(LVDELTAFS, "verify", str(bad))
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert "corrupt" in out.stderr and "Traceback" not in out.stderr and "Recursion" not in out.stderr
    dest = tmp_path / "mirror.img"
    dest.write_bytes(b"untouched")
    out = apply(bad, dest, "--force")
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert dest.read_bytes() == b"untouched"


def test_a_deeply_nested_manifest_is_corrupt_not_a_crash(tmp_path, images):
    a, b, _ = images
    d = tmp_path / "d"
    assert export(a, b, d).returncode == 0
    (d / "manifest.json").write_bytes(b"{\"x\":" * 50_000 + b"1" + b"}" * 50_000)
    out = run(LVDELTAFS, "verify", str(d))
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert "manifest.json is not valid JSON" in out.stderr and "Traceback" not in out.stderr


def test_a_header_whose_identity_disagrees_with_its_size_is_corrupt(tmp_path, images):
    a, b, _ = images
    d = tmp_path / "d"
    assert export(a, b, d).returncode == 0
    size = b.stat().st_size
    ident = json.loads((d / "manifest.json").read_text())["identity"]
    header = S.encode_header({**ident, "target_size": size + MiB}, size)
    prefix, seed = S.stream_prefix(header, size)
    body = b"".join(prefix)
    end = S.END_PAYLOAD.pack(0, 0, 0, 0)
    lying = body + S.record_head(S.T_END, len(end), len(body), 2, zlib.crc32(end), seed) + end
    (tmp_path / "lying.delta").write_bytes(lying)
    out = run(LVDELTAFS, "verify", str(tmp_path / "lying.delta"))
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert "identity says the target is" in out.stderr
