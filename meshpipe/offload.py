"""TUN offloads: carrying the kernel's large TCP segments (GSO/TSO) through the tunnel.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` a TUN device hands user space TCP segments
of up to 64 kB, each with a ``virtio_net_hdr`` that says how the kernel would have cut
it (``gso_size``) and where a checksum is still to be filled in. One read, one MSP
datagram (fragmented to the path MTU) and one write then carry what would have been
some 45 packets, and the receiving TCP acknowledges it once: far fewer system calls,
ring records and tunnel ACK packets per byte. The receiving kernel takes the segment
as it is (``IFF_VNET_HDR`` on its device) and cuts it only if it forwards it.

A tunnel message is either a plain IP packet, or ``OFFLOAD_MARK`` (a first byte no
IP packet has), the 10-byte header and the IP packet. :func:`segment` turns an
offloaded packet into plain packets with complete checksums, for a receiver whose
device has no offloads and for paths too small to be worth a 64 kB datagram (a
radio): there the loss of one fragment would cost the whole segment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from meshpipe.errors import MeshpipeError
from meshpipe.tunnel import checksum

OFFLOAD_MARK: Final = 0x01  # IP packets start with 0x4_ or 0x6_
VNET_HDR: Final = struct.Struct("<BBHHHH")  # virtio_net_hdr, little-endian (x86, ARM)
VNET_HDR_LEN: Final = VNET_HDR.size  # 10
F_NEEDS_CSUM: Final = 0x01
F_DATA_VALID: Final = 0x02
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80
# Below this path MTU a large segment is cut here before it is sent (see above).
MIN_OFFLOAD_PATH_MTU: Final = 1280

_TCP: Final = 6
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80
ZERO_HDR: Final = bytes(VNET_HDR_LEN)


class OffloadError(MeshpipeError, ValueError):
    """An offload header or the packet under it cannot be used (counted as malformed)."""


@dataclass(frozen=True, slots=True)
class Offload:
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @classmethod
    def parse(cls, data: bytes) -> Offload:
        if len(data) < VNET_HDR_LEN:
            raise OffloadError("offload header truncated")
        return cls(*VNET_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @property
    def trivial(self) -> bool:
        """Nothing left to do for anyone: the packet can travel as a plain one."""
        return self.flags & F_NEEDS_CSUM == 0 and self.gso_type & ~GSO_ECN == GSO_NONE

    @property
    def gso(self) -> bool:
        return self.gso_type & ~GSO_ECN != GSO_NONE


def join_message(off: Offload | None, packet: bytes) -> bytes:
    """The tunnel message for ``packet`` read with header ``off`` (None: no header)."""
    if off is None or off.trivial:
        return packet
    return bytes((OFFLOAD_MARK,)) + off.pack() + packet


def split_message(message: bytes) -> tuple[Offload | None, bytes]:
    """(header or None, IP packet) of a tunnel message."""
    if message[:1] == bytes((OFFLOAD_MARK,)):
        return Offload.parse(message[1:]), message[1 + VNET_HDR_LEN :]
    return None, message


def segment(off: Offload, packet: bytes) -> list[bytes]:
    """Plain packets with complete checksums: what the kernel would have sent."""
    kind = off.gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return [_complete_checksum(off, packet) if off.flags & F_NEEDS_CSUM else packet]
    if kind not in (GSO_TCPV4, GSO_TCPV6) or off.gso_size <= 0:
        raise OffloadError(f"offload type {off.gso_type} / segment size {off.gso_size}")
    v4 = kind == GSO_TCPV4
    if not packet or packet[0] >> 4 != (4 if v4 else 6):
        raise OffloadError("offload type does not match the IP version")
    ip_len = (packet[0] & 0x0F) * 4 if v4 else 40
    if ip_len < 20 or len(packet) < ip_len + 20:
        raise OffloadError("IP or TCP header truncated")
    if v4:
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
    else:
        proto, src, dst = packet[6], packet[8:24], packet[24:40]
    if proto != _TCP:
        raise OffloadError("a large segment that is not plain TCP")
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    head = ip_len + tcp_len
    if tcp_len < 20 or len(packet) < head:
        raise OffloadError("TCP header length")
    seq = int.from_bytes(packet[ip_len + 4 : ip_len + 8], "big")
    flags = packet[ip_len + 13]
    ident = int.from_bytes(packet[4:6], "big")
    payload = memoryview(packet)[head:]
    out: list[bytes] = []
    starts = range(0, max(len(payload), 1), off.gso_size)
    for i, start in enumerate(starts):
        chunk = bytes(payload[start : start + off.gso_size])
        last = i == len(starts) - 1
        tcp = bytearray(packet[ip_len:head])
        tcp[4:8] = ((seq + start) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags if last else flags & ~(_FIN | _PSH)
        tcp[13] = f if i == 0 else f & ~_CWR
        tcp[16:18] = b"\0\0"
        seg_len = tcp_len + len(chunk)
        ip = bytearray(packet[:ip_len])
        if v4:
            ip[2:4] = (ip_len + seg_len).to_bytes(2, "big")
            ip[4:6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
            pseudo = src + dst + struct.pack("!xBH", _TCP, seg_len)
        else:
            ip[4:6] = seg_len.to_bytes(2, "big")
            pseudo = src + dst + struct.pack("!I3xB", seg_len, _TCP)
        tcp[16:18] = checksum(pseudo + bytes(tcp) + chunk).to_bytes(2, "big")
        out.append(bytes(ip) + bytes(tcp) + chunk)
    return out


def _complete_checksum(off: Offload, packet: bytes) -> bytes:
    """Fill in a partial checksum: the field holds the pseudo-header sum already."""
    at = off.csum_start + off.csum_offset
    if off.csum_start >= len(packet) or at + 2 > len(packet):
        raise OffloadError("checksum position outside the packet")
    value = checksum(packet[off.csum_start :]) or 0xFFFF  # UDP: 0 means "none"
    return packet[:at] + value.to_bytes(2, "big") + packet[at + 2 :]
