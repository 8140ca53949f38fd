"""The data plane's sans-IO core: crypto shards, and the table they are given.

A node's sessions are split across N crypto shards (one per crypto worker process)
by a hash of the peer's SID (:func:`shard_of`), so every session's keys, nonce
counter and replay window have exactly one owner and need no locks. A shard owns,
for its peers:

- the whole :class:`~meshpipe.session.SessionManager` (handshakes, rekeys, transport
  encryption and decryption, the replay windows);
- the tunnel's datagram-mode MSP streams (an :class:`~meshpipe.msp.Msp` whose stream
  numbers have bit 30 set, ``DATAPLANE_SPACE``), and the cryptokey source check of
  every packet that arrives on them;
- a copy of the forwarding table with each destination's path MTU, pushed by the
  control worker, to build, receive and forward DATA frames itself.

The control worker keeps routing, neighbours, discovery and every other MSP stream
and MDP port in a *sharded* :class:`~meshpipe.stack.NodeStack`: it emits ``Seal``
(encrypt and send) and ``Open`` (a packet that came through it, from a radio) for
the owning shard, and takes ``Opened`` plaintexts back. Inputs of a shard:

- :meth:`CryptoShard.seal`, :meth:`CryptoShard.open`: from the control worker;
- :meth:`CryptoShard.on_frame`: a DATA frame straight from an interface worker, for
  this node (opened here) or in transit (forwarded, never opened);
- :meth:`CryptoShard.outbound` maps a packet read from the TUN to its SID
  (cryptokey routing) and :meth:`CryptoShard.tun_packet` sends it on that peer's
  tunnel stream (the worker reads its own TUN queue; see workers/tun.py).

Outputs: ``SendFrame``, ``Opened``, ``TunWrite`` and ``Event`` actions.

:class:`ShardedNode` wires one sharded stack and N shards in one process exactly as
the worker processes are wired, for the simulator.

Counters (``CryptoShard.counters``): the sessions' ``session.*``, the tunnel
endpoint's ``msp.*``, the forwarding ones (meshpipe/forwarding.py), the tunnel's
``tunnel.rx.*`` and ``tunnel.drop.forged_source``/``malformed``, and
``tunnel.drop.stream_error``, ``tunnel.drop.disabled``, ``drop.malformed``,
``shard.drop.internal_error``.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from meshpipe import fragments, wire
from meshpipe.actions import (
    Action,
    Deliver,
    Event,
    ForwardingChanged,
    LinkAddr,
    Open,
    Opened,
    Seal,
    SendFrame,
    TunWrite,
)
from meshpipe.classify import CONTROL, Transit, classify
from meshpipe.classify import shard_of as shard_of  # re-exported: its old home
from meshpipe.errors import FrameError
from meshpipe.forwarding import Forwarder
from meshpipe.identity import Identity
from meshpipe.link import compress
from meshpipe.msp import (
    DATAPLANE_SPACE,
    Mode,
    Msp,
    MspParams,
    Stream,
    StreamAccepted,
    StreamClosed,
    StreamError,
    StreamReadable,
    in_dataplane,
    stream_number,
)
from meshpipe.node import InterfaceParams, Timing
from meshpipe.offload import (
    MIN_OFFLOAD_PATH_MTU,
    OFFLOAD_MARK,
    OffloadError,
    segment,
    split_message,
)
from meshpipe.session import (
    MAX_PACKET,
    Plaintext,
    SessionManager,
    SessionOut,
    SessionParams,
    Transmit,
)
from meshpipe.stack import NodeStack
from meshpipe.tunnel import DEFAULT_MTU as TUNNEL_DEFAULT_MTU
from meshpipe.tunnel import TUNNEL_PORT, IPNetwork, ToPeer, ToTun, Tunnel

# What the control worker pushes per destination: interface, next hop, path MTU.
ShardEntry = tuple[int, LinkAddr, int]

_DATA_BYTE = wire.kind_byte(wire.KIND_DATA)[0]
_OFFLOAD = bytes((OFFLOAD_MARK,))
_FRAG_AT = wire.DATA_HEADER_LEN
_FRAG_BYTE = bytes((fragments.TYPE_FRAGMENT,))
# The tunnel's datagrams hold a 64 kB segment and its offload header.
TUNNEL_MSP = MspParams(max_message=65535 + 64, dgram_partial_bytes=1 << 20)
# The path MTU the tunnel's MSP sees: it seals each whole message (a 64 kB segment) in
# one packet, and meshpipe/fragments.py cuts that to the real path MTU.
TUNNEL_SEAL_MTU = MAX_PACKET + wire.DATA_HEADER_LEN
# Below this path MTU (a packet radio) the tunnel's MSP cuts messages itself, as it did
# before fragments: each piece is a transport packet of its own, which a radio's header
# compression (meshpipe/link/compress.py) shrinks by 76 bytes; a fragment it cannot.
SMALL_PATH_MTU = 1024


class CryptoShard:
    """Sessions, tunnel streams and DATA frames for the peers of one shard."""

    def __init__(
        self,
        identity: Identity,
        iface_mtus: Sequence[int],
        now: float,
        *,
        rng: random.Random | None = None,
        epoch_ns: int = 0,
        session_params: SessionParams | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        tunnel_routes: Sequence[tuple[IPNetwork, bytes]] | None = None,
        msp_params: MspParams | None = None,
        tunnel_mtu: int = TUNNEL_DEFAULT_MTU,
    ) -> None:
        self.sid = bytes(identity.sid)
        self.counters: collections.Counter[str] = collections.Counter()
        self.fwd = Forwarder(self.sid, iface_mtus, self.counters)
        self.path_mtus: dict[bytes, int] = {}
        rng = rng if rng is not None else random.Random()
        msp_rng = random.Random(rng.getrandbits(64))
        self.session = SessionManager(
            identity,
            now,
            rng,
            epoch_ns,
            session_params,
            random_bytes=random_bytes if random_bytes is not None else os.urandom,
            routable=self.fwd.table.__contains__,  # cookies and probes only where they can go
        )
        self.tunnel: Tunnel | None = None
        self.msp: Msp | None = None
        self.tunnel_streams: dict[bytes, Stream] = {}  # peer SID -> the stream we send on
        self.reassembler = fragments.Reassembler()
        self._frag_next = rng.getrandbits(32)  # message number of our next fragmented packet
        if tunnel_routes is not None:
            # Cryptokey routing both ways; the known SIDs are the pushed table's.
            self.tunnel = Tunnel(
                self.sid, tunnel_routes, tunnel_mtu, lambda: self.fwd.table.keys(), now
            )
            self.msp = Msp(
                self.sid,
                self._tunnel_seal_mtu,
                msp_params or TUNNEL_MSP,
                number_space=DATAPLANE_SPACE,
                rng=msp_rng,
            )
            self.msp.listen(TUNNEL_PORT, modes=frozenset({Mode.DATAGRAM}))
        # Service streams (forwards, SOCKS, msp) the control worker handed over once
        # bridged (workers/stream_handoff.py): they run here, next to their session.
        self.streams = Msp(self.sid, self.path_mtu, msp_params)

    # -- the table ---------------------------------------------------------------------

    def set_forwarding(self, entries: Mapping[bytes, ShardEntry | None], full: bool) -> None:
        if full:
            self.path_mtus.clear()
        hops: dict[bytes, tuple[int, LinkAddr] | None] = {}
        for dst, e in entries.items():
            dst = bytes(dst)
            if e is None:
                hops[dst] = None
                self.path_mtus.pop(dst, None)
            else:
                hops[dst] = (e[0], e[1])
                self.path_mtus[dst] = e[2]
        self.fwd.update(hops, full)

    def _tunnel_seal_mtu(self, dst: bytes) -> int:
        mtu = self.path_mtu(dst)
        return mtu if mtu < SMALL_PATH_MTU else TUNNEL_SEAL_MTU

    def path_mtu(self, dst: bytes) -> int:
        """As NodeStack.path_mtu, from the pushed table."""
        mtus = self.fwd.iface_mtus
        hop = self.fwd.table.get(bytes(dst))
        if hop is None:
            return min(mtus)
        route = self.path_mtus.get(bytes(dst))
        return mtus[hop[0]] if route is None else min(mtus[hop[0]], route)

    # -- inputs ------------------------------------------------------------------------

    def seal(self, dst: bytes, plaintext: bytes, now: float) -> list[Action]:
        out: list[Action] = []
        try:
            self._seal_into(bytes(dst), plaintext, now, out)
        except Exception as exc:  # a bug costs one packet, never the data plane
            self._internal_error(exc, out)
        return self._finish(out)

    def open(self, src: bytes, packet: bytes, hops: int, now: float) -> list[Action]:
        out: list[Action] = []
        self._open_into(bytes(src), packet, hops, now, out)
        return self._finish(out)

    def on_frame(self, frame: bytes, now: float, ingress: Hashable = None) -> list[Action]:
        """A DATA frame from an interface worker: ours (opened) or in transit (forwarded).
        ``ingress``: the (interface, link address) it came from."""
        if (
            frame[_FRAG_AT : _FRAG_AT + 1] == _FRAG_BYTE
            and frame[0] == _DATA_BYTE
            and frame[1]
            and frame[2:34] == self.sid
        ):  # a fragment for us (most frames of a busy tunnel): joined before anything else
            self.counters["data.delivered"] += 1
            src = frame[34:66]
            joined = self.reassembler.push(src, frame[_FRAG_AT:], now)
            if joined is None:
                return []
            out: list[Action] = []
            hops = wire.DEFAULT_HOP_LIMIT - frame[1] + 1
            self._open_into(src, joined, hops, now, out, ingress)
            return self._finish(out)
        try:
            actions = self.fwd.on_data(frame)
        except FrameError:
            self.counters["drop.malformed"] += 1
            return []
        out = []
        for a in actions:
            if isinstance(a, Deliver):
                self._open_into(a.src, a.payload, a.hops, now, out, ingress)
            else:
                out.append(a)
        return self._finish(out)

    def outbound(self, packet: bytes, now: float, gso: bool = False) -> ToPeer | ToTun | None:
        """A packet read from the TUN: the SID it goes to, an ICMP error, or None."""
        if self.tunnel is None:
            self.counters["tunnel.drop.disabled"] += 1
            return None
        return self.tunnel.outbound(packet, now, gso)

    def tun_packet(self, dst: bytes, message: bytes, now: float) -> None:
        """Queue a tunnel message (an IP packet, maybe offloaded: meshpipe/offload.py)
        for ``dst``; it leaves at the next on_timer (one batch)."""
        if self.msp is None:
            self.counters["tunnel.drop.disabled"] += 1
            return
        messages = [message]
        if message[:1] == _OFFLOAD and self.path_mtu(dst) < MIN_OFFLOAD_PATH_MTU:
            try:  # a 64 kB datagram in 250-byte fragments: one loss costs it all
                off, packet = split_message(message)
                assert off is not None
                messages = segment(off, packet)
            except OffloadError:
                self.counters["tunnel.drop.malformed"] += 1
                return
            self.counters["tunnel.offload.segmented"] += 1
        try:
            stream = self._tunnel_stream(bytes(dst), now)
            for m in messages:
                stream.send_datagram(m, now)
        except StreamError:  # too many streams, a closed one, too large: drop this packet
            self.counters["tunnel.drop.stream_error"] += 1

    def plaintext(self, src: bytes, plaintext: bytes, hops: int, now: float) -> list[Action]:
        """A segment of a handed-over stream that reached the control worker first."""
        out: list[Action] = []
        self._session_outs([Plaintext(bytes(src), plaintext)], hops, now, out)
        return self._finish(out)

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        if now >= self.streams.next_deadline():
            for dst, pt in self.streams.on_timer(now):
                self._seal_into(bytes(dst), bytes(pt), now, out)
        if now >= self.session.next_deadline():
            self._session_outs(self.session.on_timer(now), 0, now, out)
        if self.msp is not None and now >= self.msp.next_deadline():
            for dst, pt in self.msp.on_timer(now):
                self._seal_into(bytes(dst), bytes(pt), now, out)
        if now >= self.reassembler.next_deadline():
            self.reassembler.expire(now)
        return self._finish(out)

    def next_deadline(self) -> float:
        t = min(
            self.session.next_deadline(),
            self.reassembler.next_deadline(),
            self.streams.next_deadline(),
        )
        return t if self.msp is None else min(t, self.msp.next_deadline())

    # -- status ------------------------------------------------------------------------

    def sessions(self, now: float) -> list[dict[str, Any]]:
        return self.session.sessions(now)

    def all_counters(self) -> collections.Counter[str]:
        c = collections.Counter(self.counters)
        c.update(self.session.counters)
        c.update(self.reassembler.counters)
        c.update(self.streams.counters)
        if self.msp is not None and self.tunnel is not None:
            c.update(self.msp.counters)
            c.update(self.tunnel.counters)
        return c

    # -- plumbing ----------------------------------------------------------------------

    def _open_into(
        self,
        src: bytes,
        packet: bytes,
        hops: int,
        now: float,
        out: list[Action],
        ingress: Hashable = None,
    ) -> None:
        try:
            if fragments.is_fragment(packet):
                joined = self.reassembler.push(src, packet, now)
                if joined is None:
                    return
                packet = joined
            outs = self.session.on_packet(src, packet, now, ingress)
            self._session_outs(outs, hops, now, out)
        except Exception as exc:  # a bug costs one packet, never the data plane
            self._internal_error(exc, out)

    def _internal_error(self, exc: Exception, out: list[Action]) -> None:
        self.counters["shard.drop.internal_error"] += 1
        out.append(Event("shard.error", {"error": repr(exc)}))

    def _session_outs(
        self, outs: Sequence[SessionOut], hops: int, now: float, out: list[Action]
    ) -> None:
        for o in outs:
            if isinstance(o, Transmit):
                self._transmit(o.dst, o.payload, out)
            elif isinstance(o, Plaintext):
                if self.msp is not None and in_dataplane(o.payload):
                    for dst, pt in self.msp.on_plaintext(o.src, o.payload, hops, now):
                        self._seal_into(bytes(dst), bytes(pt), now, out)
                elif self.streams.holds(o.src, stream_number(o.payload)):
                    for dst, pt in self.streams.on_plaintext(o.src, o.payload, hops, now):
                        self._seal_into(bytes(dst), bytes(pt), now, out)
                else:
                    out.append(Opened(o.src, o.payload, hops))
            else:
                out.append(o)

    def _transmit(self, dst: bytes, packet: bytes, out: list[Action]) -> None:
        """A sealed packet in one DATA frame, or in fragments where it does not fit."""
        mtu = self.path_mtu(dst)
        room = mtu - wire.DATA_HEADER_LEN
        if len(packet) <= room or dst not in self.fwd.table:
            out.extend(self.fwd.send_data(dst, packet))
            return
        if mtu < SMALL_PATH_MTU:  # a radio's data MTU counts a gain fragments do not get
            room -= compress.GAIN
        try:
            pieces = fragments.split(packet, room, self._frag_next)
        except ValueError:
            self.counters["frag.drop.unsplittable"] += 1
            return
        self._frag_next = (self._frag_next + 1) & 0xFFFFFFFF
        self.counters["frag.tx.packets"] += 1
        out.extend(self.fwd.send_many(dst, pieces))

    def _seal_into(self, dst: bytes, plaintext: bytes, now: float, out: list[Action]) -> None:
        self._session_outs(self.session.send(dst, plaintext, now), 0, now, out)

    def _tunnel_stream(self, sid: bytes, now: float) -> Stream:
        assert self.msp is not None
        st = self.tunnel_streams.get(sid)
        if st is None or st.closed:
            st = self.msp.open(sid, TUNNEL_PORT, now, mode=Mode.DATAGRAM)
            self.tunnel_streams[sid] = st
        return st

    def _finish(self, out: list[Action]) -> list[Action]:
        """Turn the tunnel endpoint's events into TUN writes and stream bookkeeping."""
        if self.msp is None or self.tunnel is None:
            return out
        for ev in self.msp.events():
            if isinstance(ev, StreamReadable):
                while (message := ev.stream.recv_datagram()) is not None:
                    try:
                        _, packet = split_message(message)
                    except OffloadError:
                        self.counters["tunnel.drop.malformed"] += 1
                        continue
                    if self.tunnel.inbound(ev.stream.peer, packet) is not None:
                        out.append(TunWrite(message))  # the TUN worker writes the header
            elif isinstance(ev, StreamAccepted):
                mine = self.tunnel_streams.get(ev.stream.peer)
                if mine is None or mine.closed:
                    self.tunnel_streams[ev.stream.peer] = ev.stream  # answer on the peer's
            elif (
                isinstance(ev, StreamClosed)
                and self.tunnel_streams.get(ev.stream.peer) is ev.stream
            ):
                del self.tunnel_streams[ev.stream.peer]
        return out


