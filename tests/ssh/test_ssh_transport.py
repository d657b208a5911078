"""The ssh transport against a real OpenSSH sshd on 127.0.0.1: host keys, keys, bootstrap, sync, resume.

The far side is the same host, reached only through sshd: the receiver runs
there with the system's python3, shipped over the channel by lvmirror.ssh.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from lvdeltafs.errors import ConnectionProblem, LvError
from lvdeltafs.formats.stream import HEAD_SIZE, MAX_DATA
from lvmirror import bundle, ssh
from lvmirror.client import ReceiverClient
from lvmirror.config import ConfigError
from lvmirror.transports import SshTransport
from tests.harness import (
    V1,
    V2,
    BytesSource,
    delta,
    free_port,
    keygen,
    sha,
    sha_file,
    staging_files,
    wait_for_banner,
)
from tests.sshkit import CutAfter, host_fingerprint, url, wait_unlocked

pytestmark = pytest.mark.ssh

MiB = 1 << 20


def transport(sshd, path: str | Path, **kw) -> SshTransport:
    kw.setdefault("key", str(sshd.client_key))
    kw.setdefault("known_hosts", str(sshd.known_hosts))
    return SshTransport(url(sshd, path), **kw)


def sync_over_ssh(sshd, dest: Path, ident, blob: bytes, **kw) -> dict:
    with transport(sshd, dest, **kw) as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        return rc.apply()


# ---------------------------------------------------------------- names and the bootstrap


def test_parse_ssh_url_and_known_hosts_names():
    d = ssh.parse_ssh_url("ssh://backup@mirror.example:2222/srv/web.img")
    assert (d.user, d.host, d.port, d.path) == ("backup", "mirror.example", 2222, "/srv/web.img")
    assert ssh.parse_ssh_url("ssh://h/x").port == 22
    assert ssh.known_hosts_name("h", 22) == "h"
    assert ssh.known_hosts_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"
    with pytest.raises(ConfigError, match="not an ssh"):
        ssh.parse_ssh_url("/srv/web.img")
    with pytest.raises(ConfigError, match="names no path"):
        ssh.parse_ssh_url("ssh://user@host/")


def test_bootstrap_command_is_a_constant_that_carries_no_user_text():
    cmd = bundle.remote_command()
    words = shlex.split(cmd)
    assert words[:4] == ["exec", "python3", "-I", "-c"] and len(words) == 5
    # The code is one line of base64 text: nothing a shell (any shell) would interpret.
    assert "\n" not in cmd and "$" not in cmd and "`" not in cmd
    assert bundle.remote_command("/opt/py/bin/python3") == cmd.replace("python3", "/opt/py/bin/python3", 1)
    for bad in ("python3; rm -rf /", "py thon", "$(id)", ""):
        with pytest.raises(LvError, match="plain command name"):
            bundle.remote_command(bad)


def test_dest_paths_travel_as_data_not_through_the_shell(sshd, tmp_path):
    # A path full of shell syntax reaches the receiver unchanged, and no shell runs it.
    odd = tmp_path / "it's a $(touch pwned) `x` ;dir"
    odd.mkdir()
    dest = odd / "mirror.img"
    ident, blob = delta(None, V1, "", "vol@1")
    sync_over_ssh(sshd, dest, ident, blob)
    assert sha_file(dest) == sha(V1)
    assert not (Path.home() / "pwned").exists() and not Path("pwned").exists()


# ---------------------------------------------------------------- host keys and user keys


def test_known_host_key_is_accepted_and_the_receiver_answers(sshd, tmp_path):
    with transport(sshd, tmp_path / "m.img") as rc:
        hello = rc.hello()
    assert hello.dest == str(tmp_path / "m.img") and hello.state == {} and hello.kind == "file"


def test_hashed_known_hosts_entries_are_honoured(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|")
    with transport(sshd, tmp_path / "m.img", known_hosts=str(kh)) as rc:
        assert rc.hello().state == {}


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(ConnectionProblem) as err:
        transport(sshd, tmp_path / "m.img", known_hosts=str(empty)).connect()
    msg = str(err.value)
    assert f"[127.0.0.1]:{sshd.port}" in msg and "not in" in msg
    assert host_fingerprint(sshd) in msg
    assert f"ssh-keyscan -p {sshd.port} -t ssh-ed25519 127.0.0.1 >> {empty}" in msg
    assert empty.read_text() == "", "nothing may be added to known_hosts"


def test_missing_known_hosts_file_is_an_unknown_host(sshd, tmp_path):
    with pytest.raises(ConnectionProblem, match="not in .*SHA256:"):
        transport(sshd, tmp_path / "m.img", known_hosts=str(tmp_path / "nope")).connect()
    assert not (tmp_path / "nope").exists()


def test_changed_host_key_is_refused(sshd, tmp_path):
    keygen(tmp_path / "other")
    kind, blob = (tmp_path / "other.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {kind} {blob}\n")
    with pytest.raises(ConnectionProblem) as err:
        transport(sshd, tmp_path / "m.img", known_hosts=str(wrong)).connect()
    msg = str(err.value)
    assert "HAS CHANGED" in msg and host_fingerprint(sshd) in msg
    old = ssh.load_key(tmp_path / "other")
    assert ssh.fingerprint(old) in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in msg


def test_revoked_host_key_is_refused(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts.read_text() + f"@revoked * {sshd.host_key_pub}\n")
    with pytest.raises(ConnectionProblem, match="@revoked"):
        transport(sshd, tmp_path / "m.img", known_hosts=str(kh)).connect()


def test_wrong_user_key_is_refused_clearly(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    with pytest.raises(ConnectionProblem) as err:
        transport(sshd, tmp_path / "m.img", key=str(tmp_path / "stranger")).connect()
    msg = str(err.value)
    assert "refused the ssh key" in msg and f"user {sshd.user}" in msg and "authorized_keys" in msg
    assert err.value.exit_code == 8


def test_missing_user_key_file_is_clear(sshd, tmp_path):
    with pytest.raises(ConnectionProblem, match="does not exist"):
        transport(sshd, tmp_path / "m.img", key=str(tmp_path / "no-such-key")).connect()


def test_nothing_listening_is_a_connection_problem(tmp_path):
    t = SshTransport(f"ssh://root@127.0.0.1:{free_port()}{tmp_path}/m.img", key=None, known_hosts=None)
    with pytest.raises(ConnectionProblem, match="refused the connection|no ssh key"):
        t.connect()


# ---------------------------------------------------------------- the far side


def test_missing_python_on_the_far_side_is_clear(sshd, tmp_path):
    with pytest.raises(ConnectionProblem) as err, \
            transport(sshd, tmp_path / "m.img", remote_python="/nonexistent/python3") as rc:
        rc.hello()
    msg = str(err.value)
    assert "/nonexistent/python3 was not found on 127.0.0.1" in msg and "127" in msg
    assert "install python3" in msg


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: a small tmpfs mounted at a fresh folder (root ignores chmod, so read-only needs a mount)."""
    mounts: list[Path] = []

    def make(name: str, opts: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
        mounts.append(where)
        return where

    yield make
    for where in reversed(mounts):
        subprocess.run(["umount", str(where)], check=False)


def test_read_only_destination_is_refused_and_nothing_written(sshd, tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    ident, blob = delta(None, V1, "", "vol@1")
    with pytest.raises(LvError, match="Read-only file system"):
        sync_over_ssh(sshd, ro / "mirror.img", ident, blob)
    assert os.listdir(ro) == []


def test_far_side_disk_full_is_reported_and_nothing_applied(sshd, tmpfs):
    small = tmpfs("small", "size=2m")
    ident, blob = delta(None, V1, "", "vol@1")  # about 2.1 MiB of data: more than fits with staging
    with pytest.raises(LvError, match="no space left"):
        sync_over_ssh(sshd, small / "mirror.img", ident, blob)
    assert not (small / "mirror.img").exists() or (small / "mirror.img").stat().st_size == 0


# ---------------------------------------------------------------- syncing


def test_init_then_sync_over_ssh_gives_the_source_bytes(sshd, tmp_path):
    dest = tmp_path / "mirror.img"
    ident, blob = delta(None, V1, "", "vol@1")
    result = sync_over_ssh(sshd, dest, ident, blob)
    assert sha_file(dest) == sha(V1) and result["state"]["snapshot"] == "vol@1"
    ident, blob = delta(V1, V2, "vol@1", "vol@2")
    result = sync_over_ssh(sshd, dest, ident, blob, compress=True)
    assert sha_file(dest) == sha(V2) and result["state"]["generation"] == 2
    assert staging_files(dest) == []


def test_state_dir_is_passed_to_the_far_side(sshd, tmp_path):
    t = transport(sshd, tmp_path / "m.img", state_dir=str(tmp_path / "state"))
    assert t.argv() == [str(tmp_path / "m.img"), "--state-dir", str(tmp_path / "state")]


def _kill_session(sshd) -> None:
    """Kill the sshd processes serving our connection (the listener's children), as a dropped link would."""
    kids = subprocess.run(["pgrep", "-P", str(sshd.process.pid)], capture_output=True, text=True)
    for pid in kids.stdout.split():
        os.kill(int(pid), 9)


@pytest.mark.parametrize("how", ["client-drop", "server-kill"])
def test_cut_mid_transfer_then_resume_resends_only_the_unverified_tail(sshd, tmp_path, how):
    dest = tmp_path / "mirror.img"
    sync_over_ssh(sshd, dest, *delta(None, V1, "", "vol@1"))
    big = V1 + os.urandom(12 * MiB)  # 12 MiB of new data: a dozen records
    ident, blob = delta(V1, big, "vol@1", "vol@2")
    first = transport(sshd, dest)
    rc = first.connect()
    cut = first.link.abort if how == "client-drop" else (lambda: _kill_session(sshd))
    source = CutAfter(blob, 6 * MiB, first.link, cut)
    with pytest.raises(ConnectionProblem, match="next run resumes") as err:
        rc.send_delta(source, ident.delta_id)
    # The message says what happened: never an empty detail such as "(sending: )".
    assert not re.search(r"\(\w*:? ?\)|: \)", str(err.value)), str(err.value)
    first.close()
    wait_unlocked(Path(f"{dest}.lvmirror-lock"))

    with transport(sshd, dest) as rc2:
        staged = rc2.hello().staged
        assert staged is not None and staged.delta_id == ident.delta_id and not staged.complete
        verified = staged.verified
        rc2.send_delta(BytesSource(blob), ident.delta_id)
        resent = rc2.bytes_sent
        rc2.apply()
    assert sha_file(dest) == sha(big)
    assert resent == len(blob) - verified
    # Sent but never verified: at most the record cut in half plus what the link held in flight
    # (OpenSSH's 2 MiB session window); never the whole delta again.
    window = 2 * MiB
    assert source.at_cut is not None and source.at_cut >= 6 * MiB
    assert verified >= source.at_cut - (MAX_DATA + HEAD_SIZE) - window
    assert resent <= len(blob) - source.at_cut + MAX_DATA + HEAD_SIZE + window


def test_reconnecting_after_a_failure_works(sshd, tmp_path):
    t = transport(sshd, tmp_path / "m.img")
    rc = t.connect()
    t.link.abort()
    with pytest.raises(ConnectionProblem):
        rc.hello()
    t.close()
    with transport(sshd, tmp_path / "m.img") as rc2:
        assert rc2.hello().state == {}


# ---------------------------------------------------------------- one long connection


def test_rekey_limits_are_raised_and_over_512_mib_flows_on_one_connection(sshd):
    hosts = ssh.KnownHosts(sshd.known_hosts)
    key = ssh.load_key(sshd.client_key)
    t = ssh.connect(sshd.host, sshd.port, sshd.user, key, hosts)
    try:
        assert t.packetizer.REKEY_BYTES >= 1 << 40 and t.packetizer.REKEY_PACKETS >= 1 << 40
        assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == ssh.DEAD_PEER * 1000
        chan = t.open_session(window_size=ssh.WINDOW)
        chan.exec_command("cat > /dev/null")
        block = os.urandom(MiB)
        total = 600 * MiB
        t0 = time.monotonic()
        for _ in range(total // MiB):
            chan.sendall(block)
        chan.shutdown_write()
        assert chan.recv_exit_status() == 0
        elapsed = time.monotonic() - t0
        assert t.is_active()
        print(f"600 MiB over one channel in {elapsed:.1f} s ({total / elapsed / 1e6:.0f} MB/s)")
    finally:
        t.close()


def test_paramiko_2_packets_skip_the_slow_bytes_conversion(sshd):
    # paramiko < 3 formats every packet's repr on its way out unless it is handed bytes (lvmirror.ssh).
    hosts = ssh.KnownHosts(sshd.known_hosts)
    t = ssh.connect(sshd.host, sshd.port, sshd.user, ssh.load_key(sshd.client_key), hosts)
    try:
        wrapped = "send_message" in vars(t.packetizer)
        assert wrapped == (int(paramiko.__version__.split(".")[0]) < 3)
        chan = t.open_session()
        chan.exec_command("cat")
        chan.sendall(b"x" * 100_000)
        chan.shutdown_write()
        assert len(chan.makefile("rb").read()) == 100_000 and chan.recv_exit_status() == 0
    finally:
        t.close()


@pytest.fixture
def rekeying_sshd(sshd, tmp_path):
    """A second sshd, same keys, that rekeys every 16 MiB (OpenSSH's own default is 64 GiB with aes-gcm)."""
    port = free_port()
    with open(tmp_path / "sshd.log", "wb") as log:
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", str(port),
             "-o", f"HostKey={sshd.workdir / 'host_key'}",
             "-o", f"AuthorizedKeysFile={sshd.workdir / 'authorized_keys'}",
             "-o", "ListenAddress=127.0.0.1", "-o", "PidFile=none", "-o", "StrictModes=no",
             "-o", "PasswordAuthentication=no", "-o", "RekeyLimit=16M"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_banner(port, proc, tmp_path / "sshd.log")
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {sshd.host_key_pub}\n")
        yield port, known
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_initiated_rekeys_mid_stream_do_not_break_a_sync(sshd, rekeying_sshd, tmp_path):
    # Past 64 GiB OpenSSH rekeys on its own; here it does so every 16 MiB of a 20 MiB sync.
    port, known = rekeying_sshd
    dest = tmp_path / "mirror.img"
    big = V1 + os.urandom(12 * MiB)
    ident, blob = delta(None, big, "", "vol@1")
    t = SshTransport(f"ssh://{sshd.user}@127.0.0.1:{port}{dest}", str(sshd.client_key), str(known))
    with t as rc:
        rc.send_delta(BytesSource(blob), ident.delta_id)
        rc.apply()
    assert sha_file(dest) == sha(big)


def test_client_is_a_receiver_client_over_the_channel(sshd, tmp_path):
    t = transport(sshd, tmp_path / "m.img")
    with t as rc:
        assert isinstance(rc, ReceiverClient)
        assert rc.hello().state == {}
    assert not t.link.transport.is_active()


def test_far_side_stderr_is_drained_so_the_channel_never_stalls(sshd):
    # stdout and stderr share one window: 20 MB of stderr nobody read would block the protocol.
    flood = ("import sys\n"
             "def main(argv):\n"
             "    sys.stderr.write('x' * 20_000_000 + '\\nlast words\\n')\n"
             "    sys.stderr.flush()\n"
             "    sys.stdout.write('done ' + argv[0] + '\\n')\n"
             "    sys.stdout.flush()\n"
             "    return 3\n")
    hosts = ssh.KnownHosts(sshd.known_hosts)
    t = ssh.connect(sshd.host, sshd.port, sshd.user, ssh.load_key(sshd.client_key), hosts)
    link = ssh.RemoteLink(t, sshd.host, "python3", io_timeout=30)
    try:
        link.ship(bundle.blob(["arg"], [("flood", flood)], "flood"))
        assert link.reader.readline() == b"done arg\n"
        assert link.exit_status() == 3
        link._drainer.join(5)
        assert link.stderr_tail().endswith("last words")
        assert len(link.stderr_tail()) <= link.STDERR_TAIL + 32768
    finally:
        link.close()
