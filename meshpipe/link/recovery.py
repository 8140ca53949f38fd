"""Per-hop recovery: link-local sequence numbers, acks and a small retransmission buffer.

End-to-end recovery over several lossy hops collapses: a frame must survive every
crossing, so at 40% loss per link a datagram crosses 2 hops (4 crossings with its
answer) about 13% of the time. This module lets each hop recover what it lost, as
Wi-Fi's link layer and Serval do, while MSP's own recovery stays end to end.

It works on link framing only. A DATA frame sent to a neighbour is wrapped in a LINK
frame that adds a per-neighbour sequence number; the neighbour unwraps it (never
looking inside: the session authenticates end to end), drops duplicates and acks it.
Nothing here is trusted for more than timing: a lying neighbour can at most make us
retransmit (bounded) or deliver a duplicate (which MSP, the replay window and the
ping's sequence numbers drop anyway).

LINK frame (kind 5), 16-byte header, big endian::

    0       1       2         3       5           6         8          16
    | v|k   | flags | epoch u8 | seq u16 | ack_epoch | ack_top | ack_bits u64 | ...

- ``flags`` bit 0 ``F_DATA``: ``epoch``/``seq`` number the frame that follows the
  header (a whole DATA frame); bit 1 ``F_ACK``: the ack block is valid.
- ``epoch`` is the sender's random (1..255) incarnation of its sequence to this
  neighbour: a restarted sender starts afresh without being taken for old frames.
- ack block: the highest sequence number received (``ack_top``) from the neighbour's
  ``ack_epoch``, and ``ack_bits`` bit i set = ``ack_top - 1 - i`` received too.
- A pure ack (``F_ACK`` alone, no frame) may carry up to 7 more blocks of
  ``top u16 | bits u64`` (10 bytes each) for older frames of a long receive batch.

Every DATA frame carries the latest ack block for the reverse direction (fixed size,
so runs of equal-sized frames still leave in one GSO send); what no outgoing frame
carried by the end of a receive batch leaves as one pure ack per neighbour
(:meth:`HopRecovery.poll`). The overhead is :data:`OVERHEAD` bytes of MTU.

Sender, per neighbour: the last ``max_frames`` frames (and at most ``max_bytes``)
wait for their ack, oldest evicted. A frame is lost when a frame sent after it is
acked while its own bit is clear (no reordering on one link), or when its RTO
(``srtt + 4 rttvar`` of this link's ack RTT, within ``[min_rto, max_rto]``, times
1.5 per try) passes. A lost frame is sent again, with the same sequence number, at
most ``max_tries`` times in all and never once it is older than ``max_age`` (below
MSP's minimum RTO, so the end-to-end layers never wait for a hop). Receiver, per
neighbour: a 1024-frame window drops duplicates; the inner frame is passed on
unchanged, in arrival order.

Modes: ``"on"`` retransmits always; ``"auto"`` numbers and acks every DATA frame but
retransmits only while the loss it measures (the share of first transmissions not
acked: the mean of the first 256, then a moving average over about 256) is above
``auto_on_loss``, until it falls below ``auto_off_loss``; ``"off"`` sends frames
unwrapped (received LINK frames are still unwrapped and acked, so nodes with
different modes interoperate).

Counters (``hop.``): ``tx.frames`` (numbered), ``tx.retransmits``, ``tx.acked``,
``tx.lost`` (first transmissions found lost: what auto measures), ``tx.gave_up``
(tries or age exhausted, or retransmission off), ``tx.evicted`` (buffer bound),
``tx.acks`` (pure ack frames), ``rx.frames``, ``rx.duplicates``, ``rx.too_old``,
``rx.epoch_reset``, ``rx.acks``, ``rx.stale_ack`` (for another epoch),
``drop.malformed``, ``retransmit_on`` / ``retransmit_off`` (auto switched).
"""

from __future__ import annotations

import collections
import random
import struct
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshpipe import wire
from meshpipe.actions import BROADCAST, MULTICAST, Action, LinkAddr, SendFrame
from meshpipe.errors import FrameError

MODES = ("auto", "on", "off")

F_DATA = 0x01
F_ACK = 0x02

HEADER = struct.Struct("!BBBHBHQ")
OVERHEAD = HEADER.size  # 16 bytes
BLOCK = struct.Struct("!HQ")
MAX_EXTRA_BLOCKS = 7
ACK_SPAN = 65  # one block covers ack_top and the 64 before it

