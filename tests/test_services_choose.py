"""meshpipe.services.choose: forward targets, exit order, connect errors as SOCKS replies."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from meshpipe.services.choose import (
    PROXY_KIND,
    PROXY_PORT,
    TargetError,
    connect_reply,
    parse_target,
    pick_exits,
    pick_service,
)
from meshpipe.services.socks5 import (
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
)

OWN = bytes([1]) * 32
X = bytes([2]) * 32
Y = bytes([3]) * 32
Z = bytes([4]) * 32


def row(
    name: str,
    sid: bytes,
    port: int,
    hops: int,
    age: float = 1.0,
    kind: str = "tcp",
    metric: int | str | None = "hops",
) -> Any:
    """A services() row; by default the routing metric agrees with the claimed hops."""
    m = hops * 256 if metric == "hops" else metric
    return {
        "name": name,
        "sid": sid.hex(),
        "port": port,
        "kind": kind,
        "hops": hops,
        "age": age,
        "metric": m,
    }


def test_parse_target() -> None:
    assert parse_target("web").sid is None
    t = parse_target("web@ABCDEF0123")
    assert (t.name, t.sid) == ("web", "abcdef0123")
    for bad in ("", "Web!", "web@", "@abc"):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_pick_service_nearest_then_freshest_never_self_or_exit() -> None:
    rows = [
        row("web", OWN, 10, 0),
        row("web", X, 11, 3),
        row("web", Y, 12, 2, age=9.0),
        row("web", Z, 13, 2, age=1.0),
        row("web", Z, PROXY_PORT, 1, kind=PROXY_KIND),
        row("db", X, 14, 1),
    ]
    assert pick_service(rows, "web", None, OWN) == (Z, 13)
    assert pick_service(rows, "web", X, OWN) == (X, 11)
    assert pick_service(rows, "mail", None, OWN) is None
    assert pick_service(rows, "web", OWN, OWN) is None


def test_pick_exits_orders_by_hops_and_puts_deniers_last() -> None:
    rows = [
        row("exit", X, PROXY_PORT, 3, kind=PROXY_KIND),
        row("exit", Y, PROXY_PORT, 1, kind=PROXY_KIND),
        row("exit", OWN, PROXY_PORT, 0, kind=PROXY_KIND),
        row("web", Z, 80, 1),
    ]
    assert pick_exits(rows, OWN) == [(Y, PROXY_PORT), (X, PROXY_PORT)]
    assert pick_exits(rows, OWN, avoid={Y}) == [(X, PROXY_PORT), (Y, PROXY_PORT)]
    assert pick_exits([], OWN) == []


def test_far_node_claiming_hops_zero_does_not_win() -> None:
    """The unsigned ``hops`` is ignored: the routing metric to the origin decides, and
    an origin we have no route to comes last."""
    liar = Z
    rows = [
        row("web", X, 11, 2, metric=600),
        row("web", liar, 66, 0, metric=3000),  # claims to be here, is 10+ hops away
        row("web", Y, 12, 0, metric=None),  # no route at all
    ]
    assert pick_service(rows, "web", None, OWN) == (X, 11)
    exits = [
        row("exit", liar, PROXY_PORT, 0, kind=PROXY_KIND, metric=3000),
        row("exit", Y, PROXY_PORT, 0, kind=PROXY_KIND, metric=None),
        row("exit", X, PROXY_PORT, 5, kind=PROXY_KIND, metric=700),
    ]
    assert pick_exits(exits, OWN) == [(X, PROXY_PORT), (liar, PROXY_PORT), (Y, PROXY_PORT)]
    # Only unreachable offers: still tried (a route may come), never preferred.
    assert pick_service([row("web", Y, 12, 0, metric=None)], "web", None, OWN) == (Y, 12)


def test_connect_reply() -> None:
    assert connect_reply(errno.ECONNREFUSED) == REP_CONNECTION_REFUSED
    assert connect_reply(errno.EHOSTUNREACH) == REP_HOST_UNREACHABLE
    assert connect_reply(errno.ETIMEDOUT) == REP_HOST_UNREACHABLE
    assert connect_reply(errno.ENETUNREACH) == REP_NETWORK_UNREACHABLE
    assert connect_reply(errno.EPERM) == REP_GENERAL_FAILURE
