"""Msp: all streams of one node, multiplexed over its sessions (session protocol 2).

The node stack hands it every session plaintext whose first byte is 2 and wakes it
at ``next_deadline()``; it answers with ``(destination SID, plaintext)`` pairs. The
application side is :meth:`Msp.open`, :meth:`Msp.listen` and the returned
:class:`~meshpipe.msp.stream.Stream` objects, plus :meth:`Msp.events` for what
happened since the last call (accepted, readable, writable, gap, EOF, closed,
refused).

A stream is named by (peer SID, 32-bit number). The opener picks the number; its top
bit is 1 when the opener's SID sorts above the peer's, so two nodes opening streams
to each other at the same moment can never pick the same name.

Limits (MspParams, ``[limits]`` in the config): ``max_streams`` /
``max_streams_per_peer`` streams in all; of those, streams a peer opened that are
still in SYN_RCVD (it never answered our SYNACK) at most
``max_syn_streams_per_peer`` per peer and ``max_syn_streams`` in all, except that a
peer holding fewer than ``SYN_RESERVE`` always gets in (``max_streams`` still
bounds everything), so half-open floods cannot take the stream table nor lock
out a peer opening its first stream; datagram fragments being reassembled at most
``max_reassembly`` bytes in all and ``max_reassembly_per_peer`` per peer
(``buffers.PeerBudget``). A SYN past
a cap is answered with an RST (overloaded), counted in ``msp.syn_overloaded`` and
reported as a StreamRefused at most once per ``REFUSED_REPORT_EVERY`` seconds.

Counters (``Msp.counters``): ``msp.rx``, ``msp.tx``, ``msp.drop.malformed``,
``msp.drop.unknown_stream``, ``msp.refused``, ``msp.denied``, ``msp.overloaded``,
``msp.syn_overloaded``,
``msp.retransmit``, ``msp.lost``, ``msp.pto``, ``msp.deadline.*``, ``msp.dgram.*``
and the per-stream drops named in stream.py.
"""

from __future__ import annotations

import collections
import math
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from meshpipe.msp import wire
from meshpipe.msp.buffers import Gap, PeerBudget
from meshpipe.msp.stream import State, Stream, StreamError
from meshpipe.msp.wire import DATAPLANE_SPACE, Mode, ResetCode
from meshpipe.session import max_plaintext


@dataclass(frozen=True)
class MspParams:
    send_buffer: int = 1 << 20  # bytes a stream holds unacknowledged (write() stops here)
    recv_buffer: int = 1 << 20  # bytes a stream holds unread (the advertised window)
    initial_rto: float = 1.0
    min_rto: float = 0.2
    min_pto: float = 0.005  # floor of the probe timeout (tail losses)
    # The probe timeout backs off (doubles) while probes go unanswered, up to this
    # (or two unbacked timeouts, if longer): on a path that drops a tenth of its
    # batches, a run of ten lost probes is not rare, and a minute of silence after
    # it costs more than a probe a second ever could.
    max_pto_backoff: float = 1.0
    ack_every: int = 2  # segments per immediate ACK when in order
    ack_delay: float = 0.01
    # An open waits this long for the session and the SYN/SYNACK to get through: on a
    # path that loses half of its round trips, 20 s of 1-2-4-8 s session handshake
    # retries fail about one open in twenty.
    handshake_timeout: float = 60.0
    keepalive_interval: float = 10.0
    idle_timeout: float = 60.0
    # A closed stream still answers its peer's retransmitted last segments this long:
    # longer than the peer's backed-off retransmission timer (up to 60 s) on a slow
    # radio, else the peer's FIN meets an unknown stream and is reset.
    linger: float = 120.0
    max_linger: int = 8192  # closed streams remembered at once (the oldest go first)
    max_streams: int = 4096
    max_streams_per_peer: int = 512
    default_budget: float = 0.2  # deadline mode latency budget, seconds
    max_budget: float = 60.0
    max_message: int = 65535  # datagram mode
    dgram_queue: int = 256  # messages waiting for the stream to open
    dgram_inbox: int = 1024  # messages received and not yet read
    dgram_partials: int = 64  # messages being reassembled at once, per stream
    dgram_partial_bytes: int = 256 * 1024
    dgram_timeout: float = 2.0  # an incomplete message is dropped after this long
    max_syn_streams: int = 1024  # streams peers opened that are still half-open
    max_syn_streams_per_peer: int = 64
    max_reassembly: int = 16 << 20  # datagram fragment bytes held, all peers
    max_reassembly_per_peer: int = 1 << 20


