"""ssh_transport = "openssh": OpenSSH's own ssh client against a real sshd on 127.0.0.1.

The same checks as the paramiko transport's (tests/ssh/test_ssh_transport.py): byte-exact syncs, host
keys refused with the same messages and nothing written, and names ssh could misread refused first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lvdeltafs.errors import ConnectionProblem
from lvdeltafs.formats.stream import HEAD_SIZE, MAX_DATA
from lvmirror import ssh
from lvmirror.config import ConfigError
from lvmirror.openssh import OpenSshTransport, ssh_argv
from lvmirror.transports import SshOptions, receiver_for
from tests.conftest import _cannot_run
from tests.harness import BIN, V1, V2, BytesSource, delta, keygen, sha, sha_file, staging_files
from tests.sshkit import CutAfter, host_fingerprint, url, wait_unlocked

pytestmark = pytest.mark.ssh


@pytest.fixture(autouse=True)
def _ssh_client():
    """The transport runs OpenSSH's ssh: without it these tests cannot run (a failure under CI=true)."""
    if shutil.which("ssh") is None:
        _cannot_run("needs OpenSSH's ssh client (Debian: openssh-client)")

MiB = 1 << 20


def transport(sshd, path: str | Path, **kw) -> OpenSshTransport:
    kw.setdefault("key", str(sshd.client_key))
    kw.setdefault("known_hosts", str(sshd.known_hosts))
    return OpenSshTransport(url(sshd, path), **kw)


def sync(sshd, dest: Path, ident, blob: bytes, **kw) -> dict:
    with transport(sshd, dest, **kw) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        return rc.apply()


def test_the_command_line_is_a_list_with_strict_options_and_the_constant_bootstrap(sshd, tmp_path):
    from lvmirror import bundle
    dest = ssh.parse_ssh_url(url(sshd, tmp_path / "m.img"))
    argv = ssh_argv(dest, "backup", "/k", "/kh")
    opts = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/kh", "UpdateHostKeys=no",
            "GlobalKnownHostsFile=/dev/null", "IdentitiesOnly=yes", "IdentityFile=/k", "Compression=no",
            "IdentityAgent=none"} <= opts
    assert argv[1:3] == ["-F", "none"]
    # The host after "--", then exactly the paramiko transport's remote command, as one word.
    assert argv[-3:] == ["--", "127.0.0.1", bundle.remote_command()]
    assert argv[argv.index("-p") + 1] == str(sshd.port) and argv[argv.index("-l") + 1] == "backup"


def test_init_then_sync_is_byte_exact(sshd, tmp_path):
    dest = tmp_path / "mirror.img"
    ident, blob = delta(None, V1, "", "vol@1")
    assert sync(sshd, dest, ident, blob)["state"]["snapshot"] == "vol@1"
    assert sha_file(dest) == sha(V1)
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    assert sync(sshd, dest, ident, blob, compress=True)["state"]["generation"] == 2
    assert sha_file(dest) == sha(V2) and staging_files(dest) == []


def test_receiver_for_picks_the_transport_from_the_options(sshd, tmp_path):
    with receiver_for(url(sshd, tmp_path / "m.img"), None,
                      SshOptions(str(sshd.client_key), str(sshd.known_hosts), "openssh")) as rc:
        assert rc.hello().dest == str(tmp_path / "m.img")
        assert rc.on_close.__self__.__class__.__name__ == "OpenSshLink"


