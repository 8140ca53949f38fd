"""One MSP stream: the per-stream state machine behind the application API.

Sender (reliable and deadline modes): bytes written go to a SendBuffer, are cut into
segments of the path MSS when the congestion window (Veno, see congestion.py) and
the peer's receive window allow, and are retransmitted on loss. Losses are found
RACK-style (RFC 8985): a segment is lost once a segment sent after it has been
acknowledged and a reordering window has passed since it was sent, so reordered
frames are not retransmitted at once; a probe timeout (RFC 9002's PTO) covers the
tail. In deadline mode a segment that can no longer reach the peer before its
deadline is abandoned instead of retransmitted and the peer is told with SKIP.

Receiver: a Reassembly buffer orders bytes; ACKs carry the cumulative offset, the
receive window and SACK ranges, sent at once for out-of-order data and every
``ack_every`` segments otherwise, or after ``ack_delay``. The window is the free
space of the read queue, so a reader that stalls stops the sender and bounds the
memory of both ends. In deadline mode a gap is skipped when the data after it
reaches its own deadline; late data is dropped; every skipped range is reported.

Datagram mode: messages fragmented to the path MSS and reassembled in a bounded
buffer; no retransmission, no ordering.
"""

from __future__ import annotations

import bisect
import collections
import enum
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshpipe.errors import MeshpipeError
from meshpipe.identity import Sid
from meshpipe.msp import wire
from meshpipe.msp.buffers import Gap, Reassembly, SendBuffer
from meshpipe.msp.congestion import RttEstimator, Veno
from meshpipe.msp.wire import Mode, ResetCode

if TYPE_CHECKING:
    from meshpipe.msp.endpoint import Msp

TS_MASK = 0xFFFFFFFF
# RACK's reordering window grows by a quarter of the min RTT per spurious
# retransmission (RFC 8985 6.2), bounded by SRTT + 4 RTTVAR, not by the min RTT:
# per-hop recovery delivers a frame it resent a few link round trips late, often
# later than the whole min RTT, and each such frame cost an end-to-end retransmit
# and a window cut (10% per frame over 3 hops: 29-47 per 512 KiB, all spurious).
MAX_REO_FACTOR = 64


class StreamError(MeshpipeError):
    """An operation the stream's state does not allow (write after shutdown, ...)."""


class MessageTooLarge(StreamError, ValueError):
    """A datagram-mode message above the stream's maximum message size."""


class State(enum.Enum):
    SYN_SENT = "syn_sent"
    SYN_RCVD = "syn_rcvd"
    OPEN = "open"
    CLOSED = "closed"


def ts_ms(now: float) -> int:
    return int(now * 1000.0) & TS_MASK


def ms_since(now: float, ts: int) -> float:
    """Seconds from the ms timestamp ``ts`` (our clock, echoed back) to ``now``."""
    return ((ts_ms(now) - ts) & TS_MASK) / 1000.0


class _Seg:
    __slots__ = (
        "fin",
        "in_flight",
        "length",
        "lost",
        "offset",
        "origin",
        "sacked",
        "sent_at",
        "tx",
    )

    def __init__(self, offset: int, length: int, fin: bool, origin: float | None) -> None:
        self.offset = offset
        self.length = length  # payload bytes
        self.fin = fin
        self.origin = origin  # deadline mode: write time of the first byte
        self.sent_at = 0.0
        self.tx = 0
        self.in_flight = False
        self.sacked = False
        self.lost = False

    @property
    def units(self) -> int:  # offset space: a FIN takes one unit
        return self.length + (1 if self.fin else 0)

    @property
    def end(self) -> int:
        return self.offset + self.units


@dataclass(frozen=True, slots=True)
class StreamId:
    peer: bytes
    number: int

    def __str__(self) -> str:
        return f"{Sid(self.peer).short}/{self.number:08x}"


