"""Bash completion: the committed scripts are what click generates, and volume names come from the config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest
from click.shell_completion import BashComplete, ShellComplete

from lvdeltafs.cli import cli as lvdeltafs_cli
from lvmirror.cli import cli as lvmirror_cli
from tests.harness import BIN

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "contrib" / "bash-completion"
VOLUMES = ("web", "www", "db")
CONFIG = "".join(f'[volume.{name}]\nvg = "vg0"\nlv = "{name}"\ndestination = "/srv/mirror/{name}.img"\n\n'
                 for name in VOLUMES)


@pytest.mark.parametrize(("prog", "group"), [("lvmirror", lvmirror_cli), ("lvdeltafs", lvdeltafs_cli)])
def test_committed_script_is_what_click_generates(prog, group):
    var = f"_{prog.upper()}_COMPLETE"
    generated = BashComplete(group, {}, prog, var).source()
    committed = (SCRIPTS / prog).read_text(encoding="utf-8")
    # click 8.1 ends the script with one more newline than later releases: the same script.
    assert committed.rstrip("\n") == generated.rstrip("\n"), (
        f"contrib/bash-completion/{prog} is stale; regenerate it with: "
        f"{var}=bash_source .venv/bin/{prog} > contrib/bash-completion/{prog}")


def write_config(folder: Path, text: str = CONFIG, name: str = "lvmirror.toml") -> Path:
    """A config lvmirror accepts: 0600 in a 0700 folder (as root, root's own file)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    path = write_config(tmp_path / "etc")
    monkeypatch.setenv("LVMIRROR_CONFIG", str(path))
    return path


def complete(args: list[str], incomplete: str, group: click.Command = lvmirror_cli) -> list[tuple[str, str]]:
    prog = group.name or "lvmirror"
    items = ShellComplete(group, {}, prog, f"_{prog.upper()}_COMPLETE").get_completions(args, incomplete)
    return [(item.type, item.value) for item in items]


def plain(*names: str) -> list[tuple[str, str]]:
    return [("plain", name) for name in names]


@pytest.mark.parametrize("command", ["init", "sync", "check", "status", "discard"])
def test_volume_arguments_complete_configured_names(config, command):
    assert complete([command], "w") == plain("web", "www")
    assert complete([command], "") == plain("db", "web", "www")
    assert complete([command], "x") == []


def test_status_does_not_offer_a_volume_twice(config):
    assert complete(["status", "web"], "") == plain("db", "www")


@pytest.mark.parametrize("spelling", [["-c"], ["--config"]])
def test_config_option_on_the_line_wins_over_the_environment(tmp_path, monkeypatch, spelling):
    other = write_config(tmp_path / "other", CONFIG.replace("[volume.www]", "[volume.wiki]"))
    monkeypatch.setenv("LVMIRROR_CONFIG", str(tmp_path / "missing.toml"))
    assert complete([*spelling, str(other), "sync"], "w") == plain("web", "wiki")
    assert complete([f"--config={other}", "sync"], "w") == plain("web", "wiki")


BROKEN = {
    "missing": None,
    "not toml": "[volume.web\n",
    "invalid": '[volume.web]\nvg = "vg0"\n',
    "unknown key": '[defaults]\ncolour = "red"\n',
    "not utf-8": b"\xff\xfe[volume]",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_config_completes_nothing_and_says_nothing(tmp_path, monkeypatch, capsys, kind):
    content = BROKEN[kind]
    path = tmp_path / "etc" / "lvmirror.toml"
    if content is not None:
        write_config(tmp_path / "etc")
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("LVMIRROR_CONFIG", str(path))
    assert complete(["sync"], "") == []
    assert capsys.readouterr() == ("", "")


def test_an_unsafe_config_completes_nothing(config, capsys):
    config.chmod(0o666)
    assert complete(["status"], "") == []
    assert capsys.readouterr() == ("", "")


def test_a_directory_or_fifo_as_config_completes_nothing_at_once(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        monkeypatch.setenv("LVMIRROR_CONFIG", str(path))
        assert complete(["check"], "") == []


@pytest.mark.parametrize(("group", "args"), [
    (lvmirror_cli, ["apply"]),
    (lvmirror_cli, ["apply", "delta"]),
    (lvmirror_cli, ["-c"]),
    (lvmirror_cli, ["apply", "--ssh-key"]),
    (lvdeltafs_cli, ["export", "a", "b"]),
    (lvdeltafs_cli, ["mount"]),
    (lvdeltafs_cli, ["verify"]),
])
def test_paths_complete_as_file_names(group, args):
    """An empty reply would leave bash with nothing; "file" makes it complete file names itself."""
    assert complete(args, "/sr", group) == [("file", "/sr")]


def test_commands_and_options_complete(config):
    assert complete([], "s") == plain("status", "sync")
    assert ("plain", "--dry-run") in complete(["sync"], "--d")


# ---- through the console script and a real bash ---------------------------------------------



def run_complete(words: str, cword: int, config_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), "_LVMIRROR_COMPLETE": "bash_complete",
           "LVMIRROR_CONFIG": str(config_path)}
    return subprocess.run([str(BIN / "lvmirror")], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_console_script_completes_volume_names(config):
    out = run_complete("lvmirror sync w", 2, config)
    assert (out.returncode, out.stdout.split(), out.stderr) == (0, ["plain,web", "plain,www"], "")


def test_console_script_says_nothing_on_a_broken_config(tmp_path):
    broken = write_config(tmp_path / "etc", "[volume.web\n")
    out = run_complete("lvmirror sync w", 2, broken)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "", "")


@pytest.mark.parametrize(("words", "expected"), [
    ("lvmirror sync w", ["web", "www"]),
    ("lvmirror status web ''", ["db", "www"]),
    ("lvmirror st", ["status"]),
])
def test_bash_completes_with_the_committed_script(config, words, expected):
    script = (f"source {SCRIPTS / 'lvmirror'}; COMP_WORDS=({words}); "
              "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); "
              '_lvmirror_completion lvmirror; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert (out.returncode, out.stdout.split(), out.stderr) == (0, expected, "")
