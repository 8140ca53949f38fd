"""Packet-radio framing: KISS over a serial line, and the radio link header.

KISS (the TNC host protocol) delimits frames with FEND and escapes the two
special bytes inside them::

    FEND command data... FEND        FEND (0xC0) inside data -> FESC TFEND (0xDB 0xDC)
                                     FESC (0xDB) inside data -> FESC TFESC (0xDB 0xDD)

The command byte is ``port << 4 | command``; only 0x00 (data frame, port 0) carries
mesh traffic, every other command (TNC parameters, other ports) is ignored and
counted. :class:`KissDecoder` is fed whatever chunks the serial port returns and
yields whole frames; it starts hunting for a FEND, so it resyncs after line noise
or a frame cut short, and it drops (and counts) frames over its maximum length
without buffering them.

A radio is a broadcast medium and the mesh DATA header has no next-hop field, so
every radio frame carries a small link header in front of the mesh frame::

    0        2        4
    | dst u16 | src u16 | mesh frame ...        dst 0xFFFF = broadcast

A node's radio link address is derived from its SID (:func:`radio_addr`);
receivers keep frames addressed to them or to broadcast and drop the rest.

Per-frame overhead on the air: 4 bytes of link header + 3 bytes of KISS (two FENDs
and the command byte) = **7 bytes**, plus one byte for each 0xC0 or 0xDB in the
frame (escaping; about 0.8% of random bytes). A radio interface's ``mtu`` counts
the link header and the mesh frame, before escaping, so a 255-byte radio MTU
carries mesh frames of up to 251 bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter

from meshpipe.errors import FrameError

FEND = 0xC0
FESC = 0xDB
TFEND = 0xDC
TFESC = 0xDD
CMD_DATA = 0x00  # data frame on port 0

KISS_OVERHEAD = 3  # FEND, command, FEND
RADIO_HEADER = struct.Struct("!HH")  # dst, src
RADIO_HEADER_LEN = RADIO_HEADER.size  # 4 bytes
RADIO_OVERHEAD = RADIO_HEADER_LEN + KISS_OVERHEAD  # 7 bytes per frame, before escaping
RADIO_BROADCAST = 0xFFFF
RADIO_ADDR_PERSON = b"meshpipe-radio"

_ESCAPE = {FEND: bytes((FESC, TFEND)), FESC: bytes((FESC, TFESC))}


def escape(data: bytes) -> bytes:
    """KISS-escape ``data`` (FEND and FESC become two-byte sequences)."""
    return data.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")


def unescape(data: bytes) -> bytes:
    """The inverse of :func:`escape`; FrameError on a dangling or unknown escape."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == FEND:
            raise FrameError("FEND inside a KISS frame")
        if b != FESC:
            out.append(b)
            continue
        nxt = next(it, None)
        if nxt == TFEND:
            out.append(FEND)
        elif nxt == TFESC:
            out.append(FESC)
        else:
            raise FrameError("bad KISS escape")
    return bytes(out)


def encode(frame: bytes, command: int = CMD_DATA) -> bytes:
    """One KISS frame on the wire: FEND, command, escaped data, FEND."""
    return bytes((FEND,)) + escape(bytes((command,)) + frame) + bytes((FEND,))


def wire_size(frame: bytes) -> int:
    """Bytes :func:`encode` puts on the line for ``frame`` (escaping included)."""
    return KISS_OVERHEAD + len(frame) + frame.count(FEND) + frame.count(FESC)


class KissDecoder:
    """Incremental KISS decoder: feed it byte chunks, get whole data frames back.

    Counters (``counters``): ``kiss.frames`` (data frames returned), ``kiss.oversize``
    (longer than ``max_len``, dropped), ``kiss.bad_escape`` (dropped), ``kiss.not_data``
    (another command or port, ignored), ``kiss.garbage`` (bytes before the first FEND).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.counters: Counter[str] = Counter()
        self._buf = bytearray()
        self._hunting = True  # before the first FEND we cannot know where a frame starts
        self._escaped = False
        self._bad = ""  # why the frame being read will be dropped, if it will

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for b in chunk:
            if b == FEND:
                self._end_frame(out)
                continue
            if self._hunting:
                self.counters["kiss.garbage"] += 1
                continue
            if self._bad:
                continue  # skip to the next FEND without buffering
            if self._escaped:
                self._escaped = False
                if b == TFEND:
                    b = FEND
                elif b == TFESC:
                    b = FESC
                else:
                    self._bad = "kiss.bad_escape"
                    continue
            elif b == FESC:
                self._escaped = True
                continue
            # +1: the command byte is in the buffer too.
            if len(self._buf) >= self.max_len + 1:
                self._bad = "kiss.oversize"
                self._buf.clear()
                continue
            self._buf.append(b)
        return out

    def _end_frame(self, out: list[bytes]) -> None:
        if self._hunting:
            self._hunting = False
        elif self._bad or self._escaped:
            self.counters[self._bad or "kiss.bad_escape"] += 1
        elif self._buf:  # FEND FEND (an empty frame) is just idle fill
            if self._buf[0] != CMD_DATA:
                self.counters["kiss.not_data"] += 1
            else:
                self.counters["kiss.frames"] += 1
                out.append(bytes(self._buf[1:]))
        self._buf.clear()
        self._escaped = False
        self._bad = ""


def radio_addr(sid: bytes) -> int:
    """A node's 16-bit radio link address, from its SID (never the broadcast value).

    Two nodes in range with the same address would confuse each other; with 16 bits
    that is unlikely for a few dozen radios, and the radio worker counts frames that
    claim its own address (``rx.addr_conflict``) so it shows.
    """
    h = hashlib.blake2b(bytes(sid), digest_size=2, person=RADIO_ADDR_PERSON).digest()
    addr = int.from_bytes(h, "big")
    return addr if addr != RADIO_BROADCAST else 0xFFFE


def encode_radio(dst: int, src: int, frame: bytes) -> bytes:
    """Link header + mesh frame (not yet KISS-encoded)."""
    return RADIO_HEADER.pack(dst, src) + frame


def decode_radio(data: bytes) -> tuple[int, int, bytes]:
    """Return (dst, src, mesh frame) of a radio frame."""
    if len(data) <= RADIO_HEADER_LEN:
        raise FrameError(f"radio frame too short ({len(data)} bytes)")
    dst, src = RADIO_HEADER.unpack_from(data)
    return dst, src, data[RADIO_HEADER_LEN:]
