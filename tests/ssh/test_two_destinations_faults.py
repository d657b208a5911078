"""Two destinations of one volume (a local image, one over a real sshd on 127.0.0.1) under faults.

``lvmirror`` runs as a subprocess over tests/fakelvm.py (the origin an image file, snapshots copies of
it), so everything but LVM is the real thing: the shared read, both receivers, ssh, the spools, the
records.  Checked after each fault and after the run that follows it: the bytes of both mirrors
against the snapshot their state names, the bytes each run sent (the fake's send log, one line per
``pipelines.send``) against what the receivers had verified, and what is left behind.

- The ssh session cut mid-transfer (its sshd process killed while the far receiver stages): the local
  destination completes, the run exits 8 naming the far one; the rerun resumes the far one from what its
  receiver verified, and sends the local one no data.
- lvmirror itself SIGKILLed during the two sends (at a byte count of its streams, or once one destination
  has applied): the rerun finishes both, byte-equal, with no staging, spool or spare snapshot left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lvdeltafs.errors import EXIT_CONNECTION
from lvdeltafs.formats import files
from lvmirror import config
from tests.fakelvm import VG, FakeLvm
from tests.harness import sha_file, staging_files, text

pytestmark = pytest.mark.ssh

MiB = 1 << 20
SIZE = 24 * MiB
ROOT = Path(__file__).resolve().parents[2]
# Runs tests.fakelvm with this Python; the tests package is appended to the path, so an lvmirror
# installed (or given by PYTHONPATH) is the one under test.
DRIVER = "import sys; sys.path.append(sys.argv.pop(1)); from tests.fakelvm import main; main(sys.argv[1:])"


class TwoMirrors:
    def __init__(self, tmp: Path, sshd):
        self.tmp = tmp
        self.fake = FakeLvm.create(tmp / "lvm", "data", SIZE)
        rnd = random.Random(1)
        self.fake.write(0, b"".join(text(MiB, k) if k % 2 else rnd.randbytes(MiB) for k in range(24)))
        self.local, self.far = tmp / "local" / "data.img", tmp / "far" / "data.img"
        self.local.parent.mkdir()
        self.far.parent.mkdir()
        self.url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{self.far}"
        self.cfg = tmp / "lvmirror.toml"
        self.cfg.write_text(
            f'[defaults]\nlock_dir = "{tmp}/lock"\nwork_dir = "{tmp}/work"\ncompress = "off"\n'
            f'[volume.data]\nvg = "{VG}"\nlv = "data"\nsnapshot_size = "1G"\n'
            f'destinations = ["{self.local}", "{self.url}"]\n'
            f'ssh_key = "{sshd.client_key}"\nknown_hosts = "{sshd.known_hosts}"\n')
        self.cfg.chmod(0o600)
        self.views = {v.destination.raw: v for v in config.load(str(self.cfg)).volume("data").views()}
        self.sends = tmp / "sends.jsonl"

    def run(self, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        self.sends.unlink(missing_ok=True)
        argv = [sys.executable, "-c", DRIVER, str(ROOT), str(self.fake.root), "-c", str(self.cfg), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.tmp,
                              env={**os.environ, "FAKELVM_SEND_LOG": str(self.sends), **(env or {})})

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        out = self.run(*args)
        assert out.returncode == 0, f"lvmirror {' '.join(args)} -> {out.returncode}:\n{out.stderr}"
        return out

    def sent(self) -> list[dict]:
        """The sends of the last run: label, delta_id, bytes_sent (stream bytes), done."""
        lines = self.sends.read_text().splitlines() if self.sends.exists() else []
        return [json.loads(line) for line in lines]

    def sends_to(self, dest: str) -> list[dict]:
        return [s for s in self.sent() if s["label"].startswith(f"data -> {dest}: ")]

    def state(self, image: Path) -> dict:
        return json.loads(Path(f"{image}.lvmirror-state").read_text())

    def progress(self, image: Path) -> dict | None:
        path = Path(f"{image}.lvmirror-staging.progress")
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, dest: str) -> dict:
        path = self.tmp / "work" / "runs" / f"{self.views[dest].record_name}.json"
        return json.loads(path.read_text())["last_run"]

    def snapshots(self) -> dict[str, str]:
        return self.fake.snapshot_paths()

    def assert_matches_its_snapshot(self, image: Path) -> str:
        held = self.state(image)["snapshot"]
        assert sha_file(image) == sha_file(self.snapshots()[held]), f"{image} differs from {held}"
        return held

    def assert_settled(self) -> str:
        """Both mirrors equal the origin's one snapshot left, and nothing is staged or spooled."""
        a, b = self.assert_matches_its_snapshot(self.local), self.assert_matches_its_snapshot(self.far)
        assert a == b and list(self.snapshots()) == [a]
        assert sha_file(self.local) == sha_file(self.fake.origin_path)
        assert staging_files(self.local) == staging_files(self.far) == []
        inflight = self.tmp / "work" / "inflight"
        assert not inflight.exists() or not any(p.is_file() for p in inflight.rglob("*")), \
            list(inflight.rglob("*"))
        return a

    def stream_size(self, base: str, target: str) -> int:
        """Bytes of the whole (uncompressed) stream of the delta between two snapshots, as sent."""
        names = {lv.snapshot_id: lv.vg_lv for lv in self.fake.list_lvs() if lv.is_snapshot}
        delta = self.fake.lvm_delta(names[base], names[target])
        try:
            return files.stream_layout(delta).size
        finally:
            delta.close()

    def change(self, seed: int) -> None:
        rnd = random.Random(seed)
        for k in range(6):
            self.fake.write((2 + 3 * k) * MiB + 4096 * k, rnd.randbytes(2 * MiB))


