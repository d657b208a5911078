"""lvmirror's configuration: every validation error names the file and the key."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lvdeltafs.errors import EXIT_BAD_INPUT, EXIT_REFUSED, LvError
from lvmirror import config as cfg
from lvmirror.config import ConfigError, UnsafeConfig
from tests.harness import BIN

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
    assert c.metrics_file is None
    assert not web.destination.is_ssh


def test_metrics_file_is_a_defaults_path(tmp_path):
    c = load_text(tmp_path, "[defaults]\nmetrics_file = '/var/lib/node//./lvmirror.prom'\n")
    assert c.metrics_file == "/var/lib/node/lvmirror.prom"


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
    ("[defaults]\nmetrics_file = 'lvmirror.prom'\n", ("metrics_file", "absolute")),
    ("[defaults]\nmetrics_file = '/var/lib/node/lvmirror.txt'\n", ("metrics_file", ".prom")),
    ("[defaults]\nmetrics_file = '/var/lib/node/'\n", ("metrics_file", ".prom")),
    (VOL + "destination = '/x.img'\nmetrics_file = '/m.prom'\n", ("[volume.web]", "unknown key")),
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


# ---- hardening: destinations, control characters, hostile files --------------------------

# What must never reach a terminal raw: C0, DEL, C1 (and the Unicode separators / bidi controls).
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def assert_clean(msg: str) -> None:
    assert not RAW_CONTROL.search(msg), repr(msg)


def dest_error(raw: str) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.parse_destination(raw, "X destination")
    msg = str(info.value)
    assert msg.startswith("X destination"), msg
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert_clean(msg)
    return msg


@pytest.mark.parametrize("raw, fragments", [
    # control characters anywhere, shown escaped
    ("ssh://ho\nst/x", ("control character \\n", "'ssh://ho\\nst/x'")),
    ("ssh://us\x1ber@host/x", ("\\x1b",)),
    ("ssh://host/x\x7f", ("\\x7f",)),
    ("ssh://host/x\x85y", ("\\x85",)),
    ("ssh://host/x\ty", ("\\t",)),
    ("/srv/\x1b[31mred.img", ("\\x1b",)),
    ("/srv/a\x00b.img", ("\\x00",)),
    ("/srv/a\u202eb.img", ("\\u202e",)),
    ("\n/srv/a.img", ("\\n",)),
    # ports
    ("ssh://host:0/x", ("bad port '0'", "1 to 65535")),
    ("ssh://host:00/x", ("bad port",)),
    ("ssh://host:65536/x", ("bad port",)),
    ("ssh://host:99999999999999999999999/x", ("bad port",)),
    ("ssh://host:" + "9" * 5000 + "/x", ("bad port",)),
    ("ssh://host:22a/x", ("bad port",)),
    ("ssh://host:-22/x", ("bad port",)),
    ("ssh://host:+22/x", ("bad port",)),
    ("ssh://host: 22/x", ("bad port",)),
    ("ssh://host:\u0662\u0662/x", ("bad port",)),  # Arabic-Indic digits: isdigit() but not a port
    ("ssh://host:/x", ("no port number",)),
    ("ssh://[::1]:0/x", ("bad port",)),
    ("ssh://[::1]x/x", ("after ']'",)),
    # hosts
    ("ssh:///x", ("names no host",)),
    ("ssh://user@/x", ("names no host",)),
    ("ssh://user@:22/x", ("names no host",)),
    ("ssh://-oProxyCommand=sh/x", ("not a host name",)),
    ("ssh://.host/x", ("not a host name",)),
    ("ssh://ho st/x", ("not a host name",)),
    ("ssh://ho%st/x", ("not a host name",)),
    ("ssh://h\u00e9te/x", ("xn--",)),
    ("ssh://[bad]/x", ("not an IPv6 address",)),
    ("ssh://[1.2.3.4]/x", ("not an IPv6 address",)),
    ("ssh://[::1/x", ("never closes",)),
    ("ssh://::1/x", ("brackets",)),
    ("ssh://host:22:23/x", ("brackets",)),
    # users
    ("ssh://-oProxyCommand=sh@host/x", ("starts with '-'",)),
    ("ssh://@host/x", ("empty user",)),
    ("ssh://user:secret@host/x", ("password",)),
    ("ssh://user:@host/x", ("password",)),
    # paths
    ("ssh://host", ("names no path",)),
    ("ssh://host/", ("names no path",)),
    ("ssh://host/srv/../etc/x", ("'..' component",)),
    ("ssh://host/srv/x?y", ("'?' and '#'",)),
    ("ssh://host/srv/x#y", ("'?' and '#'",)),
    ("/srv/../dev/sda", ("'..' component",)),
    ("/srv/mirror/..", ("'..' component",)),
    ("/", ("root directory",)),
    ("//", ("root directory",)),
    ("/./", ("root directory",)),
    ("relative/web.img", ("absolute path",)),
    ("./web.img", ("absolute path",)),
    ("~/web.img", ("absolute path",)),
    ("", ("non-empty",)),
    ("mirror:/srv/web.img", ("scp", "ssh://")),
    ("ftp://host/x", ("unknown scheme 'ftp'",)),
    ("SSH://host/x", ("lower case",)),
])
def test_parse_destination_refuses(raw, fragments):
    msg = dest_error(raw)
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("raw, user, host, port, path", [
    ("ssh://h/x", "", "h", 22, "/x"),
    ("ssh://HOST.Example/x", "", "host.example", 22, "/x"),
    ("ssh://u@h:022/x", "u", "h", 22, "/x"),
    ("ssh://u@h:65535/x", "u", "h", 65535, "/x"),
    ("ssh://a@b@h/x", "a@b", "h", 22, "/x"),
    ("ssh://h//srv/./x/", "", "h", 22, "/srv/x"),
    ("ssh://[::1]/x", "", "::1", 22, "/x"),
    ("ssh://backup@[2001:DB8::1]:2222/srv/web.img", "backup", "2001:db8::1", 2222, "/srv/web.img"),
    ("ssh://[fe80::1%25eth0]/x", "", "fe80::1%eth0", 22, "/x"),
    ("ssh://192.0.2.7/x", "", "192.0.2.7", 22, "/x"),
    ("ssh://my_host.example./x", "", "my_host.example.", 22, "/x"),
])
def test_parse_destination_accepts_ssh(raw, user, host, port, path):
    d = cfg.parse_destination(raw)
    assert (d.is_ssh, d.user, d.host, d.port, d.path) == (True, user, host, port, path)
    assert d.raw == str(d) == raw


@pytest.mark.parametrize("raw, path", [
    ("/srv/mirror/web.img", "/srv/mirror/web.img"),
    ("//srv//mirror/./web.img/", "/srv/mirror/web.img"),
    ("/srv/my mirror/web\u00e9.img", "/srv/my mirror/web\u00e9.img"),
    ("/dev/backup/web", "/dev/backup/web"),
])
def test_parse_destination_accepts_paths(raw, path):
    d = cfg.parse_destination(raw)
    assert (d.is_ssh, d.path, d.raw) == (False, path, raw)


@pytest.mark.parametrize("a, b", [
    ("/srv/m/a.img", "/srv/m//a.img"),
    ("/srv/m/a.img", "/srv/m/./a.img"),
    ("/srv/m/a.img", "//srv/m/a.img/"),
    ("/dev/vg0/data", "/dev/mapper/vg0-data"),
    ("/dev/my-vg/my-lv", "/dev/mapper/my--vg-my--lv"),
    ("/dev/vg0//data", "/dev/mapper/vg0-data"),
    ("ssh://host/x", "ssh://host:22/x"),
    ("ssh://host/x", "ssh://HOST/x"),
    ("ssh://host/x", "ssh://host//x/"),
    ("ssh://u@host/x", "ssh://u@HoSt:0022/./x"),
    ("ssh://[::1]/x", "ssh://[0:0::1]/x"),
    ("ssh://[2001:db8::1]/x", "ssh://[2001:DB8:0::1]:22/x"),
    ("ssh://h/dev/vg0/data", "ssh://h/dev/mapper/vg0-data"),
])
def test_spellings_of_one_destination_share_a_key(a, b):
    assert cfg.parse_destination(a).key == cfg.parse_destination(b).key


@pytest.mark.parametrize("a, b", [
    # an absent user is whoever runs lvmirror: not assumed to be root (see Destination.key)
    ("ssh://host/x", "ssh://root@host/x"),
    ("ssh://alice@host/x", "ssh://bob@host/x"),
    ("ssh://Root@host/x", "ssh://root@host/x"),  # user names are case-sensitive
    ("ssh://host/x", "ssh://host:2222/x"),
    ("ssh://host/x", "ssh://other/x"),
    ("ssh://host/x", "ssh://host./x"),  # "host" may take a search domain; "host." may not
    ("ssh://host/x", "/x"),
    ("/srv/m/a.img", "/srv/m/A.img"),
    ("/dev/vg0/data", "/dev/vg0/data2"),
    ("/dev/mapper/vg0-data", "/dev/vg0-data"),
    ("/dev/disk/by-id/x", "/dev/mapper/disk-by-id/x"),
])
def test_distinct_destinations_have_distinct_keys(a, b):
    assert cfg.parse_destination(a).key != cfg.parse_destination(b).key


def two_volumes(d1: str, d2: str) -> str:
    return (f"[volume.web]\nvg = 'vg0'\nlv = 'web'\ndestination = '{d1}'\n"
            f"[volume.db]\nvg = 'vg0'\nlv = 'db'\ndestination = '{d2}'\n")


@pytest.mark.parametrize("d1, d2", [
    ("/srv/m/a.img", "/srv/m//a.img"),
    ("/srv/m/a.img", "/srv/m/./a.img"),
    ("/dev/vg1/data", "/dev/mapper/vg1-data"),
    ("ssh://host/x", "ssh://host:22/x"),
    ("ssh://host/x", "ssh://HOST/x"),
    ("ssh://root@host/x", "ssh://root@Host:22//x"),
])
def test_duplicate_destinations_across_volumes(tmp_path, d1, d2):
    expect(tmp_path, two_volumes(d1, d2), "[volume.db]", "also the destination of [volume.web]",
           f"written there as {d1}")


def test_duplicate_rule_does_not_guess_the_default_user(tmp_path):
    c = load_text(tmp_path, two_volumes("ssh://host/x", "ssh://root@host/x"))
    assert c.volume("db").destination.user == "root" and c.volume("web").destination.user == ""


# Every string a config holds, with a control character: each is refused, naming the key,
# and echoing the value escaped.  TOML writes the character as an escape; tomllib decodes it.
def volume_with(key: str, value: str) -> str:
    body = {"vg": "'vg0'", "lv": "'web'", "destination": "'/x.img'", key: value}
    return "[volume.web]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())


@pytest.mark.parametrize("esc, shown", [
    ("\\n", "\\n"), ("\\u001b", "\\x1b"), ("\\u007f", "\\x7f"), ("\\u0085", "\\x85"),
    ("\\u009b", "\\x9b"), ("\\u0000", "\\x00"), ("\\t", "\\t"), ("\\r", "\\r"),
])
@pytest.mark.parametrize("key, value", [
    ("vg", '"vg{}0"'),
    ("lv", '"w{}eb"'),
    ("destination", '"/srv/x{}.img"'),
    ("destination", '"ssh://host/srv/x{}.img"'),
    ("state_dir", '"/var/lib/x{}"'),
    ("ssh_key", '"/root/.ssh/id{}"'),
    ("known_hosts", '"/etc/lvmirror/kh{}"'),
    ("snapshot_size", '"1G{}"'),
])
def test_control_characters_in_volume_values(tmp_path, esc, shown, key, value):
    err = expect(tmp_path, volume_with(key, value.format(esc)), f"[volume.web] {key}", shown)
    assert_clean(str(err))


@pytest.mark.parametrize("key", ["lock_dir", "work_dir", "state_dir", "ssh_key", "known_hosts"])
def test_control_characters_in_defaults(tmp_path, key):
    text = f'[defaults]\n{key} = "/var/x\\u001b[2J"\n' + VOL + "destination = '/x.img'\n"
    err = expect(tmp_path, text, key, "\\x1b")
    assert_clean(str(err))


@pytest.mark.parametrize("name", ["a\\u001bb", "a\\nb", "a\\u009bb", "a\\u202eb"])
def test_control_characters_in_volume_names(tmp_path, name):
    err = expect(tmp_path, f'[volume."{name}"]\nvg = "vg0"\nlv = "web"\ndestination = "/x.img"\n',
                 "volume name")
    assert_clean(str(err))


@pytest.mark.parametrize("text", [
    '[defaults]\n"bad\\u001bkey" = 1\n',
    '"top\\u001b" = 1\n',
    VOL + 'destination = "/x.img"\nkeep = "\\u001b[2J"\n',
    VOL + 'destination = 5\n',
    '[volume."\\u001b"]\nvg = "vg0"\n',
    '[volume]\n"\\u001b" = 5\n',
])
def test_other_echoed_values_are_escaped(tmp_path, text):
    assert_clean(str(expect(tmp_path, text)))


@pytest.mark.parametrize("text", [
    "a = " + "[" * 100_000,
    "a = " + "[" * 100_000 + "]" * 100_000,
    "a = " + "{b = " * 50_000 + "1" + "}" * 50_000,
    VOL + "destination = '/x.img'\nkeep = " + "[" * 5000 + "]" * 5000 + "\n",
])
def test_deeply_nested_toml_is_a_config_error(tmp_path, text):
    expect(tmp_path, text, "nested too deeply")


def test_huge_nested_value_is_echoed_short(tmp_path):
    # Nested just shallowly enough for tomllib, the value's repr must not recurse or flood.
    err = expect(tmp_path, VOL + "destination = '/x.img'\nkeep = " + "[" * 50 + "]" * 50 + "\n", "keep")
    assert len(str(err)) < 1000


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        cfg.load(str(tmp_path))
    assert str(tmp_path) in str(info.value) and info.value.exit_code == EXIT_BAD_INPUT


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "lvmirror.toml"
    os.mkfifo(fifo, 0o600)
    # Opening a FIFO for reading blocks until a writer comes: fail the test instead of hanging.
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("load() blocked on the FIFO"))
    signal.alarm(5)
    try:
        with pytest.raises(ConfigError, match="is a FIFO, not a regular file") as info:
            cfg.load(str(fifo))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert str(fifo) in str(info.value)


def test_a_device_is_not_a_config():
    with pytest.raises(ConfigError, match="is a device"):
        cfg.load("/dev/null")


def test_unreadable_config_real():
    """A file the running user may not read, for real: the command line run as nobody."""
    folder = Path(tempfile.mkdtemp(prefix="lvmirror-cfg-"))
    try:
        folder.chmod(0o755)
        path = folder / "lvmirror.toml"
        path.write_text(GOOD)
        path.chmod(0o000)
        res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              str(BIN / "lvmirror"), "-c", str(path), "status"],
                             capture_output=True, text=True, cwd="/")
        assert res.returncode == EXIT_BAD_INPUT, res.stderr
        assert "cannot read the configuration file: Permission denied" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        shutil.rmtree(folder)


def test_unreadable_config(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    real_open = os.open

    def eacces(p, *args, **kwargs):
        if p == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", eacces)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    msg = str(info.value)
    assert path in msg and "cannot read the configuration file: Permission denied" in msg
    assert "run it as root" in msg and info.value.exit_code == EXIT_BAD_INPUT


def test_unsearchable_directory(tmp_path, monkeypatch):
    def eacces(p, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)

    monkeypatch.setattr(os, "stat", eacces)
    with pytest.raises(ConfigError, match="cannot look at the configuration file: Permission denied"):
        cfg.load(str(tmp_path / "x.toml"))


def test_config_path_with_nul_or_control_characters(tmp_path):
    with pytest.raises(ConfigError, match="NUL"):
        cfg.load(str(tmp_path / "a\0b.toml"))
    with pytest.raises(ConfigError) as info:
        cfg.load(str(tmp_path / "a\x1b[2Jb.toml"))
    assert "no such configuration file" in str(info.value)
    assert_clean(str(info.value))


def test_not_utf8(tmp_path):
    path = tmp_path / "lvmirror.toml"
    path.write_bytes(b"[volume.web]\nvg = '\xff'\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff at offset 19\)"):
        cfg.load(str(path))


def test_huge_file_is_refused(tmp_path):
    path = write(tmp_path, "# " + "x" * cfg.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="right file"):
        cfg.load(path)


def test_world_writable_is_checked_before_the_toml_is_parsed(tmp_path):
    path = write(tmp_path, "not toml [", 0o666)
    with pytest.raises(UnsafeConfig, match="world-writable"):
        cfg.load(path)


def test_bad_toml_message_is_escaped(tmp_path):
    err = expect(tmp_path, 'a = "x\x1by"\n', "not valid TOML")
    assert_clean(str(err))


# ---- fuzzing: only the project's errors come out ---------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces that reach the parser's corners, mixed with arbitrary text.
_PIECES = st.sampled_from([
    "ssh://", "ssh:", "//", "/", "@", ":", "[", "]", "::1", "%25", "%", "..", ".", "-", "?", "#",
    "host", "HOST", "root", "0", "22", "65536", "dev", "mapper", "vg0", "\n", "\x1b", "\x00", "\x7f",
    "\x85", "\u202e", "\u0662", "é", " ", "\\",
])
_DEST_TEXT = st.one_of(st.text(), st.lists(st.one_of(_PIECES, st.text(max_size=3)), max_size=12).map("".join))


def check_destination(d: cfg.Destination) -> None:
    for part in (d.user, d.host, d.path):
        assert not RAW_CONTROL.search(part)
    assert d.path.startswith("/") and not d.path.startswith("//") and d.path != "/"
    assert ".." not in d.path.split("/") and "." not in d.path.split("/")
    assert 1 <= d.port <= 65535
    assert not d.user.startswith("-")
    if d.is_ssh:
        assert d.raw.startswith("ssh://") and d.host
    # Parsing is stable: the raw form gives the same destination again.
    assert cfg.parse_destination(d.raw) == d
    hash(d.key)


@FUZZ
@given(_DEST_TEXT)
@example("ssh://[::1]:22/x")
@example("ssh://[" + "1" * 50 + "]/x")
@example("ssh://h:" + "0" * 10 + "22/x")
def test_fuzz_parse_destination(raw):
    try:
        d = cfg.parse_destination(raw)
    except ConfigError as e:
        assert_clean(str(e))
    else:
        check_destination(d)


_SEG = st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=6)


@FUZZ
@given(st.lists(_SEG, min_size=1, max_size=5), st.sampled_from(["", "/", "/.", "//"]),
       st.sampled_from(["", "ssh://h", "ssh://u@h", "ssh://[::1]:2222"]))
def test_fuzz_respelled_paths_share_a_key(segments, extra, prefix):
    """Doubling slashes and adding '.' components never changes the key, or the verdict."""
    plain = prefix + "/" + "/".join(segments)
    respelled = prefix + "/" + (extra + "/").join(segments) + extra
    try:
        a = cfg.parse_destination(plain)
    except ConfigError:
        with pytest.raises(ConfigError):
            cfg.parse_destination(respelled)
        return
    assert cfg.parse_destination(respelled).key == a.key


def _load_bytes(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    path.chmod(0o600)
    try:
        c = cfg.load(str(path))
    except LvError as e:
        assert isinstance(e, (ConfigError, UnsafeConfig)), repr(e)
        assert_clean(str(e))
    else:
        for v in c.volumes.values():
            for value in (v.name, v.vg, v.lv, v.destination.raw, v.state_dir, v.ssh_key, v.known_hosts,
                          v.work_dir, v.snapshot_size, c.lock_dir, c.metrics_file):
                assert value is None or not RAW_CONTROL.search(value)


@FUZZ
@given(st.binary(max_size=400))
@example(b"\xef\xbb\xbf[volume.web]\n")
@example(b"a = " + b"[" * 3000)
def test_fuzz_config_bytes(tmp_path, data):
    _load_bytes(tmp_path, data)


_TOML_PIECES = st.sampled_from([
    "[volume.web]\n", "[defaults]\n", "[volume]\n", "[[volume.web]]\n", "vg = 'vg0'\n", "lv = 'web'\n",
    "destination = ", "keep = ", "snapshot_size = ", "state_dir = ", "lock_dir = ", "work_dir = ",
    "ssh_key = ", "'/x.img'\n", "'ssh://h/x'\n", "\"\\u001b\"\n", "1\n", "0\n", "-1\n", "true\n", "1.5\n",
    "nan\n", "1979-05-27\n", "[1, 2]\n", "{a = 1}\n", "'1G'\n", "[", "]", "{", "}", "=", "\"", "'", "\n",
    ".", "\\", "#", "volume.x.vg = 'a'\n",
])


@FUZZ
@given(st.one_of(st.text(max_size=300), st.lists(st.one_of(_TOML_PIECES, st.text(max_size=4)),
                                                    max_size=30).map("".join)))
def test_fuzz_config_text(tmp_path, text):
    _load_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))


def _toml_string(s: str) -> str:
    # A TOML basic string: quote, backslash and the controls TOML forbids raw are escaped.
    return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or c == "\x7f" else c
                         for c in s) + '"'


_ODD = st.one_of(
    st.text(max_size=20).map(_toml_string), _DEST_TEXT.map(_toml_string),
    st.integers(-(2**70), 2**70).map(str), st.booleans().map(lambda b: str(b).lower()),
    st.sampled_from(["1.5", "inf", "nan", "1979-05-27", "07:32:00", "[]", "[1, \"a\"]", "{x = 1}"]),
)
_PATHS = st.sampled_from(["/var/lib/x", "/run/x", "//var/./lib/x/", "/var/lib/y", "/var/../x", "rel",
                          "/var/x\\u001b"])


@st.composite
def _mostly(draw: st.DrawFn, good: st.SearchStrategy[str]) -> str:
    # Mostly plausible, so that many documents get past the first check they meet.
    return draw(_ODD) if draw(st.integers(0, 29)) == 0 else draw(good)


_VALUES: dict[str, st.SearchStrategy[str]] = {
    "vg": _mostly(st.sampled_from(['"vg0"', '"vg1"', '"my-vg"'])),
    "lv": _mostly(st.sampled_from(['"web"', '"db"', '"my-lv"'])),
    "destination": _mostly(st.sampled_from([
        '"/x.img"', '"/srv/m//x.img"', '"/srv/m/./x.img"', '"ssh://h/x"', '"ssh://H:22/x"', '"ssh://root@h/x"',
        '"/dev/vg0/web"', '"/dev/mapper/vg0-web"', '"/dev/vg1/data"', '"/dev/mapper/vg1-data"',
        '"ssh://[::1]/x"', '"ssh://[0::1]:22/x"', '"ssh://h:0/x"', '"/srv/../x"', '"ssh://u;x@h/x"'])),
    "destinations": _mostly(st.lists(st.sampled_from([
        '"/x.img"', '"/y.img"', '"/srv/m//x.img"', '"ssh://h/x"', '"ssh://H:22/x"', '"/dev/vg0/web"', "1",
        '""', '"ssh://u;x@h/x"']), max_size=9).map(lambda xs: "[" + ", ".join(xs) + "]")),
    "snapshot_size": _mostly(st.sampled_from(['"1G"', '"0.5M"', "4096", '"0G"', '"1G"'])),
    "keep": _mostly(st.sampled_from(["1", "2", "3", "0"])),
    **{k: _mostly(_PATHS.map(lambda p: f'"{p}"')) for k in ("state_dir", "ssh_key", "known_hosts",
                                                               "lock_dir", "work_dir")},
    "metrics_file": _mostly(st.sampled_from(['"/var/lib/node/lvmirror.prom"', '"/x.prom"', '"/x.txt"',
                                             '"rel.prom"', '"/d/.prom"', '"/d/x.prom/"'])),
    "bwlimit": _mostly(st.sampled_from(['"12M"', '"off"', "0", "4194304", '"-1M"', '"12"', '"2T"', '"1s"'])),
    "exact": _mostly(st.sampled_from(["true", "false", '"true"', "1"])),
    "compress": _mostly(st.sampled_from(['"auto"', '"off"', '"zlib"', '"gzip"', "true", '"AUTO"'])),
    "ssh_transport": _mostly(st.sampled_from(['"paramiko"', '"openssh"', '"OpenSSH"', "true"])),
    "history_points": _mostly(st.sampled_from(["7", "0", "1000", "1001", "-1", '"7"', "true"])),
    "history_age": _mostly(st.sampled_from(['"30d"', '"1w"', '"0d"', '"soon"', "30", '"-1d"'])),
    "history_size": _mostly(st.sampled_from(['"20G"', '"1.5T"', '"0G"', '"big"', "20", '"-1G"'])),
}


@st.composite
def _body(draw: st.DrawFn, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    keys = [k for k in required if draw(st.integers(0, 19))] + draw(st.lists(st.sampled_from(optional),
                                                                              unique=True, max_size=3))
    lines = [f"{k} = {draw(_VALUES[k])}" for k in keys]
    if not draw(st.integers(0, 19)):  # now and then, a key that does not belong
        lines.append(f"{_toml_string(draw(st.text(max_size=5)))} = {draw(_ODD)}")
    return lines


# Now and then both keys, or neither; mostly one of destination and destinations, as a config has.
_WHERE_TO = st.sampled_from(["destination", "destinations"])
_VOLUME_BODY = st.one_of(
    _WHERE_TO.flatmap(lambda key: _body((*cfg.REQUIRED, key), cfg.SHARED_KEYS)),
    _body(cfg.VOLUME_ONLY, cfg.SHARED_KEYS))


@FUZZ
@given(st.lists(st.tuples(_mostly(st.sampled_from(["web", "db", "a-b", "x.y"]).map(_toml_string)),
                          _VOLUME_BODY), min_size=1, max_size=3,
                unique_by=lambda t: t[0]),
       st.one_of(st.none(), _body((), cfg.DEFAULTS_KEYS)))
def test_fuzz_structured_config(tmp_path, volumes, defaults):
    """Near-valid documents, to reach the checks past TOML parsing (values, duplicates)."""
    lines = [] if defaults is None else ["[defaults]", *defaults]
    for name, body in volumes:
        lines += [f"[volume.{name}]", *body]
    _load_bytes(tmp_path, ("\n".join(lines) + "\n").encode())


# ---- ssh_transport ----------------------------------------------------------------------------

SSH_VOL = VOL + "destination = 'ssh://backup@mirror.example:2222/srv/web.img'\n"


def test_ssh_transport_defaults_to_paramiko_and_inherits_from_defaults(tmp_path):
    assert load_text(tmp_path, SSH_VOL).volume("web").ssh_transport == "paramiko"
    c = load_text(tmp_path, "[defaults]\nssh_transport = 'openssh'\n" + SSH_VOL)
    assert c.volume("web").ssh_transport == "openssh"
    c = load_text(tmp_path, "[defaults]\nssh_transport = 'openssh'\n" + SSH_VOL
                  + "ssh_transport = 'paramiko'\n")
    assert c.volume("web").ssh_transport == "paramiko"


@pytest.mark.parametrize("value", ["'OpenSSH'", "'ssh'", "''", "1", "true", "['openssh']"])
def test_ssh_transport_must_be_one_of_the_two(tmp_path, value):
    expect(tmp_path, SSH_VOL + f"ssh_transport = {value}\n", "[volume.web] ssh_transport", '"paramiko"',
           '"openssh"')
    expect(tmp_path, f"[defaults]\nssh_transport = {value}\n" + SSH_VOL, "ssh_transport", '"openssh"')


@pytest.mark.parametrize("dest, fragment", [
    ("ssh://u;touch${IFS}x@host/x", "user"),
    ("ssh://u x@host/x", "user"),
    ("ssh://u$(id)@host/x", "user"),
    ("ssh://'u'@host/x", "user"),
    ("ssh://@u@host/x", "user"),
    ("ssh://-oProxyCommand=x/y", "not a host name"),
    ("ssh://h;x/y", "not a host name"),
    ("ssh://h x/y", "not a host name"),
])
def test_openssh_refuses_names_ssh_would_read_as_syntax(tmp_path, dest, fragment):
    err = expect(tmp_path, VOL + f"destination = \"{dest}\"\nssh_transport = 'openssh'\n", "destination",
                 fragment)
    assert err.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize("key", ["ssh_key", "known_hosts"])
@pytest.mark.parametrize("path", ["/etc/lvmirror/my key", "/etc/lvmirror/key%h", "/etc/lvmirror/k'y",
                                  '/etc/lvmirror/k\\"y'])
def test_openssh_refuses_paths_ssh_would_split_or_expand(tmp_path, key, path):
    text = SSH_VOL + f"ssh_transport = 'openssh'\n{key} = \"{path}\"\n"
    expect(tmp_path, text, f"[volume.web] {key}", "ssh reads")
    # paramiko reads the file by its name: the same path is fine there.
    vol = load_text(tmp_path, text.replace("'openssh'", "'paramiko'")).volume("web")
    assert vol.ssh_transport == "paramiko"


def test_openssh_accepts_ordinary_names_and_local_destinations(tmp_path):
    text = (VOL + "destination = 'ssh://back_up.2@Mirror-1.example:2222/srv/web.img'\n"
            "ssh_transport = 'openssh'\nssh_key = '/root/.ssh/id_ed25519'\n"
            "known_hosts = '/etc/lvmirror/known_hosts'\n")
    assert load_text(tmp_path, text).volume("web").ssh_transport == "openssh"
    # A local destination has no ssh to run: the key is allowed and ignored there.
    assert load_text(tmp_path, VOL + "destination = '/x.img'\nssh_transport = 'openssh'\n").volume("web")


# ---- several destinations ---------------------------------------------------------------------

TWO = VOL + "destinations = ['/srv/a/web.img', 'ssh://backup@far.example/srv/web.img']\n"


def test_destinations_list_loads_each_destination_in_order(tmp_path):
    vol = load_text(tmp_path, TWO).volume("web")
    assert [d.raw for d in vol.destinations] == ["/srv/a/web.img", "ssh://backup@far.example/srv/web.img"]
    assert vol.destination == vol.destinations[0] and vol.several
    one = load_text(tmp_path, VOL + "destinations = ['/srv/a/web.img']\n").volume("web")
    assert not one.several and one.destination.raw == "/srv/a/web.img"


def test_a_single_destination_keeps_its_spool_and_run_record_names(tmp_path):
    for text in (VOL + "destination = '/srv/a/web.img'\n", VOL + "destinations = ['/srv/a/web.img']\n"):
        vol = load_text(tmp_path, text).volume("web")
        (view,) = vol.views()
        assert view is vol and view.dest_key == ""
        assert view.spool == os.path.join(cfg.DEFAULT_WORK_DIR, "inflight", "web")
        assert view.record_name == "web"


def test_views_of_several_destinations_have_their_own_spool_and_record(tmp_path):
    vol = load_text(tmp_path, TWO).volume("web")
    views = vol.views()
    assert [v.destination for v in views] == list(vol.destinations)
    keys = [v.dest_key for v in views]
    assert all(re.fullmatch(r"[0-9a-f]{8}", k) for k in keys) and len(set(keys)) == 2
    assert len({v.spool for v in views}) == 2 and len({v.record_name for v in views}) == 2
    assert views[0].record_name == f"web@{keys[0]}"
    assert views[0].spool == os.path.join(cfg.DEFAULT_WORK_DIR, "inflight", f"web@{keys[0]}")
    # Named by where the mirror is, not its place in the list: reordering keeps each one's state.
    swapped = load_text(tmp_path, VOL + "destinations = ['ssh://backup@far.example/srv/web.img', "
                        "'/srv/a/web.img']\n").volume("web")
    assert {v.destination.raw: v.record_name for v in swapped.views()} == \
        {v.destination.raw: v.record_name for v in views}
    # The same place however written: the same key.
    again = load_text(tmp_path, VOL + "destinations = ['/srv/a//web.img', "
                      "'ssh://backup@FAR.example:22/srv/web.img']\n").volume("web")
    assert [v.dest_key for v in again.views()] == keys
    assert vol.view(vol.destinations[1]).dest_key == keys[1]
    with pytest.raises(ConfigError, match="not one of the volume's destinations"):
        vol.view(cfg.parse_destination("/srv/other.img"))


@pytest.mark.parametrize("text, fragments", [
    (VOL + "destination = '/x.img'\ndestinations = ['/y.img']\n", ("[volume.web]", "not both")),
    (VOL + "destinations = []\n", ("[volume.web] destinations", "1 to 8")),
    (VOL + "destinations = '/x.img'\n", ("[volume.web] destinations", "a list")),
    (VOL + "destinations = [" + ", ".join(f"'/x{i}.img'" for i in range(9)) + "]\n",
     ("[volume.web] destinations", "1 to 8")),
    (VOL + "destinations = ['/x.img', 1]\n", ("[volume.web] destinations[1]", "non-empty string")),
    (VOL + "destinations = ['/x.img', 'rel.img']\n", ("[volume.web] destinations[1]",)),
    (VOL + "destinations = ['/x.img', '/dev/vg0/web']\n", ("[volume.web] destinations[1]", "source volume")),
    (VOL + "destinations = ['/x.img', '/./x.img']\n", ("destinations[1]", "twice")),
    (VOL + "destinations = ['ssh://h/x', 'ssh://h:22/x']\n", ("destinations[1]", "twice", "same place")),
    (VOL + "destinations = ['/x.img']\n[volume.db]\nvg = 'vg0'\nlv = 'db'\ndestinations = ['/y.img', "
     "'/x.img']\n", ("[volume.db] destination /x.img", "[volume.web]")),
    (VOL + "destinations = ['ssh://u;x@h/x']\nssh_transport = 'openssh'\n", ("destinations", "user")),
    ("[defaults]\ndestinations = ['/x.img']\n" + VOL + "destination = '/y.img'\n",
     ("[defaults]", "unknown key 'destinations'")),
])
def test_destinations_errors_name_file_table_and_key(tmp_path, text, fragments):
    err = expect(tmp_path, text, *fragments)
    assert err.exit_code == EXIT_BAD_INPUT
