"""`lvmirror status`: how much room the base snapshot has left, classic and thin.

The LVM adapter's lookup of the pool is replaced here by a plain object (the
real `lvs` runs only in the VM, where tests/lvm checks the status line).
"""

from __future__ import annotations

import dataclasses

from lvdeltafs import lvm
from lvmirror import status
from lvmirror.cli import _room

ROW = dict(uuid="u", name="s", vg="vg0", attr="swi-a-s---", origin="data", origin_uuid="o", pool="",
           thin_id=None, size=1 << 20, chunk_size=4096, snap_percent=12.5, data_percent=None, time="",
           creation=None, dm_path="", path="", tags=())


def lv(**kw) -> lvm.LogicalVolume:
    return dataclasses.replace(lvm.LogicalVolume(**ROW), **kw)


def test_a_classic_base_shows_its_cow_use_and_warns_when_nearly_full():
    st = status.VolumeStatus("web", "vg0/data", "/m.img")
    status._space(st, lv())
    assert st.cow_percent == 12.5 and not st.problems and _room(st) == ", COW 12.5% full"
    status._space(st, lv(snap_percent=91.0))
    assert "91.0% of its COW space" in st.problems[0] and "snapshot_size" in st.problems[0]


def test_a_thin_base_shows_its_pool_and_warns_before_the_pool_fills(monkeypatch):
    pool = lv(name="pool", attr="twi-aotz--", snap_percent=None, data_percent=85.0, metadata_percent=10.0)
    monkeypatch.setattr(lvm, "get_lv", lambda vg, name: pool if (vg, name) == ("vg0", "pool") else None)
    st = status.VolumeStatus("web", "vg0/tdata", "/m.img")
    status._space(st, lv(attr="Vwi-a-tz--", pool="pool", snap_percent=100.0, data_percent=30.0))
    assert st.cow_percent is None and st.pool == "vg0/pool"
    assert _room(st) == ", thin pool vg0/pool: data 85.0%, metadata 10.0% used"
    assert len(st.problems) == 1 and "85.0% of its data space" in st.problems[0]
