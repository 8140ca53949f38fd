"""Per-link header compression for slow links (a packet radio).

A routed DATA frame that carries a session transport packet starts with 79 bytes
that hardly change along one flow: the 66-byte mesh header (kind, hop limit, two
32-byte SIDs) and the 13-byte transport header (type, receiver index, 64-bit
counter). On one link the sender and the receiver agree on a short *context*
for those bytes (as 6LoWPAN and ROHC do), and the frame crosses that link as::

    COMPRESSED  0x80|ctx (ctx 0..63) | counter low 16 bits | ciphertext + tag     3 bytes

instead of 79. A context is set up by link-local frames that never leave the link::

    DEFINE  0xE0 | ctx u8 | epoch u16 | gen u8 | DATA header 66 | transport header 13
    ACK     0xE1 | ctx u8 | epoch u16 | gen u8         the receiver stored that DEFINE
    NACK    0xE2 | ctx u8 | epoch u16 | gen u8         a COMPRESSED frame with no context

The first bytes of these forms (wire version nibbles 8..15) never start a core
frame, so a receiver tells them apart by the first byte alone. The receiver
rebuilds the original frame byte for byte before anything else looks at it, so
nothing above the link changes: transit nodes decompress and compress again with
the next link's contexts (only the link part is rewritten), and the session still
authenticates the real header (the AEAD's associated data is the rebuilt transport
header and the session checks the real source SID).

Rules:

* The sender keys a context by the 66 + 5 invariant bytes (header, type, receiver
  index); the counter is sent as its low 16 bits and rebuilt as the value nearest
  the context's reference counter (the one in its DEFINE). When a counter drifts
  16384 or more from the reference, the sender defines the context again with a new
  reference; frames sent meanwhile still decode under the old one (they are within
  32768 of both).
* Until the receiver has acknowledged a context's DEFINE, a frame that fits the link
  MTU uncompressed goes uncompressed; a bigger one (the link's data MTU allows
  for the compression gain) goes compressed right behind a DEFINE. DEFINEs are
  repeated at most every ``define_interval`` while unacknowledged.
* A COMPRESSED frame whose context the receiver does not hold (the neighbour or we
  restarted, a DEFINE was lost) is dropped and counted (``compress.drop.unknown_ctx``)
  and answered with a NACK (at most once per ``define_interval`` per context); the
  sender then defines the context again. A DEFINE with a new sender epoch (the
  neighbour restarted) clears every context that neighbour had defined.
* A frame rebuilt from a stale context (a DEFINE lost after its context id was
  reused) has the old flow's header and the new flow's ciphertext: the session that
  receives it fails its tag and drops it. Nothing is ever delivered from a wrong
  context.

Counters: ``compress.tx.compressed``, ``.tx.full``, ``.tx.define``, ``.tx.ack``,
``.tx.nack``, ``.tx.saved_bytes``, ``.rx.compressed``, ``.rx.define``, ``.rx.ack``,
``.rx.nack``, ``.drop.unknown_ctx``, ``.drop.malformed``, ``.ctx.evicted``.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from meshpipe import wire
from meshpipe.session import TRANSPORT_HEADER_LEN, TYPE_TRANSPORT

MAX_CTX = 64
COMPRESSED = 0x80  # | ctx
T_DEFINE, T_ACK, T_NACK = 0xE0, 0xE1, 0xE2
COMPRESSED_HEADER = struct.Struct("!BH")  # 0x80|ctx, counter low 16
COMPRESSED_HEADER_LEN = COMPRESSED_HEADER.size  # 3
CONTROL = struct.Struct("!BBHB")  # type, ctx, epoch, gen
FULL_HEADER_LEN = wire.DATA_HEADER_LEN + TRANSPORT_HEADER_LEN  # 79
KEY_LEN = FULL_HEADER_LEN - 8  # everything but the counter
DEFINE_LEN = CONTROL.size + FULL_HEADER_LEN  # 84
GAIN = FULL_HEADER_LEN - COMPRESSED_HEADER_LEN  # 76 bytes a compressed frame saves
MIN_PAYLOAD = 16  # a transport packet carries at least its tag
REDEFINE_DRIFT = 1 << 14
_HALF = 1 << 15
_TAG_TRANSPORT = bytes((TYPE_TRANSPORT,))
_DATA_BYTE = (wire.WIRE_VERSION << 4) | wire.KIND_DATA
_COUNTER = struct.Struct("!Q")
MAX_COUNTER = (1 << 64) - 1


def is_link_frame(frame: bytes) -> bool:
    """Is this one of the forms above (first byte 0x80..0xBF or a control type)?"""
    return bool(frame) and (
        COMPRESSED <= frame[0] < COMPRESSED + MAX_CTX or frame[0] in (T_DEFINE, T_ACK, T_NACK)
    )


def expand_counter(ref: int, low: int) -> int:
    """The counter nearest ``ref`` whose low 16 bits are ``low`` (may be out of u64)."""
    value = (ref & ~0xFFFF) | low
    if value <= ref - _HALF:
        value += 1 << 16
    elif value > ref + _HALF:
        value -= 1 << 16
    return value


@dataclass
class _TxCtx:
    ident: int
    gen: int
    ref: int
    acked: bool = False
    define_at: float = -1e18


@dataclass
class _RxCtx:
    header: bytes  # the 71 invariant bytes
    ref: int
    nack_at: float = -1e18


class _TxState:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.by_key: OrderedDict[bytes, _TxCtx] = OrderedDict()  # LRU order
        self.by_id: dict[int, bytes] = {}
        self.gen = 0


class _RxState:
    def __init__(self) -> None:
        self.epoch: int | None = None
        self.ctx: dict[int, _RxCtx] = {}
        self.unknown_nack_at: dict[int, float] = {}


class LinkCompressor:
    """Both directions of header compression for every neighbour on one link."""

    def __init__(
        self,
        mtu: int,
        rng: random.Random,
        counters: Counter[str],
        *,
        max_neighbours: int = 256,
        define_interval: float = 0.25,
    ) -> None:
        self.mtu = mtu  # the largest frame the link carries (uncompressed size)
        self.rng = rng
        self.counters = counters
        self.max_neighbours = max_neighbours
        self.define_interval = define_interval
        self.tx: OrderedDict[Hashable, _TxState] = OrderedDict()
        self.rx: OrderedDict[Hashable, _RxState] = OrderedDict()

    # -- send ------------------------------------------------------------------------

    def _tx_state(self, nbr: Hashable) -> _TxState:
        st = self.tx.get(nbr)
        if st is None:
            st = self.tx[nbr] = _TxState(self.rng.randrange(1 << 16))
            while len(self.tx) > self.max_neighbours:
                self.tx.popitem(last=False)
        self.tx.move_to_end(nbr)
        return st

    def encode(self, nbr: Hashable, frame: bytes, now: float) -> list[bytes]:
        """Frames to send to ``nbr`` in order: any DEFINE first, the frame itself last."""
        if (
            len(frame) < FULL_HEADER_LEN + MIN_PAYLOAD
            or frame[0] != _DATA_BYTE
            or frame[wire.DATA_HEADER_LEN] != TYPE_TRANSPORT
        ):
            return [frame]
        st = self._tx_state(nbr)
        key = frame[:KEY_LEN]
        (counter,) = _COUNTER.unpack_from(frame, KEY_LEN)
        ctx = st.by_key.get(key)
        out: list[bytes] = []
        if ctx is None:
            ctx = self._new_ctx(st, key, counter)
        else:
            st.by_key.move_to_end(key)
            if abs(counter - ctx.ref) >= REDEFINE_DRIFT:
                ctx.ref, ctx.acked, ctx.define_at = counter, False, -1e18
                st.gen = ctx.gen = (st.gen + 1) & 0xFF
        if not ctx.acked and now - ctx.define_at >= self.define_interval:
            ctx.define_at = now
            out.append(self._define(st, ctx, key))
        if not ctx.acked and len(frame) <= self.mtu:
            self.counters["compress.tx.full"] += 1
            out.append(frame)
            return out
        if abs(counter - ctx.ref) >= _HALF:  # cannot happen (redefined above); be safe
            out.append(frame)
            return out
        self.counters["compress.tx.compressed"] += 1
        self.counters["compress.tx.saved_bytes"] += GAIN
        out.append(
            COMPRESSED_HEADER.pack(COMPRESSED | ctx.ident, counter & 0xFFFF)
            + frame[FULL_HEADER_LEN:]
        )
        return out

    def _new_ctx(self, st: _TxState, key: bytes, counter: int) -> _TxCtx:
        if len(st.by_key) >= MAX_CTX:
            _, old = st.by_key.popitem(last=False)
            del st.by_id[old.ident]
            self.counters["compress.ctx.evicted"] += 1
        ident = next(i for i in range(MAX_CTX) if i not in st.by_id)
        st.gen = (st.gen + 1) & 0xFF
        ctx = _TxCtx(ident, st.gen, counter)
        st.by_key[key] = ctx
        st.by_id[ident] = key
        return ctx

    def _define(self, st: _TxState, ctx: _TxCtx, key: bytes) -> bytes:
        self.counters["compress.tx.define"] += 1
        return CONTROL.pack(T_DEFINE, ctx.ident, st.epoch, ctx.gen) + key + _COUNTER.pack(ctx.ref)

    # -- receive ---------------------------------------------------------------------

    def _rx_state(self, nbr: Hashable) -> _RxState:
        st = self.rx.get(nbr)
        if st is None:
            st = self.rx[nbr] = _RxState()
            while len(self.rx) > self.max_neighbours:
                self.rx.popitem(last=False)
        self.rx.move_to_end(nbr)
        return st

    def decode(self, nbr: Hashable, frame: bytes, now: float) -> tuple[bytes | None, list[bytes]]:
        """(the rebuilt core frame or None, link frames to send back to ``nbr``).

        ``frame`` must satisfy :func:`is_link_frame`; anything malformed is counted
        and dropped."""
        if not is_link_frame(frame):
            self.counters["compress.drop.malformed"] += 1
            return None, []
        first = frame[0]
        if first < COMPRESSED + MAX_CTX:
            return self._on_compressed(nbr, first - COMPRESSED, frame, now)
        if len(frame) < CONTROL.size:
            self.counters["compress.drop.malformed"] += 1
            return None, []
        kind, ident, epoch, gen = CONTROL.unpack_from(frame)
        if ident >= MAX_CTX:
            self.counters["compress.drop.malformed"] += 1
            return None, []
        if kind == T_DEFINE:
            return None, self._on_define(nbr, ident, epoch, gen, frame)
        if len(frame) != CONTROL.size:
            self.counters["compress.drop.malformed"] += 1
            return None, []
        self._on_feedback(nbr, kind, ident, epoch, gen)
        return None, []

    def _on_compressed(
        self, nbr: Hashable, ident: int, frame: bytes, now: float
    ) -> tuple[bytes | None, list[bytes]]:
        if len(frame) < COMPRESSED_HEADER_LEN + MIN_PAYLOAD:
            self.counters["compress.drop.malformed"] += 1
            return None, []
        st = self.rx.get(nbr)
        ctx = None if st is None else st.ctx.get(ident)
        if ctx is None:
            self.counters["compress.drop.unknown_ctx"] += 1
            st = self._rx_state(nbr)
            if now - st.unknown_nack_at.get(ident, -1e18) < self.define_interval:
                return None, []
            st.unknown_nack_at[ident] = now
            self.counters["compress.tx.nack"] += 1
            return None, [CONTROL.pack(T_NACK, ident, st.epoch or 0, 0)]
        _, low = COMPRESSED_HEADER.unpack_from(frame)
        counter = expand_counter(ctx.ref, low)
        if not 0 <= counter <= MAX_COUNTER:
            self.counters["compress.drop.malformed"] += 1
            return None, []
        self.counters["compress.rx.compressed"] += 1
        return ctx.header + _COUNTER.pack(counter) + frame[COMPRESSED_HEADER_LEN:], []

    def _on_define(
        self, nbr: Hashable, ident: int, epoch: int, gen: int, frame: bytes
    ) -> list[bytes]:
        if len(frame) != DEFINE_LEN:
            self.counters["compress.drop.malformed"] += 1
            return []
        header = frame[CONTROL.size : CONTROL.size + KEY_LEN]
        if header[0] != _DATA_BYTE or header[wire.DATA_HEADER_LEN] != TYPE_TRANSPORT:
            self.counters["compress.drop.malformed"] += 1
            return []
        (ref,) = _COUNTER.unpack_from(frame, CONTROL.size + KEY_LEN)
        st = self._rx_state(nbr)
        if st.epoch != epoch:  # the neighbour restarted: its old contexts are void
            st.epoch = epoch
            st.ctx.clear()
        st.ctx[ident] = _RxCtx(header, ref)
        st.unknown_nack_at.pop(ident, None)
        self.counters["compress.rx.define"] += 1
        self.counters["compress.tx.ack"] += 1
        return [CONTROL.pack(T_ACK, ident, epoch, gen)]

    def _on_feedback(self, nbr: Hashable, kind: int, ident: int, epoch: int, gen: int) -> None:
        st = self.tx.get(nbr)
        key = None if st is None else st.by_id.get(ident)
        if kind == T_ACK:
            self.counters["compress.rx.ack"] += 1
            if st is None or key is None or epoch != st.epoch:
                return
            ctx = st.by_key[key]
            if ctx.gen == gen:
                ctx.acked = True
        elif kind == T_NACK:
            self.counters["compress.rx.nack"] += 1
            if st is None or key is None:
                return
            # Define again with the next frame, but never more often than define_interval:
            # a neighbour that forges NACKs cannot make us send a DEFINE per frame.
            st.by_key[key].acked = False
        else:
            self.counters["compress.drop.malformed"] += 1


__all__ = [
    "COMPRESSED_HEADER_LEN",
    "DEFINE_LEN",
    "GAIN",
    "LinkCompressor",
    "expand_counter",
    "is_link_frame",
]
