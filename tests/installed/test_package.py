"""The Debian package as a sysadmin gets it: installed by apt, run by Debian's python3 and libraries.

scripts/test builds it (scripts/build-deb), installs it with apt-get and runs the whole host suite
against /usr/bin with LVMIRROR_TEST_INSTALLED=1; these tests check what only the package has: the
commands' interpreter and libraries, the systemd units, man pages, completion, example files.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.installed

ROOT = Path(__file__).resolve().parents[2]
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"
UNITS = Path("/lib/systemd/system")


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


def test_the_commands_run_on_debians_python_and_libraries():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for command in ("lvmirror", "lvdeltafs"):
        script = Path("/usr/bin") / command
        assert script.read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert run("/usr/bin/lvmirror", "--version").stdout.strip() == f"lvmirror, version {version}"
    assert run("dpkg-query", "-W", "-f=${Version}", "lvmirror").stdout == version
    probe = ("import click, numpy, paramiko, pyfuse3, trio, lvmirror, lvdeltafs\n"
             "for m in (click, numpy, paramiko, pyfuse3, trio, lvmirror, lvdeltafs): print(m.__file__)")
    paths = run("/usr/bin/python3", "-I", "-c", probe).stdout.split()
    assert len(paths) == 7 and all(p.startswith(DIST_PACKAGES) for p in paths), paths


def test_the_systemd_units_verify_and_are_not_enabled(tmp_path):
    units = [UNITS / "lvmirror.service", UNITS / "lvmirror.timer"]
    # A template is verified through an instance, named as OnFailure= names it.
    instance = tmp_path / "lvmirror-failure@lvmirror.service.service"
    instance.write_text((UNITS / "lvmirror-failure@.service").read_text())
    out = run("systemd-analyze", "verify", *map(str, units), str(instance))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "OnFailure=lvmirror-failure@%n.service" in (UNITS / "lvmirror.service").read_text()
    wants = list(Path("/etc/systemd/system").glob("*.wants/lvmirror*"))
    assert wants == [], "the package must not enable its units: the config has no volume yet"


@pytest.mark.parametrize("page, section", [("lvmirror", "8"), ("lvdeltafs", "8"), ("lvmirror.toml", "5")])
def test_the_man_pages_are_installed_and_render_without_warnings(page, section):
    path = run("man", "-w", section, page).stdout.strip()
    assert path == f"/usr/share/man/man{section}/{page}.{section}.gz"
    out = run("man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", path,
              env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANROFFSEQ": ""})
    assert out.returncode == 0 and out.stderr == "" and page in out.stdout.lower(), out.stderr


def test_bash_completion_names_the_configured_volumes(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o700)
    config = folder / "lvmirror.toml"
    config.write_text("".join(f'[volume.{n}]\nvg = "vg0"\nlv = "{n}"\ndestination = "/srv/{n}.img"\n'
                              'snapshot_size = "1G"\n' for n in ("web", "db", "wiki")))
    config.chmod(0o600)
    script = ("source /usr/share/bash-completion/completions/lvmirror\n"
              "COMP_WORDS=(lvmirror sync w); COMP_CWORD=2; _lvmirror_completion lvmirror\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = run("bash", "--norc", "-c", script,
              env={"PATH": "/usr/bin:/bin", "LVMIRROR_CONFIG": str(config), "HOME": str(tmp_path)})
    assert out.stdout.split() == ["web", "wiki"] and out.stderr == "", out


def _uncommented(text: str) -> str:
    """The example with every setting switched on: '#key = ...' and '#[table]' lose their '#'."""
    return "".join(re.sub(r"^#(?=[\[a-z])", "", line) for line in text.splitlines(keepends=True))


def test_the_example_config_is_valid_as_shipped_and_with_every_setting_on(tmp_path):
    shipped = Path("/etc/lvmirror/lvmirror.toml")
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o700)
    full = folder / "lvmirror.toml"
    full.write_text(_uncommented(shipped.read_text()))
    full.chmod(0o600)
    probe = ("import sys\nfrom lvmirror import config\n"
             "for path in sys.argv[1:]: print(sorted(config.load(path).volumes))")
    out = run("/usr/bin/python3", "-I", "-c", probe, str(shipped), str(full))
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == ["[]", "['web']"], out
    none = run("/usr/bin/lvmirror", "sync", "--all")
    assert none.returncode == 3 and "nothing to sync" in none.stderr, none


def test_the_cron_file_is_the_commented_out_alternative():
    text = Path("/etc/cron.d/lvmirror").read_text()
    jobs = [line for line in text.splitlines() if line and not line.startswith("#") and "=" not in line]
    assert jobs == [], "cron must not run lvmirror as well as the timer unless the admin says so"
    assert re.search(r"^#15 2 \* \* \* root lvmirror -q sync --all$", text, re.M)


def test_the_files_an_admin_edits_are_conffiles_and_the_docs_are_there():
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "lvmirror").stdout
    for path in ("/etc/lvmirror/lvmirror.toml", "/etc/cron.d/lvmirror"):
        assert f" {path} " in conffiles
    for doc in ("README.md.gz", "status-json.md.gz", "receiver-protocol.md.gz", "stream-format.md.gz"):
        assert (Path("/usr/share/doc/lvmirror") / doc).is_file()
