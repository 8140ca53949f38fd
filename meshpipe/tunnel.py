"""The IP tunnel's sans-IO core: IP header parsing, cryptokey routing, ICMP errors.

Packets read from the TUN device go out with :meth:`Tunnel.outbound`, which finds
the SID a packet belongs to:

- an overlay address (``fd00::/8``) is a node's /128, derived from its SID
  (:func:`meshpipe.identity.overlay_ipv6`); the SID is found among the known SIDs
  (routes and neighbours, asked for through ``known_sids``) whose derived address
  matches, and the answer is cached;
- otherwise the longest configured prefix (``[[tunnel.route]]``, like WireGuard's
  allowed-ips) that holds the destination names the SID.

A packet nobody owns gets an ICMP "destination unreachable" back into the TUN; a
packet above the tunnel MTU gets "packet too big" (IPv6) or "fragmentation needed"
(IPv4 with DF). ICMP errors are never sent about ICMP errors, multicast or
broadcast destinations or non-first IPv4 fragments, and at most
``ICMP_RATE`` a second (a token bucket).

Packets from the mesh go in with :meth:`Tunnel.inbound`: the inner source address
must be one the sending SID may use, its own overlay /128 or an address inside a
prefix configured as routed via it, or the packet is dropped and counted
(``tunnel.drop.forged_source``). That check is what makes the routing
"cryptokey" routing: the session proved who sent the packet.

Counters (``Tunnel.counters``): ``tunnel.tx.packets``/``bytes`` (to the mesh),
``tunnel.rx.packets``/``bytes`` (to the TUN), ``tunnel.drop.malformed``,
``tunnel.drop.no_route``, ``tunnel.drop.forged_source``, ``tunnel.drop.multicast``,
``tunnel.drop.to_self``, ``tunnel.drop.too_big``, ``tunnel.icmp.unreachable``,
``tunnel.icmp.too_big``, ``tunnel.icmp.rate_limited``.
"""

from __future__ import annotations

import collections
import ipaddress
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from meshpipe.errors import MeshpipeError
from meshpipe.identity import overlay_ipv6

# MSP port of the tunnel's datagram streams, the same on every node (below the range
# auto-assigned to services, 1024..49151, so a service can never take it).
TUNNEL_PORT: Final = 1
DEFAULT_MTU: Final = 1280
MIN_MTU: Final = 1280  # IPv6's minimum link MTU
OVERLAY: Final = ipaddress.IPv6Network("fd00::/8")
ICMP_RATE: Final = 100.0  # ICMP errors a second (burst: as many)
CACHE_LIMIT: Final = 4096  # prefix-lookup cache entries before it is flushed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_PROTO_ICMP = 1
_PROTO_ICMPV6 = 58
# ICMP error types: never answered with another error (RFC 1122 3.2.2, RFC 4443 2.4).
_ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
_V4_DF = 0x4000
_V4_FRAG = 0x3FFF  # MF flag and fragment offset


class PacketError(MeshpipeError, ValueError):
    """An IP packet is malformed (too short, bad version, lengths that do not add up)."""


@dataclass(frozen=True, slots=True)
class IpHeader:
    version: int  # 4 or 6
    src: bytes  # 4 or 16 bytes
    dst: bytes
    proto: int  # IPv4 protocol / IPv6 next header
    header_len: int  # bytes before the upper-layer header (IPv6: fixed header only)
    total_len: int  # the packet's own length field, header included
    dont_fragment: bool = True  # IPv6: always
    first_fragment: bool = True


def parse_header(packet: bytes) -> IpHeader:
    """Parse and check an IPv4 or IPv6 header; raise PacketError when malformed."""
    if not packet:
        raise PacketError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise PacketError(f"IPv4 packet of {len(packet)} bytes is shorter than a header")
        vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _V4.unpack_from(packet)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or total > len(packet):
            raise PacketError(f"IPv4 header length {ihl} / total {total} / got {len(packet)}")
        return IpHeader(4, src, dst, proto, ihl, total, bool(frag & _V4_DF), frag & 0x1FFF == 0)
    if version == 6:
        if len(packet) < 40:
            raise PacketError(f"IPv6 packet of {len(packet)} bytes is shorter than a header")
        _vtf, plen, nxt, _hop, src, dst = _V6.unpack_from(packet)
        if 40 + plen > len(packet):
            raise PacketError(f"IPv6 payload length {plen} exceeds the {len(packet)}-byte packet")
        return IpHeader(6, src, dst, nxt, 40, 40 + plen)
    raise PacketError(f"IP version {version}")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp6_error(src: bytes, dst: bytes, kind: int, code: int, word: int, quoted: bytes) -> bytes:
    """An ICMPv6 error from ``src`` to ``dst`` quoting as much of ``quoted`` as fits 1280."""
    body = quoted[: MIN_MTU - 40 - 8]
    msg = struct.pack("!BBHI", kind, code, 0, word) + body
    pseudo = src + dst + struct.pack("!I3xB", len(msg), _PROTO_ICMPV6)
    msg = msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]
    return struct.pack("!IHBB", 6 << 28, len(msg), _PROTO_ICMPV6, 64) + src + dst + msg


