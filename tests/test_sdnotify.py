"""meshpipe_workers.sdnotify against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpipe_workers import sdnotify


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; fall back to a short temp dir if
    # pytest's tmp_path is too deep.
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@pytest.fixture
def receiver(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = sock_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def test_notify_unset_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_datagram(receiver: socket.socket) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=meshpipe node running") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=meshpipe node running"
    assert sdnotify.notify("WATCHDOG=1") is True
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_utf8(receiver: socket.socket) -> None:
    assert sdnotify.notify("STATUS=n\u00f8de") is True
    assert receiver.recv(4096) == "STATUS=n\u00f8de".encode()


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"meshpipe-test-sdnotify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_notify_missing_socket_returns_false(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_dir / "nobody-listens.sock"))
    assert sdnotify.notify("READY=1") is False


def test_notify_relative_path_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None


def test_watchdog_half_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(15.0)


def test_watchdog_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["0", "-5", "abc", ""])
def test_watchdog_invalid(monkeypatch: pytest.MonkeyPatch, usec: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None


def test_watchdog_invalid_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "not-a-pid")
    assert sdnotify.watchdog_interval() is None
