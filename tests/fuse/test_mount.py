"""Real lvdeltafs mounts on the host over file pairs, driven with ordinary tools."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lvdeltafs.extents import DATA, format_ranges
from lvdeltafs.formats.files import NAMES, DeltaFiles
from lvdeltafs.pairs import open_delta
from tests.harness import LVDELTAFS, run

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 48 * MiB


def make_pair(tmp: Path, seed: int = 1) -> tuple[Path, Path]:
    """A base image and a target with scattered changes: small, ragged, large, at the end."""
    rng = random.Random(seed)
    base, target = tmp / "base.img", tmp / "target.img"
    content = bytearray(rng.randbytes(SIZE))
    base.write_bytes(content)
    for off, length in [(0, 100), (3 * MiB + 17, 70_000), (10 * MiB, 5 * MiB), (SIZE - 4096, 4096),
                        *((rng.randrange(SIZE - 9000), rng.choice([512, 4096, 9000])) for _ in range(30))]:
        content[off:off + length] = rng.randbytes(length)
    target.write_bytes(content)
    return base, target


def make_cow_pair(tmp: Path) -> tuple[Path, Path]:
    from tests.cowimage import write_cow_image
    chunk = 64 * 1024
    old = [3, 4, 5, 100, 7, 300, SIZE // chunk - 1]
    cow, target = tmp / "cow.img", tmp / "cowtarget.img"
    write_cow_image(cow, chunk, old, data=bytes(len(old) * chunk))
    target.write_bytes(random.Random(5).randbytes(SIZE))
    return cow, target


@pytest.fixture
def mnt(tmp_path) -> Path:
    m = tmp_path / "mnt"
    m.mkdir()
    return m


def mount_pair(fuse_mount, mnt: Path, base: Path, target: Path, *extra: str) -> Path:
    fuse_mount([LVDELTAFS, "mount", "-f", *extra, "--pair", str(base), str(target), str(mnt)], mnt)
    return mnt / "@pairs" / f"{base.name}..{target.name}"


def check_pair_dir(pair: Path, base: Path, target: Path, tmp: Path) -> None:
    delta = open_delta(str(base), str(target))
    files = DeltaFiles(delta)
    try:
        # ls -l: the five files, sizes exact before anything was read
        listing = run("ls", "-l", pair).stdout.splitlines()[1:]
        sizes = {line.split()[-1]: int(line.split()[4]) for line in listing}
        assert sizes == {n: files[n].size for n in NAMES}
        assert all(line.startswith("-r-------- 1 root root") for line in listing), listing
        # cat ranges
        assert run("cat", pair / "ranges").stdout == format_ranges(delta.extents)
        # cmp data against the target over each changed range, and against zeros elsewhere
        pos = 0
        for off, length, kind in delta.extents:
            if off > pos:
                run("cmp", "-n", off - pos, "-i", f"{pos}:0", pair / "data", "/dev/zero")
            other = target if kind == DATA else "/dev/zero"
            run("cmp", "-n", length, "-i", f"{off}:{off if kind == DATA else 0}", pair / "data", other)
            pos = off + length
        if pos < files["data"].size:
            run("cmp", "-n", files["data"].size - pos, "-i", f"{pos}:0", pair / "data", "/dev/zero")
        # sha256sum chunks against the manifest
        manifest = json.loads((pair / "manifest.json").read_text())
        assert run("sha256sum", pair / "chunks").stdout.split()[0] == manifest["chunks_sha256"]
        if delta.identity.source == "compare":  # named by content; a COW pair's names are fresh each run
            assert manifest["delta_id"] == delta.identity.delta_id
        # cp the directory, then verify the copy and the stream file alone
        copy = tmp / "copy"
        run("cp", "-r", pair, copy)
        assert "OK" in run(LVDELTAFS, "verify", copy).stdout
        run("cp", pair / "delta", tmp / "delta.stream")
        run(LVDELTAFS, "verify", tmp / "delta.stream")
        # du: the sparse data file counts only its changed bytes
        du = int(run("du", "-B1", pair / "data").stdout.split()[0])
        assert du == -(-delta.extents.data_bytes // 512) * 512 < files["data"].size // 4
        assert int(run("du", "-B1", "--apparent-size", pair / "data").stdout.split()[0]) == files["data"].size
        # getfattr -d: the identity
        attrs = run("getfattr", "-d", pair / "data").stdout
        ident = manifest["identity"]
        for key, value in [("delta_id", manifest["delta_id"]), ("base", ident["base"]),
                           ("target", ident["target"]), ("source", ident["source"]),
                           ("volume", ident["volume"])]:
            assert f'user.lvdeltafs.{key}="{value}"' in attrs
        assert "user.lvdeltafs.delta_id=" in run("getfattr", "-d", pair).stdout
        # tar it up and unpack it: still a valid delta
        run("tar", "-cf", tmp / "d.tar", "-C", pair.parent, pair.name)
        (tmp / "untar").mkdir()
        run("tar", "-xf", tmp / "d.tar", "-C", tmp / "untar")
        run(LVDELTAFS, "verify", tmp / "untar" / pair.name)
    finally:
        delta.close()


def test_compare_pair_through_ordinary_tools(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    pair = mount_pair(fuse_mount, mnt, base, target)
    assert run("ls", mnt).stdout.split() == ["@pairs"]
    assert run("ls", mnt / "@pairs").stdout.split() == [pair.name]
    check_pair_dir(pair, base, target, tmp_path)


def test_cow_image_pair_through_ordinary_tools(fuse_mount, tmp_path, mnt):
    cow, target = make_cow_pair(tmp_path)
    pair = mount_pair(fuse_mount, mnt, cow, target)
    assert json.loads((pair / "manifest.json").read_text())["source"] == "cow"
    lines = (pair / "ranges").read_text().splitlines()
    assert [int(line.split()[0]) // 65536 for line in lines] == [3, 7, 100, 300, SIZE // 65536 - 1]
    check_pair_dir(pair, cow, target, tmp_path)


def test_bad_names_are_enoent_and_the_mount_lives_on(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    # --vg of a volume group this host lacks: its directory shows, empty, and nothing resolves in it.
    fuse_mount([LVDELTAFS, "mount", "-f", "--vg", "novg", "--pair", str(base), str(target), str(mnt)], mnt)
    assert sorted(os.listdir(mnt)) == ["@pairs", "novg"]
    for name in ["a..", "..b", "x..y", "...", "a...b", "lv", "@origin..x", "x" * 300, "\udcff..x", "@pairs2"]:
        for where in [mnt / "@pairs", mnt / "novg", mnt / "novg" / "lv", mnt]:
            p = os.path.join(where, name)
            with pytest.raises(OSError) as e:
                os.stat(p)
            assert e.value.errno in (errno.ENOENT, errno.ENAMETOOLONG), p
    pair = mnt / "@pairs" / "base.img..target.img"
    with pytest.raises(FileNotFoundError):
        os.stat(pair / "nope")
    assert (pair / "ranges").read_text()


def test_reads_past_the_end_and_writes_refused(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    pair = mount_pair(fuse_mount, mnt, base, target)
    size = (pair / "chunks").stat().st_size
    fd = os.open(pair / "chunks", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, size) == b""
        assert os.pread(fd, 4096, size + 10**12) == b""
        assert len(os.pread(fd, 4096, size - 5)) == 5
        with pytest.raises(OSError) as e:
            os.pread(fd, 10, -1)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(OSError) as e:
            os.open(pair / "data", flags)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    proc = run("touch", pair / "new", check=False)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    assert run("rm", "-f", pair / "data", check=False).returncode != 0
    assert run("setfattr", "-n", "user.x", "-v", "1", pair / "data", check=False).returncode != 0
    assert (pair / "data").stat().st_size == SIZE


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def public_mnt(tmp_path) -> Path:
    """A mount point every user can reach: pytest's own folders are root's alone (0700), so a
    refusal there would come from them, not from the mount's modes."""
    top = Path(tempfile.mkdtemp(prefix="lvdeltafs-test-"))
    top.chmod(0o755)
    (top / "mnt").mkdir()
    yield top / "mnt"
    if os.path.ismount(top / "mnt"):
        subprocess.run(["fusermount3", "-u", "-z", str(top / "mnt")], capture_output=True)
    shutil.rmtree(top, ignore_errors=True)


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess:
    return run(*NOBODY, *argv, check=False)


