"""lvmirror's configuration: every validation error names the file and the key."""

from __future__ import annotations

import os
import textwrap

import pytest

from lvdeltafs.errors import EXIT_BAD_INPUT, EXIT_REFUSED
from lvmirror import config as cfg
from lvmirror.config import ConfigError, UnsafeConfig

GOOD = """
[defaults]
snapshot_size = "1G"
keep = 2

[volume.web]
vg = "vg0"
lv = "web"
destination = "/srv/mirror/web.img"

[volume.db]
vg = "vg0"
lv = "db"
destination = "/dev/backup/db"
state_dir = "/var/lib/lvmirror/db"
keep = 1
snapshot_size = 4096
"""


def write(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "lvmirror.toml"
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return str(path)


def load_text(tmp_path, text: str) -> cfg.Config:
    return cfg.load(write(tmp_path, text))


def test_good_config_loads_with_defaults_applied(tmp_path):
    c = load_text(tmp_path, GOOD)
    web, db = c.volume("web"), c.volume("db")
    assert (web.vg, web.lv, web.destination.path, web.snapshot_size, web.keep) == (
        "vg0", "web", "/srv/mirror/web.img", "1G", 2)
    assert (db.keep, db.snapshot_size, db.state_dir) == (1, "4096b", "/var/lib/lvmirror/db")
    assert c.lock_dir == cfg.DEFAULT_LOCK_DIR
    assert not web.destination.is_ssh


def test_env_and_explicit_path(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.setenv(cfg.ENV_PATH, path)
    assert cfg.config_path() == path
    assert cfg.config_path("/x.toml") == "/x.toml"
    assert set(cfg.load().volumes) == {"web", "db"}
    monkeypatch.delenv(cfg.ENV_PATH)
    assert cfg.config_path() == cfg.DEFAULT_PATH


def test_ssh_destination_is_parsed(tmp_path):
    c = load_text(tmp_path, """
        [volume.web]
        vg = "vg0"
        lv = "web"
        destination = "ssh://backup@mirror.example:2222/srv/web.img"
        ssh_key = "/root/.ssh/id_ed25519"
        known_hosts = "/etc/lvmirror/known_hosts"
    """)
    d = c.volume("web").destination
    assert (d.is_ssh, d.user, d.host, d.port, d.path) == (
        True, "backup", "mirror.example", 2222, "/srv/web.img")


def expect(tmp_path, text: str, *fragments: str, exc=ConfigError):
    with pytest.raises(exc) as info:
        load_text(tmp_path, text)
    msg = str(info.value)
    assert str(tmp_path / "lvmirror.toml") in msg, msg
    for f in fragments:
        assert f in msg, msg
    return info.value


VOL = '[volume.web]\nvg = "vg0"\nlv = "web"\n'


@pytest.mark.parametrize("text, fragments", [
    ("[volume.web]\nvg = 'vg0'\nlv = 'web'\ndestination = '/x.img'\ndestinaton = '/y'\n",
     ("[volume.web]", "unknown key 'destinaton'")),
    ("[defaults]\nvg = 'vg0'\n", ("[defaults]", "unknown key 'vg'")),
    ("[global]\nkeep = 1\n", ("unknown table or key 'global'",)),
    ("[volume.web]\nvg = 'vg0'\nlv = 'web'\n", ("[volume.web]", "missing key 'destination'")),
    ("[volume.web]\nlv = 'web'\ndestination = '/x.img'\n", ("missing key 'vg'",)),
    (VOL + "destination = 'relative/web.img'\n", ("destination", "absolute path")),
    (VOL + "destination = 'ftp://host/x'\n", ("destination", "unknown scheme")),
    (VOL + "destination = 'ssh://user@host/'\n", ("destination", "names no path")),
    (VOL + "destination = 'ssh://user@host:99999/x'\n", ("destination", "bad port")),
    (VOL + "destination = 'ssh:///x'\n", ("destination", "names no host")),
    (VOL + "destination = '/dev/vg0/web'\n", ("destination", "is the source volume vg0/web")),
    (VOL + "destination = '/dev/mapper/vg0-web'\n", ("destination", "is the source volume")),
    (VOL + "destination = '/dev/vg0/web/sub'\n", ("destination", "is the source volume")),
    (VOL + "destination = '/x.img'\nkeep = 0\n", ("keep", "at least 1")),
    (VOL + "destination = '/x.img'\nkeep = '2'\n", ("keep",)),
    (VOL + "destination = '/x.img'\nkeep = true\n", ("keep",)),
    (VOL + "destination = '/x.img'\nsnapshot_size = 'lots'\n", ("snapshot_size", "not a size")),
    (VOL + "destination = '/x.img'\nsnapshot_size = -5\n", ("snapshot_size", "positive")),
    (VOL + "destination = '/x.img'\nsnapshot_size = '0M'\n", ("snapshot_size",)),
    (VOL + "destination = '/x.img'\nstate_dir = 'state'\n", ("state_dir", "absolute")),
    (VOL + "destination = '/x.img'\nssh_key = 'id'\n", ("ssh_key", "absolute")),
    (VOL + "destination = '/x.img'\nknown_hosts = 3\n", ("known_hosts",)),
    ("[volume.web]\nvg = 'bad/vg'\nlv = 'web'\ndestination = '/x.img'\n", ("vg", "not a valid LVM name")),
    ("[volume.web]\nvg = 'vg0'\nlv = '-web'\ndestination = '/x.img'\n", ("lv", "not a valid LVM name")),
    ("[volume.'we b']\nvg = 'vg0'\nlv = 'web'\ndestination = '/x.img'\n", ("volume name",)),
    ("[volume.web]\nvg = 'vg0'\nlv = 'web'\ndestination = ''\n", ("destination", "non-empty")),
    ("volume = 3\n", ("[volume] must be a table",)),
    ("[defaults]\nlock_dir = 'run'\n", ("lock_dir", "absolute")),
    ("[defaults]\nwork_dir = 'var'\n" + VOL + "destination = '/x.img'\n", ("work_dir", "absolute")),
    (VOL + "destination = '/x.img'\nwork_dir = '/var'\n", ("[volume.web]", "unknown key 'work_dir'")),
    (VOL + "destination = '/x.img'\n[volume.w2]\nvg = 'vg0'\nlv = 'w2'\ndestination = '/x.img'\n",
     ("[volume.w2]", "also the destination of [volume.web]")),
    ("[volume.web\n", ("not valid TOML",)),
])
def test_validation_errors(tmp_path, text, fragments):
    err = expect(tmp_path, text, *fragments)
    assert err.exit_code == EXIT_BAD_INPUT


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        cfg.load(str(tmp_path / "nope.toml"))


def test_unknown_volume_lists_the_configured_ones(tmp_path):
    c = load_text(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"no volume named 'mail' \(configured: db, web\)"):
        c.volume("mail")


def test_world_writable_file_is_refused(tmp_path):
    path = write(tmp_path, GOOD, 0o666)
    with pytest.raises(UnsafeConfig, match="world-writable") as info:
        cfg.load(path)
    assert path in str(info.value) and info.value.exit_code == EXIT_REFUSED


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only ownership rules apply only when run as root")
def test_group_writable_or_foreign_owned_refused_as_root(tmp_path):
    path = write(tmp_path, GOOD, 0o664)
    with pytest.raises(UnsafeConfig, match="group-writable"):
        cfg.load(path)
    os.chmod(path, 0o644)
    os.chown(path, 1234, 1234)
    with pytest.raises(UnsafeConfig, match="owned by uid 1234"):
        cfg.load(path)
    os.chown(path, 0, 0)
    assert cfg.load(path).volume("web")
