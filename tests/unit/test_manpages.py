"""The man pages in docs/man/ name every command, option, config key and exit code, and render cleanly.

The click trees and lvmirror/config.py are the truth: a command or option added
to a CLI, or a key added to the configuration, fails here until its page says
what it does.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from lvdeltafs import errors
from lvdeltafs.cli import cli as lvdeltafs_cli
from lvmirror.cli import cli as lvmirror_cli
from lvmirror.config import DEFAULTS_KEYS, VOLUME_KEYS

MAN_DIR = Path(__file__).resolve().parents[2] / "docs" / "man"
PAGES = ("lvmirror.8", "lvdeltafs.8", "lvmirror.toml.5")
CLIS = {"lvmirror.8": ("lvmirror", lvmirror_cli), "lvdeltafs.8": ("lvdeltafs", lvdeltafs_cli)}

# ---- reading roff -------------------------------------------------------------------------

_ESCAPES = re.compile(r"\\f[BIRP]|\\&|\\%|\\\(..|\\e")


def plain(line: str) -> str:
    r"""A roff line as it reads: ``\-`` is ``-``, font changes and quotes of macro arguments gone."""
    text = _ESCAPES.sub("", line.replace(r"\-", "-"))
    if text.startswith("."):
        text = text.split(None, 1)[1] if " " in text else ""
    return text.replace('"', "")


def sections(lines: list[str], macro: str) -> dict[str, list[str]]:
    """The lines under each ``.SH`` (or ``.SS``) heading, by the heading's plain text."""
    found: dict[str, list[str]] = {}
    body: list[str] | None = None
    for line in lines:
        if line.startswith(macro + " "):
            body = found.setdefault(plain(line).strip(), [])
        elif line.startswith(".SH ") or line.startswith(".TH "):
            body = None
        elif body is not None:
            body.append(line)
    return found


def tags(lines: list[str]) -> list[str]:
    """The plain text of every ``.TP`` tag: the line that follows the macro."""
    return [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line.strip() == ".TP"]


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text))


def page(name: str) -> list[str]:
    return (MAN_DIR / name).read_text(encoding="utf-8").splitlines()


# ---- walking the click trees --------------------------------------------------------------

Path_ = tuple[str, ...]


def commands(group: click.Command, path: Path_ = ()) -> Iterator[tuple[Path_, click.Command]]:
    """Every command of a click tree, with its path of names (the root's is empty)."""
    yield path, group
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            yield from commands(command, (*path, name))


def option_flags(command: click.Command) -> set[str]:
    return {flag for param in command.params if isinstance(param, click.Option) and not param.hidden
            for flag in (*param.opts, *param.secondary_opts)}


def argument_names(command: click.Command) -> list[str]:
    return [(param.name or "").upper() for param in command.params if isinstance(param, click.Argument)]


def documented_commands(name: str) -> dict[str, list[str]]:
    """Each ``.SS`` of the COMMANDS section, by its heading's first words (the command's path)."""
    body = sections(page(name), ".SH")["COMMANDS"]
    return sections(body, ".SS")


def subsection_of(documented: dict[str, list[str]], path: tuple[str, ...]) -> tuple[str, list[str]]:
    wanted = " ".join(path)
    for heading, body in documented.items():
        if heading == wanted or heading.startswith(wanted + " "):
            return heading, body
    raise AssertionError(f"no .SS heading for command {wanted!r} under COMMANDS (have: {sorted(documented)})")


CASES = [(man, path) for man, (_prog, root) in CLIS.items() for path, _cmd in commands(root) if path]


def command_at(root: click.Command, path: tuple[str, ...]) -> click.Command:
    for name in path:
        assert isinstance(root, click.Group)
        root = root.commands[name]
    return root


# ---- the tests ----------------------------------------------------------------------------

@pytest.mark.parametrize(("man", "path"), CASES, ids=[f"{m}:{' '.join(p)}" for m, p in CASES])
def test_every_command_has_its_subsection_with_every_option(man, path):
    prog, root = CLIS[man]
    command = command_at(root, path)
    heading, body = subsection_of(documented_commands(man), path)
    for arg in argument_names(command):
        # An argument taking many values (VOLUMES) may be shown as VOLUME...
        assert arg in heading or arg.rstrip("S") + "..." in heading, (man, heading, arg)
    missing = option_flags(command) - flags_in("\n".join(tags(body)))
    assert not missing, f"{man}: {' '.join(path)}: options without a .TP entry: {sorted(missing)}"
    synopsis = plain(" ".join(sections(page(man), ".SH")["SYNOPSIS"]))
    assert f"{prog} {' '.join(path)}" in " ".join(synopsis.split()), f"{man}: SYNOPSIS lacks {path}"


