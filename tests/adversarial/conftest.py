"""Fixtures of the adversarial suite: a folder another user can write, and a file of root's to protect."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness import VICTIM


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The hostile part runs as nobody through setpriv, which only root may do; CI runs as root.
    if os.geteuid() != 0:
        here = Path(__file__).parent
        for item in (i for i in items if here in Path(i.fspath).parents):
            item.add_marker(pytest.mark.skip(reason="needs root, to run the hostile part as nobody"))


@pytest.fixture
def shared():
    """A sticky, world-writable folder that nobody can reach (under /tmp, not pytest's private tmp)."""
    d = Path(tempfile.mkdtemp(prefix="lvmirror-shared-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file of root's outside every destination: the target of every planted link."""
    v = tmp_path / "victim"
    v.write_bytes(VICTIM)
    v.chmod(0o644)
    return v
