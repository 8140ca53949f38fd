"""Link frames: the bytes that cross one hop.

Every frame starts with one byte: the wire version in the high nibble and the
frame kind in the low nibble. Data-plane headers are fixed ``struct`` layouts so
an interface worker can forward a transit frame by reading 66 bytes and never
opening the payload; control-plane bodies (hellos, routing) are msgpack.

DATA frame (routed end to end, forwarded without being opened)::

    0      1          2            34           66
    | v|k  | hop_limit | dst SID 32 | src SID 32 | payload ...
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from meshpipe.errors import FrameError

WIRE_VERSION = 1

KIND_HELLO = 1  # link-local: neighbour discovery and link quality
KIND_ROUTING = 2  # link-local: route updates and requests
KIND_DATA = 3  # routed: end-to-end payload between two SIDs
KIND_DISCOVERY = 4  # link-local: signed service records, flooded (meshpipe.services.discovery)
KIND_NODE = 6  # link-local: signed node records (name, neighbours), flooded (meshpipe.noderecord)

# link-local: a DATA frame with a per-hop sequence number, and per-hop acks
# (meshpipe.link.recovery). The link shells unwrap it, so the core never sees one.
KIND_LINK = 5

KIND_TRACE = 7  # routed, answered by every hop: path probes (meshpipe.trace)

# link-local: a unicast copy of a multicast hello (same body and signature). Told
# apart so that link quality counts one copy per hello: two copies of every hello
# would hide most of a lossy link's loss from the cost (60 % loss looked like 36 %).
KIND_HELLO_COPY = 8

# what the core takes
KINDS = frozenset(
    {KIND_HELLO, KIND_ROUTING, KIND_DATA, KIND_DISCOVERY, KIND_NODE, KIND_TRACE, KIND_HELLO_COPY}
)

DATA_HEADER = struct.Struct("!BB32s32s")
DATA_HEADER_LEN = DATA_HEADER.size  # 66 bytes
DEFAULT_HOP_LIMIT = 64

# Largest msgpack body we will try to decode; bigger frames are malformed by
# definition (no link we drive has a larger MTU).
MAX_FRAME = 65535


def frame_kind(frame: bytes) -> int:
    """Return the kind of a frame, raising FrameError for anything unknown."""
    if not frame:
        raise FrameError("empty frame")
    b = frame[0]
    if b >> 4 != WIRE_VERSION:
        raise FrameError(f"unknown wire version {b >> 4}")
    kind = b & 0x0F
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    return kind


def kind_byte(kind: int) -> bytes:
    return bytes(((WIRE_VERSION << 4) | kind,))


def encode_data(
    dst: bytes, src: bytes, payload: bytes, hop_limit: int = DEFAULT_HOP_LIMIT
) -> bytes:
    return DATA_HEADER.pack((WIRE_VERSION << 4) | KIND_DATA, hop_limit, dst, src) + payload


def decode_data_header(frame: bytes) -> tuple[int, bytes, bytes]:
    """Return (hop_limit, dst, src) of a DATA frame."""
    if len(frame) < DATA_HEADER_LEN:
        raise FrameError(f"data frame truncated ({len(frame)} < {DATA_HEADER_LEN} bytes)")
    first, hop_limit, dst, src = DATA_HEADER.unpack_from(frame)
    if first != (WIRE_VERSION << 4) | KIND_DATA:
        raise FrameError("not a data frame")
    return hop_limit, dst, src


def data_payload(frame: bytes) -> bytes:
    return frame[DATA_HEADER_LEN:]


def with_hop_limit(frame: bytes, hop_limit: int) -> bytes:
    """The same DATA frame with its hop limit rewritten (used when forwarding)."""
    return frame[:1] + bytes((hop_limit,)) + frame[2:]


def encode_control(kind: int, body: Any) -> bytes:
    """A control-plane frame: kind byte + msgpack body."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return kind_byte(kind) + packed


def decode_control(frame: bytes) -> Any:
    """Decode the msgpack body of a control frame; any damage becomes FrameError."""
    if len(frame) > MAX_FRAME:
        raise FrameError("frame too large")
    return unpack_body(frame[1:])


def unpack_body(data: bytes) -> Any:
    """Decode one msgpack object that must fill ``data`` exactly (nested signed bodies too)."""
    if len(data) > MAX_FRAME:
        raise FrameError("body too large")
    try:
        # The length check above bounds every nested size; unpackb has no
        # max_buffer_size (that is an Unpacker option) and raised TypeError on it.
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for damaged input
        raise FrameError(f"bad control body: {type(exc).__name__}") from exc


def pack_body(body: Any) -> bytes:
    """msgpack with binary strings kept binary (the inverse of unpack_body)."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def expect_bytes(value: Any, length: int, what: str) -> bytes:
    """Field validators shared by the control-plane codecs."""
    if not isinstance(value, bytes) or len(value) != length:
        raise FrameError(f"{what}: want {length} bytes")
    return value


def expect_int(value: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FrameError(f"{what}: want an integer in [{lo}, {hi}]")
    return value


def expect_list(value: Any, max_len: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len:
        raise FrameError(f"{what}: want a list of at most {max_len} items")
    return value


def expect_record(value: Any, n_fields: int, what: str) -> list[Any]:
    """A msgpack array of exactly ``n_fields`` items (one record of a control body)."""
    items = expect_list(value, n_fields, what)
    if len(items) != n_fields:
        raise FrameError(f"{what}: want {n_fields} fields")
    return items