def holders(folder: Path) -> list[int]:
    """Processes with a file under ``folder`` open (the receivers of its destination)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{folder}/") for fd in fds):
                out.append(int(pid))
        except OSError:
            continue
    return out


def wait_released(*folders: Path, timeout: float = 30.0) -> None:
    """Until no process (an orphaned receiver finishing after its sender died) holds them."""
    deadline = time.monotonic() + timeout
    while any(holders(f) for f in folders):
        assert time.monotonic() < deadline, f"still held: {[holders(f) for f in folders]}"
        time.sleep(0.05)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cut_ssh_when_staged(image: Path, at: int) -> tuple[threading.Thread, dict]:
    """A watcher: once ``at`` bytes are staged beside ``image``, SIGKILL the sshd process serving its
    receiver (the session; the receiver itself sees its input end and keeps what it verified)."""
    seen: dict = {}
    staging = Path(f"{image}.lvmirror-staging")

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                size = staging.stat().st_size
            except FileNotFoundError:
                size = 0
            if size >= at:
                for pid in holders(image.parent):
                    p = pid
                    while p > 1 and Path(f"/proc/{p}/comm").read_text().strip() != "sshd":
                        p = parent(p)
                    if p > 1:
                        seen.update(staged=size, receiver=pid, killed=p)
                        os.kill(p, signal.SIGKILL)
                        return
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, seen


def test_an_ssh_session_cut_mid_transfer_fails_alone_and_resumes_from_what_was_verified(sshd, tmp_path):
    m = TwoMirrors(tmp_path, sshd)
    m.ok("init", "data")
    base = m.assert_settled()
    local_gen = m.state(m.local)["generation"]

    m.change(seed=2)
    # Paced (both destinations) so the far side is cut while it stages: 12 MiB of changes at 8 MiB/s.
    watcher, seen = cut_ssh_when_staged(m.far, at=3 * MiB)
    cut = m.run("sync", "data", "--bwlimit", "8M")
    watcher.join(timeout=5)
    assert seen, f"the transfer ended before the cut:\n{cut.stderr}"
    wait_released(m.far.parent, m.local.parent)

    # The exit code is the failure's (the connection), naming the one destination that failed.
    assert cut.returncode == EXIT_CONNECTION, cut.stderr
    assert "1 of 2 destinations failed" in cut.stderr and m.url in cut.stderr, cut.stderr
    # The local destination completed: the new snapshot, byte for byte (the origin has not changed since).
    new = m.assert_matches_its_snapshot(m.local)
    assert new != base and sha_file(m.local) == sha_file(m.fake.origin_path)
    assert m.state(m.local)["generation"] == local_gen + 1
    assert m.record(str(m.local))["exit_code"] == 0 and m.record(str(m.local))["snapshot"] == new
    # The far one still holds the old base, untouched, and part of the delta to the new one, verified.
    assert m.assert_matches_its_snapshot(m.far) == base
    progress = m.progress(m.far)
    assert progress is not None and not progress["complete"]
    verified = progress["verified"]
    whole = m.stream_size(base, new)
    assert 0 < verified < whole and verified >= seen["staged"] - (1 << 20) - 4096, (verified, seen)
    assert m.record(m.url)["exit_code"] == EXIT_CONNECTION and m.record(m.url)["snapshot"] == base
    assert set(m.snapshots()) == {base, new}  # the far one's base and the staged delta's target kept
    (local_send,) = m.sends_to(str(m.local))
    assert local_send["done"] and local_send["bytes_sent"] == whole

    again = m.ok("sync", "data")
    assert f"resuming delta {progress['delta_id']} at byte {verified}" in again.stderr, again.stderr
    far_sends, local_sends = m.sends_to(m.url), m.sends_to(str(m.local))
    resumed = [s for s in far_sends if s["label"].endswith(": resume")]
    assert len(resumed) == 1 and resumed[0]["delta_id"] == progress["delta_id"]
    # Only what the far receiver had not verified, the tail of the same stream, went again.
    assert resumed[0]["bytes_sent"] == whole - verified
    # The local destination was sent no data: its delta from the snapshot it already held is empty.
    (local_again,) = local_sends
    assert local_again["bytes_sent"] < 4096
    record = m.record(str(m.local))
    assert record["bytes_sent"] == record["marked_bytes"] == 0, record
    final = m.assert_settled()
    assert m.state(m.far)["snapshot"] == m.state(m.local)["snapshot"] == final
    print(f"cut at {seen['staged']} bytes staged; verified {verified} of {whole}; resumed "
          f"{resumed[0]['bytes_sent']}")
    status = json.loads(m.ok("status", "--json").stdout)
    (vol,) = status["volumes"]
    assert not vol["problems"], vol["problems"]


@pytest.mark.parametrize("kill_at", ["sent:14680064", "applied:1"])
def test_lvmirror_killed_during_a_two_destination_sync_then_a_rerun_finishes_both(sshd, tmp_path, kill_at):
    m = TwoMirrors(tmp_path, sshd)
    m.ok("init", "data")
    base = m.assert_settled()
    m.change(seed=3)

    # sent: once the two streams have yielded 14 MiB between them, paced at 8 MiB/s each so that neither
    # is through its 12 MiB; applied: once the first destination has applied the delta.
    paced = ["--bwlimit", "8M"] if kill_at.startswith("sent") else []
    killed = m.run("sync", "data", *paced, env={"FAKELVM_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wait_released(m.far.parent, m.local.parent)
    (new,) = set(m.snapshots()) - {base}
    whole = m.stream_size(base, new)
    progress, held = {}, {}
    for dest, image in ((str(m.local), m.local), (m.url, m.far)):
        held[dest] = m.assert_matches_its_snapshot(image)  # old or new, byte for byte: never a mix
        progress[dest] = m.progress(image)
        assert held[dest] in (base, new)
        if held[dest] == new:
            assert progress[dest] is None
    partial = [p for p in progress.values() if p is not None and 0 < p["verified"] < whole]
    if kill_at.startswith("applied"):
        assert new in held.values()
    else:
        assert new not in held.values() and partial, progress  # cut mid-stream: a resume to test

    again = m.ok("sync", "data")
    print(f"{kill_at}: held {held}, progress {[(p or {}).get('verified') for p in progress.values()]} of "
          f"{whole}; rerun sends {m.sent()}")
    final = m.assert_settled()
    assert final not in (base, new)
    for dest, image in ((str(m.local), m.local), (m.url, m.far)):
        p = progress[dest]
        resumed = [s for s in m.sends_to(dest) if s["label"].endswith(": resume")]
        record = m.record(dest)
        assert record["exit_code"] == 0 and record["snapshot"] == final
        if held[dest] == new or p is not None:
            if p is not None:
                (one,) = resumed
                # The tail its receiver had not verified, nothing more (nothing at all if it held it whole).
                assert one["bytes_sent"] == whole - p["verified"], (dest, one, p)
                if 0 < p["verified"] < whole:
                    assert f"{p['delta_id']} at byte {p['verified']}" in again.stderr, again.stderr
            else:
                assert resumed == []
            # Then the delta from `new` to `final`: nothing changed, no data.
            assert record["bytes_sent"] == 0 and m.state(image)["generation"] == 3, record
        else:  # nothing of the delta to `new` was verified there: it gets its own delta from the base
            assert resumed == [] and record["bytes_sent"] > 0 and m.state(image)["generation"] == 2
