"""Choosing numpy's AVX2 sort over its AVX-512 one on AMD Zen 4, and only there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvdeltafs import cpu_quirks

ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
ZEN3 = ZEN4.replace(" avx512f avx512bw", "")
ZEN5 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 26")
INTEL = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6")


@pytest.mark.parametrize(("cpuinfo", "zen4"), [(ZEN4, True), (ZEN3, False), (ZEN5, False), (INTEL, False),
                                                ("", False), ("garbage\n\x00:::", False)])
def test_only_a_zen4_is_a_zen4(cpuinfo: str, zen4: bool):
    assert cpu_quirks.is_zen4(cpuinfo) is zen4


@pytest.fixture
def numpy_not_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "numpy", raising=False)


def cpuinfo_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_set_on_a_zen4_with_numpy_2_4_and_kept_as_the_user_set_it(tmp_path, numpy_not_loaded, monkeypatch):
    monkeypatch.setattr(cpu_quirks, "numpy_version", lambda: (2, 4))
    env: dict[str, str] = {}
    assert cpu_quirks.avoid_slow_avx512_sort(env, cpuinfo_file(tmp_path, ZEN4))
    assert env == {"NPY_DISABLE_CPU_FEATURES": cpu_quirks.DISABLE}
    mine = {"NPY_DISABLE_CPU_FEATURES": ""}
    assert not cpu_quirks.avoid_slow_avx512_sort(mine, cpuinfo_file(tmp_path, ZEN4))
    assert mine == {"NPY_DISABLE_CPU_FEATURES": ""}


@pytest.mark.parametrize("version", [None, (1, 24), (2, 3), (3, 0)])
def test_left_alone_with_a_numpy_whose_names_differ(tmp_path, numpy_not_loaded, monkeypatch, version):
    monkeypatch.setattr(cpu_quirks, "numpy_version", lambda: version)
    env: dict[str, str] = {}
    assert not cpu_quirks.avoid_slow_avx512_sort(env, cpuinfo_file(tmp_path, ZEN4)) and env == {}


@pytest.mark.parametrize("cpuinfo", [ZEN3, ZEN5, INTEL])
def test_left_alone_on_other_cpus_or_without_cpuinfo(tmp_path, numpy_not_loaded, monkeypatch, cpuinfo):
    monkeypatch.setattr(cpu_quirks, "numpy_version", lambda: (2, 4))
    env: dict[str, str] = {}
    assert not cpu_quirks.avoid_slow_avx512_sort(env, cpuinfo_file(tmp_path, cpuinfo)) and env == {}
    assert not cpu_quirks.avoid_slow_avx512_sort(env, str(tmp_path / "missing")) and env == {}


def test_too_late_once_numpy_is_loaded(tmp_path, monkeypatch):
    import numpy  # noqa: F401
    monkeypatch.setattr(cpu_quirks, "numpy_version", lambda: (2, 4))
    env: dict[str, str] = {}
    assert not cpu_quirks.avoid_slow_avx512_sort(env, cpuinfo_file(tmp_path, ZEN4)) and env == {}


def test_the_installed_numpy_is_read_and_takes_the_names_without_a_warning():
    """This installation's numpy, in a fresh process as a command starts: whatever the CPU, numpy
    loads without a word on stderr, and on a Zen 4 with numpy 2.4 the AVX-512 targets are off."""
    import numpy
    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    # Debian 12's numpy 1.24 computes its version.py's version: unknown, so left alone, as it should be.
    assert cpu_quirks.numpy_version() == (major, minor) or ((major, minor) < (2, 4)
                                                            and cpu_quirks.numpy_version() is None)
    env = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
    code = "import json, os, lvdeltafs, numpy; print(json.dumps(os.environ.get('NPY_DISABLE_CPU_FEATURES')))"
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert run.stderr == ""  # numpy knew every name it was given
    with open("/proc/cpuinfo") as f:
        expect = cpu_quirks.is_zen4(f.read()) and (2, 4) <= (major, minor) < (3, 0)
    assert json.loads(run.stdout) == (cpu_quirks.DISABLE if expect else None)