def test_cli_apply_through_openssh_is_byte_exact(sshd, tmp_path):
    data = V1 + os.urandom(3 * MiB)
    ident, blob = delta(None, data, "", "vol@1")
    stream = tmp_path / "delta"
    stream.write_bytes(blob)
    dest = tmp_path / "mirror.img"
    out = subprocess.run([str(BIN / "lvmirror"), "apply", str(stream), url(sshd, dest),
                          "--ssh-transport", "openssh", "--ssh-key", str(sshd.client_key),
                          "--known-hosts", str(sshd.known_hosts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sha_file(dest) == sha(data)
    with transport(sshd, dest) as rc:
        assert rc.hello().state["delta_id"] == ident.delta_id


def test_unknown_host_key_is_refused_with_the_paramiko_message_and_nothing_written(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    where = tmp_path / "far"
    where.mkdir()
    with pytest.raises(ConnectionProblem) as err:
        sync(sshd, where / "m.img", *delta(None, V1, "", "vol@1"), known_hosts=str(empty))
    msg = str(err.value)
    assert f"[127.0.0.1]:{sshd.port}" in msg and "not in" in msg and host_fingerprint(sshd) in msg
    assert f"ssh-keyscan -p {sshd.port} -t ssh-ed25519 127.0.0.1 >> {empty}" in msg
    assert err.value.exit_code == 8
    assert empty.read_text() == "" and os.listdir(where) == []


def test_changed_host_key_is_refused_and_nothing_written(sshd, tmp_path):
    keygen(tmp_path / "other")
    kind, blob = (tmp_path / "other.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {kind} {blob}\n")
    where = tmp_path / "far"
    where.mkdir()
    with pytest.raises(ConnectionProblem) as err:
        sync(sshd, where / "m.img", *delta(None, V1, "", "vol@1"), known_hosts=str(wrong))
    msg = str(err.value)
    assert "HAS CHANGED" in msg and host_fingerprint(sshd) in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in msg
    assert os.listdir(where) == [] and wrong.read_text() == f"[{sshd.host}]:{sshd.port} {kind} {blob}\n"


def test_wrong_user_key_is_refused_clearly(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    with pytest.raises(ConnectionProblem) as err, transport(sshd, tmp_path / "m.img",
                                                            key=str(tmp_path / "stranger")) as rc:
        rc.hello()
    msg = str(err.value)
    assert "refused the ssh key" in msg and f"user {sshd.user}" in msg and "authorized_keys" in msg


def test_missing_python_on_the_far_side_is_clear(sshd, tmp_path):
    with pytest.raises(ConnectionProblem) as err, \
            transport(sshd, tmp_path / "m.img", remote_python="/nonexistent/python3") as rc:
        rc.hello()
    assert "/nonexistent/python3 was not found on 127.0.0.1" in str(err.value)


@pytest.mark.parametrize("dest", ["ssh://u;touch${IFS}pwned@127.0.0.1/x", "ssh://u x@127.0.0.1/x",
                                  "ssh://-oProxyCommand=touch${IFS}pwned/x", "ssh://h;touch${IFS}pwned/x"])
def test_hostile_names_are_refused_before_ssh_runs(sshd, tmp_path, dest, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a))
    with pytest.raises(ConfigError):
        OpenSshTransport(dest, str(sshd.client_key), str(sshd.known_hosts)).connect()
    assert ran == [] and not (tmp_path / "pwned").exists()


def test_config_refuses_a_hostile_name_before_anything_runs(tmp_path):
    cfg = tmp_path / "lvmirror.toml"
    cfg.write_text(f'[defaults]\nlock_dir = "{tmp_path}/lock"\nwork_dir = "{tmp_path}/work"\n'
                   '[volume.web]\nvg = "vg0"\nlv = "web"\ndestination = "ssh://u;touch${IFS}pwned@host/x"\n'
                   'ssh_transport = "openssh"\n')
    cfg.chmod(0o600)
    out = subprocess.run([str(BIN / "lvmirror"), "-c", str(cfg), "sync", "web"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 3 and "ssh_transport" in out.stderr and "user" in out.stderr, out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "lock").exists()


def test_cut_mid_transfer_then_resume_over_openssh(sshd, tmp_path):
    dest = tmp_path / "mirror.img"
    sync(sshd, dest, *delta(None, V1, "", "vol@1"))
    big = V1 + os.urandom(12 * MiB)
    ident, blob = delta(V1, big, "vol@1", "vol@2")
    first = transport(sshd, dest)
    rc = first.connect()
    source = CutAfter(blob, 6 * MiB, first.link, first.link.abort)
    with pytest.raises(ConnectionProblem, match="next run resumes"):
        rc.send_delta(source, ident.delta_id)
    first.close()
    wait_unlocked(Path(f"{dest}.lvmirror-lock"))
    with transport(sshd, dest) as rc2:
        staged = rc2.hello().staged
        assert staged is not None and staged.delta_id == ident.delta_id and not staged.complete
        rc2.send_delta(BytesSource(blob), ident.delta_id)
        resent = rc2.bytes_sent
        rc2.apply()
    assert sha_file(dest) == sha(big)
    assert resent == len(blob) - staged.verified
    assert resent <= len(blob) - source.at_cut + MAX_DATA + HEAD_SIZE + 4 * MiB
