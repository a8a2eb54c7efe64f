"""sd_notify: the datagram to $NOTIFY_SOCKET, path and abstract ('@') forms, never raising."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from smtpbalancer import sdnotify


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_abstract_address_gets_a_leading_nul_and_receives_the_datagram() -> None:
    name = f"smtpbalancer-test-{os.getpid()}-{id(object())}"
    assert sdnotify.socket_address("@" + name) == b"\0" + name.encode()
    with receiver(b"\0" + name.encode()) as sock:
        assert sdnotify.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_path_address_receives_the_datagram(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with receiver(str(path)) as sock:
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"STOPPING=1"


def test_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "n.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with receiver(str(path)) as sock:
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("value", ["relative/path.sock", "vsock:2:1234", "@"])
def test_unsupported_addresses_are_skipped(value: str) -> None:
    assert sdnotify.socket_address(value) is None
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_a_failed_send_returns_false_and_logs_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="smtpbalancer.sdnotify")
    missing = str(tmp_path / "nobody-listens.sock")
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": missing}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@smtpbalancer-nobody-listens"}) is False
    failures = [r for r in caplog.records if r.getMessage().startswith("sdnotify.send_failed ")]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)


def test_status_is_kept_on_one_line() -> None:
    assert sdnotify.status_line("reload failed\nfirst=x  y") == "reload failed first=x y"
