"""Which network device carries an address: one rtnetlink RTM_GETADDR dump.

The interface worker needs this once (to join its multicast group on the right
device). pyroute2 would do it too, but importing pyroute2 costs a worker about 12 MB
and 0.2 s; it stays in the TUN worker, which configures a device with it.
"""

from __future__ import annotations

import socket
import struct

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTATTR = struct.Struct("=HH")  # length, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def addresses() -> list[tuple[int, int, bytes]]:
    """(family, interface index, address bytes) of every address in this namespace."""
    out: list[tuple[int, int, bytes]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        s.send(
            _NLMSG.pack(_NLMSG.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
            + body
        )
        while True:
            data = s.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    return out
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                if kind == RTM_NEWADDR:
                    out.extend(_parse_addr(data[off + _NLMSG.size : off + length]))
                off += _align(length)


def _parse_addr(msg: bytes) -> list[tuple[int, int, bytes]]:
    if len(msg) < _IFADDRMSG.size:
        return []
    family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(msg)
    out = []
    off = _IFADDRMSG.size
    while off + _RTATTR.size <= len(msg):
        alen, atype = _RTATTR.unpack_from(msg, off)
        if alen < _RTATTR.size:
            break
        if atype in (IFA_ADDRESS, IFA_LOCAL):
            out.append((family, index, msg[off + _RTATTR.size : off + alen]))
        off += _align(alen)
    return out


def device_of(ip: str) -> str | None:
    """Name of the network device that carries ``ip`` in this namespace."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    want = socket.inet_pton(family, ip)
    for fam, index, addr in addresses():
        if fam == family and addr == want:
            return socket.if_indextoname(index)
    return None
