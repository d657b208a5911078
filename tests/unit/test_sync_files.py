"""lvmirror's pipelines on image files, on the host (no LVM): init copy, compare resync,
apply of an exported delta directory, check and repair, resume, lock, the ssh refusal."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvdeltafs.errors import EXIT_BAD_INPUT, EXIT_REFUSED, Busy, ConnectionProblem, Refused
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.formats.export import export
from lvdeltafs.pairs import IMAGE_VOLUME, image_id
from lvdeltafs.pairs import compare_delta as image_compare_delta
from lvmirror import deltas, pipelines
from lvmirror import spool as spool_mod
from lvmirror.lock import volume_lock
from lvmirror.progress import Progress, human
from lvmirror.transports import LocalTransport
from tests.harness import BIN

MiB = 1 << 20


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_image(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


@pytest.fixture
def images(tmp_path):
    """A base image and a changed target, sparse, 8 MiB + a partial block."""
    size = 8 * MiB + 12345
    rnd = os.urandom
    a = make_image(tmp_path / "a.img", size, {0: rnd(4096), 3 * MiB + 17: rnd(100_000), size - 500: rnd(500)})
    b_writes = {0: (tmp_path / "a.img").read_bytes()[:4096], 3 * MiB + 17: rnd(100_000), 6 * MiB: rnd(MiB),
                size - 500: bytes(500)}
    b = make_image(tmp_path / "b.img", size, b_writes)
    return a, b, size


def init_from(client, path: Path, volume: str, target: str):
    size = path.stat().st_size
    delta = deltas.full_copy_delta(volume, target, str(path), size, source="compare")
    try:
        pipelines.send(client, delta, "init")
    finally:
        delta.close()
    return delta


def test_nonzero_extents_skip_zero_blocks(images):
    a, _, size = images
    e = deltas.nonzero_extents(str(a), size)
    assert e.as_tuples() == [(0, MiB, DATA), (MiB, 2 * MiB, ZERO), (3 * MiB, MiB, DATA),
                             (4 * MiB, 4 * MiB, ZERO), (8 * MiB, 12345, DATA)]


def test_init_copies_data_and_keeps_holes(tmp_path, images):
    a, _, size = images
    dest = tmp_path / "mirror.img"
    with LocalTransport(str(dest)) as client:
        init_from(client, a, "vol-uuid", "snapA")
        state = client.hello().state
    assert sha(dest) == sha(a)
    assert (state["volume"], state["snapshot"], state["size"], state["generation"]) == (
        "vol-uuid", "snapA", size, 1)
    # Only the three data blocks were written: the rest stayed holes.
    assert dest.stat().st_blocks * 512 <= 3 * MiB + 64 * 1024


def test_init_over_a_destination_that_holds_a_copy_is_refused(tmp_path, images):
    a, b, _ = images
    dest = tmp_path / "mirror.img"
    with LocalTransport(str(dest)) as client:
        init_from(client, a, "vol-uuid", "snapA")
        with pytest.raises(Refused, match="already holds"):
            init_from(client, b, "vol-uuid", "snapB")
    assert sha(dest) == sha(a)


def test_compare_resync_sends_only_differing_blocks(tmp_path, images):
    a, b, size = images
    dest = tmp_path / "mirror.img"
    with LocalTransport(str(dest)) as client:
        init_from(client, a, "vol-uuid", "snapA")
        delta = deltas.compare_delta(client, client.hello(), "vol-uuid", "snapB", str(b), size)
        # Blocks 3 and 6 changed (data), the tail changed to zeros.
        assert delta.extents.as_tuples() == [(3 * MiB, MiB, DATA), (6 * MiB, MiB, DATA),
                                             (8 * MiB, 12345, ZERO)]
        pipelines.send(client, delta, "resync")
        delta.close()
        assert client.hello().state["snapshot"] == "snapB"
    assert sha(dest) == sha(b)


def test_check_finds_a_change_behind_our_back_and_repair_fixes_it(tmp_path, images):
    a, _, size = images
    dest = tmp_path / "mirror.img"
    with LocalTransport(str(dest)) as client:
        init_from(client, a, "vol-uuid", "snapA")
        result, repaired = pipelines.check_against(client, "vol", str(a), size)
        assert result.ok and repaired is None
    with open(dest, "r+b") as f:  # someone writes to the mirror
        f.seek(5 * MiB + 3)
        f.write(b"oops")
    with LocalTransport(str(dest)) as client:
        greeting = client.hello()
        assert "modified" in greeting.unknown and greeting.recorded["snapshot"] == "snapA"
        result, repaired = pipelines.check_against(client, "vol", str(a), size)
        assert result.mismatched.as_tuples() == [(5 * MiB, MiB, ZERO)]
        result, repaired = pipelines.check_against(client, "vol", str(a), size, repair=True)
        assert repaired is not None and repaired.zero_bytes == MiB
        assert pipelines.check_against(client, "vol", str(a), size)[0].ok
        state = client.hello().state
    assert sha(dest) == sha(a)
    assert (state["snapshot"], state["generation"]) == ("snapA", 2)


def test_apply_of_an_exported_delta_directory(tmp_path, images):
    a, b, size = images
    dest = tmp_path / "mirror.img"
    # The destination holds image a, named as the compare delta names it.
    with LocalTransport(str(dest)) as client:
        init_from(client, a, IMAGE_VOLUME, image_id(str(a)))
    delta = image_compare_delta(str(a), str(b))
    export(delta, str(tmp_path / "d"))
    delta.close()
    out = subprocess.run([str(BIN / "lvmirror"), "apply", str(tmp_path / "d"), str(dest)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sha(dest) == sha(b)
    ranges = len((tmp_path / "d" / "ranges").read_text().splitlines())
    assert ranges > 0 and f" in {ranges} ranges" in out.stderr, out.stderr  # not "in 0 ranges"
    # The same delta again: the destination no longer holds its base.
    out = subprocess.run([str(BIN / "lvmirror"), "apply", str(tmp_path / "d" / "delta"), str(dest)],
                         capture_output=True, text=True)
    assert out.returncode == EXIT_REFUSED, out.stderr
    assert "refusing delta" in out.stderr and "holds" in out.stderr
    assert sha(dest) == sha(b)


def test_forced_apply_to_a_wrong_base_then_check_is_needed(tmp_path, images):
    a, b, _ = images
    dest = tmp_path / "mirror.img"
    dest.write_bytes(a.read_bytes())  # a plain copy: no state
    delta = image_compare_delta(str(a), str(b))
    export(delta, str(tmp_path / "d"))
    delta.close()
    with pytest.raises(Refused, match="holds nothing lvmirror knows of"):
        pipelines.apply_file(str(tmp_path / "d"), str(dest))
    out = pipelines.apply_file(str(tmp_path / "d"), str(dest), force=True)
    assert sha(dest) == sha(b) and out.data_bytes > 0
    with LocalTransport(str(dest)) as client:
        assert client.hello().state["needs_check"] is True


def test_a_damaged_delta_is_refused_before_the_receiver_sees_it(tmp_path, images):
    a, b, _ = images
    delta = image_compare_delta(str(a), str(b))
    export(delta, str(tmp_path / "d"))
    delta.close()
    stream = tmp_path / "d" / "delta"
    raw = bytearray(stream.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stream.write_bytes(bytes(raw))
    dest = tmp_path / "mirror.img"
    out = subprocess.run([str(BIN / "lvmirror"), "apply", "--force", str(stream), str(dest)],
                         capture_output=True, text=True)
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert not dest.exists()


def test_a_broken_send_resumes_from_what_the_receiver_holds(tmp_path, images):
    a, _, size = images
    big = make_image(tmp_path / "big.img", 48 * MiB, {0: os.urandom(40 * MiB)})
    dest = tmp_path / "mirror.img"
    spool = str(tmp_path / "spool")
    delta = deltas.full_copy_delta("vol-uuid", "snapBig", str(big), 48 * MiB, source="compare")
    # The receiver dies after staging 36 records (about 36 MiB, past one durable sync point).
    with (LocalTransport(str(dest), env={"LVMIRROR_TEST_KILL_AT": "receive:36"}) as client,
          pytest.raises(ConnectionProblem)):
        pipelines.send(client, delta, "init", spool_dir=spool)
    assert os.listdir(spool) == [f"{delta.identity.delta_id}.ranges"]
    with LocalTransport(str(dest)) as client:
        staged = client.hello().staged
        assert staged is not None and staged.delta_id == delta.identity.delta_id and staged.verified > 0
        assert spool_mod.load(spool, delta.identity.delta_id, 48 * MiB) == delta.extents
        pipelines.send(client, delta, "init", spool_dir=spool)
        assert 0 < client.bytes_sent < 40 * MiB
    delta.close()
    assert sha(dest) == sha(big)
    assert os.listdir(spool) == []


def test_volume_lock_is_exclusive(tmp_path):
    with volume_lock(str(tmp_path), "web") as path:
        assert Path(path).read_text().strip() == str(os.getpid())
        code = ("import sys; from lvmirror.lock import volume_lock\n"
                f"with volume_lock({str(tmp_path)!r}, 'web'): pass\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "Busy" in out.stderr and "volume web is busy" in out.stderr
    with volume_lock(str(tmp_path), "web"):
        pass


def test_volume_lock_raises_busy_in_process(tmp_path):
    import fcntl
    fd = os.open(tmp_path / "db.lock", os.O_RDWR | os.O_CREAT)
    try:
        # flock locks are per open file description: a second open in this process conflicts too.
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(Busy), volume_lock(str(tmp_path), "db"):
            pass
    finally:
        os.close(fd)


def test_progress_line_and_silence_off_a_terminal(capsys):
    p = Progress("web: sync", 4 * MiB, enabled=False)
    p.update(MiB)
    p.close()
    assert capsys.readouterr().err == ""
    line = p.line(p.started + 1.0)
    assert line.startswith("web: sync: 1.0 MiB of 4.0 MiB (25%), 1.0 MiB/s, 0:03 left")
    assert human(0) == "0 B" and human(3 * 1024**3) == "3.0 GiB"


def write_config(tmp_path, body: str) -> Path:
    cfg = tmp_path / "lvmirror.toml"
    cfg.write_text(f'[defaults]\nlock_dir = "{tmp_path}/lock"\nwork_dir = "{tmp_path}/work"\n' + body)
    cfg.chmod(0o600)
    return cfg


def run_cli(*args: str, cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lvmirror"), "-c", str(cfg), *args], capture_output=True, text=True)


def test_ssh_destination_that_cannot_be_reached_is_a_connection_error(tmp_path):
    from lvdeltafs.errors import EXIT_CONNECTION
    from tests.harness import keygen
    keygen(tmp_path / "key")
    (tmp_path / "known_hosts").write_text("")
    cfg = write_config(tmp_path, '[volume.web]\nvg = "vg0"\nlv = "web"\n'
                                 'destination = "ssh://backup@mirror.invalid:2222/srv/web.img"\n'
                                 f'ssh_key = "{tmp_path}/key"\nknown_hosts = "{tmp_path}/known_hosts"\n')
    out = run_cli("check", "web", cfg=cfg)
    assert out.returncode == EXIT_CONNECTION, out.stderr
    assert "mirror.invalid" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # Without a key anywhere, the message says which setting to make.
    cfg.write_text(cfg.read_text().replace(f'ssh_key = "{tmp_path}/key"\n', 'ssh_key = "/nonexistent/key"\n'))
    out = run_cli("check", "web", cfg=cfg)
    assert out.returncode != 0 and "/nonexistent/key" in out.stderr


def test_cli_usage_errors_and_unknown_volume(tmp_path):
    cfg = write_config(tmp_path, '[volume.web]\nvg = "vg0"\nlv = "web"\ndestination = "/srv/web.img"\n')
    assert run_cli("sync", cfg=cfg).returncode == 2
    assert run_cli("sync", "web", "--all", cfg=cfg).returncode == 2
    assert run_cli("sync", "web", "--repair", cfg=cfg).returncode == 2
    out = run_cli("sync", "mail", cfg=cfg)
    assert out.returncode == EXIT_BAD_INPUT and "no volume named 'mail'" in out.stderr


def test_with_zero_rest_covers_the_whole_volume():
    data = Extents.from_ranges([4096], [4096], DATA, 1 << 16)
    assert deltas.with_zero_rest(data, 1 << 16).as_tuples() == [
        (0, 4096, ZERO), (4096, 4096, DATA), (8192, (1 << 16) - 8192, ZERO)]
    assert len(deltas.with_zero_rest(Extents.empty(), 0)) == 0
