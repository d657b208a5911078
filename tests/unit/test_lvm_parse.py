"""lvm: parsing real `lvs` JSON, device-mapper names, name validation (no LVM needed)."""

# The recorded reports below are kept verbatim, long lines and all.
# ruff: noqa: E501

from __future__ import annotations

import pytest

from lvdeltafs import lvm
from lvdeltafs.errors import BadInput, CommandFailed, Refused, SnapshotUnusable

# Recorded in the VM (LVM 2.03.16, Debian kernel) with
#   lvs -a --reportformat json --units b --nosuffix --config 'report/time_format="%s"' -o <LVS_FIELDS> vg0
# after: lvcreate -L 32M -n lv0; lvcreate -s -L 16M -c 16k -n snap1 --addtag lvmirror --addtag gen:1;
# lvcreate -s -L 4M -n snapbad; dd 8 MiB of random data onto lv0 (snapbad overflowed);
# a thin pool "pool", thin1, thin1s1 (plain -s: activation skip) and thin1s2 (-kn).
CLASSIC_AND_THIN = r"""
  {
      "report": [
          {
              "lv": [
                  {"lv_uuid":"cl72cX-IVTn-aGke-izUa-fDBk-y06x-5ZYB6g", "lv_name":"lv0", "vg_name":"vg0", "lv_attr":"owi-a-s---", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"33554432", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734693", "lv_dm_path":"/dev/mapper/vg0-lv0", "lv_path":"/dev/vg0/lv0", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"62Tt8l-3ZC3-9qKY-XSdi-53bW-XUUO-fadQ0K", "lv_name":"[lvol0_pmspare]", "vg_name":"vg0", "lv_attr":"ewi-------", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"4194304", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734695", "lv_dm_path":"/dev/mapper/vg0-lvol0_pmspare", "lv_path":"", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":""},
                  {"lv_uuid":"tz2cJn-9zy4-wr5k-xWJt-Tg40-dYYy-JgERX7", "lv_name":"pool", "vg_name":"vg0", "lv_attr":"twi-aotz--", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"67108864", "chunk_size":"65536", "snap_percent":"0.00", "data_percent":"0.00", "lv_time":"1795734695", "lv_dm_path":"/dev/mapper/vg0-pool", "lv_path":"", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"CWGHWD-7fRt-Ld0f-Nsjd-OyE0-hvnz-Z5BbHo", "lv_name":"[pool_tdata]", "vg_name":"vg0", "lv_attr":"Twi-ao----", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"67108864", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734695", "lv_dm_path":"/dev/mapper/vg0-pool_tdata", "lv_path":"", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"wxyvrI-deew-dJAk-BQFi-LlU0-tuxE-ncrnCt", "lv_name":"[pool_tmeta]", "vg_name":"vg0", "lv_attr":"ewi-ao----", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"4194304", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734695", "lv_dm_path":"/dev/mapper/vg0-pool_tmeta", "lv_path":"", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"06v9bt-NN5s-Mfzc-TPuZ-pXXA-3D3q-aag2as", "lv_name":"snap1", "vg_name":"vg0", "lv_attr":"swi-a-s---", "origin":"lv0", "origin_uuid":"cl72cX-IVTn-aGke-izUa-fDBk-y06x-5ZYB6g", "pool_lv":"", "thin_id":"", "lv_size":"16777216", "chunk_size":"16384", "snap_percent":"50.20", "data_percent":"50.20", "lv_time":"1795734693", "lv_dm_path":"/dev/mapper/vg0-snap1", "lv_path":"/dev/vg0/snap1", "lv_tags":"gen:1,lvmirror", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"sSR0XE-uzyt-i0Ma-p1m8-eXMZ-V673-GUYdVn", "lv_name":"snapbad", "vg_name":"vg0", "lv_attr":"swi-I-s---", "origin":"lv0", "origin_uuid":"cl72cX-IVTn-aGke-izUa-fDBk-y06x-5ZYB6g", "pool_lv":"", "thin_id":"", "lv_size":"4194304", "chunk_size":"4096", "snap_percent":"100.00", "data_percent":"100.00", "lv_time":"1795734694", "lv_dm_path":"/dev/mapper/vg0-snapbad", "lv_path":"/dev/vg0/snapbad", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"7TokUK-Pnom-8k20-vNMW-5ovx-7KeX-wgosB3", "lv_name":"thin1", "vg_name":"vg0", "lv_attr":"Vwi-a-tz--", "origin":"", "origin_uuid":"", "pool_lv":"pool", "thin_id":"1", "lv_size":"134217728", "chunk_size":"0", "snap_percent":"0.00", "data_percent":"0.00", "lv_time":"1795734696", "lv_dm_path":"/dev/mapper/vg0-thin1", "lv_path":"/dev/vg0/thin1", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"uQUK3d-BmpF-QFw1-9Es9-1sDI-LXzo-G82uQf", "lv_name":"thin1s1", "vg_name":"vg0", "lv_attr":"Vwi---tz-k", "origin":"thin1", "origin_uuid":"7TokUK-Pnom-8k20-vNMW-5ovx-7KeX-wgosB3", "pool_lv":"pool", "thin_id":"2", "lv_size":"134217728", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734696", "lv_dm_path":"/dev/mapper/vg0-thin1s1", "lv_path":"/dev/vg0/thin1s1", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"skip activation", "lv_active":""},
                  {"lv_uuid":"j5K74G-fQN2-sNYx-T9iA-ocPK-Y2Lo-YTl50Q", "lv_name":"thin1s2", "vg_name":"vg0", "lv_attr":"Vwi-a-tz--", "origin":"thin1", "origin_uuid":"7TokUK-Pnom-8k20-vNMW-5ovx-7KeX-wgosB3", "pool_lv":"pool", "thin_id":"3", "lv_size":"134217728", "chunk_size":"0", "snap_percent":"0.00", "data_percent":"0.00", "lv_time":"1795734697", "lv_dm_path":"/dev/mapper/vg0-thin1s2", "lv_path":"/dev/vg0/thin1s2", "lv_tags":"", "lv_merging":"", "lv_skip_activation":"", "lv_active":"active"}
              ]
          }
      ]
  }
"""

