"""meshpipe.services.exit_policy: built-in refusals, own addresses, allow/deny, ports."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe.services.exit_policy import (
    ALLOWED,
    ExitPolicy,
    ExitPolicyError,
    PortRange,
    parse_network,
)
from meshpipe.services.socks5 import REP_HOST_UNREACHABLE, REP_NOT_ALLOWED, REP_SUCCEEDED

OWN = "198.18.0.4"


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "multicast"),
        (OWN, "own_address"),
    ],
)
def test_default_refusals(addr: str, reason: str) -> None:
    d = ExitPolicy(own_addresses=[OWN]).check(addr, 80)
    assert not d.allowed and d.reason == reason and d.reply == REP_NOT_ALLOWED


def test_builtin_refusals_are_not_lifted_by_allow_lists() -> None:
    p = ExitPolicy(allow_networks=["127.0.0.0/8", "::/0", "0.0.0.0/0"])
    assert p.check("127.0.0.1", 80).reason == "loopback"
    assert p.check("::1", 80).reason == "loopback"


def test_own_address_lifted_only_by_naming_the_host() -> None:
    assert ExitPolicy(["198.18.0.0/15"], own_addresses=[OWN]).check(OWN, 80).reason == (
        "own_address"
    )
    p = ExitPolicy([f"{OWN}/32", "198.18.0.0/15"], own_addresses=[OWN])
    assert p.check(OWN, 80) == ALLOWED


def test_default_allows_ordinary_destinations() -> None:
    p = ExitPolicy(own_addresses=[OWN])
    assert p.check("198.18.0.9", 443) == ALLOWED
    assert p.check(ipaddress.ip_address("fd00::9"), 22).allowed
    assert ALLOWED.reply == REP_SUCCEEDED


def test_deny_wins_over_allow() -> None:
    p = ExitPolicy(allow_networks=["198.18.0.0/15"], deny_networks=["198.18.5.0/24"])
    assert p.check("198.18.5.7", 80).reason == "denied_network"
    assert p.check("198.18.6.7", 80).allowed
    assert p.check("198.20.0.1", 80).reason == "network_not_allowed"


def test_ports() -> None:
    p = ExitPolicy(allow_ports=[80, "443", "8000-8010"])
    assert p.check("198.18.0.9", 80).allowed
    assert p.check("198.18.0.9", 8005).allowed
    assert p.check("198.18.0.9", 22).reason == "port_not_allowed"
    for bad in (0, 65536, -1):
        assert ExitPolicy().check("198.18.0.9", bad).reason == "bad_port"


def test_filter_keeps_allowed_addresses_in_order() -> None:
    p = ExitPolicy(own_addresses=[OWN])
    ok, d = p.filter(["127.0.0.1", "198.18.0.9", "fd00::1"], 80)
    assert [str(a) for a in ok] == ["198.18.0.9", "fd00::1"] and d.allowed
    ok, d = p.filter(["127.0.0.1", OWN], 80)
    assert ok == [] and d.reason == "loopback"
    ok, d = p.filter([], 80)
    assert d.reason == "no_address" and d.reply == REP_HOST_UNREACHABLE


@pytest.mark.parametrize("bad", ["198.18.0.1/15", "nonsense", "300.0.0.0/8", 5])
def test_bad_networks(bad: object) -> None:
    with pytest.raises(ExitPolicyError):
        parse_network(bad)


@pytest.mark.parametrize("bad", ["0", "70000", "10-5", "a-b", "1-2-3", 3.5, True])
def test_bad_port_ranges(bad: object) -> None:
    with pytest.raises(ExitPolicyError):
        PortRange.parse(bad)


def test_names_must_be_resolved_first() -> None:
    with pytest.raises(ExitPolicyError, match="resolve"):
        ExitPolicy().check("example.org", 80)


@given(st.ip_addresses(), st.integers(-5, 70000))
def test_check_is_total(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    d = ExitPolicy(deny_networks=["198.18.9.0/24"], own_addresses=[OWN]).check(addr, port)
    assert d.allowed == (d.reply == REP_SUCCEEDED)
    if addr.is_loopback:
        assert not d.allowed