def icmp4_error(src: bytes, dst: bytes, kind: int, code: int, word: int, quoted: bytes) -> bytes:
    """An ICMP error from ``src`` to ``dst`` quoting as much of ``quoted`` as fits 576."""
    body = quoted[: 576 - 20 - 8]
    msg = struct.pack("!BBHI", kind, code, 0, word) + body
    msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    head = _V4.pack(0x45, 0, 20 + len(msg), 0, 0, 64, _PROTO_ICMP, 0, src, dst)
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + msg


@dataclass(frozen=True, slots=True)
class ToPeer:
    """Send ``packet`` to ``sid`` over the tunnel's datagram stream."""

    sid: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class ToTun:
    """Write ``packet`` (an ICMP error made here) back into the TUN device."""

    packet: bytes


class Tunnel:
    """Cryptokey routing for one node."""

    def __init__(
        self,
        own_sid: bytes,
        routes: Sequence[tuple[IPNetwork, bytes]] = (),
        mtu: int = DEFAULT_MTU,
        known_sids: Callable[[], Iterable[bytes]] = lambda: (),
        now: float = 0.0,
    ) -> None:
        self.sid = bytes(own_sid)
        self.own_ipv6 = overlay_ipv6(self.sid).packed
        self.mtu = mtu
        self.known_sids = known_sids
        self.counters: collections.Counter[str] = collections.Counter()
        # Routes via this node itself are where its own LAN is: nothing to send.
        mine = [(n, bytes(s)) for n, s in routes if bytes(s) != self.sid]
        # Longest prefix first, so the first match is the best one.
        self._routes = sorted(mine, key=lambda r: r[0].prefixlen, reverse=True)
        self._allowed: dict[bytes, list[IPNetwork]] = collections.defaultdict(list)
        for net, sid in self._routes:
            self._allowed[sid].append(net)
        self._overlay: dict[bytes, bytes] = {}  # derived /128 -> SID
        self._derived: set[bytes] = set()  # SIDs already in _overlay
        self._cache: dict[bytes, bytes | None] = {}  # destination -> SID via a prefix
        self._address_of: dict[bytes, bytes] = {}  # SID -> its overlay address
        self._tokens = ICMP_RATE
        self._tokens_at = now

    # -- cryptokey routing -------------------------------------------------------------

    def learn(self, sids: Iterable[bytes]) -> None:
        """Remember the overlay address of every SID in ``sids``."""
        for sid in sids:
            sid = bytes(sid)
            if sid not in self._derived:
                self._derived.add(sid)
                self._overlay[overlay_ipv6(sid).packed] = sid

    def _own_address(self, sid: bytes) -> bytes:
        """``sid``'s overlay /128 (a hash: computed once per SID, not per packet)."""
        addr = self._address_of.get(sid)
        if addr is None:
            if len(self._address_of) >= CACHE_LIMIT:
                self._address_of.clear()
            addr = self._address_of[sid] = overlay_ipv6(sid).packed
        return addr

    def lookup(self, dst: bytes) -> bytes | None:
        """The SID that owns destination address ``dst`` (4 or 16 bytes), or None."""
        if len(dst) == 16 and dst[0] == 0xFD:
            sid = self._overlay.get(dst)
            if sid is None:
                self.learn(self.known_sids())  # a new node since the last miss?
                sid = self._overlay.get(dst)
            if sid is not None:
                return sid
        if dst in self._cache:
            return self._cache[dst]
        addr = ipaddress.ip_address(dst)
        found = next((s for n, s in self._routes if addr in n), None)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[dst] = found
        return found

    def allowed_source(self, sid: bytes, src: bytes) -> bool:
        """May node ``sid`` send packets from address ``src``?"""
        if len(src) == 16 and src == self._own_address(bytes(sid)):
            return True
        nets = self._allowed.get(bytes(sid))
        if not nets:
            return False
        addr = ipaddress.ip_address(src)
        return any(addr in n for n in nets)

    # -- the two directions ----------------------------------------------------------------

    def outbound(self, packet: bytes, now: float, gso: bool = False) -> ToPeer | ToTun | None:
        """A packet read from the TUN: where it goes (None: dropped and counted).

        ``gso``: a large segment the kernel will cut itself (meshpipe/offload.py): it
        may exceed the MTU."""
        try:
            h = parse_header(packet)
        except PacketError:
            self.counters["tunnel.drop.malformed"] += 1
            return None
        if _multicast(h.dst):
            self.counters["tunnel.drop.multicast"] += 1  # e.g. the kernel's MLD reports
            return None
        if h.dst == self.own_ipv6:
            self.counters["tunnel.drop.to_self"] += 1
            return None
        if len(packet) > self.mtu and not gso:
            self.counters["tunnel.drop.too_big"] += 1
            if h.version == 6 or h.dont_fragment:
                return self._icmp(h, packet, now, too_big=True)
            return None
        sid = self.lookup(h.dst)
        if sid is None:
            self.counters["tunnel.drop.no_route"] += 1
            return self._icmp(h, packet, now, too_big=False)
        self.counters["tunnel.tx.packets"] += 1
        self.counters["tunnel.tx.bytes"] += len(packet)
        return ToPeer(sid, packet)

    def inbound(self, sid: bytes, packet: bytes) -> bytes | None:
        """A packet from node ``sid``: the packet to write to the TUN, or None if dropped."""
        try:
            h = parse_header(packet)
        except PacketError:
            self.counters["tunnel.drop.malformed"] += 1
            return None
        if not self.allowed_source(sid, h.src):
            self.counters["tunnel.drop.forged_source"] += 1
            return None
        self.counters["tunnel.rx.packets"] += 1
        self.counters["tunnel.rx.bytes"] += len(packet)
        return packet

    # -- ICMP errors -----------------------------------------------------------------------

    def _icmp(self, h: IpHeader, packet: bytes, now: float, too_big: bool) -> ToTun | None:
        if not h.first_fragment or self._is_icmp_error(h, packet):
            return None
        self._tokens = min(ICMP_RATE, self._tokens + (now - self._tokens_at) * ICMP_RATE)
        self._tokens_at = now
        if self._tokens < 1.0:
            self.counters["tunnel.icmp.rate_limited"] += 1
            return None
        self._tokens -= 1.0
        quoted = packet[: h.total_len]
        if h.version == 6:
            # From our own overlay address: the kernel accepts errors from any source.
            if too_big:
                self.counters["tunnel.icmp.too_big"] += 1
                return ToTun(icmp6_error(self.own_ipv6, h.src, 2, 0, self.mtu, quoted))
            self.counters["tunnel.icmp.unreachable"] += 1  # type 1 code 3: address unreachable
            return ToTun(icmp6_error(self.own_ipv6, h.src, 1, 3, 0, quoted))
        # IPv4: the TUN may have no IPv4 address; the unreachable destination itself is
        # a source the kernel's reverse-path check accepts on this device.
        if too_big:
            self.counters["tunnel.icmp.too_big"] += 1
            return ToTun(icmp4_error(h.dst, h.src, 3, 4, self.mtu & 0xFFFF, quoted))
        self.counters["tunnel.icmp.unreachable"] += 1  # type 3 code 1: host unreachable
        return ToTun(icmp4_error(h.dst, h.src, 3, 1, 0, quoted))

    @staticmethod
    def _is_icmp_error(h: IpHeader, packet: bytes) -> bool:
        if len(packet) <= h.header_len:
            return False
        kind = packet[h.header_len]
        if h.version == 4:
            return h.proto == _PROTO_ICMP and kind in _ICMP4_ERRORS
        return h.proto == _PROTO_ICMPV6 and kind < 128


def _multicast(dst: bytes) -> bool:
    if len(dst) == 16:
        return dst[0] == 0xFF
    return 224 <= dst[0] <= 239 or dst == b"\xff\xff\xff\xff"


__all__ = [
    "DEFAULT_MTU",
    "MIN_MTU",
    "OVERLAY",
    "TUNNEL_PORT",
    "IpHeader",
    "PacketError",
    "ToPeer",
    "ToTun",
    "Tunnel",
    "checksum",
    "icmp4_error",
    "icmp6_error",
    "parse_header",
]