# Recorded likewise for VG my-vg after `lvconvert --merge my-vg/s-1` while my-lv was open:
# the merge is deferred, the snapshot turns hidden ("[s-1]") and both say lv_merging.
MERGING = r"""
  {
      "report": [
          {
              "lv": [
                  {"lv_uuid":"hKAWgr-W4A5-vvGc-5ybk-fpCN-2xnL-gKtQER", "lv_name":"my-lv", "vg_name":"my-vg", "lv_attr":"Owi-aos---", "origin":"", "origin_uuid":"", "pool_lv":"", "thin_id":"", "lv_size":"16777216", "chunk_size":"0", "snap_percent":"", "data_percent":"", "lv_time":"1795734662", "lv_dm_path":"/dev/mapper/my--vg-my--lv", "lv_path":"/dev/my-vg/my-lv", "lv_tags":"", "lv_merging":"merging", "lv_skip_activation":"", "lv_active":"active"},
                  {"lv_uuid":"WVqB1u-VdKr-tDfm-m1On-fLEq-2cTx-GOi08T", "lv_name":"[s-1]", "vg_name":"my-vg", "lv_attr":"Swi-a-s---", "origin":"my-lv", "origin_uuid":"hKAWgr-W4A5-vvGc-5ybk-fpCN-2xnL-gKtQER", "pool_lv":"", "thin_id":"", "lv_size":"4194304", "chunk_size":"8192", "snap_percent":"0.00", "data_percent":"0.00", "lv_time":"1795734663", "lv_dm_path":"/dev/mapper/my--vg-s--1", "lv_path":"", "lv_tags":"", "lv_merging":"merging", "lv_skip_activation":"", "lv_active":"active"}
              ]
          }
      ]
  }
"""


