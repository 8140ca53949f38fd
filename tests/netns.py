"""Test-side helpers for network namespaces (the topology code is meshpipe_workers.netns)
and for loopback labs, which share the host's ports."""

from __future__ import annotations

import itertools
import os
import socket

import pytest

from meshpipe_workers.netns import (
    LOCK_DIR,
    UNDERLAY,
    Link,
    Topology,
    cleanup_stale,
    default_prefix,
    line_topology,
    list_namespaces,
)

__all__ = [
    "LOCK_DIR",
    "UNDERLAY",
    "Link",
    "Topology",
    "cleanup_stale",
    "default_prefix",
    "line_topology",
    "list_namespaces",
    "loopback_ports",
    "require_root",
]

# Loopback labs take blocks of consecutive UDP ports from below the kernel's ephemeral
# range (32768 up), so that no client socket of another test is handed one of them.
_PORT_LOW, _PORT_HIGH, _BLOCK = 20_000, 32_000, 16
_blocks_taken = itertools.count()


def loopback_ports(span: int = _BLOCK) -> int:
    """The first of ``span`` consecutive UDP (and TCP) ports on 127.0.0.1 that are free
    now, for a loopback Lab's ``base_port``.

    Each call of each process starts at its own block (pid-spread, so that parallel
    test workers and other runs on the machine start far apart) and moves on past any
    block with a port in use.
    """
    if not 0 < span <= _BLOCK:
        raise ValueError(f"span must be 1..{_BLOCK}")
    blocks = (_PORT_HIGH - _PORT_LOW) // _BLOCK
    start = os.getpid() * 7919 + next(_blocks_taken) * 101
    for k in range(blocks):
        base = _PORT_LOW + ((start + k) % blocks) * _BLOCK
        if all(_port_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free block of loopback ports")


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def require_root() -> None:
    """Skip the calling test unless root; fail instead when $CI is set.

    On CI a skipped end-to-end test would look like a pass, so a missing root is
    an error there.
    """
    if os.geteuid() == 0:
        return
    reason = "needs root for network namespaces (ip netns, veth)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)
