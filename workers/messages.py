"""Records that travel on the shared-memory rings between worker processes.

Each record starts with one tag byte. Link addresses of UDP interfaces are packed
as (family, ip, port) so the per-frame path needs no msgpack; rare control
records (forwarding tables, counters) are msgpack.

Every ``parse_*`` here raises :class:`~meshpipe.errors.RecordError` and nothing
else on a malformed record (the receiving worker counts it and drops it): a
worker that restarts mid-write or a bug elsewhere must cost one record, not the
process.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from meshpipe.errors import RecordError
from meshpipe.identity import SID_LEN

# interface worker -> control worker
REC_FRAME_IN = 0x46  # 'F': u8 iface, addr, frame
REC_WORKER_UP = 0x48  # 'H': u8 iface, u8 worker index; asks for a full forwarding table
REC_COUNTERS = 0x4B  # 'K': msgpack {"iface":..., "worker":..., "counters": {...}}
# supervisor -> control worker
REC_SUPERVISOR = 0x57  # 'W': msgpack {"workers": [{role, pid, restarts, ...}]}
# control worker -> interface worker
REC_SEND = 0x53  # 'S': addr, frame
REC_SEND_RUN = 0x55  # 'U': addr, u16 size, frames of that size (the last may be shorter)
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

_U16 = struct.Struct("!H")
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
        raise RecordError("record truncated before address")
    fam = buf[offset]
    st = _V4 if fam == 4 else _V6 if fam == 6 else None
    if st is None or len(buf) < offset + st.size:
        raise RecordError("bad address in record")
    end = offset + st.size
    return _decode_addr(bytes(buf[offset:end])), end


def frame_in(iface: int, addr: UdpAddr, frame: bytes) -> bytes:
    return bytes((REC_FRAME_IN, iface)) + pack_addr(addr) + frame


def parse_frame_in(rec: bytes) -> tuple[int, UdpAddr, bytes]:
    if len(rec) < 2:
        raise RecordError("frame record truncated")
    addr, off = unpack_addr(rec, 2)
    return rec[1], addr, rec[off:]


def send(addr: UdpAddr, frame: bytes) -> bytes:
    return bytes((REC_SEND,)) + pack_addr(addr) + frame


def parse_send(rec: bytes) -> tuple[UdpAddr, bytes]:
    addr, off = unpack_addr(rec, 1)
    return addr, rec[off:]


def send_run(addr: UdpAddr, frames: Sequence[bytes]) -> bytes:
    """Several frames to one peer in one record (all of the first's size, the last
    maybe shorter): the fragments of one packet, for one UDP GSO send."""
    return b"".join([bytes((REC_SEND_RUN,)), pack_addr(addr), _U16.pack(len(frames[0])), *frames])


def parse_send_run(rec: bytes) -> tuple[UdpAddr, list[bytes]]:
    addr, off = unpack_addr(rec, 1)
    if len(rec) < off + 2:
        raise RecordError("send-run record truncated")
    (size,) = _U16.unpack_from(rec, off)
    off += 2
    if size == 0 or len(rec) == off:
        raise RecordError("send-run record without frames")
    return addr, [rec[i : i + size] for i in range(off, len(rec), size)]


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
    body = unpacked_map(rec)
    raw = body.get("entries")
    if not isinstance(raw, dict) or not isinstance(body.get("full", False), bool):
        raise RecordError("forwarding record: want {full: bool, entries: map}")
    entries: dict[bytes, ForwardingEntry | None] = {}
    for dst, e in raw.items():
        if not isinstance(dst, bytes) or len(dst) != SID_LEN:
            raise RecordError("forwarding record: a destination is not a SID")
        if e is None:
            entries[dst] = None
            continue
        if not isinstance(e, list) or not 3 <= len(e) <= 4 or not isinstance(e[1], str):
            raise RecordError("forwarding record: want [iface, host, port/addr(, mtu)]")
        iface, port, mtu = _uint(e[0], 255), _uint(e[2], 65535), _uint(e[3] if e[3:] else 0)
        entries[dst] = (iface, port if e[1] == "" else (e[1], port), mtu)
    return bool(body.get("full")), entries


def _uint(v: object, hi: int = (1 << 32) - 1) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise RecordError(f"record: want an integer 0..{hi}, got {v!r}")
    return v


def parse_worker_up(rec: bytes) -> tuple[int, int]:
    """REC_WORKER_UP: (interface index, worker index)."""
    if len(rec) != 3:
        raise RecordError("worker-up record: want 3 bytes")
    return rec[1], rec[2]


def parse_crypto_up(rec: bytes) -> int:
    """REC_CRYPTO_UP: the crypto worker's index."""
    if len(rec) != 2:
        raise RecordError("crypto-up record: want 2 bytes")
    return rec[1]


def worker_up(iface: int, worker: int) -> bytes:
    return bytes((REC_WORKER_UP, iface, worker))


def packed(tag: int, body: Any) -> bytes:
    body_bytes: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes((tag,)) + body_bytes


def unpacked(rec: bytes) -> Any:
    """The msgpack body after the tag byte."""
    try:
        return msgpack.unpackb(rec[1:], raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData is a ValueError
        raise RecordError(f"record body: {type(exc).__name__}: {exc}") from None


def unpacked_map(
    rec: bytes, ints: Sequence[str] = (), counters: Sequence[str] = ()
) -> dict[str, Any]:
    """A msgpack map body whose ``ints`` keys hold integers >= 0 and whose
    ``counters`` keys, where present, hold maps of names to integers."""
    body = unpacked(rec)
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise RecordError("record body: want a map with string keys")
    for k in ints:
        _uint(body.get(k), (1 << 63) - 1)
    for k in counters:
        c = body.get(k, {})
        if not isinstance(c, dict) or not all(
            isinstance(n, str) and type(v) is int for n, v in c.items()
        ):
            raise RecordError(f"record body: {k} is not a map of counters")
    return body


def sid_record(tag: int, sid: bytes, data: bytes) -> bytes:
    """REC_SEAL / REC_TUN_TO_PEER: tag, a 32-byte SID, data."""
    return bytes((tag,)) + sid + data


def sid_hops_record(tag: int, sid: bytes, hops: int, data: bytes) -> bytes:
    """REC_OPEN / REC_OPENED: tag, a 32-byte SID, u8 hops, data."""
    return bytes((tag,)) + sid + bytes((min(hops, 255),)) + data


def parse_sid_record(rec: bytes) -> tuple[bytes, bytes]:
    if len(rec) < 33:
        raise RecordError("record truncated before its SID")
    return rec[1:33], rec[33:]


def parse_sid_hops_record(rec: bytes) -> tuple[bytes, int, bytes]:
    if len(rec) < 34:
        raise RecordError("record truncated before its SID and hops")
    return rec[1:33], rec[33], rec[34:]
