"""The tunnel's sans-IO core (cryptokey routing, header parsing, ICMP) and [tunnel] config."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from meshpipe.config import parse_config
from meshpipe.errors import ConfigError
from meshpipe.identity import overlay_ipv6
from meshpipe.tunnel import PacketError, ToPeer, ToTun, Tunnel, checksum, parse_header

A, B, D = b"\xaa" * 32, b"\xbb" * 32, b"\xdd" * 32
LAN = ipaddress.ip_network("198.18.200.0/24")


def v6(src: bytes, dst: bytes, payload: bytes = b"\x80\0\0\0\0\0\0\0", nxt: int = 58) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64) + src + dst + payload


def v4(src: str, dst: str, payload: bytes = b"\x08\0\0\0\0\0\0\0", df: bool = True) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            0,
            0x4000 if df else 0,
            64,
            1,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + payload
    )


def tunnel(**kw: object) -> Tunnel:
    return Tunnel(A, [(LAN, D), (ipaddress.ip_network("198.18.201.1/32"), A)], 1280, lambda: [B, D])


def test_overlay_destination_maps_to_the_sid_among_known_ones() -> None:
    t = tunnel()
    out = t.outbound(v6(overlay_ipv6(A).packed, overlay_ipv6(D).packed), 0.0)
    assert isinstance(out, ToPeer) and out.sid == D
    assert t.counters["tunnel.tx.packets"] == 1


def test_configured_prefix_routes_to_its_sid() -> None:
    out = tunnel().outbound(v4("198.18.201.1", "198.18.200.7"), 0.0)
    assert isinstance(out, ToPeer) and out.sid == D


def test_unknown_overlay_address_gets_icmpv6_unreachable() -> None:
    t = tunnel()
    pkt = v6(overlay_ipv6(A).packed, ipaddress.IPv6Address("fd00::1").packed)
    out = t.outbound(pkt, 0.0)
    assert isinstance(out, ToTun)
    h = parse_header(out.packet)
    assert h.version == 6 and h.proto == 58 and out.packet[40] == 1  # destination unreachable
    assert h.dst == overlay_ipv6(A).packed
    pseudo = h.src + h.dst + struct.pack("!I3xB", h.total_len - 40, 58)
    assert checksum(pseudo + out.packet[40:]) == 0
    assert t.counters["tunnel.drop.no_route"] == 1


def test_unrouted_ipv4_gets_icmp_host_unreachable_with_valid_checksums() -> None:
    out = tunnel().outbound(v4("198.18.201.1", "198.18.99.1"), 0.0)
    assert isinstance(out, ToTun)
    assert checksum(out.packet[:20]) == 0 and checksum(out.packet[20:]) == 0
    assert out.packet[20:22] == b"\x03\x01"


def test_too_big_packet_gets_packet_too_big_with_the_mtu() -> None:
    pkt = v6(overlay_ipv6(A).packed, overlay_ipv6(D).packed, b"\x80" + bytes(1300))
    out = tunnel().outbound(pkt, 0.0)
    assert isinstance(out, ToTun) and out.packet[40] == 2
    assert struct.unpack_from("!I", out.packet, 44)[0] == 1280


def test_no_icmp_error_about_an_icmp_error_or_multicast() -> None:
    t = tunnel()
    err = v6(overlay_ipv6(A).packed, ipaddress.IPv6Address("fd00::1").packed, b"\x01" + bytes(7))
    assert t.outbound(err, 0.0) is None
    mcast = v6(overlay_ipv6(A).packed, ipaddress.IPv6Address("ff02::16").packed)
    assert t.outbound(mcast, 0.0) is None
    assert t.counters["tunnel.drop.multicast"] == 1


def test_icmp_errors_are_rate_limited() -> None:
    t = tunnel()
    pkt = v4("198.18.201.1", "198.18.99.1")
    outs = [t.outbound(pkt, 0.0) for _ in range(150)]
    assert sum(isinstance(o, ToTun) for o in outs) == 100
    assert t.counters["tunnel.icmp.rate_limited"] == 50
    assert isinstance(t.outbound(pkt, 1.0), ToTun)


def test_inbound_source_check_is_cryptokey_routing() -> None:
    t = tunnel()
    own_d = v6(overlay_ipv6(D).packed, overlay_ipv6(A).packed)
    assert t.inbound(D, own_d) == own_d
    assert t.inbound(B, own_d) is None  # B may not use D's address
    assert t.inbound(D, v4("198.18.200.9", "198.18.201.1")) is not None
    assert t.inbound(B, v4("198.18.200.9", "198.18.201.1")) is None
    assert t.inbound(D, v4("198.18.202.1", "198.18.201.1")) is None
    assert t.counters["tunnel.drop.forged_source"] == 3
    assert t.counters["tunnel.rx.packets"] == 2


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45" + bytes(10),
        b"\x46" + bytes(18) + b"\0",  # header length over the packet
        v4("1.2.3.4", "5.6.7.8")[:-3],  # total length over the packet
        b"\x60" + bytes(30),
        v6(bytes(16), bytes(16))[:-1],
        b"\x50" + bytes(40),
    ],
)
def test_malformed_packets_raise_typed_errors_and_are_counted(pkt: bytes) -> None:
    with pytest.raises(PacketError):
        parse_header(pkt)
    t = tunnel()
    assert t.outbound(pkt, 0.0) is None and t.inbound(D, pkt) is None
    assert t.counters["tunnel.drop.malformed"] == 2


BASE = """
[node]
key = "node.key"
[[interface]]
name = "udp0"
kind = "udp"
listen = "127.0.0.1:7700"
"""


def test_tunnel_section_defaults_and_routes() -> None:
    cfg = parse_config(BASE, "/x/meshpipe.toml")
    assert not cfg.tunnel.enabled and cfg.tunnel.name == "mesh0" and cfg.tunnel.mtu == 1280
    text = (
        BASE
        + f"""
[tunnel]
enabled = true
addresses = ["198.18.201.1/32"]
[[tunnel.route]]
prefix = "198.18.200.0/24"
via = "{D.hex()}"
"""
    )
    t = parse_config(text, "/x/meshpipe.toml").tunnel
    assert t.enabled and t.routes[0].prefix == LAN and t.routes[0].via == D
    assert str(t.addresses[0]) == "198.18.201.1/32"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[tunnel]\nmtu = 1000\n", "tunnel.mtu"),
        ('[tunnel]\nname = "Mesh 0"\n', "tunnel.name"),
        ("[tunnel]\nbogus = 1\n", "tunnel.bogus"),
        ('[tunnel]\naddresses = ["fd00::1/128"]\n', "tunnel.addresses[0]"),
        ('[[tunnel.route]]\nprefix = "198.18.200.1/24"\nvia = "' + "d" * 64 + '"\n', "prefix"),
        ('[[tunnel.route]]\nprefix = "198.18.200.0/24"\nvia = "dddd"\n', "via"),
    ],
)
def test_tunnel_section_rejects_bad_values(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra, "/x/meshpipe.toml")
    assert key in info.value.key
