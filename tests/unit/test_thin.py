"""thin_delta and thin_dump parsing, on pool metadata made with thin_restore (no kernel needed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lvdeltafs.errors import BadInput, CommandFailed, UnsupportedFormat
from lvdeltafs.extents import DATA, ZERO
from lvdeltafs.sources import thin
from lvdeltafs.sources.thin import (
    parse_thin_delta,
    parse_thin_dump,
    thin_delta_extents,
    thin_mapped_extents,
    thin_tools_version,
)

pytestmark = pytest.mark.skipif(shutil.which("thin_restore") is None,
                                reason="needs thin-provisioning-tools (scripts/setup installs it)")

BLOCK = 128 * 512  # data_block_size="128"
MIB = 1 << 20

# Device 1 is the older snapshot, 2 the newer; block numbers in comments.
META_XML = """<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="10" data_block="10" time="0"/>
    <single_mapping origin_block="60" data_block="11" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="7" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <range_mapping origin_begin="2" data_begin="20" length="2" time="1"/>
    <single_mapping origin_block="7" data_block="6" time="1"/>
    <single_mapping origin_block="90" data_block="30" time="1"/>
    <single_mapping origin_block="91" data_block="31" time="1"/>
  </device>
</superblock>
"""
# same 0-1; different 2-3; left_only 10 and 60; right_only 7 and 90-91.


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    d = tmp_path_factory.mktemp("thin")
    (d / "meta.xml").write_text(META_XML)
    out = d / "meta.bin"
    out.write_bytes(b"")
    subprocess.run(["truncate", "-s", "4M", str(out)], check=True)
    subprocess.run(["thin_restore", "-i", str(d / "meta.xml"), "-o", str(out)], check=True,
                   capture_output=True)
    return str(out)


def test_every_tag(meta):
    ext = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    assert ext.as_tuples() == [
        (2 * BLOCK, 2 * BLOCK, DATA),    # different
        (7 * BLOCK, BLOCK, DATA),        # right_only
        (10 * BLOCK, BLOCK, ZERO),       # left_only
        (60 * BLOCK, BLOCK, ZERO),       # left_only
        (90 * BLOCK, 2 * BLOCK, DATA),   # right_only
    ]


def test_verbose_output_gives_the_same(meta):
    out = subprocess.run(["thin_delta", "--verbose", "--thin1", "1", "--thin2", "2", meta],
                         capture_output=True, text=True, check=True).stdout
    assert "<range " in out
    plain = thin_delta_extents(meta, 1, 2, 128 * MIB, metadata_snap=False)
    assert parse_thin_delta(out.splitlines(), 128 * MIB, thin1=1, thin2=2) == plain


def test_shrunk_target_clips_left_only(meta):
    # The newer volume is 61 blocks less half a block: block 90 is gone, block 60 is cut.
    size = 61 * BLOCK - 4096
    ext = thin_delta_extents(meta, 1, 2, size, metadata_snap=False)
    assert ext.as_tuples()[-1] == (60 * BLOCK, BLOCK - 4096, ZERO)
    assert ext.end == size


def test_grown_target_keeps_right_only_past_the_old_end(meta):
    # Reverse direction: 2 is older, 1 newer; 90-91 become left_only (zeros) in a larger volume.
    ext = thin_delta_extents(meta, 2, 1, 256 * MIB, metadata_snap=False)
    assert (90 * BLOCK, 2 * BLOCK, ZERO) in ext.as_tuples()
    assert (10 * BLOCK, BLOCK, DATA) in ext.as_tuples()


def test_missing_device_is_a_clear_error(meta):
    with pytest.raises(CommandFailed, match="Unable to find mapping tree.*9.*thin ids"):
        thin_delta_extents(meta, 1, 9, MIB, metadata_snap=False)
    with pytest.raises(BadInput, match="thin device 9 is not in the pool"):
        thin_mapped_extents(meta, 9, MIB, False)


def test_metadata_snap_without_one(meta):
    with pytest.raises(CommandFailed, match="no current metadata snap"):
        thin_delta_extents(meta, 1, 2, MIB, metadata_snap=True)


def test_mapped_extents(meta):
    assert thin_mapped_extents(meta, 2, 128 * MIB, False).as_tuples() == [
        (0, 4 * BLOCK, DATA), (7 * BLOCK, BLOCK, DATA), (90 * BLOCK, 2 * BLOCK, DATA)]
    assert thin_mapped_extents(meta, 1, 11 * BLOCK, False).as_tuples() == [
        (0, 4 * BLOCK, DATA), (10 * BLOCK, BLOCK, DATA)]


def test_version_is_read():
    assert thin_tools_version() >= (0, 9, 0)


@pytest.mark.parametrize("version", ["1.0.0", "1.0.5", "thin_delta 1.0.3"])
def test_broken_versions_refused(monkeypatch, version):
    monkeypatch.setattr(thin, "run", lambda *a, **k: version + "\n")
    with pytest.raises(UnsupportedFormat, match="1.0.0 to 1.0.5.*1.0.6"):
        thin_tools_version()


@pytest.mark.parametrize("version", ["0.9.0", "1.0.6", "1.1.0"])
def test_good_versions_accepted(monkeypatch, version):
    monkeypatch.setattr(thin, "run", lambda *a, **k: version + "\n")
    assert thin_tools_version() == tuple(int(x) for x in version.split("."))


# ---- parsing edge cases from text ----

HEAD = '<superblock uuid="" time="1" transaction="2" data_block_size="8" nr_data_blocks="2048">'


def _delta(*body: str, left: int = 1, right: int = 2) -> list[str]:
    return [HEAD, f'  <diff left="{left}" right="{right}">', *body, "  </diff>", "</superblock>"]


def test_parse_plain_text():
    ext = parse_thin_delta(_delta('<same begin="0" length="16"/>', '<different begin="16" length="4"/>',
                                  '<left_only begin="20" length="2"/>'), 1 << 30, thin1=1, thin2=2)
    assert ext.as_tuples() == [(16 * 4096, 4 * 4096, DATA), (20 * 4096, 2 * 4096, ZERO)]


def test_parse_bytes_lines():
    lines = [x.encode() + b"\n" for x in _delta('<right_only begin="1" length="1"/>')]
    assert parse_thin_delta(lines, 1 << 30, thin1=1, thin2=2).as_tuples() == [(4096, 4096, DATA)]


@pytest.mark.parametrize(("body", "words"), [
    (['<moved begin="1" length="1"/>'], "unknown or misplaced element <moved>"),
    (['<different begin="x1" length="1"/>'], "not a decimal block number"),
    (['<different begin="-1" length="1"/>'], "not a decimal block number"),
    (['<different begin="01" length="1"/>'], "not a decimal block number"),
    (['<different begin="1" length="0"/>'], "length 0"),
    (['<different begin="1"/>'], "'length' is missing"),
    (['<different begin="1" length="1">'], "ended early"),
    (["<different begin=1 length=2/>"], "not understood"),
    (['<range begin="1" length="1"/>'], "misplaced element <range>"),
    (["garbage"], "not understood"),
])
def test_parse_rejects(body, words):
    with pytest.raises(BadInput, match=words):
        parse_thin_delta(_delta(*body), 1 << 30, thin1=1, thin2=2)


def test_parse_checks_ids():
    with pytest.raises(BadInput, match="between thin devices 1 and 3, but 1 and 2"):
        parse_thin_delta(_delta(right=3), 1 << 30, thin1=1, thin2=2)


def test_parse_rejects_truncated_output():
    with pytest.raises(BadInput, match="ended early"):
        parse_thin_delta(_delta('<different begin="1" length="1"/>')[:-2], 1 << 30, thin1=1, thin2=2)
    with pytest.raises(BadInput, match="ended early"):
        parse_thin_delta([HEAD, "</superblock>"], 1 << 30, thin1=1, thin2=2)


def test_parse_thin_dump_rejects_other_devices():
    lines = [HEAD, '<device dev_id="3" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">',
             '<single_mapping origin_block="0" data_block="0" time="0"/>', "</device>", "</superblock>"]
    with pytest.raises(BadInput, match="thin device 3 listed, but only 2"):
        parse_thin_dump(lines, 2, 1 << 30)


# ---- MetadataSnapshot, with dmsetup faked ----

class FakeDmsetup:
    def __init__(self, held: bool = False):
        self.held = held
        self.calls: list[str] = []

    def __call__(self, argv, **kw):
        what = argv[-1]
        self.calls.append(f"{argv[2]} {what}")
        if what == "release_metadata_snap":
            if not self.held:
                raise CommandFailed(argv, 1, f"device-mapper: message ioctl on {argv[2]}  failed: "
                                             "Invalid argument")
            self.held = False
        elif what == "reserve_metadata_snap":
            if self.held:
                raise CommandFailed(argv, 1, "device-mapper: message ioctl failed: Device or resource busy")
            self.held = True
        return ""


def test_metadata_snapshot_releases_stale_and_own(monkeypatch):
    fake = FakeDmsetup(held=True)
    monkeypatch.setattr(thin, "run", fake)
    with thin.MetadataSnapshot("vg-pool") as snap:
        assert fake.held and snap.target == "vg-pool-tpool"
    assert not fake.held
    assert fake.calls == ["vg-pool-tpool release_metadata_snap", "vg-pool-tpool reserve_metadata_snap",
                          "vg-pool-tpool release_metadata_snap"]


def test_metadata_snapshot_released_on_error(monkeypatch):
    fake = FakeDmsetup()
    monkeypatch.setattr(thin, "run", fake)
    with pytest.raises(RuntimeError), thin.MetadataSnapshot("vg-pool-tpool"):
        raise RuntimeError("boom")
    assert not fake.held


def test_metadata_snapshot_released_on_sigterm(monkeypatch):
    import os
    import signal

    fake = FakeDmsetup()
    monkeypatch.setattr(thin, "run", fake)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, thin.MetadataSnapshot("vg-pool"):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.1)  # let the handler run
    assert info.value.code == 128 + signal.SIGTERM
    assert not fake.held
    assert signal.getsignal(signal.SIGTERM) is before


def test_metadata_snapshot_other_release_failures_surface(monkeypatch):
    def broken(argv, **kw):
        raise CommandFailed(argv, 1, "device-mapper: message ioctl failed: No such device or address")

    monkeypatch.setattr(thin, "run", broken)
    with pytest.raises(CommandFailed, match="No such device"), thin.MetadataSnapshot("vg-pool"):
        pass


def test_metadata_snapshot_is_one_holder_per_pool_at_a_time(tmp_path, monkeypatch):
    """Two holders of one pool take turns, so one's stale-release cannot pull the other's snapshot.

    The dmsetup messages are recorded instead of sent: the host has no
    device-mapper (the VM tests send them for real).
    """
    import threading
    import time

    from lvdeltafs.sources.thin import MetadataSnapshot

    log: list[str] = []
    monkeypatch.setattr(MetadataSnapshot, "_message", lambda self, what: log.append(what))
    first_in = threading.Event()

    def hold(name: str) -> None:
        with MetadataSnapshot("vg-pool", lock_dir=str(tmp_path)):
            log.append(f"{name} in")
            first_in.set()
            time.sleep(0.3)
            log.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a",))
    a.start()
    first_in.wait(5)
    b = threading.Thread(target=hold, args=("b",))
    b.start()
    a.join()
    b.join()
    assert log == ["release_metadata_snap", "reserve_metadata_snap", "a in", "a out", "release_metadata_snap",
                   "release_metadata_snap", "reserve_metadata_snap", "b in", "b out", "release_metadata_snap"]
