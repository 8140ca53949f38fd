"""Trace: every hop on the path to a node, with its SID, name and RTT (like mtr).

A TRACE frame (link frame kind 5) is routed hop by hop like DATA, but every node
looks at it (it is small, rare and carries no session payload), so the control plane
answers it: in the control worker for UDP hops, which pass every non-DATA frame up,
and for radio hops, whose frames all go there anyway.

Layout (fixed, big-endian; the first 66 bytes are the DATA header's)::

    0     1           2          34         66     67        75
    | v|k | hop_limit | dst SID  | src SID  | type | nonce 8 | ...
    PROBE (type 1): nothing more                                     75 bytes
    REPLY (type 2): flags u8 | name_len u8 | name | signature 64     <= 189 bytes

- A **probe** leaves the origin with hop limit k. A node that receives one answers
  if it is the destination (REPLY flag ``REACHED``), or if the hop limit runs out
  there (hop limit 1 on arrival: it is hop k); otherwise it forwards it with the hop
  limit lowered, like DATA.
- A **reply** goes from the answering node to the probe's origin (hop limit 64),
  forwarded the same way. It names the answering node (its SID is the frame's
  source, the ``name`` is its configured ``[node] name``, cut to 48 UTF-8 bytes so a
  reply fits the smallest mesh MTU, 192) and is signed by it with Ed25519 over
  ``"meshpipe-trace-v1" | origin SID | replier SID | nonce | flags | name``. The
  origin accepts a reply only for a nonce it sent (random 64 bits) and a signature
  that verifies under the source SID, so no node can answer for another one.
- The origin sends probes for k = 1 .. the route's hop count + 2 in each round
  (``rounds``, ``interval`` apart) and measures each hop's RTT on its own clock.

Answers are rate-limited (token bucket, ``reply_rate`` per second): a probe costs
its answerer a signature, so a flood of probes must not. Bad input never raises.

Counters: ``trace.probe.tx``, ``trace.probe.rx``, ``trace.reply.tx``,
``trace.reply.rx``, ``trace.forwarded``, ``trace.drop.malformed``,
``trace.drop.hop_limit``, ``trace.drop.no_route``, ``trace.drop.rate_limited``,
``trace.drop.bad_signature``, ``trace.drop.unexpected`` (a reply for no probe of ours).
"""

from __future__ import annotations

import collections
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from meshpipe import wire
from meshpipe.actions import Action, SendFrame
from meshpipe.errors import FrameError
from meshpipe.forwarding import Forwarder
from meshpipe.identity import Identity, Sid

KIND_TRACE = wire.KIND_TRACE
PROBE = 1
REPLY = 2
REACHED = 0x01
MAX_NAME_BYTES = 48
SIG_LEN = 64
DOMAIN = b"meshpipe-trace-v1"
_HEAD = struct.Struct("!BB32s32sBQ")  # kind byte, hop limit, dst, src, type, nonce
HEAD_LEN = _HEAD.size  # 75
MAX_TRACES = 16  # traces running at once
MAX_HOPS = 32
MAX_NAMES = 4096  # names remembered from trace replies


@dataclass(frozen=True, slots=True)
class TraceFrame:
    hop_limit: int
    dst: bytes
    src: bytes
    type: int
    nonce: int
    flags: int = 0
    name: str = ""
    signature: bytes = b""


def _name_bytes(name: str) -> bytes:
    raw = name.encode()[:MAX_NAME_BYTES]
    return raw.decode(errors="ignore").encode()  # never a cut multi-byte character


def _signed(origin: bytes, replier: bytes, nonce: int, flags: int, name: bytes) -> bytes:
    return DOMAIN + origin + replier + struct.pack("!QB", nonce, flags) + name


def encode_probe(dst: bytes, src: bytes, nonce: int, hop_limit: int) -> bytes:
    return _HEAD.pack(wire.kind_byte(KIND_TRACE)[0], hop_limit, dst, src, PROBE, nonce)


def encode_reply(identity: Identity, origin: bytes, nonce: int, flags: int, name: str) -> bytes:
    me = bytes(identity.sid)
    raw = _name_bytes(name)
    sig = identity.sign(_signed(origin, me, nonce, flags, raw))
    head = _HEAD.pack(
        wire.kind_byte(KIND_TRACE)[0], wire.DEFAULT_HOP_LIMIT, origin, me, REPLY, nonce
    )
    return head + bytes((flags, len(raw))) + raw + sig