class Stream:
    """A stream as the application sees it; created by ``Msp.open`` or accepted."""

    def __init__(
        self,
        host: Msp,
        peer: bytes,
        number: int,
        port: int,
        mode: Mode,
        *,
        initiator: bool,
        budget: float,
        now: float,
    ) -> None:
        self.host = host
        self.params = host.params
        self.id = StreamId(bytes(peer), number)
        self.peer = bytes(peer)
        self.number = number
        self.port = port
        self.mode = mode
        self.initiator = initiator
        self.budget = budget
        self.opened_at = now
        self.state = State.SYN_SENT if initiator else State.SYN_RCVD
        self.reset_code: ResetCode | None = None
        self.last_recv = now
        self._last_keepalive = now
        self._hs_next = now  # handshake (re)transmission time
        self._hs_tries = 0
        self._synack_sent: dict[int, float] = {}  # acceptor: SYNACK ts -> send time
        self._dirty = True
        # -- sender
        self.rtt = RttEstimator(initial_rto=self.params.initial_rto, min_rto=self.params.min_rto)
        self._mss = self._compute_mss()
        self.cc = Veno(self._mss)
        self._sbuf = SendBuffer()
        self._snd_nxt = 0  # next offset to put in a new segment
        self._snd_una = 0  # peer has everything below this
        self._snd_max = 0  # highest end of any segment sent
        self._fin_pending = False  # shutdown asked; FIN goes after the buffered data
        self._fin_sent = False
        self.fin_acked = False
        self._segs: dict[int, _Seg] = {}
        self._order: list[int] = []  # segment offsets in stream order
        self._order_head = 0
        self._txq: collections.deque[tuple[float, int, int]] = collections.deque()
        self._lost: list[int] = []  # heap of offsets to retransmit
        self._inflight = 0
        self._peer_edge = 0  # the peer accepts offsets below this
        # (send time, offset) of the newest segment known delivered. The offset breaks
        # ties: a burst leaves with one timestamp, and "sent after" must still hold
        # only for the later segments of it (RFC 8985's end_seq tie-break).
        self._rack_xmit: tuple[float, int] = (-math.inf, -1)
        self._rack_timer = math.inf
        self._recovery_start = -math.inf
        self._pto_count = 0
        self._pto_base = now
        self._persist_at = math.inf
        self._persist_backoff = 0
        self._reo_factor = 1  # reordering window in quarters of min RTT (RACK)
        self._last_retx = -math.inf
        self._writes: collections.deque[tuple[int, float]] = collections.deque()  # deadline
        self._skip_to = 0  # deadline: offsets below this are given up by us
        self._skip_sent = 0
        self._want_writable = False
        # -- receiver
        self._reasm = Reassembly()
        self._rq: collections.deque[tuple[int, bytes]] = collections.deque()
        self.readable_bytes = 0
        self.gaps: list[Gap] = []
        self.bytes_received = 0
        self._fin_at: int | None = None
        self.eof = False
        self._unacked = 0
        self._ack_due = math.inf
        self._ack_now = False
        self._ack_dup = False
        self._echo = 0
        self._last_data_at: float | None = None
        self._data_gap = 0.0  # smoothed time between data segments (for the ACK delay)
        self._adv_edge = 0
        self._peer_ts0: int | None = None  # deadline: first ts seen, to unwrap
        self._clock_offset = math.inf  # deadline: min(arrival - sender ts)
        self._spread = 0.0  # deadline: mean of (arrival - sender ts) above that minimum
        self._seg_deadlines: list[tuple[int, float]] = []  # (offset, local deadline)
        # -- datagram mode
        self._dgram_next = 0
        self._dgram_out: collections.deque[bytes] = collections.deque()
        self._dgram_in: collections.deque[bytes] = collections.deque()
        self._frags: dict[int, _Partial] = {}
        self._frag_bytes = 0
        self.bytes_sent = 0

    # -- application API ------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """A stream moved to another endpoint (Msp.export) travels without its host."""
        state = dict(self.__dict__)
        del state["host"]
        return state

    @property
    def mss(self) -> int:
        return self._mss

    @property
    def established(self) -> bool:
        return self.state is State.OPEN

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def write_space(self) -> int:
        if self._fin_pending or self.state is State.CLOSED:
            return 0
        return max(0, self.params.send_buffer - len(self._sbuf) - self._unsent_dgram_bytes())

    @property
    def buffered(self) -> int:
        """Bytes this stream holds in memory: send buffer, reassembly, read queue."""
        return len(self._sbuf) + self._reasm.buffered + self.readable_bytes + self._frag_bytes

    @property
    def all_acked(self) -> bool:
        return self._snd_una >= self._sbuf.end

    def write(self, data: bytes, now: float) -> int:
        """Queue bytes to send; returns how many were taken (0 when the buffer is full)."""
        if self.mode is Mode.DATAGRAM:
            raise StreamError("a datagram stream sends with send_datagram()")
        if self._fin_pending:
            raise StreamError("write after shutdown")
        if self.state is State.CLOSED:
            raise StreamError(f"stream is closed ({self._reason()})")
        n = min(len(data), self.write_space)
        if n < len(data) or n == self.write_space:  # full: say when there is room again
            self._want_writable = True
        if n:
            self._sbuf.append(bytes(data[:n]))
            if self.mode is Mode.DEADLINE:
                self._writes.append((self._sbuf.end, now))
            self._touch()
        return n

    def read(self, max_bytes: int = -1) -> bytes:
        """Take bytes delivered in order (b"" when none; check ``eof``)."""
        return b"".join(data for _, data in self.read_chunks(max_bytes))

    def read_chunks(self, max_bytes: int = -1) -> list[tuple[int, bytes]]:
        """Like read(), with each run's stream offset: in deadline mode the offsets
        jump over the gaps (also reported as StreamGap events and in ``gaps``)."""
        out: list[tuple[int, bytes]] = []
        need = self.readable_bytes if max_bytes < 0 else min(max_bytes, self.readable_bytes)
        taken = 0
        while taken < need:
            offset, chunk = self._rq.popleft()
            if len(chunk) > need - taken:
                cut = need - taken
                self._rq.appendleft((offset + cut, chunk[cut:]))
                chunk = chunk[:cut]
            out.append((offset, chunk))
            taken += len(chunk)
        self.readable_bytes -= taken
        # Reopening a window the sender may be waiting on: tell it without waiting.
        grown = self._edge() - self._adv_edge
        if self.state is State.OPEN and grown >= min(self.params.recv_buffer // 4, 8 * self._mss):
            self._ack_now = True
            self._touch()
        return out

    def send_datagram(self, message: bytes, now: float) -> None:
        """Datagram mode: send one message (fragmented, unreliable)."""
        if self.mode is not Mode.DATAGRAM:
            raise StreamError("send_datagram() needs a datagram-mode stream")
        if len(message) > self.params.max_message:
            raise MessageTooLarge(
                f"message of {len(message)} bytes exceeds {self.params.max_message} bytes"
            )
        if self.state is State.CLOSED:
            raise StreamError(f"stream is closed ({self._reason()})")
        if len(self._dgram_out) >= self.params.dgram_queue:
            self.host.count("msp.dgram.drop.queue_full")
            return
        self._dgram_out.append(bytes(message))
        self._touch()

    def recv_datagram(self) -> bytes | None:
        return self._dgram_in.popleft() if self._dgram_in else None

    def shutdown(self, now: float) -> None:
        """Half-close: a FIN follows the buffered bytes. Datagram streams close."""
        if self.state is State.CLOSED or self._fin_pending:
            return
        if self.mode is Mode.DATAGRAM:
            self._send(wire.encode_rst(self.number, ResetCode.ABORTED))
            self._close(None, now)
            return
        self._fin_pending = True
        self._touch()

    def reset(self, now: float, code: ResetCode = ResetCode.ABORTED) -> None:
        """Abort: the peer gets a RST, unsent and unread data is dropped."""
        if self.state is State.CLOSED:
            return
        self._send(wire.encode_rst(self.number, code))
        self._close(code, now)

    def info(self, now: float) -> dict[str, Any]:
        return {
            "stream": str(self.id),
            "peer": str(Sid(self.peer)),
            "port": self.port,
            "mode": self.mode.name.lower(),
            "state": self.state.value,
            "initiator": self.initiator,
            "age_s": round(now - self.opened_at, 3),
            "bytes_sent": min(self._snd_una, self._sbuf.end)
            if self.mode is not Mode.DATAGRAM
            else self.bytes_sent,
            "bytes_received": self.bytes_received,
            "srtt_ms": round(self.rtt.srtt * 1000.0, 3),
            "cwnd": int(self.cc.cwnd),
            "inflight": self._inflight,
            "buffered": self.buffered,
            "gaps": len(self.gaps),
        }

    # -- driven by Msp -------------------------------------------------------------------------

    def on_segment(self, seg: wire.Segment, now: float) -> None:
        try:
            if isinstance(seg, wire.Data) and seg.short:
                seg = wire.widen_data(seg, self._reasm.next)
            elif isinstance(seg, wire.Ack) and seg.short:
                seg = wire.widen_ack(seg, self._snd_una)
        except wire.SegmentError:
            self.host.count("msp.drop.bad_segment")
            return
        self.last_recv = now
        if isinstance(seg, wire.Rst):
            self._close(seg.code, now)
            return
        if self.state is State.SYN_RCVD and not isinstance(seg, wire.Syn):
            self._established(now)
        if isinstance(seg, wire.Ack) and not self.initiator and not self.rtt.has_sample:
            sent = self._synack_sent.pop(seg.echo, None)
            if sent is not None:  # echoes one of our SYNACKs: the acceptor's first RTT
                self.rtt.sample(now - sent, now, provisional=True)
                self._synack_sent.clear()
        if isinstance(seg, wire.Syn):
            if self.state is State.SYN_RCVD:  # our SYNACK was lost: answer again
                self._echo = seg.ts
                self._hs_next = now
                self._touch()
        elif isinstance(seg, wire.SynAck):
            if self.state is State.SYN_SENT:
                self._peer_edge = seg.window
                self.rtt.sample(ms_since(now, seg.echo), now, provisional=True)
                self._established(now)
            self._echo = seg.ts
            self._ack_now = True  # confirms the handshake to the acceptor
            self._touch()
        elif self.state is State.SYN_SENT:
            self.host.count("msp.drop.before_open")
        elif isinstance(seg, wire.Data):
            self._on_data(seg, now)
        elif isinstance(seg, wire.Ack):
            self._on_ack(seg, now)
        elif isinstance(seg, wire.Skip):
            self._on_skip(seg, now)
        elif isinstance(seg, wire.Dgram):
            self._on_dgram(seg, now)

    def on_timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        # Each check repeats next_deadline()'s sum exactly: ``now - a >= b`` can be
        # false at ``now == a + b`` in floating point, which would spin the timer.
        if now >= self.last_recv + self.params.idle_timeout:
            self.host.count("msp.idle_timeout")
            self.reset(now, ResetCode.TIMEOUT)
            return
        if self.state in (State.SYN_SENT, State.SYN_RCVD):
            if now >= self.opened_at + self.params.handshake_timeout:
                self.host.count("msp.handshake_timeout")
                self._close(ResetCode.TIMEOUT, now)
                return
            if now >= self._hs_next:
                self._handshake(now)
            return
        if now >= self._ack_due:
            self._ack_now = True
        if now >= max(self.last_recv, self._last_keepalive) + self.params.keepalive_interval:
            self._last_keepalive = now
            self._send_ack(now, request=True)
        if now >= self._rack_timer:
            self._rack_timer = math.inf
            self._detect_losses(now)
        if self.mode is not Mode.DATAGRAM and now >= self._pto_deadline():
            self._on_pto(now)
        if now >= self._persist_at:
            self._persist_backoff += 1
            self._persist_at = now + min(self.rtt.rto() * 2**self._persist_backoff, 30.0)
            self._send_ack(now, request=True)
        if self.mode is Mode.DEADLINE:
            self._deadline_skip(now)
        if self._frags:
            self._expire_fragments(now)
        self.flush(now)

    def flush(self, now: float) -> None:
        """Send whatever is due: handshake, data, ACKs."""
        self._dirty = False
        if self.state is State.CLOSED:
            return
        if self.state is not State.OPEN:
            if now >= self._hs_next:
                self._handshake(now)
            return
        if self.mode is Mode.DATAGRAM:
            self._send_datagrams()
        else:
            self._transmit(now)
        if self._ack_now:
            self._send_ack(now)
        self._maybe_closed(now)

    def next_deadline(self) -> float:
        if self.state is State.CLOSED:
            return math.inf
        if self._dirty:
            return -math.inf
        idle = self.last_recv + self.params.idle_timeout
        if self.state is not State.OPEN:
            return min(self._hs_next, self.opened_at + self.params.handshake_timeout, idle)
        keepalive = max(self.last_recv, self._last_keepalive) + self.params.keepalive_interval
        t = min(idle, keepalive, self._ack_due, self._rack_timer, self._persist_at)
        if self.mode is not Mode.DATAGRAM:
            t = min(t, self._pto_deadline())
        if self.mode is Mode.DEADLINE:
            t = min(t, self._skip_deadline())
        if self._frags:
            t = min(t, min(p.first for p in self._frags.values()) + self.params.dgram_timeout)
        return t

    # -- handshake ---------------------------------------------------------------------------

    def _handshake(self, now: float) -> None:
        window = min(self.params.recv_buffer, TS_MASK)
        if self.state is State.SYN_SENT:
            budget_ms = int(self.budget * 1000)
            syn = wire.Syn(self.number, self.port, self.mode, budget_ms, window, ts_ms(now))
            self._send(wire.encode_syn(syn))
        else:
            self._send_synack(now)
        self._adv_edge = window
        self._hs_tries += 1
        self._hs_next = now + min(self.params.initial_rto * 2 ** (self._hs_tries - 1), 8.0)

    def _send_synack(self, now: float) -> None:
        window = min(self.params.recv_buffer, TS_MASK)
        ts = ts_ms(now)
        if len(self._synack_sent) < 64:
            self._synack_sent[ts] = now
        self._send(wire.encode_synack(wire.SynAck(self.number, window, ts, self._echo)))

    def _established(self, now: float) -> None:
        self.state = State.OPEN
        self._pto_base = now
        self.host.stream_established(self)

    # -- sender ---------------------------------------------------------------------------------

    def _compute_mss(self) -> int:
        room = self.host.max_plaintext(self.peer)
        head = wire.DEADLINE_DATA_HEADER_LEN if self.mode is Mode.DEADLINE else wire.DATA_HEADER_LEN
        self._short = room <= wire.SHORT_ROOM  # a radio path: short offsets (msp.wire)
        if self._short:
            head -= wire.DATA_HEADER_LEN - wire.SHORT_DATA_HEADER_LEN
        if self.mode is Mode.DATAGRAM:
            head = wire.DGRAM_HEADER_LEN
        return max(1, room - head)

    def _unsent_dgram_bytes(self) -> int:
        return sum(len(m) for m in self._dgram_out)

    def _pto_deadline(self) -> float:
        if self._inflight == 0 and not self._lost and self._skip_sent >= self._skip_to:
            return math.inf
        pto = self._pto_interval()
        cap = max(2 * pto, self.params.max_pto_backoff)
        return self._pto_base + min(pto * 2.0 ** min(self._pto_count, 30), cap, 60.0)

    def _pto_interval(self) -> float:
        return self.rtt.pto(self._max_ack_delay(), self.params.min_pto)

    def _origin_of(self, offset: int) -> float:
        """Deadline mode: the write time of the byte at ``offset``."""
        while self._writes and self._writes[0][0] <= offset:
            self._writes.popleft()
        return self._writes[0][1] if self._writes else math.inf

    def _too_late(self, origin: float | None, now: float, *, first: bool = False) -> bool:
        if origin is None:
            return False
        # A first transmission goes out while its deadline has not passed here: only
        # the receiver can tell whether it arrived in time, and without new data our
        # RTT estimate (maybe inflated by a slow session handshake) would never heal.
        owd = self.rtt.min_rtt / 2 if self.rtt.has_sample and not first else 0.0
        return now + owd > origin + self.budget

    def _transmit(self, now: float) -> None:
        mss = self._compute_mss()
        if mss != self._mss:  # the route changed: new segments follow the path MTU
            self._mss = mss
            self.cc.set_mss(mss)
            self.host.count("msp.mss_changed")
        cwnd = self.cc.cwnd
        while self._lost and (self._inflight + self._mss <= cwnd or self._inflight == 0):
            off = heapq.heappop(self._lost)
            seg = self._segs.get(off)
            if seg is None or not seg.lost:
                continue
            if self._too_late(seg.origin, now):
                self._abandon(seg)
                continue
            if seg.length > self._mss:
                self._split(seg)
            self._send_seg(seg, now)
            self._last_retx = now
            self.host.count("msp.retransmit")
        while self._inflight + self._mss <= cwnd or self._inflight == 0:
            avail = self._sbuf.end - self._snd_nxt
            if avail <= 0:
                if self._fin_pending and not self._fin_sent:
                    self._fin_sent = True
                    seg = _Seg(self._snd_nxt, 0, True, None)
                    self._add_seg(seg)
                    self._send_seg(seg, now)
                break
            room = self._peer_edge - self._snd_nxt
            if room <= 0:
                if self._persist_at == math.inf and self._inflight == 0:
                    self._persist_at = now + self.rtt.rto()
                break
            origin: float | None = None
            if self.mode is Mode.DEADLINE:
                origin = self._origin_of(self._snd_nxt)
                if self._too_late(origin, now, first=True):
                    # Never sent: skip the whole write it belongs to.
                    end = self._writes[0][0] if self._writes else self._sbuf.end
                    self.host.count("msp.deadline.expired_unsent_bytes", end - self._snd_nxt)
                    self._snd_nxt = end
                    self._snd_max = max(self._snd_max, end)
                    self._skip_to = max(self._skip_to, end)
                    continue
            n = min(self._mss, avail, room)
            seg = _Seg(self._snd_nxt, n, False, origin)
            self._snd_nxt += n
            self._add_seg(seg)
            self._send_seg(seg, now)
        if self.mode is Mode.DEADLINE:
            self._advance_skip(now)
        if self._want_writable and self.write_space >= self.params.send_buffer // 4:
            self._want_writable = False
            self.host.stream_writable(self)

    def _split(self, seg: _Seg) -> None:
        """Cut a lost segment to the current MSS (the path MTU shrank: it was dropped on
        the way); the rest becomes lost segments of their own, retransmitted next."""
        end = seg.offset + seg.length
        seg.length = self._mss
        off = seg.offset + self._mss
        while off < end:
            rest = _Seg(off, min(self._mss, end - off), False, seg.origin)
            rest.sent_at, rest.tx, rest.lost = seg.sent_at, seg.tx, True
            self._segs[off] = rest
            bisect.insort(self._order, off, lo=self._order_head)
            heapq.heappush(self._lost, off)
            off += rest.length
        self.host.count("msp.resegmented")

    def _add_seg(self, seg: _Seg) -> None:
        self._segs[seg.offset] = seg
        self._order.append(seg.offset)

    def _send_seg(self, seg: _Seg, now: float) -> None:
        payload = self._sbuf.get(seg.offset, seg.length) if seg.length else b""
        origin = None if seg.origin is None else ts_ms(seg.origin)
        self._send(
            wire.encode_data(
                self.number,
                seg.offset,
                ts_ms(now),
                payload,
                fin=seg.fin,
                origin_ts=origin,
                short=self._short,
            )
        )
        if self._inflight == 0:
            self._pto_base = now
        seg.sent_at = now
        seg.tx += 1
        seg.lost = False
        if not seg.in_flight:
            seg.in_flight = True
            self._inflight += seg.units
        self._txq.append((now, seg.offset, seg.tx))
        self._snd_max = max(self._snd_max, seg.end)
        self._persist_at = math.inf
        self._persist_backoff = 0

    def _leave_flight(self, seg: _Seg) -> None:
        if seg.in_flight:
            seg.in_flight = False
            self._inflight -= seg.units

    def _abandon(self, seg: _Seg) -> None:
        """Deadline mode: stop trying to deliver ``seg``."""
        self._leave_flight(seg)
        seg.lost = False
        seg.sacked = True  # counts as settled for the skip point and the scoreboard
        self._skip_to = max(self._skip_to, seg.end)
        self.host.count("msp.deadline.abandoned")

    def _advance_skip(self, now: float) -> None:
        """Deadline mode: tell the peer to stop waiting below the first live segment."""
        if self._skip_to <= self._snd_una:
            return
        point = self._snd_nxt
        for i in range(self._order_head, len(self._order)):
            seg = self._segs[self._order[i]]
            if not seg.sacked:
                point = seg.offset
                break
        point = min(point, self._skip_to)
        if point > self._skip_sent and point > self._snd_una:
            self._skip_sent = point
            self._send(wire.encode_skip(self.number, point))
            if self._inflight == 0:
                self._pto_base = now

    def _on_ack(self, ack: wire.Ack, now: float) -> None:
        if ack.cum > self._snd_max or any(e > self._snd_max for _, e in ack.blocks):
            self.host.count("msp.drop.ack_beyond_sent")
            return
        progress = False
        echo_hit = False  # the ACK echoes a transmission it acknowledges: a clean RTT
        newly = 0
        latest_sent: tuple[float, int] = (-math.inf, -1)
        if ack.cum >= self._snd_una:
            self._peer_edge = max(self._peer_edge, ack.cum + ack.window)
        if ack.cum > self._snd_una:
            self._snd_una = ack.cum
            progress = True
            order = self._order
            while self._order_head < len(order):
                seg = self._segs[order[self._order_head]]
                if seg.end > ack.cum:
                    break
                self._order_head += 1
                del self._segs[seg.offset]
                if not seg.sacked:
                    newly += seg.units
                    latest_sent = max(latest_sent, (seg.sent_at, seg.offset))
                    echo_hit = echo_hit or ts_ms(seg.sent_at) == ack.echo
                self._leave_flight(seg)
                seg.lost = False
                if seg.fin:
                    self.fin_acked = True
            if self._order_head > 1024 and self._order_head * 2 > len(order):
                del order[: self._order_head]
                self._order_head = 0
            self._sbuf.release(min(ack.cum, self._sbuf.end))
            self._snd_nxt = max(self._snd_nxt, min(ack.cum, self._sbuf.end))
        for start, end in ack.blocks:
            i = _bisect_left(self._order, start, self._order_head)
            while i < len(self._order):
                seg = self._segs[self._order[i]]
                if seg.end > end:
                    break
                i += 1
                if seg.offset < start or seg.sacked:
                    continue
                seg.sacked = True
                seg.lost = False
                self._leave_flight(seg)
                newly += seg.units
                latest_sent = max(latest_sent, (seg.sent_at, seg.offset))
                echo_hit = echo_hit or ts_ms(seg.sent_at) == ack.echo
                progress = True
        if echo_hit:
            self.rtt.sample(ms_since(now, ack.echo), now)
        if progress:
            app_limited = self._inflight + newly < self.cc.cwnd * 0.5
            self.cc.on_ack(newly, self.rtt, app_limited)
            self._pto_count = 0
            self._pto_base = now
            self._rack_xmit = max(self._rack_xmit, latest_sent)
        if ack.dup and now - self._last_retx < 2 * max(self.rtt.srtt, 0.001):
            # Our retransmission arrived twice: the original was only late. Widen RACK's
            # reordering window (RFC 8985 6.2) so reordering stops costing retransmits.
            self._reo_factor = min(self._reo_factor + 1, MAX_REO_FACTOR)
        self._detect_losses(now)
        if ack.ack_now:
            self._ack_now = True
        self._touch()

    def _detect_losses(self, now: float) -> None:
        if not self.rtt.has_sample:
            return
        cap = self.rtt.srtt + 4 * self.rtt.rttvar
        reo = max(min(self.rtt.min_rtt * self._reo_factor / 4, cap), 0.001)
        thresh = self.rtt.latest + reo
        txq = self._txq
        while txq:
            sent_at, off, tx = txq[0]
            seg = self._segs.get(off)
            if seg is None or seg.tx != tx or seg.sacked or not seg.in_flight:
                txq.popleft()
                continue
            if (sent_at, off) >= self._rack_xmit:
                break
            if sent_at + thresh > now:
                self._rack_timer = min(self._rack_timer, sent_at + thresh)
                break
            txq.popleft()
            self._mark_lost(seg, now)

    def _mark_lost(self, seg: _Seg, now: float) -> None:
        self._leave_flight(seg)
        seg.lost = True
        heapq.heappush(self._lost, seg.offset)
        self.host.count("msp.lost")
        if seg.sent_at > self._recovery_start:  # one window reduction per round trip
            self._recovery_start = now
            self.cc.on_loss(self.rtt)

    def _on_pto(self, now: float) -> None:
        self._pto_count += 1
        self._pto_base = now
        self.host.count("msp.pto")
        if self.mode is Mode.DEADLINE and self._skip_sent < self._skip_to:
            self._skip_sent = 0  # resend the SKIP
        if self._skip_sent > self._snd_una:
            self._send(wire.encode_skip(self.number, self._skip_sent))
        victims = self._in_flight_segments()
        if self._pto_count < 3:
            # A probe: retransmit the oldest; its ACK lets RACK find the rest.
            if victims:
                self._mark_lost(victims[0], now)
        else:
            self.cc.on_persistent_congestion(self.rtt)
            for seg in victims:
                self._requeue(seg)
        self._touch()

    def _requeue(self, seg: _Seg) -> None:
        self._leave_flight(seg)
        seg.lost = True
        heapq.heappush(self._lost, seg.offset)

    def _in_flight_segments(self) -> list[_Seg]:
        out = []
        for i in range(self._order_head, len(self._order)):
            seg = self._segs[self._order[i]]
            if seg.in_flight:
                out.append(seg)
        return out

    # -- receiver -------------------------------------------------------------------------------

    def _edge(self) -> int:
        return self._reasm.next + max(0, self.params.recv_buffer - self.readable_bytes)

    def _on_data(self, seg: wire.Data, now: float) -> None:
        if self.mode is Mode.DATAGRAM:
            self.host.count("msp.drop.bad_segment")
            return
        self._echo = seg.ts
        # The first segment after a silence (a probe after a lost flight, or the next
        # burst of an idle stream) is acked at once: the sender is waiting on it, and a
        # delayed ACK there only stretches its timeouts and RTT variance.
        quick = self._last_data_at is None or now - self._last_data_at > max(
            4 * self._data_gap, 2 * self.params.ack_delay
        )
        if self._last_data_at is not None:
            self._data_gap += (now - self._last_data_at - self._data_gap) / 8
        self._last_data_at = now
        end = seg.offset + len(seg.payload) + (1 if seg.fin else 0)
        if seg.fin:
            if self._fin_at is not None and self._fin_at != seg.offset:
                self.host.count("msp.drop.fin_moved")
                return
            if seg.offset < self._reasm.highest():
                self.host.count("msp.drop.fin_below_data")
                return
            self._fin_at = seg.offset
        elif self._fin_at is not None and end > self._fin_at:
            self.host.count("msp.drop.data_after_fin")
            return
        if end > self._edge():
            self.host.count("msp.drop.beyond_window")
            self._ack_now = True
            self._touch()
            return
        deadline = math.inf
        if self.mode is Mode.DEADLINE:
            deadline = self._local_deadline(seg, now)
            if now > deadline and not seg.fin:
                self.host.count("msp.deadline.late_dropped")
                return
        before = self._reasm.next
        data, dup = self._reasm.insert(seg.offset, seg.payload)
        if seg.fin:
            dup = seg.offset < before
        if not dup and deadline != math.inf and seg.payload:
            _insort_deadline(self._seg_deadlines, seg.offset, deadline)
        if data:
            self._deliver(before, data)
        self._check_fin()
        in_order = seg.offset == before and self._reasm.first_held() is None
        self._unacked += 1
        if dup:
            self._ack_dup = True
            self._ack_now = True
        elif not in_order or seg.fin or quick or self._unacked >= self.params.ack_every:
            self._ack_now = True
        elif self._ack_due == math.inf:
            self._ack_due = now + self._ack_delay()
        self._touch()

    def _max_ack_delay(self) -> float:
        """The longest the peer holds an ACK (its ``_ack_delay()`` cap, same params)."""
        cap = 0.25
        if self.rtt.has_sample:
            cap = min(cap, max(0.001, self.rtt.min_rtt / 2))
        return cap

    def _ack_delay(self) -> float:
        """How long an in-order segment may wait for the next before it is acked.

        On a fast path, ``params.ack_delay``. On a slow link (a radio) segments arrive
        further apart than that, so a fixed 10 ms would ACK every segment and spend a
        third of the air on ACKs: wait two segment gaps instead (one ACK per
        ``ack_every`` segments despite jitter), at most 250 ms and, once the RTT is
        known, half the smallest RTT, so the delay never dominates the sender's RTT
        samples (its loss timers and queue estimate read them)."""
        return min(self._max_ack_delay(), max(self.params.ack_delay, 2.0 * self._data_gap))

    def _deliver(self, offset: int, data: bytes) -> None:
        self._rq.append((offset, data))
        self.readable_bytes += len(data)
        self.bytes_received += len(data)
        self.host.stream_readable(self)

    def _check_fin(self) -> None:
        if self._fin_at is not None and not self.eof and self._reasm.next == self._fin_at:
            self.eof = True
            self.host.stream_eof(self)

    def _cum(self) -> int:
        return self._reasm.next + (1 if self.eof else 0)

    def _send_ack(self, now: float, request: bool = False) -> None:
        if not self.initiator and not self.rtt.has_sample and self.state is State.OPEN:
            # The opener's answer to our SYNACK was lost: without an RTT the deadline
            # clock cannot be estimated, so ask again (the opener answers every SYNACK).
            self._send_synack(now)
        edge = self._edge()
        room = self.host.max_plaintext(self.peer) - wire.ACK.size
        limit = max(0, min(wire.MAX_SACK_BLOCKS, room // wire.SACK_BLOCK.size))
        cum = self._cum()
        blocks = tuple(self._reasm.ranges(limit)) if self.mode is not Mode.DATAGRAM else ()
        window = min(max(0, edge - cum), TS_MASK)
        ack = wire.Ack(
            self.number, cum, window, self._echo, blocks, request, self._ack_dup, self._short
        )
        self._send(wire.encode_ack(ack))
        self._adv_edge = edge
        self._unacked = 0
        self._ack_due = math.inf
        self._ack_now = False
        self._ack_dup = False

    # -- deadline receiver --------------------------------------------------------------------

    def _local_deadline(self, seg: wire.Data, now: float) -> float:
        """Our clock's time by which this segment's bytes must be delivered.

        The sender's clock maps to ours by the smallest (arrival - send ts) seen, less
        half the smallest RTT we know: an estimate of the one-way delay. Until many
        samples have pulled that minimum down, jitter can leave it too high, so a
        margin of twice the observed spread above it (plus the 1 ms truncation of
        each timestamp) is taken off: data is skipped slightly early, never late.
        """
        if self._peer_ts0 is None:
            self._peer_ts0 = seg.ts
            self._spread = self.rtt.rttvar / 2 if self.rtt.has_sample else self.budget / 8
        rel_ts = _unwrap(seg.ts, self._peer_ts0)
        sample = now - rel_ts
        if sample < self._clock_offset:
            self._clock_offset = sample
        else:
            self._spread += (sample - self._clock_offset - self._spread) / 8
        origin = rel_ts if seg.origin_ts is None else _unwrap(seg.origin_ts, self._peer_ts0)
        owd = self.rtt.min_rtt / 2 if self.rtt.has_sample else 0.0
        margin = min(2 * self._spread, self.budget / 4) + 0.002
        return origin + self._clock_offset - owd + self.budget - margin

    def _skip_deadline(self) -> float:
        first = self._reasm.first_held()
        if first is None or not self._seg_deadlines:
            return math.inf
        i = _bisect_deadline(self._seg_deadlines, first)
        return self._seg_deadlines[i][1] if i >= 0 else self._seg_deadlines[0][1]

    def _deadline_skip(self, now: float) -> None:
        while (first := self._reasm.first_held()) is not None and now >= self._skip_deadline():
            self._skip(first)
        # Forget deadlines of delivered bytes.
        nxt = self._reasm.next
        drop = 0
        while drop + 1 < len(self._seg_deadlines) and self._seg_deadlines[drop + 1][0] <= nxt:
            drop += 1
        if drop:
            del self._seg_deadlines[:drop]

    def _on_skip(self, seg: wire.Skip, now: float) -> None:
        if self.mode is not Mode.DEADLINE:
            self.host.count("msp.drop.bad_segment")
            return
        if self._fin_at is not None and seg.offset > self._fin_at:
            self.host.count("msp.drop.bad_segment")
            return
        if seg.offset > self._reasm.next:
            self._skip(seg.offset)
        self._check_fin()
        self._ack_now = True
        self._touch()

    def _skip(self, offset: int) -> None:
        for item in self._reasm.skip_to(offset):
            if isinstance(item, Gap):
                self.gaps.append(item)
                self.host.count("msp.deadline.skipped_bytes", item.end - item.start)
                self.host.stream_gap(self, item)
            else:
                self._deliver(item[0], item[1])
        self._ack_now = True
        self._touch()

    # -- datagram mode ------------------------------------------------------------------------

    def _send_datagrams(self) -> None:
        frag = self._mss
        while self._dgram_out:
            msg = self._dgram_out.popleft()
            count = max(1, -(-len(msg) // frag))
            number = self._dgram_next
            self._dgram_next = (self._dgram_next + 1) & TS_MASK
            for i in range(count):
                piece = msg[i * frag : (i + 1) * frag]
                self._send(wire.encode_dgram(wire.Dgram(self.number, number, i, count, piece)))
            self.bytes_sent += len(msg)
            self.host.count("msp.dgram.tx")

    def _on_dgram(self, seg: wire.Dgram, now: float) -> None:
        if self.mode is not Mode.DATAGRAM:
            self.host.count("msp.drop.bad_segment")
            return
        if seg.count == 1:
            self._dgram_deliver(seg.payload)
            return
        if seg.count * self._mss > self.params.max_message + self._mss:
            self.host.count("msp.dgram.drop.too_many_fragments")
            return
        part = self._frags.get(seg.message)
        room = self.host.fragments
        if part is None:
            while self._frags and (
                len(self._frags) >= self.params.dgram_partials
                or self._frag_bytes + len(seg.payload) > self.params.dgram_partial_bytes
                or not room.fits(self.peer, len(seg.payload))  # only our own give way
            ):
                oldest = next(iter(self._frags))
                self._hold(-self._frags.pop(oldest).size)
                self.host.count("msp.dgram.drop.evicted")
        if not room.fits(self.peer, len(seg.payload)):
            self.host.count("msp.dgram.drop.peer_budget")  # the peer's other streams hold it
            return
        if part is None:
            part = self._frags[seg.message] = _Partial(seg.count, now)
        if part.count != seg.count or seg.index in part.pieces:
            self.host.count("msp.dgram.drop.bad_fragment")
            return
        part.pieces[seg.index] = seg.payload
        part.size += len(seg.payload)
        self._hold(len(seg.payload))
        if len(part.pieces) == part.count:
            del self._frags[seg.message]
            self._hold(-part.size)
            self._dgram_deliver(b"".join(part.pieces[i] for i in range(part.count)))

    def _hold(self, delta: int) -> None:
        """Fragment bytes held: this stream's count and the peer's shared budget."""
        self._frag_bytes += delta
        self.host.fragments.change(self.peer, delta)

    def _dgram_deliver(self, message: bytes) -> None:
        if len(self._dgram_in) >= self.params.dgram_inbox:
            self.host.count("msp.dgram.drop.inbox_full")
            return
        self._dgram_in.append(message)
        self.bytes_received += len(message)
        self.host.count("msp.dgram.rx")
        self.host.stream_readable(self)

    def _expire_fragments(self, now: float) -> None:
        for number, part in list(self._frags.items()):
            if now >= part.first + self.params.dgram_timeout:
                del self._frags[number]
                self._hold(-part.size)
                self.host.count("msp.dgram.drop.incomplete")

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, plaintext: bytes) -> None:
        self.host.emit(self.peer, plaintext)

    def _touch(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.host.mark_dirty(self)

    def _reason(self) -> str:
        return "closed" if self.reset_code is None else self.reset_code.name.lower()

    def _maybe_closed(self, now: float) -> None:
        if self.mode is Mode.DATAGRAM:
            return
        if self.fin_acked and self.eof:
            self._close(None, now)

    def _close(self, code: ResetCode | None, now: float) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.reset_code = code
        self._lost.clear()
        self._txq.clear()
        self._inflight = 0
        self._frags.clear()
        self._hold(-self._frag_bytes)  # give the peer's reassembly budget back
        self.host.stream_closed(self, self._cum(), now)


class _Partial:
    __slots__ = ("count", "first", "pieces", "size")

    def __init__(self, count: int, now: float) -> None:
        self.count = count
        self.first = now
        self.pieces: dict[int, bytes] = {}
        self.size = 0


def _unwrap(ts: int, ref: int) -> float:
    """Seconds of ``ts`` relative to ``ref`` on a 32-bit millisecond clock."""
    d = (ts - ref) & TS_MASK
    if d >= 1 << 31:
        d -= 1 << 32
    return d / 1000.0


def _bisect_left(a: list[int], x: int, lo: int) -> int:
    hi = len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _insort_deadline(a: list[tuple[int, float]], offset: int, deadline: float) -> None:
    i = len(a)
    while i > 0 and a[i - 1][0] > offset:
        i -= 1
    a.insert(i, (offset, deadline))


def _bisect_deadline(a: list[tuple[int, float]], offset: int) -> int:
    """Index of the last entry whose offset is <= ``offset`` (-1 if none)."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid][0] <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


__all__ = ["MessageTooLarge", "State", "Stream", "StreamError", "StreamId"]