def test_private_to_the_mounting_user(fuse_mount, tmp_path, public_mnt):
    base, target = make_pair(tmp_path)
    pair = mount_pair(fuse_mount, public_mnt, base, target)
    st = (pair / "data").stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o400, os.getuid())
    assert pair.stat().st_mode & 0o7777 == 0o500
    assert as_nobody("stat", public_mnt.parent).returncode == 0  # the way to the mount is open
    proc = as_nobody("cat", pair / "ranges")  # but without --allow-other FUSE lets in no one else
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_allow_other_follows_each_images_owner_and_mode(fuse_mount, tmp_path, public_mnt):
    base, target = make_pair(tmp_path)
    pairs = {}
    for name, mode, gid in [("private", 0o600, 0), ("public", 0o644, 0), ("group", 0o640, 65534)]:
        b, t = tmp_path / f"{name}-base.img", tmp_path / f"{name}.img"
        shutil.copy(base, b)
        shutil.copy(target, t)
        for p in (b, t):
            os.chown(p, 0, gid)
            p.chmod(mode)
        pairs[name] = (b, t)
    argv = [LVDELTAFS, "mount", "-f", "--allow-other"]
    for b, t in pairs.values():
        argv += ["--pair", str(b), str(t)]
    fuse_mount([*argv, str(public_mnt)], public_mnt)
    at = {name: public_mnt / "@pairs" / f"{b.name}..{t.name}" for name, (b, t) in pairs.items()}
    assert as_nobody("ls", public_mnt / "@pairs").stdout.split() == sorted(p.name for p in at.values())
    # A 0600 root image: its files are root's, 0400, and nobody gets EACCES.
    st = (at["private"] / "ranges").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o400, 0, 0)
    assert at["private"].stat().st_mode & 0o7777 == 0o500
    for name in ("ranges", "data", "delta"):
        proc = as_nobody("cat", at["private"] / name)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    assert (at["private"] / "ranges").read_text()  # root still reads it
    # 0644: everyone reads it; 0640 root:nogroup: nogroup reads it.
    assert (at["public"] / "ranges").stat().st_mode & 0o7777 == 0o444
    assert as_nobody("cat", at["public"] / "ranges").stdout == (at["public"] / "ranges").read_text()
    st = (at["group"] / "data").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o440, 0, 65534)
    assert as_nobody("sha256sum", at["group"] / "chunks").returncode == 0
    proc = run("setpriv", "--reuid=nobody", "--regid=0", "--clear-groups", "cat", at["group"] / "data",
               check=False)  # same user, another group
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_image_changed_under_the_mount(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    proc = fuse_mount([LVDELTAFS, "mount", "-f", "--pair", str(base), str(target), str(mnt)], mnt)
    pair = mnt / "@pairs" / "base.img..target.img"
    before = (pair / "ranges").read_text()
    fd = os.open(pair / "data", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == target.read_bytes()[:100]
        with open(target, "r+b") as f:  # changed in place, in a part that was the same
            f.seek(40 * MiB + 12345)
            f.write(b"changed" * 1000)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 10 * MiB)  # not a mix of the old delta and the new image
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # At once, within the kernel's attribute timeout: the new delta, at its new size.
    after = (pair / "ranges").read_text()
    fresh = open_delta(str(base), str(target))
    fresh.close()
    assert after != before and after == format_ranges(fresh.extents)
    assert f"{40 * MiB} " in after
    manifest = json.loads((pair / "manifest.json").read_text())
    assert run("sha256sum", pair / "chunks").stdout.split()[0] == manifest["chunks_sha256"]
    run("fusermount3", "-u", mnt)
    log = proc.stdout.read().decode()
    warned = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warned) == 1 and str(target) in warned[0] and "reopen" in warned[0], log