def by_name(text: str) -> dict[str, lvm.LogicalVolume]:
    return {lv.name: lv for lv in lvm.parse_lvs_json(text)}


def test_classic_origin_and_snapshot():
    lvs = by_name(CLASSIC_AND_THIN)
    origin, snap = lvs["lv0"], lvs["snap1"]
    assert not origin.is_snapshot and not origin.is_thin and origin.is_active
    assert origin.size == 32 << 20 and origin.path == "/dev/vg0/lv0"
    assert snap.is_snapshot and snap.is_classic_snapshot and not snap.is_thin
    assert not snap.is_invalid and not snap.is_merging and snap.is_active
    assert snap.origin == "lv0" and snap.origin_uuid == origin.uuid
    assert snap.size == 16 << 20 and snap.chunk_size == 16384
    assert snap.snap_percent == pytest.approx(50.2)
    assert snap.tags == ("gen:1", "lvmirror")
    assert snap.dm_path == "/dev/mapper/vg0-snap1"
    assert snap.creation == 1795734693 and snap.time == "2026-11-26T23:11:33Z"
    assert snap.snapshot_id == "06v9bt-NN5s-Mfzc-TPuZ-pXXA-3D3q-aag2as@2026-11-26T23:11:33Z"
    assert lvm.require_usable(snap) is snap


def test_overflowed_classic_snapshot_is_invalid_and_unusable():
    bad = by_name(CLASSIC_AND_THIN)["snapbad"]
    assert bad.attr == "swi-I-s---" and bad.is_invalid and bad.snap_percent == 100.0
    with pytest.raises(SnapshotUnusable, match="invalid.*lvremove vg0/snapbad"):
        lvm.require_usable(bad)


def test_thin_pool_thin_volume_and_thin_snapshots():
    lvs = by_name(CLASSIC_AND_THIN)
    pool, thin, skipped, usable = lvs["pool"], lvs["thin1"], lvs["thin1s1"], lvs["thin1s2"]
    assert pool.is_thin_pool and not pool.is_thin and pool.chunk_size == 65536
    assert thin.is_thin and not thin.is_snapshot and thin.pool == "pool" and thin.thin_id == 1
    assert skipped.is_thin and skipped.is_snapshot and not skipped.is_classic_snapshot
    assert skipped.thin_id == 2 and skipped.origin == "thin1"
    assert skipped.needs_activation_skip_override and not skipped.is_active
    assert skipped.snap_percent is None
    with pytest.raises(SnapshotUnusable, match="lvchange -ay -K vg0/thin1s1"):
        lvm.require_usable(skipped)
    assert usable.thin_id == 3 and usable.is_active and not usable.needs_activation_skip_override
    assert lvm.require_usable(usable) is usable


def test_hidden_lvs_lose_their_brackets():
    lvs = by_name(CLASSIC_AND_THIN)
    assert lvs["pool_tmeta"].hidden and lvs["pool_tdata"].hidden and lvs["lvol0_pmspare"].hidden
    assert not lvs["pool"].hidden


def test_merging_snapshot_is_seen_and_refused():
    lvs = by_name(MERGING)
    snap, origin = lvs["s-1"], lvs["my-lv"]
    assert snap.hidden and snap.is_snapshot and snap.is_merging
    assert origin.is_merging and not origin.is_snapshot
    with pytest.raises(SnapshotUnusable, match="being merged"):
        lvm.require_usable(snap)


def test_missing_or_non_snapshot_is_unusable():
    with pytest.raises(SnapshotUnusable, match="gone"):
        lvm.require_usable(None)
    with pytest.raises(SnapshotUnusable, match="not a snapshot"):
        lvm.require_usable(by_name(CLASSIC_AND_THIN)["lv0"])