SEQ_MOD = 1 << 16
_HALF = SEQ_MOD // 2
RX_WINDOW = 1024  # frames remembered for duplicate suppression
_RX_MASK = (1 << RX_WINDOW) - 1
_BITS_MASK = (1 << 64) - 1
_TOO_OLD_RESET = 64  # that many too-old frames in a row: the sender lost its state
_LINK_BYTE = (wire.WIRE_VERSION << 4) | wire.KIND_LINK
_DATA_BYTE = (wire.WIRE_VERSION << 4) | wire.KIND_DATA
_LOSS_WINDOW = 256


@dataclass(frozen=True)
class RecoveryParams:
    """Bounds per neighbour. Defaults suit a UDP link; a radio gets a longer age."""

    max_frames: int = 128
    max_bytes: int = 256 * 1024
    max_tries: int = 8  # transmissions in all, the first included
    max_age: float = 0.15  # below MSP's 0.2 s minimum RTO
    initial_rto: float = 0.02
    min_rto: float = 0.004
    max_rto: float = 0.05
    auto_on_loss: float = 0.01
    auto_off_loss: float = 0.0025
    idle_expiry: float = 60.0
    max_neighbours: int = 1024


@dataclass
class _Entry:
    inner: bytes
    first_sent: float
    last_sent: float
    tries: int = 1


@dataclass
class _Tx:
    epoch: int
    next_seq: int = 0
    buffer: collections.OrderedDict[int, _Entry] = field(
        default_factory=collections.OrderedDict
    )  # by last transmission, oldest first
    bytes: int = 0
    srtt: float | None = None
    rttvar: float = 0.0
    newest_acked_sent: float = float("-inf")
    loss: float = 0.0
    outcomes: int = 0
    retransmit: bool = False


@dataclass
class _Rx:
    epoch: int = 0
    top: int = -1  # -1: nothing received yet from this epoch
    window: int = 0  # bit i: top - i received
    pending_low: int | None = None  # oldest frame received since it was last acked
    too_old_run: int = 0


@dataclass
class _Link:
    addr: Hashable
    tx: _Tx
    rx: _Rx = field(default_factory=_Rx)
    last_active: float = 0.0


