"""The sshd fixture is a real OpenSSH server that paramiko reaches with strict host keys."""

from __future__ import annotations

import paramiko
import pytest

from tests.harness import keygen

pytestmark = pytest.mark.ssh


def strict_client(known_hosts) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def test_strict_host_key_connects_and_runs_a_command(sshd):
    client = strict_client(sshd.known_hosts)
    client.connect(sshd.host, port=sshd.port, username=sshd.user, key_filename=str(sshd.client_key),
                   look_for_keys=False, allow_agent=False, timeout=10)
    try:
        _, stdout, _ = client.exec_command("echo lvmirror-$((6*7))")
        assert stdout.read().decode().strip() == "lvmirror-42"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


def test_host_missing_from_known_hosts_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    client = strict_client(empty)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(sshd.host, port=sshd.port, username=sshd.user,
                       key_filename=str(sshd.client_key), look_for_keys=False, allow_agent=False,
                       timeout=10)


def test_changed_host_key_is_refused(sshd, tmp_path):
    keygen(tmp_path / "other")
    kind, blob = (tmp_path / "other.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {kind} {blob}\n")
    client = strict_client(wrong)
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(sshd.host, port=sshd.port, username=sshd.user,
                       key_filename=str(sshd.client_key), look_for_keys=False, allow_agent=False,
                       timeout=10)
