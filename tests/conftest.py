"""Test plumbing: where each suite may run, and fixtures for real LVM, FUSE and sshd.

- ``lvm`` tests run only inside the VM (``scripts/lvm-vm``, which sets
  LVMIRROR_IN_VM=1).  Outside it they are skipped with the reason, except
  under CI=true, where a test that cannot reach real LVM is a failure.
- ``fuse`` and ``ssh`` tests run on the host against a real /dev/fuse and a
  real sshd on 127.0.0.1; a missing piece is likewise a failure under CI.
- ``netns`` tests make a network namespace behind a tbf-shaped veth pair (a slow
  link on this host) and run a real sshd inside it; they need root, ``ip`` and
  ``tc``, and a kernel with network namespaces, veth and tbf.  Likewise a
  failure under CI when any of that is missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import ShapedLink, Sshd, VolumeGroup, start_sshd, wait_for_mount

IN_VM = os.environ.get("LVMIRROR_IN_VM") == "1"
IN_CI = os.environ.get("CI", "").lower() == "true"
# scripts/test's second host run: the Debian package as installed, under Debian's Python.
INSTALLED = os.environ.get("LVMIRROR_TEST_INSTALLED") == "1"


def _cannot_run(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (under CI=true this is a failure, not a skip)")
    pytest.skip(reason)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The installed run must test the installed package, not the checkout beside it."""
    if INSTALLED:
        import lvdeltafs
        import lvmirror
        for module in (lvmirror, lvdeltafs):
            if not module.__file__.startswith("/usr/lib/python3/dist-packages/"):
                pytest.exit(f"LVMIRROR_TEST_INSTALLED=1 but {module.__name__} comes from {module.__file__}: "
                            "run pytest with --import-mode=append, as scripts/test does", returncode=4)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("installed") and not INSTALLED:
        _cannot_run("tests the installed Debian package: scripts/test runs it after scripts/build-deb")
    if item.get_closest_marker("lvm") and not IN_VM:
        _cannot_run("needs real LVM: run inside the VM with scripts/test or "
                    "scripts/lvm-vm -- .venv/bin/pytest -m lvm ...")
    if item.get_closest_marker("fuse") and not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        _cannot_run("needs /dev/fuse and fusermount3 (scripts/setup installs fuse3)")
    if item.get_closest_marker("ssh") and not os.path.exists("/usr/sbin/sshd"):
        _cannot_run("needs /usr/sbin/sshd (scripts/setup installs openssh-server)")
    if item.get_closest_marker("netns") and not (os.geteuid() == 0 and shutil.which("ip")
                                                 and shutil.which("tc")):
        _cannot_run("needs root, ip and tc (iproute2) to make a network namespace with a shaped link")


_vg_numbers = itertools.count(1)


@pytest.fixture
def make_vg():
    """Factory: a fresh volume group on its own loop-device PV, removed after the test."""
    made: list[VolumeGroup] = []

    def make(name: str | None = None, size_mb: int = 512, extent_size: str | None = None) -> VolumeGroup:
        vg = VolumeGroup.create(name or f"vgt{os.getpid()}x{next(_vg_numbers)}", size_mb, extent_size)
        made.append(vg)
        return vg

    yield make
    problems = [p for vg in reversed(made) if (p := vg.destroy())]
    if problems:
        pytest.fail("cleaning up test volume groups failed: " + "; ".join(problems))


@pytest.fixture
def vg(make_vg) -> VolumeGroup:
    """A fresh volume group (512 MiB) for one test."""
    return make_vg()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    """A real OpenSSH sshd on 127.0.0.1 with temporary host and client keys."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def shaped_sshd(tmp_path_factory) -> tuple[ShapedLink, Sshd]:
    """A real sshd inside a network namespace, reached over a tbf-shaped veth (80 Mbit/s each way).

    Everything is torn down after: sshd stopped, the namespace deleted (the veth pair goes with it).
    """
    try:
        link = ShapedLink.create()
    except AssertionError as e:  # a command failed: this host cannot make the link
        _cannot_run(f"cannot make a network namespace with a tbf-shaped veth here: {e}")
    server = None
    try:
        server = start_sshd(tmp_path_factory.mktemp("shaped-sshd"), link.ns_ip, link.exec_prefix())
        yield link, server
    finally:
        if server is not None:
            server.stop()
        problem = link.destroy()
    if problem:
        pytest.fail(f"tearing down the shaped link failed: {problem}")


@pytest.fixture
def fuse_mount():
    """Factory: start a FUSE filesystem process and wait for its mount; always unmounted after."""
    mounts: list[tuple[subprocess.Popen, Path]] = []

    def mount(argv: list[str], mountpoint: Path, timeout: float = 20.0) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        mounts.append((proc, Path(mountpoint)))
        wait_for_mount(Path(mountpoint), proc, timeout)
        return proc

    yield mount
    for proc, mountpoint in reversed(mounts):
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
