"""pip's way in: the wheel that `pip wheel .` / `python -m build` / `pipx install .` make works on its own,
and it asks for the same library floors as the Debian package's Depends."""

from __future__ import annotations

import re
import site
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: the build must work offline with the setuptools already here (Debian's
    # 66 in the installed run, which is why pyproject's license is a table).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("lvmirror-*.whl")
    return built


def test_the_wheel_installs_working_commands(tmp_path, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lvmirror/remote/server.py" in names and "lvdeltafs/fuse.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Then the libraries, from this interpreter's site-packages: a path line, so the .pth files there
    # (the checkout's editable install) stay out, and after the install, so pip does not take an
    # installed lvmirror there for this one.
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # cwd: not the checkout, which `python -c` would put first on sys.path.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lvmirror; print(lvmirror.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(purelib))
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([str(venv / "bin" / "lvmirror"), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"lvmirror, version {version}", out.stderr
    out = subprocess.run([str(venv / "bin" / "lvdeltafs"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "mount" in out.stdout, out.stderr


def _debian_floors() -> dict[str, str]:
    """python3-NAME (>= VERSION) in debian/control's Depends, as {NAME: VERSION} (epochs dropped)."""
    control = (ROOT / "debian" / "control").read_text()
    return {name: version.split(":")[-1]
            for name, version in re.findall(r"python3-([a-z0-9]+) \(>= ([^)]+)\)", control)}


def test_pip_and_debian_ask_for_the_same_library_floors():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([a-z0-9]+)>=([0-9.]+)", d).groups() for d in deps)
    assert floors == _debian_floors()


def test_the_package_metadata_says_what_it_needs(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Requires-Python"] == ">=3.11"
    # Older setuptools (Debian's) writes "click (>=8.1.3)", newer "click>=8.1.3".
    runtime = [re.sub(r"[ ()]", "", r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(runtime) == sorted(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert "lvmirror = lvmirror.cli:main" in entry_points and "lvdeltafs = lvdeltafs.cli:main" in entry_points
