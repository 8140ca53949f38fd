"""A minimal ``sd_notify`` client without dependencies.

systemd (``Type=notify``) passes the address of its notification socket in
``$NOTIFY_SOCKET``: a filesystem path, or an abstract socket name written with a
leading ``@``. A notification is one AF_UNIX datagram of newline-separated
``KEY=value`` assignments (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``,
``STOPPING=1``). Outside systemd the variable is unset and every call is a no-op.

``$WATCHDOG_USEC`` (with ``WatchdogSec=``) is the watchdog timeout in
microseconds; ``$WATCHDOG_PID``, when set, names the process it is meant for.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def _address(raw: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``, or None if it is not usable."""
    if raw.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of "@".
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # Relative paths are not accepted by systemd; other schemes (e.g. "vsock:")
    # are not supported here.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is unset
    or unusable or the send failed. Never raises for socket errors: a missing
    notification must not take the node down.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    addr = _address(raw)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The recommended watchdog ping period in seconds, or None without a watchdog.

    That is half of ``$WATCHDOG_USEC`` (as systemd recommends). None when the
    variable is unset, not a positive integer, or ``$WATCHDOG_PID`` is set and
    names another process (the watchdog is then meant for someone else).
    """
    usec_raw = os.environ.get("WATCHDOG_USEC")
    if not usec_raw:
        return None
    try:
        usec = int(usec_raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_raw = os.environ.get("WATCHDOG_PID")
    if pid_raw:
        try:
            pid = int(pid_raw)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000 / 2
