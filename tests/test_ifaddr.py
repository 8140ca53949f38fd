"""workers/ifaddr.py: the device of an address, from one netlink dump (no pyroute2)."""

from __future__ import annotations

import socket

from meshpipe_workers.ifaddr import addresses, device_of


def test_loopback_addresses_are_on_lo() -> None:
    assert device_of("127.0.0.1") == "lo"
    assert device_of("::1") == "lo"


def test_an_address_nobody_has_is_on_no_device() -> None:
    assert device_of("198.18.255.254") is None


def test_every_address_names_a_device() -> None:
    found = addresses()
    assert any(fam == socket.AF_INET for fam, _i, _a in found)
    for fam, index, addr in found:
        assert socket.if_indextoname(index)
        assert len(addr) == (4 if fam == socket.AF_INET else 16)
