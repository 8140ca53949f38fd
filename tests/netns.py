"""Test-side helpers for network namespaces (the topology code is meshpipe_workers.netns)."""

from __future__ import annotations

import os

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
    "require_root",
]


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
