"""Records that travel on the shared-memory rings between worker processes.

Each record starts with one tag byte. Link addresses of UDP interfaces are packed
as (family, ip, port) so the per-frame path needs no msgpack; rare control
records (forwarding tables, counters) are msgpack.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from meshpipe.errors import FrameError

# interface worker -> control worker
REC_FRAME_IN = 0x46  # 'F': u8 iface, addr, frame
REC_WORKER_UP = 0x48  # 'H': u8 iface, u8 worker index; asks for a full forwarding table
REC_COUNTERS = 0x4B  # 'K': msgpack {"iface":..., "worker":..., "counters": {...}}
# supervisor -> control worker
REC_SUPERVISOR = 0x57  # 'W': msgpack {"workers": [{role, pid, restarts, ...}]}
# control worker -> interface worker
REC_SEND = 0x53  # 'S': addr, frame
REC_MULTICAST = 0x4D  # 'M': frame (to the interface's discovery group)
REC_FORWARDING = 0x52  # 'R': msgpack {"full": bool, "entries": {dst: [iface, host, port] | None}}

# control worker <-> crypto workers (workers/crypto.py); interface workers also send
# REC_FRAME_IN (DATA frames) to a crypto worker and take REC_SEND from it
REC_SEAL = 0x45  # 'E': control -> crypto: dst SID 32, plaintext (encrypt and send)
REC_OPEN = 0x4F  # 'O': control -> crypto: src SID 32, u8 hops, session packet
REC_OPENED = 0x6F  # 'o': crypto -> control: src SID 32, u8 hops, plaintext
REC_CRYPTO_UP = 0x43  # 'C': crypto -> control: u8 index; asks for the full table
REC_CRYPTO_REPORT = 0x6B  # 'k': crypto -> control: msgpack counters, sessions, queues
# crypto worker -> crypto worker (a packet its TUN queue read for the other's peer)
REC_TUN_TO_PEER = 0x58  # 'X': dst SID 32, tunnel message (meshpipe/offload.py)

UdpAddr = tuple[str, int]

_V4 = struct.Struct("!B4sH")
_V6 = struct.Struct("!B16sH")


@functools.lru_cache(maxsize=4096)
def pack_addr(addr: UdpAddr) -> bytes:
    """Cached: a node talks to few peers, and ipaddress parsing is slow per packet."""
    ip = ipaddress.ip_address(addr[0])
    if ip.version == 4:
        return _V4.pack(4, ip.packed, addr[1])
    return _V6.pack(6, ip.packed, addr[1])


@functools.lru_cache(maxsize=4096)
def _decode_addr(packed: bytes) -> UdpAddr:
    st = _V4 if packed[0] == 4 else _V6
    _, raw, port = st.unpack(packed)
    return str(ipaddress.ip_address(raw)), port


def unpack_addr(buf: bytes, offset: int) -> tuple[UdpAddr, int]:
    """Return (addr, offset after it)."""
    if len(buf) <= offset:
        raise FrameError("record truncated before address")
    fam = buf[offset]
    st = _V4 if fam == 4 else _V6 if fam == 6 else None
    if st is None or len(buf) < offset + st.size:
        raise FrameError("bad address in record")
    end = offset + st.size
    return _decode_addr(bytes(buf[offset:end])), end


def frame_in(iface: int, addr: UdpAddr, frame: bytes) -> bytes:
    return bytes((REC_FRAME_IN, iface)) + pack_addr(addr) + frame


def parse_frame_in(rec: bytes) -> tuple[int, UdpAddr, bytes]:
    addr, off = unpack_addr(rec, 2)
    return rec[1], addr, rec[off:]


def send(addr: UdpAddr, frame: bytes) -> bytes:
    return bytes((REC_SEND,)) + pack_addr(addr) + frame


def parse_send(rec: bytes) -> tuple[UdpAddr, bytes]:
    addr, off = unpack_addr(rec, 1)
    return addr, rec[off:]


def multicast(frame: bytes) -> bytes:
    return bytes((REC_MULTICAST,)) + frame


def forwarding(entries: Mapping[bytes, Sequence[Any] | None], full: bool) -> bytes:
    """REC_FORWARDING: per destination its next hop ``(iface, link address[, path
    MTU])`` or None (removed). A radio link address (an int) rides as ``[iface, "",
    addr]``; UDP ones as ``[iface, host, port]``."""

    def hop(e: Sequence[Any]) -> list[Any]:
        link = e[1]
        head = [e[0], "", link] if isinstance(link, int) else [e[0], link[0], link[1]]
        return head + list(e[2:])

    body = {"full": full, "entries": {d: None if e is None else hop(e) for d, e in entries.items()}}
    return packed(REC_FORWARDING, body)


ForwardingEntry = tuple[int, UdpAddr | int, int]  # iface, link address, path MTU (0: none)


def parse_forwarding(rec: bytes) -> tuple[bool, dict[bytes, ForwardingEntry | None]]:
    """(full table?, entries) of a REC_FORWARDING record."""
    body = unpacked(rec)
    entries: dict[bytes, ForwardingEntry | None] = {}
    for dst, e in body["entries"].items():
        if e is None:
            entries[bytes(dst)] = None
            continue
        link: UdpAddr | int = int(e[2]) if e[1] == "" else (str(e[1]), int(e[2]))
        entries[bytes(dst)] = (int(e[0]), link, int(e[3]) if len(e) > 3 else 0)
    return bool(body.get("full")), entries


def worker_up(iface: int, worker: int) -> bytes:
    return bytes((REC_WORKER_UP, iface, worker))


def packed(tag: int, body: Any) -> bytes:
    body_bytes: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes((tag,)) + body_bytes


def unpacked(rec: bytes) -> Any:
    return msgpack.unpackb(rec[1:], raw=False, strict_map_key=False)


def sid_record(tag: int, sid: bytes, data: bytes) -> bytes:
    """REC_SEAL / REC_TUN_TO_PEER: tag, a 32-byte SID, data."""
    return bytes((tag,)) + sid + data


def sid_hops_record(tag: int, sid: bytes, hops: int, data: bytes) -> bytes:
    """REC_OPEN / REC_OPENED: tag, a 32-byte SID, u8 hops, data."""
    return bytes((tag,)) + sid + bytes((min(hops, 255),)) + data


def parse_sid_record(rec: bytes) -> tuple[bytes, bytes]:
    if len(rec) < 33:
        raise FrameError("record truncated before its SID")
    return rec[1:33], rec[33:]


def parse_sid_hops_record(rec: bytes) -> tuple[bytes, int, bytes]:
    if len(rec) < 34:
        raise FrameError("record truncated before its SID and hops")
    return rec[1:33], rec[33], rec[34:]
