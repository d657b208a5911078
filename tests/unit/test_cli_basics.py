"""Both console scripts are installed and answer --help and --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lvdeltafs

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("prog", ["lvdeltafs", "lvmirror"])
def test_version_and_help(prog):
    out = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{prog}, version {lvdeltafs.__version__}"
    out = subprocess.run([str(BIN / prog), "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout


@pytest.mark.parametrize("prog", ["lvdeltafs", "lvmirror"])
def test_unknown_command_is_a_usage_error(prog):
    out = subprocess.run([str(BIN / prog), "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "No such command" in out.stderr