class HopRecovery:
    """Per-hop recovery for every neighbour of one interface (addresses are opaque)."""

    def __init__(
        self,
        mode: str,
        counters: collections.Counter[str],
        rng: random.Random,
        params: RecoveryParams | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"hop recovery mode {mode!r}: want one of {MODES}")
        self.mode = mode
        self.counters = counters
        self.rng = rng
        self.params = params or RecoveryParams()
        self.links: collections.OrderedDict[Hashable, _Link] = collections.OrderedDict()
        self._out: list[tuple[Hashable, bytes]] = []
        self._next_sweep = 0.0

    # -- sending ----------------------------------------------------------------------

    def send(self, addr: Hashable, frame: bytes, now: float) -> bytes:
        """The bytes to put on the link for ``frame`` to neighbour ``addr``."""
        if self.mode == "off" or not frame or frame[0] != _DATA_BYTE:
            return frame
        link = self._link(addr, now)
        tx = link.tx
        seq = tx.next_seq
        tx.next_seq = (seq + 1) % SEQ_MOD
        p = self.params
        if tx.buffer.get(seq) is not None:  # a whole sequence space in flight: impossible
            self._forget(tx, seq)
        tx.buffer[seq] = _Entry(frame, now, now)
        tx.bytes += len(frame)
        while len(tx.buffer) > p.max_frames or tx.bytes > p.max_bytes:
            self._forget(tx, next(iter(tx.buffer)))
            self.counters["hop.tx.evicted"] += 1
        self.counters["hop.tx.frames"] += 1
        return self._header(link, F_DATA, seq) + frame

    def _header(self, link: _Link, flags: int, seq: int) -> bytes:
        rx = link.rx
        top = bits = 0
        if rx.top >= 0:
            flags |= F_ACK
            top = rx.top
            bits = (rx.window >> 1) & _BITS_MASK
            if rx.pending_low is not None and _older(top, rx.pending_low) < ACK_SPAN:
                rx.pending_low = None  # this block covers all that waited for an ack
        epoch = link.tx.epoch if flags & F_DATA else 0
        return HEADER.pack(_LINK_BYTE, flags, epoch, seq, rx.epoch, top, bits)

    def _forget(self, tx: _Tx, seq: int) -> _Entry:
        entry = tx.buffer.pop(seq)
        tx.bytes -= len(entry.inner)
        return entry

    # -- receiving --------------------------------------------------------------------

    def receive(self, addr: Hashable, frame: bytes, now: float) -> bytes | None:
        """The frame to process for ``frame`` from ``addr``: unwrapped, or unchanged if
        not a LINK frame; None when nothing is left (an ack, a duplicate, a drop)."""
        if not frame or frame[0] != _LINK_BYTE:
            return frame
        try:
            flags, epoch, seq, ack_epoch, top, bits, extra = _parse(frame)
        except FrameError:
            self.counters["hop.drop.malformed"] += 1
            return None
        link = self._link(addr, now)
        if flags & F_ACK:
            self._on_ack(link, ack_epoch, [(top, bits), *extra], now)
        if not flags & F_DATA:
            self.counters["hop.rx.acks"] += 1
            return None
        if self._is_new(link.rx, epoch, seq):
            self.counters["hop.rx.frames"] += 1
            return frame[OVERHEAD:]
        return None

    def _is_new(self, rx: _Rx, epoch: int, seq: int) -> bool:
        if epoch != rx.epoch:
            if rx.top >= 0:
                self.counters["hop.rx.epoch_reset"] += 1
            rx.epoch, rx.top, rx.window, rx.pending_low = epoch, -1, 0, None
        if rx.top < 0:
            rx.top, rx.window = seq, 1
        else:
            ahead = (seq - rx.top) % SEQ_MOD
            if ahead and ahead < _HALF:
                rx.window = ((rx.window << ahead) | 1) & _RX_MASK
                rx.top = seq
            else:
                back = (rx.top - seq) % SEQ_MOD
                if back >= RX_WINDOW:
                    self.counters["hop.rx.too_old"] += 1
                    rx.too_old_run += 1
                    if rx.too_old_run >= _TOO_OLD_RESET:
                        rx.top, rx.window = -1, 0
                    return False
                if rx.window >> back & 1:
                    self.counters["hop.rx.duplicates"] += 1
                    # Ack it again: our first ack was lost, or the sender would not repeat.
                    rx.pending_low = (
                        seq if rx.pending_low is None else _oldest(rx.top, rx.pending_low, seq)
                    )
                    return False
                rx.window |= 1 << back
        rx.too_old_run = 0
        rx.pending_low = seq if rx.pending_low is None else _oldest(rx.top, rx.pending_low, seq)
        return True

    def _on_ack(self, link: _Link, epoch: int, blocks: list[tuple[int, int]], now: float) -> None:
        tx = link.tx
        if epoch != tx.epoch:
            self.counters["hop.rx.stale_ack"] += 1
            return
        missing: list[int] = []
        for top, bits in blocks:
            for seq in list(tx.buffer):
                back = (top - seq) % SEQ_MOD
                if back >= ACK_SPAN:
                    continue
                if back and not bits >> (back - 1) & 1:
                    missing.append(seq)
                    continue
                entry = self._forget(tx, seq)
                self.counters["hop.tx.acked"] += 1
                tx.newest_acked_sent = max(tx.newest_acked_sent, entry.last_sent)
                if entry.tries == 1:  # Karn: a retransmitted frame's RTT is ambiguous
                    self._rtt_sample(tx, now - entry.last_sent)
                    self._outcome(tx, lost=False)
        for seq in missing:
            hole = tx.buffer.get(seq)
            # Lost only if something sent after its last transmission got through.
            if hole is not None and hole.last_sent < tx.newest_acked_sent:
                self._lost(link, seq, hole, now, self._out)

    def _rtt_sample(self, tx: _Tx, rtt: float) -> None:
        if tx.srtt is None:
            tx.srtt, tx.rttvar = rtt, rtt / 2
        else:
            tx.rttvar = 0.75 * tx.rttvar + 0.25 * abs(tx.srtt - rtt)
            tx.srtt = 0.875 * tx.srtt + 0.125 * rtt

    def rto(self, tx: _Tx) -> float:
        p = self.params
        if tx.srtt is None:
            return p.initial_rto
        return min(p.max_rto, max(p.min_rto, tx.srtt + 4 * tx.rttvar))

    def _outcome(self, tx: _Tx, lost: bool) -> None:
        tx.outcomes += 1
        tx.loss += ((1.0 if lost else 0.0) - tx.loss) / min(tx.outcomes, _LOSS_WINDOW)
        if self.mode != "auto":
            return
        p = self.params
        if not tx.retransmit and tx.loss > p.auto_on_loss:
            tx.retransmit = True
            self.counters["hop.retransmit_on"] += 1
        elif tx.retransmit and tx.loss < p.auto_off_loss:
            tx.retransmit = False
            self.counters["hop.retransmit_off"] += 1

    def _lost(
        self, link: _Link, seq: int, entry: _Entry, now: float, out: list[tuple[Hashable, bytes]]
    ) -> None:
        tx = link.tx
        if entry.tries == 1:
            self.counters["hop.tx.lost"] += 1
            self._outcome(tx, lost=True)
        p = self.params
        on = self.mode == "on" or tx.retransmit
        if not on or entry.tries >= p.max_tries or now - entry.first_sent >= p.max_age:
            self._forget(tx, seq)
            self.counters["hop.tx.gave_up"] += 1
            return
        entry.tries += 1
        entry.last_sent = now
        tx.buffer.move_to_end(seq)
        self.counters["hop.tx.retransmits"] += 1
        out.append((link.addr, self._header(link, F_DATA, seq) + entry.inner))

    # -- timers -----------------------------------------------------------------------

    def poll(self, now: float) -> list[tuple[Hashable, bytes]]:
        """Frames to send now: retransmissions due and acks no frame carried."""
        out, self._out = self._out, []
        for addr, link in list(self.links.items()):
            tx = link.tx
            rto = self.rto(tx)
            while tx.buffer:
                seq, entry = next(iter(tx.buffer.items()))
                if entry.last_sent + rto * 1.5 ** (entry.tries - 1) > now:
                    break
                self._lost(link, seq, entry, now, out)
            if link.rx.pending_low is not None:
                out.append((addr, self._pure_ack(link)))
        if now >= self._next_sweep:
            self._sweep(now)
        return out

    def _pure_ack(self, link: _Link) -> bytes:
        rx = link.rx
        assert rx.pending_low is not None
        low = rx.pending_low
        head = self._header(link, 0, 0)
        blocks: list[bytes] = []
        back = ACK_SPAN
        # Older blocks until the oldest frame not yet acked is covered; a block's top
        # must be a frame received, so each starts at the newest one left.
        while len(blocks) < MAX_EXTRA_BLOCKS and _older(rx.top, low) >= back:
            rest = rx.window >> back
            if not rest:
                break
            back += (rest & -rest).bit_length() - 1
            top = (rx.top - back) % SEQ_MOD
            blocks.append(BLOCK.pack(top, (rx.window >> (back + 1)) & _BITS_MASK))
            back += ACK_SPAN
        rx.pending_low = None
        self.counters["hop.tx.acks"] += 1
        return head + b"".join(blocks)

    def next_deadline(self) -> float:
        """When :meth:`poll` next has something to do (``-inf``: now)."""
        if self._out:
            return float("-inf")
        t = self._next_sweep if self.links else float("inf")
        for link in self.links.values():
            if link.rx.pending_low is not None:
                return float("-inf")
            tx = link.tx
            if tx.buffer:
                entry = next(iter(tx.buffer.values()))
                t = min(t, entry.last_sent + self.rto(tx) * 1.5 ** (entry.tries - 1))
        return t

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + 1.0
        idle = [
            a
            for a, link in self.links.items()
            if now - link.last_active > self.params.idle_expiry and not link.tx.buffer
        ]
        for a in idle:
            del self.links[a]

    def _link(self, addr: Hashable, now: float) -> _Link:
        link = self.links.get(addr)
        if link is None:
            while len(self.links) >= self.params.max_neighbours:
                self.links.popitem(last=False)
            link = _Link(addr, _Tx(epoch=self.rng.randrange(1, 256)))
            self.links[addr] = link
        else:
            self.links.move_to_end(addr)
        link.last_active = now
        return link

    # -- reporting --------------------------------------------------------------------

    def info(self) -> list[dict[str, object]]:
        """Per neighbour: measured loss, RTT, whether retransmission is on, buffer use."""
        rows: list[dict[str, object]] = []
        for addr, link in self.links.items():
            tx = link.tx
            rows.append(
                {
                    "addr": repr(addr),
                    "loss": round(tx.loss, 4),
                    "srtt_ms": None if tx.srtt is None else round(tx.srtt * 1000, 2),
                    "retransmit": self.mode == "on" or tx.retransmit,
                    "buffered": len(tx.buffer),
                }
            )
        return rows


