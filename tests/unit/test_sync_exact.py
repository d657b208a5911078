"""`exact = true` on the host, with image files: the sync's delta refined against its base, sent through
the real receiver, resumed from its spooled ranges after a break; the config key and the summary line."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from lvdeltafs.delta import Delta, FileReader, Identity
from lvdeltafs.errors import ConnectionProblem
from lvdeltafs.exact import BLOCK
from lvdeltafs.extents import DATA, ZERO, Extents
from lvdeltafs.formats import files
from lvmirror import config, deltas, pipelines, snapshots
from lvmirror import spool as spool_mod
from lvmirror.config import ConfigError
from lvmirror.transports import LocalTransport

MiB = 1 << 20
VOL = "vol-uuid"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def init(dest: Path, image: Path, size: int) -> None:
    """The destination holds ``image`` as snapshot vol@1, as after an init."""
    delta = deltas.full_copy_delta(VOL, f"{VOL}@1", str(image), size, source="compare")
    with LocalTransport(str(dest)) as client:
        try:
            pipelines.send(client, delta, "init")
        finally:
            delta.close()


def cow_delta(target: Path, size: int, extents: Extents) -> Delta:
    """What a COW table would give: the marked chunks, from snapshot vol@1 to vol@2."""
    ident = Identity(VOL, f"{VOL}@1", f"{VOL}@2", size, size, 64 * 1024, "cow")
    return Delta(ident, extents, FileReader(str(target), size))


@pytest.fixture
def rewritten(tmp_path):
    """A base image and a target whose marked chunks were mostly rewritten with the same bytes."""
    size = 16 * MiB + 1000  # a partial last block
    rnd = random.Random(3)
    base = bytearray(rnd.randbytes(size))
    target = bytearray(base)
    target[5 * MiB + 100:5 * MiB + 110] = b"0123456789"  # a few bytes, inside a 2 MiB rewrite
    target[9 * MiB:9 * MiB + 64 * 1024] = bytes(64 * 1024)  # a discard (thin): must be zeroed
    target[size - 3] ^= 1  # in the partial last block
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(base)
    b.write_bytes(target)
    extents = Extents.from_ranges([4 * MiB, 9 * MiB, 12 * MiB, 16 * MiB], [2 * MiB, 64 * 1024, MiB, 1000],
                                  [DATA, ZERO, DATA, DATA], size)
    return a, b, size, extents


def test_an_exact_sync_mirrors_the_target_sending_only_what_differs(tmp_path, rewritten):
    a, b, size, extents = rewritten
    dest = tmp_path / "mirror.img"
    init(dest, a, size)
    delta = deltas.exact_delta(cow_delta(b, size, extents), str(a), "web")
    assert delta.identity.delta_id == cow_delta(b, size, extents).identity.delta_id  # the same pair
    assert delta.extents.as_tuples() == [(5 * MiB, BLOCK, DATA), (9 * MiB, 64 * 1024, ZERO),
                                         (16 * MiB, 1000, DATA)]
    assert delta.unchanged_bytes == 3 * MiB - BLOCK
    spool = str(tmp_path / "spool")
    with LocalTransport(str(dest)) as client:
        try:
            pipelines.send(client, delta, "sync", spool_dir=spool)
        finally:
            delta.close()
        sent = client.bytes_sent
        assert client.hello().state["snapshot"] == f"{VOL}@2"
    assert sha(dest) == sha(b)
    # The stream held 5096 bytes of data where the unrefined one held 3 MiB and 1000 bytes.
    assert sent < 8192 and files.stream_layout(delta).size == sent


def test_a_broken_exact_send_resumes_from_the_spooled_refined_ranges(tmp_path):
    size = 48 * MiB
    rnd = random.Random(4)
    base = rnd.randbytes(size)
    target = bytearray(rnd.randbytes(40 * MiB) + base[40 * MiB:])
    for p in range(0, 40 * MiB, 256 * 1024):  # one unchanged block in each 256 KiB: 160 ranges
        target[p:p + BLOCK] = base[p:p + BLOCK]
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(base)
    b.write_bytes(target)
    dest = tmp_path / "mirror.img"
    init(dest, a, size)
    spool = str(tmp_path / "spool")
    delta = deltas.exact_delta(cow_delta(b, size, Extents.from_ranges([0], [size], DATA, size)), str(a), "t")
    refined = delta.extents
    assert len(refined) == 160 and refined.data_bytes == 40 * MiB - 160 * BLOCK
    # The receiver dies after staging 140 records (past its first durable sync point, at 32 MiB).
    with (LocalTransport(str(dest), env={"LVMIRROR_TEST_KILL_AT": "receive:140"}) as client,
          pytest.raises(ConnectionProblem)):
        pipelines.send(client, delta, "sync", spool_dir=spool)
    delta.close()
    # What a resume rebuilds from (pipelines._resume_staged): the spooled ranges are the refined ones,
    # so the stream is the same bytes and nothing is compared again.
    spooled = spool_mod.load(spool, delta.identity.delta_id, size)
    assert spooled == refined
    resumed = cow_delta(b, size, spooled)
    with LocalTransport(str(dest)) as client:
        staged = client.hello().staged
        assert staged is not None and staged.delta_id == resumed.identity.delta_id and staged.verified > 0
        try:
            pipelines.send(client, resumed, "resume", spool_dir=spool)
        finally:
            resumed.close()
        assert 0 < client.bytes_sent < refined.data_bytes
    assert dest.read_bytes() == bytes(target)
    assert os.listdir(spool) == []


def volume(tmp_path: Path, **keys) -> config.VolumeConfig:
    doc = {"defaults": {"work_dir": str(tmp_path / "work")},
           "volume": {"web": {"vg": "vg0", "lv": "web", "destination": str(tmp_path / "m.img"), **keys}}}
    return config.parse(doc, str(tmp_path / "lvmirror.toml")).volume("web")


def test_sync_delta_refines_an_incremental_only_when_exact_is_on(tmp_path, rewritten, monkeypatch):
    a, b, size, extents = rewritten
    monkeypatch.setattr(pipelines.pairs, "lvm_delta", lambda base, target: cow_delta(b, size, extents))
    base = snapshots.BaseCheck(SimpleNamespace(vg_lv="vg0/web-lvm-1", path=str(a)), "")
    snap = SimpleNamespace(vg_lv="vg0/web-lvm-2")
    for exact, data in ((True, BLOCK + 1000), (False, 3 * MiB + 1000)):
        vol = volume(tmp_path, exact=exact)
        delta = pipelines._sync_delta(vol, None, None, base, None, snap)  # type: ignore[arg-type]
        try:
            assert delta.extents.data_bytes == data
            out = pipelines._outcome("web", "sync", delta, dry_run=False)
        finally:
            delta.close()
        if exact:
            assert out.unchanged_bytes == 3 * MiB - BLOCK
            assert "sent 5.0 KiB of data in 3 ranges" in out.summary()
            assert "(exact: 3.0 MiB unchanged not sent)" in out.summary()
            out.dry_run = True
            assert "would send 5.0 KiB" in out.summary()
            assert "(exact: 3.0 MiB unchanged would not be sent)" in out.summary()
        else:
            assert out.unchanged_bytes is None and "exact" not in out.summary()


def test_a_failed_comparison_closes_the_delta(tmp_path, rewritten):
    a, b, size, extents = rewritten
    delta = cow_delta(b, size, extents)
    (tmp_path / "short.img").write_bytes(a.read_bytes()[:MiB])
    with pytest.raises(Exception, match="not that base"):
        deltas.exact_delta(delta, str(tmp_path / "short.img"), "web")
    assert delta.target.fd == -1  # type: ignore[attr-defined]


def test_exact_is_a_boolean_key_default_false(tmp_path):
    assert volume(tmp_path).exact is False
    assert volume(tmp_path, exact=True).exact is True
    doc = {"defaults": {"exact": True},
           "volume": {"web": {"vg": "vg0", "lv": "web", "destination": "/srv/web.img"},
                      "db": {"vg": "vg0", "lv": "db", "destination": "/srv/db.img", "exact": False}}}
    parsed = config.parse(doc, "/etc/lvmirror.toml")
    assert (parsed.volume("web").exact, parsed.volume("db").exact) == (True, False)
    for bad in ("true", 1, "yes"):
        with pytest.raises(ConfigError, match=r"\[volume.web\] exact must be true or false"):
            volume(tmp_path, exact=bad)