REFUSED_REPORT_EVERY = 10.0  # seconds between two StreamRefused for SYNs past a cap
SYN_RESERVE = 4  # half-open streams any peer may have, even past max_syn_streams


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamEstablished:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamReadable:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamWritable:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamGap:
    stream: Stream
    gap: Gap


@dataclass(frozen=True, slots=True)
class StreamEof:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamClosed:
    stream: Stream
    code: ResetCode | None  # None: closed normally


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """A peer's open was turned away here (logged by the shell as acl.denied etc.)."""

    peer: bytes
    port: int
    code: ResetCode


MspEvent = (
    StreamAccepted
    | StreamEstablished
    | StreamReadable
    | StreamWritable
    | StreamGap
    | StreamEof
    | StreamClosed
    | StreamRefused
)


@dataclass
class _Listener:
    port: int
    allow: Callable[[bytes], bool] | None
    modes: frozenset[Mode]


class Msp:
    """Every stream of one node."""

    def __init__(
        self,
        local_sid: bytes,
        path_mtu: Callable[[bytes], int],
        params: MspParams | None = None,
        *,
        number_space: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        if number_space not in (0, DATAPLANE_SPACE):
            raise ValueError("number_space is 0 or DATAPLANE_SPACE")
        self.sid = bytes(local_sid)
        # Bit 30 of the numbers this endpoint allocates: lets a receiver hand the
        # segments of the data plane's streams (the tunnel's) to their own endpoint.
        self.number_space = number_space
        # Where each peer's stream numbers start: random when an rng is given, so a
        # restarted process does not reuse the numbers of streams its peers still
        # hold open (their SYNs would be taken for duplicates).
        self._rng = rng
        self.params = params or MspParams()
        self._path_mtu = path_mtu
        self._streams: dict[tuple[bytes, int], Stream] = {}
        self._per_peer: collections.Counter[bytes] = collections.Counter()
        # Streams peers opened that have not completed the handshake (SYN_RCVD).
        self._half_open: dict[tuple[bytes, int], None] = {}
        self._half_open_per_peer: collections.Counter[bytes] = collections.Counter()
        self._syn_refused_at = -math.inf
        self.fragments = PeerBudget(self.params.max_reassembly_per_peer, self.params.max_reassembly)
        self._listeners: dict[int, _Listener] = {}
        self._linger: dict[tuple[bytes, int], tuple[float, int]] = {}
        self._next_number: dict[bytes, int] = {}
        self._dirty: dict[Stream, None] = {}
        self._out: list[tuple[bytes, bytes]] = []
        self._events: list[MspEvent] = []
        self._readable_flagged: set[Stream] = set()
        self.counters: collections.Counter[str] = collections.Counter()

    # -- application API --------------------------------------------------------------------

    def listen(
        self,
        port: int,
        *,
        allow: Callable[[bytes], bool] | None = None,
        modes: frozenset[Mode] = frozenset(Mode),
    ) -> None:
        """Accept streams to ``port``; ``allow(peer_sid)`` may refuse them (DENIED)."""
        if not 1 <= port <= 65535:
            raise StreamError(f"port {port} is out of range 1-65535")
        if port in self._listeners:
            raise StreamError(f"port {port} already has a listener")
        self._listeners[port] = _Listener(port, allow, modes)

    def unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    def listening(self) -> list[int]:
        return sorted(self._listeners)

    def is_listening(self, port: int) -> bool:
        return port in self._listeners

    def open(
        self,
        dst: bytes,
        port: int,
        now: float,
        mode: Mode = Mode.RELIABLE,
        budget: float | None = None,
    ) -> Stream:
        """Start a stream to (``dst``, ``port``); write to it at once, it sends when open."""
        dst = bytes(dst)
        if not 1 <= port <= 65535:
            raise StreamError(f"port {port} is out of range 1-65535")
        if len(self._streams) >= self.params.max_streams:
            raise StreamError(f"too many streams ({self.params.max_streams})")
        b = self.params.default_budget if budget is None else budget
        if not 0.0 < b <= self.params.max_budget:
            raise StreamError(f"deadline budget {b} s is out of range")
        number = self._allocate(dst)
        st = Stream(self, dst, number, port, mode, initiator=True, budget=b, now=now)
        self._add(st)
        return st

    def events(self) -> list[MspEvent]:
        out, self._events = self._events, []
        self._readable_flagged.clear()
        return out

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def get(self, peer: bytes, number: int) -> Stream | None:
        return self._streams.get((bytes(peer), number))

    def info(self, now: float) -> list[dict[str, Any]]:
        return [s.info(now) for s in self._streams.values()]

    def max_plaintext(self, dst: bytes) -> int:
        return max_plaintext(self._path_mtu(dst))

    # -- moving a stream to another endpoint (another process) --------------------------------

    def export(self, stream: Stream, max_bytes: int) -> bytes | None:
        """``stream`` as bytes for :meth:`adopt` in another endpoint of the same node,
        or None if it cannot move: closed, in datagram mode (its fragments count
        against this endpoint's budget) or bigger than ``max_bytes``. Once the bytes
        have been handed over, :meth:`release` it here, and make its segments reach
        the new endpoint from then on."""
        key = (stream.peer, stream.number)
        if stream.closed or stream.mode is Mode.DATAGRAM or self._streams.get(key) is not stream:
            return None
        if stream.buffered + stream.readable_bytes > max_bytes:
            return None  # cheap test first: the buffers dominate the size
        blob = pickle.dumps(stream, protocol=pickle.HIGHEST_PROTOCOL)
        return blob if len(blob) <= max_bytes else None

    def release(self, stream: Stream) -> None:
        """Forget an exported stream, silently (no RST: it lives on elsewhere)."""
        key = (stream.peer, stream.number)
        if self._streams.get(key) is not stream:
            return
        del self._streams[key]
        self._per_peer[stream.peer] -= 1
        if self._per_peer[stream.peer] <= 0:
            del self._per_peer[stream.peer]
        self._dirty.pop(stream, None)
        self._readable_flagged.discard(stream)
        self._half_open_done(stream)
        self.counters["msp.exported"] += 1

    def adopt(self, blob: bytes, now: float) -> Stream:
        """A stream another endpoint of this node exported (trusted bytes: only ever
        from this node's own control worker). Raises StreamError if it cannot stay."""
        st = pickle.loads(blob)  # from our own control worker only, see above
        if not isinstance(st, Stream):
            raise StreamError("not a stream")
        key = (st.peer, st.number)
        if key in self._streams or len(self._streams) >= self.params.max_streams:
            raise StreamError(f"cannot adopt stream {st.id}")
        st.host = self
        self._add(st)
        self.counters["msp.adopted"] += 1
        if st.readable_bytes or st.eof:
            self.stream_readable(st)
        return st

    def holds(self, peer: bytes, number: int | None) -> bool:
        """Is (peer, number) one of this endpoint's streams, open or lingering?"""
        if number is None:
            return False
        key = (peer, number)
        return key in self._streams or key in self._linger

    # -- the session-protocol interface (NodeStack) -------------------------------------------

    def on_plaintext(
        self, src: bytes, plaintext: bytes, hops: int, now: float
    ) -> Sequence[tuple[bytes, bytes]]:
        self.counters["msp.rx"] += 1
        try:
            seg = wire.decode(plaintext)
        except wire.SegmentError:
            self.counters["msp.drop.malformed"] += 1
            return self._take(now)
        src = bytes(src)
        st = self._streams.get((src, seg.stream))
        if st is not None:
            st.on_segment(seg, now)
        elif isinstance(seg, wire.Syn):
            self._on_syn(src, seg, now)
        else:
            self._on_unknown(src, seg)
        return self._take(now)

    def on_timer(self, now: float) -> Sequence[tuple[bytes, bytes]]:
        for st in list(self._streams.values()):
            if st.next_deadline() <= now:
                st.on_timer(now)
        # Linger entries are kept in expiry order (one fixed linger time), oldest first.
        while self._linger and next(iter(self._linger.values()))[0] <= now:
            del self._linger[next(iter(self._linger))]
        return self._take(now)

    def next_deadline(self) -> float:
        if self._dirty or self._out:
            return -math.inf
        t = min((s.next_deadline() for s in self._streams.values()), default=math.inf)
        if self._linger:
            t = min(t, next(iter(self._linger.values()))[0])
        return t

    # -- called by streams ----------------------------------------------------------------------

    def emit(self, dst: bytes, plaintext: bytes) -> None:
        self._out.append((dst, plaintext))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def mark_dirty(self, stream: Stream) -> None:
        self._dirty[stream] = None

    def stream_established(self, stream: Stream) -> None:
        self._half_open_done(stream)
        self._events.append(StreamEstablished(stream))

    def stream_readable(self, stream: Stream) -> None:
        if stream not in self._readable_flagged:
            self._readable_flagged.add(stream)
            self._events.append(StreamReadable(stream))

    def stream_writable(self, stream: Stream) -> None:
        self._events.append(StreamWritable(stream))

    def stream_gap(self, stream: Stream, gap: Gap) -> None:
        self._events.append(StreamGap(stream, gap))

    def stream_eof(self, stream: Stream) -> None:
        self._events.append(StreamEof(stream))

    def stream_closed(self, stream: Stream, cum: int, now: float) -> None:
        key = (stream.peer, stream.number)
        if self._streams.pop(key, None) is not None:
            self._per_peer[stream.peer] -= 1
            if self._per_peer[stream.peer] <= 0:
                del self._per_peer[stream.peer]
        self._linger.pop(key, None)  # re-inserted at the end: the dict stays in expiry order
        self._linger[key] = (now + self.params.linger, cum)
        while len(self._linger) > self.params.max_linger:
            del self._linger[next(iter(self._linger))]
        self._dirty.pop(stream, None)
        self._half_open_done(stream)
        self._events.append(StreamClosed(stream, stream.reset_code))

    # -- internals ------------------------------------------------------------------------------

    def _take(self, now: float) -> list[tuple[bytes, bytes]]:
        while self._dirty:
            st = next(iter(self._dirty))
            del self._dirty[st]
            st.flush(now)
        out, self._out = self._out, []
        self.counters["msp.tx"] += len(out)
        return out

    def _allocate(self, peer: bytes) -> int:
        top = 0x80000000 if self.sid > peer else 0
        n = self._next_number.get(peer, -1)
        if n < 0:
            n = self._rng.randrange(1 << 30) if self._rng is not None else 0
        for _ in range(1 << 16):
            n = (n + 1) & 0x3FFFFFFF
            number = top | self.number_space | n
            key = (peer, number)
            if key not in self._streams and key not in self._linger:
                self._next_number[peer] = n
                return number
        raise StreamError("no free stream number")  # pragma: no cover - 2**31 streams

    def _add(self, st: Stream) -> None:
        self._streams[(st.peer, st.number)] = st
        self._per_peer[st.peer] += 1
        self.mark_dirty(st)

    def _half_open_done(self, stream: Stream) -> None:
        key = (stream.peer, stream.number)
        if key in self._half_open:
            del self._half_open[key]
            self._half_open_per_peer[stream.peer] -= 1
            if self._half_open_per_peer[stream.peer] <= 0:
                del self._half_open_per_peer[stream.peer]

    def _refuse(self, src: bytes, seg: wire.Syn, code: ResetCode, counter: str) -> None:
        self.counters[counter] += 1
        self.emit(src, wire.encode_rst(seg.stream, code))
        self._events.append(StreamRefused(src, seg.port, code))

    def _on_syn(self, src: bytes, seg: wire.Syn, now: float) -> None:
        if (src, seg.stream) in self._linger:
            return  # a late duplicate of a finished stream's SYN
        if (seg.stream & 0x80000000) == (0x80000000 if self.sid > src else 0):
            self.counters["msp.drop.bad_stream_number"] += 1
            self.emit(src, wire.encode_rst(seg.stream, ResetCode.PROTOCOL))
            return
        listener = self._listeners.get(seg.port)
        if listener is None or seg.mode not in listener.modes:
            self._refuse(src, seg, ResetCode.REFUSED, "msp.refused")
            return
        if listener.allow is not None and not listener.allow(src):
            self._refuse(src, seg, ResetCode.DENIED, "msp.denied")
            return
        if (
            len(self._streams) >= self.params.max_streams
            or self._per_peer[src] >= self.params.max_streams_per_peer
        ):
            self._refuse(src, seg, ResetCode.OVERLOADED, "msp.overloaded")
            return
        half_open = self._half_open_per_peer[src]
        if half_open >= self.params.max_syn_streams_per_peer or (
            # Past the overall cap only peers already holding several are turned
            # away: a peer opening its first few still gets in (max_streams bounds it).
            len(self._half_open) >= self.params.max_syn_streams and half_open >= SYN_RESERVE
        ):
            # A flood: answer each SYN (so an honest opener learns at once) but report
            # it upwards, where it becomes a log line, only now and then.
            self.counters["msp.syn_overloaded"] += 1
            self.emit(src, wire.encode_rst(seg.stream, ResetCode.OVERLOADED))
            if now - self._syn_refused_at >= REFUSED_REPORT_EVERY:
                self._syn_refused_at = now
                self._events.append(StreamRefused(src, seg.port, ResetCode.OVERLOADED))
            return
        budget = min(max(seg.budget_ms / 1000.0, 0.001), self.params.max_budget)
        st = Stream(
            self, src, seg.stream, seg.port, seg.mode, initiator=False, budget=budget, now=now
        )
        st.on_segment(seg, now)
        st._peer_edge = seg.window
        self._add(st)
        if st.state is State.SYN_RCVD:
            self._half_open[(src, seg.stream)] = None
            self._half_open_per_peer[src] += 1
        self._events.append(StreamAccepted(st))

    def _on_unknown(self, src: bytes, seg: wire.Segment) -> None:
        lingering = self._linger.get((src, seg.stream))
        if lingering is not None:
            if isinstance(seg, wire.Data):  # the peer missed our last ACK
                ack = wire.Ack(seg.stream, lingering[1], 0, seg.ts, (), False, True)
                self.emit(src, wire.encode_ack(ack))
            return
        self.counters["msp.drop.unknown_stream"] += 1
        # Datagrams too: a peer that lost its state (a restarted crypto worker) would
        # otherwise never learn that its datagram stream goes nowhere.
        if not isinstance(seg, wire.Rst):
            self.emit(src, wire.encode_rst(seg.stream, ResetCode.PROTOCOL))


__all__ = [
    "Msp",
    "MspEvent",
    "MspParams",
    "StreamAccepted",
    "StreamClosed",
    "StreamEof",
    "StreamEstablished",
    "StreamGap",
    "StreamReadable",
    "StreamRefused",
    "StreamWritable",
]