class ForwardingMirror:
    """What the crypto shards were last told (next hop and path MTU per destination).

    The path MTU can change while the next hop stays, so the control worker also
    rescans now and then (``changes()`` with no destinations).
    """

    def __init__(self) -> None:
        self.table: dict[bytes, ShardEntry] = {}

    def changes(self, stack: NodeStack, dsts: Iterable[bytes] | None = None) -> dict[bytes, Any]:
        """Entries that differ from what was pushed (None: removed); records them."""
        if dsts is None:
            dsts = set(stack.forwarding_table()) | set(self.table)
        out: dict[bytes, ShardEntry | None] = {}
        for dst in dsts:
            dst = bytes(dst)
            hop = stack.core.next_hop(dst)
            new = None if hop is None else (hop[0], hop[1], stack.path_mtu(dst))
            if new != self.table.get(dst):
                out[dst] = new
                if new is None:
                    del self.table[dst]
                else:
                    self.table[dst] = new
        return out


class ShardedNode:
    """A sharded NodeStack and its crypto shards in one process, wired like the
    worker processes (control, crypto workers, interface workers), for simulations.

    Speaks the simulator's node protocol; ``tun_in(dst_sid, packet)`` stands in for
    the TUN worker and ``tun_out`` collects what would be written to the TUN.
    """

    def __init__(
        self,
        identity: Identity,
        interfaces: Sequence[InterfaceParams],
        timing: Timing | None = None,
        now: float = 0.0,
        rng: random.Random | None = None,
        *,
        shards: int = 2,
        epoch_ns: int = 0,
        session_params: SessionParams | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        tunnel_routes: Sequence[tuple[IPNetwork, bytes]] | None = None,
        msp_params: MspParams | None = None,
    ) -> None:
        self.stack = NodeStack(
            identity,
            interfaces,
            timing,
            now,
            rng,
            epoch_ns=epoch_ns,
            msp_params=msp_params,
            sharded=True,
        )
        self.sid = bytes(identity.sid)
        mtus = [p.routed_mtu for p in interfaces]
        self.shards = [
            CryptoShard(
                identity,
                mtus,
                now,
                rng=random.Random(self.stack.core.rng.getrandbits(64)),
                epoch_ns=epoch_ns,
                session_params=session_params,
                random_bytes=random_bytes,
                tunnel_routes=tunnel_routes,
                msp_params=msp_params,
            )
            for _ in range(shards)
        ]
        self.mirror = ForwardingMirror()
        self.tun_out: list[bytes] = []

    def shard(self, sid: bytes) -> CryptoShard:
        return self.shards[shard_of(sid, len(self.shards))]

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        # As a link worker: the receive classifier decides (meshpipe/classify.py).
        shards = self.shards
        verdict = classify(frame, self.sid, self.mirror.table, iface, len(shards))
        if isinstance(verdict, Transit):
            return [SendFrame(iface, verdict.dest, verdict.frame)]
        if verdict == CONTROL:
            return self._run(self.stack.on_frame(iface, src, frame, now), now)
        if isinstance(verdict, int):
            return self._run(shards[verdict].on_frame(frame, now, (iface, src)), now)
        self.stack.core.counters[verdict.reason] += 1
        return []

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        if now >= self.stack.next_deadline():
            out = self._run(self.stack.on_timer(now), now)
        changes = self.mirror.changes(self.stack)  # path MTUs may change on their own
        if changes:
            for s in self.shards:
                s.set_forwarding(changes, full=False)
        for s in self.shards:
            if now >= s.next_deadline():
                out.extend(self._run(s.on_timer(now), now))
        return out

    def next_deadline(self) -> float:
        return min(self.stack.next_deadline(), *(s.next_deadline() for s in self.shards))

    def tun_in(self, dst: bytes, packet: bytes, now: float) -> list[Action]:
        shard = self.shard(dst)
        shard.tun_packet(dst, packet, now)
        return self._run(shard.on_timer(now), now)

    def _run(self, actions: list[Action], now: float) -> list[Action]:
        out: list[Action] = []
        todo = collections.deque(actions)
        while todo:
            a = todo.popleft()
            if isinstance(a, Seal):
                todo.extend(self.shard(a.dst).seal(a.dst, a.plaintext, now))
            elif isinstance(a, Open):
                todo.extend(self.shard(a.src).open(a.src, a.packet, a.hops, now))
            elif isinstance(a, Opened):
                todo.extend(self.stack.on_opened(a.src, a.plaintext, a.hops, now))
            elif isinstance(a, TunWrite):
                self.tun_out.append(a.packet)
            elif isinstance(a, ForwardingChanged):
                changes = self.mirror.changes(self.stack, a.entries)
                for s in self.shards:
                    s.set_forwarding(changes, full=False)
                out.append(a)
            else:
                out.append(a)
        return out