def test_killed_reader_and_many_readers(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    pair = mount_pair(fuse_mount, mnt, base, target)
    data = target.read_bytes()
    chunks = run("cat", pair / "ranges").stdout  # warm the delta
    assert chunks
    for _ in range(3):
        reader = subprocess.Popen(["dd", f"if={pair / 'data'}", "of=/dev/null", "bs=4k"])
        time.sleep(0.15)
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    want = hashlib.sha256((pair / "chunks").read_bytes()).hexdigest()
    delta = open_delta(str(base), str(target))
    spans = [(o, n) for o, n, k in delta.extents if k == DATA]
    delta.close()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with open(pair / "data", "rb", buffering=0) as f:
                for _ in range(40):
                    off, n = rng.choice(spans)
                    start = off + rng.randrange(n)
                    length = rng.randrange(1, 300_000)
                    got = os.pread(f.fileno(), length, start)
                    exp = bytearray(min(length, SIZE - start))
                    for o, m in spans:
                        lo, hi = max(o, start), min(o + m, start + len(exp))
                        if lo < hi:
                            exp[lo - start:hi - start] = data[lo:hi]
                    if got != bytes(exp):
                        errors.append(f"data at {start}+{length} differs")
            if hashlib.sha256((pair / "chunks").read_bytes()).hexdigest() != want:
                errors.append("chunks differ")
        except Exception as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert os.path.ismount(mnt)


def test_signals_unmount_cleanly(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = fuse_mount([LVDELTAFS, "mount", "-f", "--pair", str(base), str(target), str(mnt)], mnt)
        assert (mnt / "@pairs" / "base.img..target.img" / "ranges").read_text()
        proc.send_signal(sig)
        assert proc.wait(20) == 0, proc.stdout.read()
        assert not os.path.ismount(mnt)
        os.stat(mnt)  # not a dead mount either


def test_sigkilled_mount_is_detected_and_cleared(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    argv = [LVDELTAFS, "mount", "-f", "--pair", str(base), str(target), str(mnt)]
    proc = fuse_mount(argv, mnt)
    proc.kill()
    proc.wait()
    with pytest.raises(OSError) as e:
        os.statvfs(mnt)  # at once: stat may be answered from the attribute cache for a second
    assert e.value.errno == errno.ENOTCONN
    again = run(*argv, check=False)
    assert again.returncode == 7
    assert "dead" in again.stderr and f"lvdeltafs umount {mnt}" in again.stderr
    out = run(LVDELTAFS, "umount", mnt)
    assert "cleared" in out.stderr
    os.stat(mnt)
    fuse_mount(argv, mnt)
    assert (mnt / "@pairs" / "base.img..target.img" / "ranges").read_text()
    busy = run(*argv, check=False)
    assert busy.returncode == 7 and "already a mount point" in busy.stderr


def test_background_mount_and_umount(tmp_path, mnt):
    base, target = make_pair(tmp_path)
    os.chdir(tmp_path)  # relative paths are resolved before the mount goes to the background
    try:
        start = time.monotonic()
        out = run(LVDELTAFS, "mount", "--log-file", "mount.log", "--pair", "base.img", "target.img", "mnt")
        assert time.monotonic() - start < 30
        assert os.path.ismount(mnt), out.stderr
        assert "lvdeltafs umount" in out.stderr
        assert (mnt / "@pairs" / "base.img..target.img" / "ranges").read_text()
        pid = int(out.stderr.split("process ")[1].split(")")[0])
        run(LVDELTAFS, "umount", "mnt")
        assert not os.path.ismount(mnt)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert "serving" in (tmp_path / "mount.log").read_text()
    finally:
        os.chdir("/")
        if os.path.ismount(mnt) or run("stat", mnt, check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_umount_of_a_busy_mount_is_exit_7(fuse_mount, tmp_path, mnt):
    base, target = make_pair(tmp_path)
    mount_pair(fuse_mount, mnt, base, target)
    with open(mnt / "@pairs" / "base.img..target.img" / "ranges", "rb"):
        busy = run(LVDELTAFS, "umount", mnt, check=False)
        assert busy.returncode == 7, busy.stderr
        assert "busy" in busy.stderr and f"lvdeltafs umount --lazy {mnt}" in busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1 and os.path.ismount(mnt)
    run(LVDELTAFS, "umount", mnt)
    assert not os.path.ismount(mnt)


def test_mount_errors_are_clear(tmp_path, mnt):
    base, _ = make_pair(tmp_path)
    missing = run(LVDELTAFS, "mount", "-f", "--pair", base, tmp_path / "nope.img", mnt, check=False)
    assert missing.returncode == 3 and "nope.img" in missing.stderr
    nodir = run(LVDELTAFS, "mount", "-f", "--pair", base, base, tmp_path / "nodir", check=False)
    assert nodir.returncode == 3 and "does not exist" in nodir.stderr
    notmounted = run(LVDELTAFS, "umount", mnt, check=False)
    assert notmounted.returncode == 3 and "not mounted" in notmounted.stderr
    assert not os.path.ismount(mnt)