@pytest.mark.parametrize("man", sorted(CLIS))
def test_global_options_are_in_options(man):
    _prog, root = CLIS[man]
    body = sections(page(man), ".SH")["OPTIONS"]
    missing = option_flags(root) - flags_in("\n".join(tags(body)))
    assert not missing, f"{man}: global options missing from OPTIONS: {sorted(missing)}"


@pytest.mark.parametrize("man", sorted(CLIS))
def test_no_command_is_documented_that_does_not_exist(man):
    _prog, root = CLIS[man]
    real = {" ".join(path) for path, _cmd in commands(root) if path}
    for heading in documented_commands(man):
        assert any(heading == c or heading.startswith(c + " ") for c in real), f"{man}: stale {heading!r}"


def config_keys() -> dict[str, set[str]]:
    """Each key lvmirror/config.py accepts, and the tables it may stand in."""
    keys: dict[str, set[str]] = {}
    for table, allowed in (("[volume.NAME]", VOLUME_KEYS), ("[defaults]", DEFAULTS_KEYS)):
        for key in allowed:
            keys.setdefault(key, set()).add(table)
    return keys


@pytest.mark.parametrize(("key", "tables"), sorted(config_keys().items()))
def test_every_config_key_is_documented_under_its_tables(key, tables):
    """A key is a .TP entry of the section whose heading names exactly the tables that accept it."""
    where = [heading for heading, body in sections(page("lvmirror.toml.5"), ".SH").items()
             if key in {tag.split()[0] for tag in tags(body) if tag.split()}]
    assert len(where) == 1, f"lvmirror.toml.5: {key} is a .TP entry of {where or 'no section'}"
    named = set(re.findall(r"\[(?:volume\.NAME|defaults)\]", where[0]))
    assert named == tables, f"lvmirror.toml.5: {key} is under {where[0]!r}; it belongs in {sorted(tables)}"


def exit_codes() -> set[int]:
    """Every EXIT_* constant and every exit code an error class carries."""
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    classes = [errors.LvError]
    while classes:
        cls = classes.pop()
        codes.add(cls.exit_code)
        classes.extend(cls.__subclasses__())
    return codes


@pytest.mark.parametrize("man", sorted(CLIS))
def test_every_exit_code_is_in_exit_status(man):
    body = sections(page(man), ".SH")["EXIT STATUS"]
    documented = {int(tag) for tag in tags(body) if tag.strip().isdigit()}
    assert exit_codes() <= documented, f"{man}: EXIT STATUS lacks {sorted(exit_codes() - documented)}"


def test_the_walks_find_what_there_is():
    assert {("lvmirror.8", ("sync",)), ("lvmirror.8", ("apply",)), ("lvdeltafs.8", ("mount",))} <= set(CASES)
    assert {"--dry-run", "-n", "--all"} <= option_flags(command_at(lvmirror_cli, ("sync",)))
    assert "--debug-fuse" not in option_flags(command_at(lvdeltafs_cli, ("mount",)))  # hidden
    assert set(range(10)) <= exit_codes()


@pytest.mark.parametrize("man", PAGES)
def test_page_head_and_sections(man):
    lines = page(man)
    title, section = man.rsplit(".", 1)
    th = [line for line in lines if line.startswith(".TH ")]
    assert len(th) == 1 and th[0].split()[1:3] == [title.upper(), section], th
    heads = list(sections(lines, ".SH"))
    for required in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "ENVIRONMENT", "EXAMPLES", "SEE ALSO"):
        assert required in heads, f"{man}: no {required} section"
    name_line = " ".join(sections(lines, ".SH")["NAME"])
    assert re.fullmatch(rf"{re.escape(title)} \\- \S.*", name_line), f"{man}: NAME is not 'name \\- what'"


@pytest.mark.parametrize("man", PAGES)
def test_options_and_dashes_are_escaped(man):
    r"""An option written with a bare '-' renders as a hyphen (U+2010) in UTF-8, so copies badly: use \-."""
    for number, line in enumerate(page(man), 1):
        if line.startswith('.\\"'):
            continue
        bare = re.findall(r"(?<![\\\w])-{1,2}[A-Za-z]", line)
        assert not bare, f"{man}:{number}: unescaped option {bare} in {line!r}"


# scripts/setup installs man-db and groff-base: a missing one fails here, it does not skip.
@pytest.mark.parametrize("man", PAGES)
def test_page_renders_without_warnings(man):
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80"}
    out = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MAN_DIR / man)],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and not out.stderr, out.stderr