def test_default_lv_time_format_is_read_too():
    text = CLASSIC_AND_THIN.replace('"lv_time":"1795734693"', '"lv_time":"2026-11-27 00:11:33 +0100"')
    assert by_name(text)["snap1"].time == "2026-11-26T23:11:33Z"


@pytest.mark.parametrize("text", ["", "not json", '{"report": 3}', '{"report":[{"lv":[{"lv_name":"x"}]}]}'])
def test_garbage_report_is_bad_input(text):
    with pytest.raises(BadInput, match="report of lvs"):
        lvm.parse_lvs_json(text)


def test_empty_report():
    assert lvm.parse_lvs_json('{"report":[{"lv":[]}]}') == []


def test_snapshots_of_orders_by_time_then_thin_id_then_name(monkeypatch):
    monkeypatch.setattr(lvm, "run", lambda argv, **kw: CLASSIC_AND_THIN)
    assert [s.name for s in lvm.snapshots_of("vg0", "lv0")] == ["snap1", "snapbad"]
    # thin1s1 and thin1s2: one second apart; swap their times to tie and let thin_id decide.
    tied = CLASSIC_AND_THIN.replace('"lv_time":"1795734697"', '"lv_time":"1795734696"')
    monkeypatch.setattr(lvm, "run", lambda argv, **kw: tied)
    assert [s.name for s in lvm.snapshots_of("vg0", "thin1")] == ["thin1s1", "thin1s2"]


def test_natural_name_order_breaks_remaining_ties():
    names = ["s10", "s9", "s1", "a2b10", "a2b9"]
    assert sorted(names, key=lvm._natural_key) == ["a2b9", "a2b10", "s1", "s9", "s10"]


@pytest.mark.parametrize(("vg", "lv", "dm"), [
    ("vg0", "lv0", "vg0-lv0"),
    ("my-vg", "my-lv", "my--vg-my--lv"),
    ("a--b", "-c", "a----b---c"),
    ("vg", "s_1.2+x", "vg-s_1.2+x"),
])
def test_dm_name_doubles_dashes_in_each_part(vg, lv, dm):
    assert lvm.dm_name(vg, lv) == dm


@pytest.mark.parametrize("name", ["vg0", "my-vg", "a+b_c.d-e", "_x", ".x", "x" * 127, "9"])
def test_valid_names(name):
    assert lvm.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-vg", ".", "..", "a/b", "a b", "a;b", "x" * 128, "é", "a\nb", "$(x)"])
def test_invalid_names_are_bad_input(name):
    with pytest.raises(BadInput, match="not a valid LVM name"):
        lvm.check_name(name)


@pytest.mark.parametrize("tag", ["lvmirror", "gen:1", "a/b=c", "x#y&z!"])
def test_valid_tags(tag):
    assert lvm.check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "-x", "a b", "a,b", "x" * 1025, "a\n"])
def test_invalid_tags(tag):
    with pytest.raises(BadInput, match="not a valid LVM tag"):
        lvm.check_tag(tag)


def test_names_are_checked_before_any_command_runs(monkeypatch):
    def no_commands(argv, **kw):
        raise AssertionError(f"ran {argv}")
    monkeypatch.setattr(lvm, "run", no_commands)
    for call in (lambda: lvm.list_lvs("-bad"), lambda: lvm.get_lv("vg", "a b"),
                 lambda: lvm.cow_device("vg", "--help"), lambda: lvm.pool_devices("v g", "pool"),
                 lambda: lvm.create_snapshot("vg", "lv", "s;rm"), lambda: lvm.add_tag("vg", "lv", "-t"),
                 lambda: lvm.activate("vg", "../x"), lambda: lvm.snapshots_of("vg", "")):
        with pytest.raises(BadInput):
            call()


