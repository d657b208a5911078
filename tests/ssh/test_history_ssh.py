"""History, rewind and restore over ssh: the receiver on the far side (a real sshd on 127.0.0.1) keeps the
undo deltas, composes the points and serves their bytes; lvmirror runs in process over tests/fakelvm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakelvm import VG, configured, lvmirror
from tests.harness import sha, sha_file, text

pytestmark = pytest.mark.ssh
MiB = 1 << 20
SIZE = 8 * MiB


def test_history_rewind_and_restore_through_the_far_receiver(sshd, tmp_path, monkeypatch):
    far = tmp_path / "far"
    far.mkdir()
    image = far / "data.img"
    fake, cfg = configured(tmp_path, monkeypatch, f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{image}",
                           size=SIZE, volume=f'history_points = 2\nssh_key = "{sshd.client_key}"\n'
                                             f'known_hosts = "{sshd.known_hosts}"\n')
    lvmirror(cfg, "init", "data")
    held = {1: sha(fake.read())}
    for i in range(3):
        fake.write(i * 2 * MiB, text(MiB, 10 + i))
        lvmirror(cfg, "sync", "data")
        held[i + 2] = sha(fake.read())
    assert sha_file(image) == held[4]

    doc = json.loads(lvmirror(cfg, "history", "data", "--json"))
    assert [p["generation"] for p in doc["points"]] == [2, 3] and doc["drops_next"] == [2]

    fake.write(5 * MiB, text(MiB, 50))  # damage on the source, then point 3 written back over ssh
    out = lvmirror(cfg, "restore", "data", "--point", "3", "--to", f"{VG}/data")
    assert sha(fake.read()) == held[3] and "changes since the base snapshot" in out

    lvmirror(cfg, "rewind", "data", "--to", "2")
    assert sha_file(image) == held[2]
    state = json.loads(Path(f"{image}.lvmirror-state").read_text())
    assert state["history"] == [] and state["source"] == "rewind"
    assert not list(far.glob("*undo*"))  # the far side removed the dropped points' files