def decode(frame: bytes) -> TraceFrame:
    """Parse a TRACE frame; FrameError for anything malformed (signatures unchecked)."""
    if len(frame) < HEAD_LEN:
        raise FrameError(f"trace frame truncated ({len(frame)} bytes)")
    first, hop_limit, dst, src, typ, nonce = _HEAD.unpack_from(frame)
    if first != wire.kind_byte(KIND_TRACE)[0]:
        raise FrameError("not a trace frame")
    if typ == PROBE:
        if len(frame) != HEAD_LEN:
            raise FrameError("trace probe with trailing bytes")
        return TraceFrame(hop_limit, dst, src, PROBE, nonce)
    if typ != REPLY:
        raise FrameError(f"unknown trace type {typ}")
    if len(frame) < HEAD_LEN + 2:
        raise FrameError("trace reply truncated")
    flags, n = frame[HEAD_LEN], frame[HEAD_LEN + 1]
    if n > MAX_NAME_BYTES or len(frame) != HEAD_LEN + 2 + n + SIG_LEN:
        raise FrameError("trace reply has a bad length")
    raw = frame[HEAD_LEN + 2 : HEAD_LEN + 2 + n]
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise FrameError("trace reply name is not UTF-8") from None
    return TraceFrame(hop_limit, dst, src, REPLY, nonce, flags, name, frame[-SIG_LEN:])


def verify_reply(tf: TraceFrame) -> bool:
    msg = _signed(tf.dst, tf.src, tf.nonce, tf.flags, tf.name.encode())
    return Sid(tf.src).verify(msg, tf.signature)


@dataclass
class TraceHop:
    """What is known of hop ``hop`` (1 = the first neighbour) after a trace."""

    hop: int
    sid: bytes | None = None
    name: str = ""
    reached: bool = False
    sent: int = 0
    rtts: list[float] = field(default_factory=list)  # seconds

    def as_json(self) -> dict[str, Any]:
        rtt = min(self.rtts) * 1000 if self.rtts else None
        return {
            "hop": self.hop,
            "sid": None if self.sid is None else self.sid.hex(),
            "name": self.name,
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "rtt_avg_ms": round(1000 * sum(self.rtts) / len(self.rtts), 3) if self.rtts else None,
            "sent": self.sent,
            "received": len(self.rtts),
        }


@dataclass
class _Trace:
    tid: int
    dst: bytes
    max_hops: int
    rounds: int
    interval: float
    timeout: float
    next_round: float
    sent_rounds: int = 0
    last_send: float = -math.inf
    hops: dict[int, TraceHop] = field(default_factory=dict)
    done: bool = False

    def reached_at(self) -> int | None:
        return min((h.hop for h in self.hops.values() if h.reached and h.rtts), default=None)

    def result(self) -> list[TraceHop]:
        """Hops in path order up to the destination (the last one), or all probed."""
        last = self.reached_at() or self.max_hops
        return [self.hops.get(k, TraceHop(k)) for k in range(1, last + 1)]