def fake_dmsetup(monkeypatch, table: str, lvs_text: str = CLASSIC_AND_THIN) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv, **kw):
        calls.append(argv)
        assert "timeout" in kw
        return table if argv[0] == "dmsetup" else lvs_text
    monkeypatch.setattr(lvm, "run", run)
    return calls


def test_cow_device_refuses_a_table_that_is_not_a_snapshot(monkeypatch):
    calls = fake_dmsetup(monkeypatch, "0 262144 thin 254:8 3\n")
    with pytest.raises(SnapshotUnusable, match="not a classic snapshot.*'thin'"):
        lvm.cow_device("my-vg", "my-lv")
    assert calls == [["dmsetup", "table", "my--vg-my--lv"]]
    fake_dmsetup(monkeypatch, "")
    with pytest.raises(SnapshotUnusable, match="'empty'"):
        lvm.cow_device("vg0", "snap1")


def test_pool_devices_names(monkeypatch):
    calls = fake_dmsetup(monkeypatch, "0 131072 thin-pool 254:6 254:7 128 0 0\n")
    devs = lvm.pool_devices("my-vg", "po-ol")
    assert calls == [["dmsetup", "table", "my--vg-po--ol-tpool"]]
    assert devs.tpool_name == "my--vg-po--ol-tpool" and devs.tpool == "/dev/mapper/my--vg-po--ol-tpool"
    assert devs.tmeta_name == "my--vg-po--ol_tmeta" and devs.tmeta == "/dev/mapper/my--vg-po--ol_tmeta"
    fake_dmsetup(monkeypatch, "0 131072 linear 7:0 2048\n")
    with pytest.raises(BadInput, match="not an active thin pool"):
        lvm.pool_devices("vg0", "pool")


def test_create_snapshot_argv(monkeypatch):
    calls = fake_dmsetup(monkeypatch, "")
    lvm.create_snapshot("vg0", "thin1", "thin1s2", tags=["lvmirror"])
    assert ["lvcreate", "-q", "-s", "-kn", "-n", "thin1s2", "--addtag", "lvmirror", "vg0/thin1"] in calls
    calls.clear()
    lvm.create_snapshot("vg0", "lv0", "snap1", size=16 << 20, chunk_size=16384)
    assert ["lvcreate", "-q", "-s", "-L", "16777216b", "-c", "16k", "-n", "snap1", "vg0/lv0"] in calls
    with pytest.raises(BadInput, match="needs a size"):
        lvm.create_snapshot("vg0", "lv0", "snapx")
    with pytest.raises(BadInput, match="takes no size"):
        lvm.create_snapshot("vg0", "thin1", "snapx", size="1G", thin=True)
    with pytest.raises(BadInput, match="not a size"):
        lvm.create_snapshot("vg0", "lv0", "snapx", size="1G; rm")
    with pytest.raises(BadInput, match="power of two"):
        lvm.create_snapshot("vg0", "lv0", "snapx", size="1G", chunk_size=3000)


def test_remove_lv_refuses_non_snapshots_and_merging(monkeypatch):
    calls = fake_dmsetup(monkeypatch, "")
    with pytest.raises(Refused, match="not a snapshot"):
        lvm.remove_lv("vg0", "lv0")
    assert lvm.remove_lv("vg0", "nosuch") is False
    assert lvm.remove_lv("vg0", "snapbad") is True
    assert calls[-1] == ["lvremove", "-q", "-y", "vg0/snapbad"]
    fake_dmsetup(monkeypatch, "", MERGING)
    with pytest.raises(Refused, match="merged"):
        lvm.remove_lv("my-vg", "s-1")


def test_command_failure_propagates(monkeypatch):
    def failing(argv, **kw):
        raise CommandFailed(argv, 5, '  Volume group "nosuch" not found')
    monkeypatch.setattr(lvm, "run", failing)
    with pytest.raises(CommandFailed, match="not found"):
        lvm.list_lvs("nosuch")