def _older(top: int, seq: int) -> int:
    """How far ``seq`` lies behind ``top`` (0 when equal), modulo the sequence space."""
    return (top - seq) % SEQ_MOD


def _oldest(top: int, a: int, b: int) -> int:
    return a if _older(top, a) >= _older(top, b) else b


def _parse(frame: bytes) -> tuple[int, int, int, int, int, int, list[tuple[int, int]]]:
    if len(frame) < OVERHEAD:
        raise FrameError(f"link frame truncated ({len(frame)} < {OVERHEAD} bytes)")
    _, flags, epoch, seq, ack_epoch, top, bits = HEADER.unpack_from(frame)
    if flags & ~(F_DATA | F_ACK) or not flags:
        raise FrameError(f"link frame: bad flags {flags:#x}")
    extra: list[tuple[int, int]] = []
    if flags & F_DATA:
        if epoch == 0:
            raise FrameError("link frame: epoch 0")
        inner = frame[OVERHEAD:]
        if len(inner) < wire.DATA_HEADER_LEN or inner[0] != _DATA_BYTE:
            raise FrameError("link frame: the inner frame is not a DATA frame")
    else:
        rest = len(frame) - OVERHEAD
        if rest % BLOCK.size or rest // BLOCK.size > MAX_EXTRA_BLOCKS:
            raise FrameError("link frame: bad ack blocks")
        extra = [
            BLOCK.unpack_from(frame, OVERHEAD + i * BLOCK.size) for i in range(rest // BLOCK.size)
        ]
    return flags, epoch, seq, ack_epoch, top, bits, extra


def encode_ack(ack_epoch: int, blocks: list[tuple[int, int]]) -> bytes:
    """A pure ack frame (for tests and tools); ``blocks`` = [(top, bits), ...], 1..8."""
    if not 1 <= len(blocks) <= MAX_EXTRA_BLOCKS + 1:
        raise ValueError("1 to 8 ack blocks")
    (top, bits), rest = blocks[0], blocks[1:]
    head = HEADER.pack(_LINK_BYTE, F_ACK, 0, 0, ack_epoch, top, bits)
    return head + b"".join(BLOCK.pack(t, b) for t, b in rest)


def encode_data(epoch: int, seq: int, frame: bytes) -> bytes:
    """A LINK frame carrying ``frame`` with no ack (for tests and tools)."""
    return HEADER.pack(_LINK_BYTE, F_DATA, epoch, seq, 0, 0, 0) + frame


def decode(frame: bytes) -> tuple[int, int, int, int, list[tuple[int, int]], bytes]:
    """(flags, epoch, seq, ack_epoch, blocks, inner frame or b"") of a LINK frame."""
    flags, epoch, seq, ack_epoch, top, bits, extra = _parse(frame)
    inner = frame[OVERHEAD:] if flags & F_DATA else b""
    return flags, epoch, seq, ack_epoch, [(top, bits), *extra], inner


class _Core(Protocol):
    def on_frame(
        self, iface: int, src: LinkAddr, frame: bytes, now: float, /
    ) -> Sequence[Action]: ...

    def on_timer(self, now: float, /) -> Sequence[Action]: ...

    def next_deadline(self) -> float: ...


class RecoveringNode:
    """A node core behind per-hop recovery, one :class:`HopRecovery` per interface:
    what the UDP and radio workers do around the core, for the simulator. Give the
    core's interfaces an MTU :data:`OVERHEAD` below the link's."""

    def __init__(
        self,
        node: _Core,
        modes: Sequence[str],
        rng: random.Random,
        params: RecoveryParams | None = None,
    ) -> None:
        self.node = node
        self.counters: collections.Counter[str] = collections.Counter()
        self.hops = [HopRecovery(m, self.counters, rng, params) for m in modes]

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        inner = self.hops[iface].receive(src, frame, now)
        actions = [] if inner is None else self.node.on_frame(iface, src, inner, now)
        return self.wrap(actions, now)

    def on_timer(self, now: float) -> list[Action]:
        actions = self.node.on_timer(now) if self.node.next_deadline() <= now else []
        return self.wrap(actions, now)

    def next_deadline(self) -> float:
        return min(self.node.next_deadline(), *(h.next_deadline() for h in self.hops))

    def wrap(self, actions: Sequence[Action], now: float) -> list[Action]:
        """What the core's ``actions`` become on the links (also for actions a caller
        got from the core directly, such as ``NodeStack.ping``)."""
        out: list[Action] = []
        for a in actions:
            if isinstance(a, SendFrame) and a.dest not in (MULTICAST, BROADCAST):
                a = SendFrame(a.iface, a.dest, self.hops[a.iface].send(a.dest, a.frame, now))
            out.append(a)
        for i, hop in enumerate(self.hops):
            out.extend(SendFrame(i, addr, frame) for addr, frame in hop.poll(now))
        return out