class Tracer:
    """The trace protocol of one node: answers and forwards probes, runs traces."""

    def __init__(
        self,
        identity: Identity,
        fwd: Forwarder,
        rng: random.Random,
        name: str = "",
        *,
        reply_rate: float = 20.0,
        reply_burst: float = 40.0,
    ) -> None:
        self.identity = identity
        self.sid = bytes(identity.sid)
        self.fwd = fwd
        self.rng = rng
        self.name = name
        self.reply_rate = reply_rate
        self.reply_burst = reply_burst
        self._tokens = reply_burst
        self._tokens_at = -math.inf
        self.counters: collections.Counter[str] = collections.Counter()
        self._traces: dict[int, _Trace] = {}
        # SID -> name, from verified replies: lets `trace NAME` find a node traced before.
        self.names: dict[bytes, str] = {}
        self._probes: dict[int, tuple[int, int, float]] = {}  # nonce -> trace, hop, sent
        self._next_id = 0

    # -- running a trace --------------------------------------------------------------------

    def start(
        self,
        dst: bytes,
        route_hops: int,
        now: float,
        *,
        rounds: int = 3,
        interval: float = 0.3,
        timeout: float = 2.0,
    ) -> int:
        """Begin a trace to ``dst`` (probes leave at the next ``on_timer``); its id."""
        if len(self._traces) >= MAX_TRACES:
            raise ValueError(f"at most {MAX_TRACES} traces at once")
        self._next_id += 1
        tid = self._next_id
        max_hops = max(1, min(MAX_HOPS, route_hops + 2))
        self._traces[tid] = _Trace(tid, bytes(dst), max_hops, rounds, interval, timeout, now)
        return tid

    def result(self, tid: int) -> list[TraceHop] | None:
        """The hops of a finished trace (and forgets it); None while it runs."""
        tr = self._traces.get(tid)
        if tr is None or not tr.done:
            return None
        del self._traces[tid]
        for nonce in [n for n, p in self._probes.items() if p[0] == tid]:
            del self._probes[nonce]
        return tr.result()

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        for tr in self._traces.values():
            if tr.done:
                continue
            if tr.sent_rounds < tr.rounds and now >= tr.next_round:
                self._send_round(tr, now, out)
            self._check_done(tr, now)
        return out

    def next_deadline(self) -> float:
        t = math.inf
        for tr in self._traces.values():
            if tr.done:
                continue
            t = min(t, tr.next_round if tr.sent_rounds < tr.rounds else tr.last_send + tr.timeout)
        return t

    def _send_round(self, tr: _Trace, now: float, out: list[Action]) -> None:
        tr.sent_rounds += 1
        tr.next_round = now + tr.interval
        tr.last_send = now
        hop = self.fwd.table.get(tr.dst)
        if hop is None:
            self.counters["trace.drop.no_route"] += 1
            return
        for k in range(1, tr.max_hops + 1):
            reached = tr.reached_at()
            if reached is not None and k > reached:
                break
            nonce = self.rng.getrandbits(64)
            self._probes[nonce] = (tr.tid, k, now)
            tr.hops.setdefault(k, TraceHop(k)).sent += 1
            out.append(SendFrame(hop[0], hop[1], encode_probe(tr.dst, self.sid, nonce, k)))
            self.counters["trace.probe.tx"] += 1

    def _check_done(self, tr: _Trace, now: float) -> None:
        if tr.sent_rounds < tr.rounds:
            return
        last = tr.reached_at()
        waiting = any(
            p[0] == tr.tid and (last is None or p[1] <= last) for p in self._probes.values()
        )
        if not waiting or now >= tr.last_send + tr.timeout:
            tr.done = True

    # -- frames -------------------------------------------------------------------------------

    def on_frame(self, frame: bytes, now: float) -> list[Action]:
        try:
            tf = decode(frame)
        except FrameError:
            self.counters["trace.drop.malformed"] += 1
            return []
        if tf.dst == self.sid:
            if tf.type == PROBE:
                self.counters["trace.probe.rx"] += 1
                return self._reply(tf, REACHED, now)
            return self._on_reply(tf, now)
        if tf.type == PROBE and tf.hop_limit <= 1:
            self.counters["trace.probe.rx"] += 1
            return self._reply(tf, 0, now)  # the hop limit runs out here: we are hop k
        return self._forward(frame, tf)

    def _forward(self, frame: bytes, tf: TraceFrame) -> list[Action]:
        if tf.hop_limit <= 1:
            self.counters["trace.drop.hop_limit"] += 1
            return []
        return self._route(tf.dst, wire.with_hop_limit(frame, tf.hop_limit - 1), "trace.forwarded")

    def _route(self, dst: bytes, frame: bytes, counter: str) -> list[Action]:
        hop = self.fwd.table.get(dst)
        if hop is None:
            self.counters["trace.drop.no_route"] += 1
            return []
        self.counters[counter] += 1
        return [SendFrame(hop[0], hop[1], frame)]

    def _reply(self, tf: TraceFrame, flags: int, now: float) -> list[Action]:
        if tf.src == self.sid:
            return []
        if not self._take_token(now):
            self.counters["trace.drop.rate_limited"] += 1
            return []
        frame = encode_reply(self.identity, tf.src, tf.nonce, flags, self.name)
        return self._route(tf.src, frame, "trace.reply.tx")

    def _take_token(self, now: float) -> bool:
        elapsed = now - self._tokens_at if self._tokens_at > -math.inf else 0.0
        self._tokens = min(self.reply_burst, self._tokens + max(0.0, elapsed) * self.reply_rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _on_reply(self, tf: TraceFrame, now: float) -> list[Action]:
        probe = self._probes.get(tf.nonce)
        if tf.type != REPLY or probe is None:
            self.counters["trace.drop.unexpected"] += 1
            return []
        if not verify_reply(tf):
            self.counters["trace.drop.bad_signature"] += 1
            return []
        del self._probes[tf.nonce]
        tid, k, sent = probe
        tr = self._traces.get(tid)
        if tr is None:
            return []
        self.counters["trace.reply.rx"] += 1
        hop = tr.hops.setdefault(k, TraceHop(k))
        hop.sid = tf.src
        hop.name = tf.name
        if tf.name and (tf.src in self.names or len(self.names) < MAX_NAMES):
            self.names[tf.src] = tf.name
        hop.reached = bool(tf.flags & REACHED)
        hop.rtts.append(now - sent)
        self._check_done(tr, now)
        return []


__all__ = [
    "KIND_TRACE",
    "TraceFrame",
    "TraceHop",
    "Tracer",
    "decode",
    "encode_probe",
    "encode_reply",
    "verify_reply",
]
