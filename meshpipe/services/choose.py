"""Client-side choices for forwards and SOCKS, sans-IO.

Which node and MSP port a ``forward NAME[@SID]`` goes to, which exits ``socks --via
auto`` tries and in what order, and how a failed TCP connect at an exit becomes a
SOCKS5 reply code. Inputs are the rows of ``ServiceDiscovery.services()``; they are
ranked by the routing metric to each record's origin (see ``_rank``).
"""

from __future__ import annotations

import errno
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshpipe.errors import MeshpipeError
from meshpipe.services.discovery import check_name
from meshpipe.services.socks5 import (
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
)

# The exit's SOCKS service listens on this MSP port. It lies below the range that
# [[service]] tables get ports from (1024..49151), so no named service can take it.
PROXY_PORT = 1000
PROXY_KIND = "socks5"
PROXY_NAME = "exit"  # the name an exit is announced under


class TargetError(MeshpipeError, ValueError):
    """A forward target (NAME[@SID]) is malformed or cannot be found."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    sid: str | None  # a SID or prefix as typed, None: any node offering ``name``


def parse_target(text: str) -> Target:
    """``NAME`` or ``NAME@SID`` (a SID or a prefix of at least 8 hex characters)."""
    name, sep, sid = text.strip().partition("@")
    try:
        check_name(name)
    except MeshpipeError as exc:
        raise TargetError(str(exc)) from None
    if sep and not sid:
        raise TargetError(f"{text!r}: nothing after '@' (want NAME@SID)")
    return Target(name, sid.lower() if sep else None)


def _rank(row: Mapping[str, Any]) -> tuple[bool, int, float]:
    """Nearest by our own routing metric to the record's origin, then the freshest.

    Never by the record's ``hops``: that field is unsigned and any forwarder (or a
    far origin) can claim 0. A record whose origin we have no route to (``metric``
    None) comes last: it cannot be reached now, and is no lure for traffic.
    """
    metric = row.get("metric")
    return (metric is None, 0 if metric is None else int(metric), float(row["age"]))


def pick_service(
    rows: Iterable[Mapping[str, Any]], name: str, sid: bytes | None, own: bytes
) -> tuple[bytes, int] | None:
    """(node, MSP port) of the nearest live ``name`` (on ``sid`` if given), else None.

    The record is signed by its origin, so the node and port are the origin's own
    claim; what is trusted without a pin is only that the nearest such origin is
    the one wanted."""
    found = [
        r
        for r in rows
        if r["name"] == name
        and r["kind"] != PROXY_KIND
        and bytes.fromhex(r["sid"]) != own
        and (sid is None or bytes.fromhex(r["sid"]) == sid)
    ]
    if not found:
        return None
    best = min(found, key=_rank)
    return bytes.fromhex(best["sid"]), int(best["port"])


def pick_exits(
    rows: Iterable[Mapping[str, Any]], own: bytes, avoid: Container[bytes] = ()
) -> list[tuple[bytes, int]]:
    """Discovered exits to try, nearest first; ``avoid`` (exits that denied us
    lately) go last rather than nowhere, in case their access list changed."""
    exits = sorted(
        (r for r in rows if r["kind"] == PROXY_KIND and bytes.fromhex(r["sid"]) != own),
        key=_rank,
    )
    seen: set[bytes] = set()
    first: list[tuple[bytes, int]] = []
    last: list[tuple[bytes, int]] = []
    for r in exits:
        sid = bytes.fromhex(r["sid"])
        if sid in seen:
            continue
        seen.add(sid)
        (last if sid in avoid else first).append((sid, int(r["port"])))
    return first + last


_ERRNO_REPLY = {
    errno.ECONNREFUSED: REP_CONNECTION_REFUSED,
    errno.EHOSTUNREACH: REP_HOST_UNREACHABLE,
    errno.EHOSTDOWN: REP_HOST_UNREACHABLE,
    errno.ENETUNREACH: REP_NETWORK_UNREACHABLE,
    errno.ENETDOWN: REP_NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: REP_HOST_UNREACHABLE,  # the usual reading of a connect timeout
}


def connect_reply(err: int) -> int:
    """The SOCKS5 reply for a failed connect with ``errno`` ``err``."""
    return _ERRNO_REPLY.get(err, REP_GENERAL_FAILURE)


__all__ = [
    "PROXY_KIND",
    "PROXY_NAME",
    "PROXY_PORT",
    "Target",
    "TargetError",
    "connect_reply",
    "parse_target",
    "pick_exits",
    "pick_service",
]
