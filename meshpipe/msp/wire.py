"""MSP segment layouts: fixed big-endian structs inside a session plaintext.

Every segment starts ``proto u8 = 2 | type u8 | stream u32``. The type byte's low
nibble is the segment type, its high nibble flags. Sizes (bytes, before the session's
13-byte transport header and 16-byte tag and the 66-byte DATA frame header):

    SYN     6 + port u16, mode u8, reserved u8, budget_ms u32, window u32, ts u32  = 22
    SYNACK  6 + window u32, ts u32, echo u32                                       = 18
    DATA    6 + offset u64, ts u32 [+ origin_ts u32 in deadline mode] + payload    = 18 / 22
    ACK     6 + cum u64, window u32, echo u32 + n x (start-cum u32, length u32)     = 22 + 8n
    RST     6 + code u8                                                             = 7
    SKIP    6 + offset u64                                                          = 14
    DGRAM   6 + message u32, index u16, count u16 + payload                         = 14

``ts`` is the sender's clock in milliseconds (mod 2**32); an ACK or SYNACK echoes the
``ts`` of the segment that caused it, which gives RTT samples that stay right across
retransmissions (the idea of TCP timestamps, RFC 7323). Offsets count stream bytes;
a FIN occupies one unit after the last byte, as in TCP.

Short forms (flag ``F_SHORT``): on a path whose plaintext room is at most
``SHORT_ROOM`` bytes (a radio hop), DATA's offset and ACK's cum are sent as their low
32 bits (DATA 14 bytes, ACK 18 + 8n). The receiver takes the value nearest its own
reference (the next byte it expects for DATA, the oldest unacknowledged one for an
ACK): every valid offset lies within 2**31 of it, since windows and buffers are far
smaller. The offsets stay inside the AEAD, so nothing is weakened.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from meshpipe.errors import MeshpipeError

PROTO_MSP = 2
# Bit 30 of a stream number: the stream belongs to the data plane's endpoint (the
# tunnel's streams, run by a crypto shard), not the control worker's. The opener
# sets it; a receiver routes on it without decoding the segment (in_dataplane).
DATAPLANE_SPACE = 0x40000000

T_SYN = 1
T_SYNACK = 2
T_DATA = 3
T_ACK = 4
T_RST = 5
T_SKIP = 6
T_DGRAM = 7

F_FIN = 0x10  # DATA: this segment is the FIN (zero payload, one unit of offset space)
F_ORIGIN = 0x20  # DATA: an origin_ts (deadline mode) follows ts
F_ACK_NOW = 0x10  # ACK: the receiver of this ACK must answer with an ACK (probe)
F_DUP = 0x20  # ACK: caused by a segment that had already arrived (DSACK-like)
F_SHORT = 0x40  # DATA, ACK: the offset (cum) is its low 32 bits (see expand_offset)
SHORT_ROOM = 1024  # paths with at most this much plaintext room use the short forms

COMMON = struct.Struct("!BBI")
SYN = struct.Struct("!BBIHBBIII")
SYNACK = struct.Struct("!BBIIII")
DATA = struct.Struct("!BBIQI")
ORIGIN = struct.Struct("!I")
ACK = struct.Struct("!BBIQII")
SACK_BLOCK = struct.Struct("!II")
RST = struct.Struct("!BBIB")
SKIP = struct.Struct("!BBIQ")
DGRAM = struct.Struct("!BBIIHH")
SHORT_DATA = struct.Struct("!BBIII")
SHORT_ACK = struct.Struct("!BBIIII")

DATA_HEADER_LEN = DATA.size  # 18
DEADLINE_DATA_HEADER_LEN = DATA.size + ORIGIN.size  # 22
DGRAM_HEADER_LEN = DGRAM.size  # 14
SHORT_DATA_HEADER_LEN = SHORT_DATA.size  # 14
MAX_SACK_BLOCKS = 16
MAX_OFFSET = 2**62  # far beyond any stream; keeps offset arithmetic away from u64 wrap


class Mode(enum.IntEnum):
    RELIABLE = 0
    DEADLINE = 1
    DATAGRAM = 2


class ResetCode(enum.IntEnum):
    """Why a stream was reset; sent in RST and reported to the application."""

    REFUSED = 1  # no listener on the port
    DENIED = 2  # the listener's access control said no
    TIMEOUT = 3  # idle timeout or handshake gave up
    ABORTED = 4  # the application reset the stream
    PROTOCOL = 5  # a segment that makes no sense for the stream's state
    OVERLOADED = 6  # too many streams
    UNREACHABLE = 7  # the peer could not be reached (local only, never sent)

    @classmethod
    def parse(cls, value: int) -> ResetCode:
        try:
            return cls(value)
        except ValueError:
            return cls.PROTOCOL


class SegmentError(MeshpipeError, ValueError):
    """A malformed MSP segment (counted and dropped, never answered)."""


@dataclass(frozen=True, slots=True)
class Syn:
    stream: int
    port: int
    mode: Mode
    budget_ms: int
    window: int
    ts: int


@dataclass(frozen=True, slots=True)
class SynAck:
    stream: int
    window: int
    ts: int
    echo: int


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    offset: int
    ts: int
    origin_ts: int | None
    fin: bool
    payload: bytes
    short: bool = False  # offset holds only the low 32 bits (expand_offset)


@dataclass(frozen=True, slots=True)
class Ack:
    stream: int
    cum: int
    window: int
    echo: int
    blocks: tuple[tuple[int, int], ...]  # absolute [start, end) ranges above cum
    ack_now: bool
    dup: bool
    short: bool = False  # cum and blocks are relative to cum's low 32 bits (expand_offset)


@dataclass(frozen=True, slots=True)
class Rst:
    stream: int
    code: ResetCode


@dataclass(frozen=True, slots=True)
class Skip:
    stream: int
    offset: int


@dataclass(frozen=True, slots=True)
class Dgram:
    stream: int
    message: int
    index: int
    count: int
    payload: bytes


Segment = Syn | SynAck | Data | Ack | Rst | Skip | Dgram


def _byte(kind: int, flags: int = 0) -> int:
    return kind | flags


def expand_offset(ref: int, low: int) -> int:
    """The offset nearest ``ref`` whose low 32 bits are ``low`` (never negative)."""
    value = (ref & ~0xFFFFFFFF) | low
    if value <= ref - (1 << 31):
        value += 1 << 32
    elif value > ref + (1 << 31) and value >= 1 << 32:
        value -= 1 << 32
    return value


def widen_data(seg: Data, ref: int) -> Data:
    """A short DATA segment with its full offset, taken nearest ``ref``."""
    offset = expand_offset(ref, seg.offset)
    if offset + len(seg.payload) > MAX_OFFSET:
        raise SegmentError("offset out of range")
    return dataclasses.replace(seg, offset=offset, short=False)


def widen_ack(ack: Ack, ref: int) -> Ack:
    """A short ACK with its full cum (and blocks), taken nearest ``ref``."""
    cum = expand_offset(ref, ack.cum)
    shift = cum - ack.cum
    if cum > MAX_OFFSET or any(e + shift > MAX_OFFSET for _, e in ack.blocks):
        raise SegmentError("offset out of range")
    blocks = tuple((s + shift, e + shift) for s, e in ack.blocks)
    return dataclasses.replace(ack, cum=cum, blocks=blocks, short=False)


def encode_syn(s: Syn) -> bytes:
    return SYN.pack(PROTO_MSP, T_SYN, s.stream, s.port, s.mode, 0, s.budget_ms, s.window, s.ts)


def encode_synack(s: SynAck) -> bytes:
    return SYNACK.pack(PROTO_MSP, T_SYNACK, s.stream, s.window, s.ts, s.echo)


def encode_data(
    stream: int,
    offset: int,
    ts: int,
    payload: bytes,
    *,
    fin: bool = False,
    origin_ts: int | None,
    short: bool = False,
) -> bytes:
    flags = (F_FIN if fin else 0) | (F_ORIGIN if origin_ts is not None else 0)
    if short:
        t = _byte(T_DATA, flags | F_SHORT)
        head = SHORT_DATA.pack(PROTO_MSP, t, stream, offset & 0xFFFFFFFF, ts)
    else:
        head = DATA.pack(PROTO_MSP, _byte(T_DATA, flags), stream, offset, ts)
    if origin_ts is not None:
        head += ORIGIN.pack(origin_ts)
    return head + payload


def encode_ack(a: Ack) -> bytes:
    flags = (F_ACK_NOW if a.ack_now else 0) | (F_DUP if a.dup else 0)
    if a.short:
        t = _byte(T_ACK, flags | F_SHORT)
        head = SHORT_ACK.pack(PROTO_MSP, t, a.stream, a.cum & 0xFFFFFFFF, a.window, a.echo)
    else:
        head = ACK.pack(PROTO_MSP, _byte(T_ACK, flags), a.stream, a.cum, a.window, a.echo)
    parts = [head]
    parts.extend(SACK_BLOCK.pack(start - a.cum, end - start) for start, end in a.blocks)
    return b"".join(parts)


def encode_rst(stream: int, code: ResetCode) -> bytes:
    return RST.pack(PROTO_MSP, T_RST, stream, code)


def encode_skip(stream: int, offset: int) -> bytes:
    return SKIP.pack(PROTO_MSP, T_SKIP, stream, offset)


def encode_dgram(d: Dgram) -> bytes:
    head = DGRAM.pack(PROTO_MSP, T_DGRAM, d.stream, d.message, d.index, d.count)
    return head + d.payload


def decode(plaintext: bytes) -> Segment:
    """Parse one segment; raises SegmentError on anything malformed."""
    if len(plaintext) < COMMON.size:
        raise SegmentError(f"segment of {len(plaintext)} bytes is shorter than its header")
    proto, tbyte, stream = COMMON.unpack_from(plaintext)
    if proto != PROTO_MSP:
        raise SegmentError(f"protocol byte {proto} is not MSP")
    kind, flags = tbyte & 0x0F, tbyte & 0xF0
    try:
        short = bool(flags & F_SHORT)
        if kind == T_DATA:
            st = SHORT_DATA if short else DATA
            _, _, _, offset, ts = st.unpack_from(plaintext)
            pos = st.size
            origin: int | None = None
            if flags & F_ORIGIN:
                (origin,) = ORIGIN.unpack_from(plaintext, pos)
                pos += ORIGIN.size
            payload = plaintext[pos:]
            fin = bool(flags & F_FIN)
            if fin and payload:
                raise SegmentError("FIN segment carries payload")
            if offset + len(payload) > MAX_OFFSET:
                raise SegmentError("offset out of range")
            return Data(stream, offset, ts, origin, fin, payload, short)
        if kind == T_ACK:
            st = SHORT_ACK if short else ACK
            _, _, _, cum, window, echo = st.unpack_from(plaintext)
            rest = len(plaintext) - st.size
            if rest % SACK_BLOCK.size or rest // SACK_BLOCK.size > MAX_SACK_BLOCKS:
                raise SegmentError("bad SACK block list")
            if cum > MAX_OFFSET:
                raise SegmentError("offset out of range")
            blocks = []
            for i in range(rest // SACK_BLOCK.size):
                delta, length = SACK_BLOCK.unpack_from(plaintext, st.size + i * SACK_BLOCK.size)
                if length == 0:
                    raise SegmentError("empty SACK block")
                blocks.append((cum + delta, cum + delta + length))
            return Ack(
                stream,
                cum,
                window,
                echo,
                tuple(blocks),
                bool(flags & F_ACK_NOW),
                bool(flags & F_DUP),
                short,
            )
        if kind == T_SYN:
            _exact(plaintext, SYN)
            _, _, _, port, mode, _, budget, window, ts = SYN.unpack(plaintext)
            try:
                m = Mode(mode)
            except ValueError:
                raise SegmentError(f"unknown stream mode {mode}") from None
            return Syn(stream, port, m, budget, window, ts)
        if kind == T_SYNACK:
            _exact(plaintext, SYNACK)
            _, _, _, window, ts, echo = SYNACK.unpack(plaintext)
            return SynAck(stream, window, ts, echo)
        if kind == T_RST:
            _exact(plaintext, RST)
            return Rst(stream, ResetCode.parse(RST.unpack(plaintext)[3]))
        if kind == T_SKIP:
            _exact(plaintext, SKIP)
            offset = SKIP.unpack(plaintext)[3]
            if offset > MAX_OFFSET:
                raise SegmentError("offset out of range")
            return Skip(stream, offset)
        if kind == T_DGRAM:
            _, _, _, message, index, count = DGRAM.unpack_from(plaintext)
            if count == 0 or index >= count:
                raise SegmentError(f"fragment {index} of {count}")
            return Dgram(stream, message, index, count, plaintext[DGRAM.size :])
    except struct.error:
        raise SegmentError(f"truncated segment of type {kind}") from None
    raise SegmentError(f"unknown segment type {kind}")


def _exact(plaintext: bytes, st: struct.Struct) -> None:
    if len(plaintext) != st.size:
        raise SegmentError(f"segment of {len(plaintext)} bytes, expected {st.size}")


def stream_number(plaintext: bytes) -> int | None:
    """The stream number of a session plaintext that is an MSP segment, else None."""
    if len(plaintext) < COMMON.size or plaintext[0] != PROTO_MSP:
        return None
    return int.from_bytes(plaintext[2:6], "big")


def in_dataplane(plaintext: bytes) -> bool:
    """Is this session plaintext an MSP segment of a data-plane stream (bit 30)?"""
    return len(plaintext) >= COMMON.size and plaintext[0] == PROTO_MSP and plaintext[2] & 0x40 != 0
