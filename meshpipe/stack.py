"""NodeStack: the whole sans-IO node, routing + sessions + MDP, behind one interface.

It speaks the simulator's node protocol (``on_frame`` / ``on_timer`` /
``next_deadline``) and returns the same actions as :class:`NodeCore`. Internally:

    frame -> NodeCore.on_frame -> Deliver(src, payload, hops)
          -> SessionManager.on_packet -> Plaintext(src, plaintext)
          -> by the plaintext's first byte: 1 = MDP (meshpipe.mdp), 2 = MSP
             (meshpipe.msp, registered through register_protocol), anything else
             dropped and counted
    SessionManager Transmit(dst, payload) -> NodeCore.send_data -> SendFrame

Deliver actions are consumed here (they carry ciphertext); everything else the core
or the session layer emits (SendFrame, Event, ForwardingChanged) is passed on.
Datagrams for bound ports wait in a bounded per-port inbox: ``recv(port)`` drains it.

Counters (``NodeStack.counters`` merges the core's, the sessions' and MDP's):
``stack.drop.unknown_proto``, ``mdp.drop.inbox_full``, ``stack.drop.internal_error``,
``ping.tx``, ``ping.rx``, ``ping.drop.unexpected``.
Events added here: ``ping.reply`` (sid, seq, rtt_ms, hops).

Service discovery (:mod:`meshpipe.services.discovery`) sits beside routing, not on
sessions: DISCOVERY frames from known neighbours go to ``self.discovery`` (others:
``discovery.drop.unknown_neighbour``) and its frames leave link-wide like route
updates. API: ``announce_service``, ``withdraw_service``, ``query_services``,
``services``; counters ``discovery.*``; events ``service.*``.

Node records (:mod:`meshpipe.noderecord`: this node's name and neighbours, signed and
flooded) sit beside discovery the same way: NODE frames from known neighbours go to
``self.nodes``, which looks at ``neighbours()`` on its own timer. API:
``node_records``; counters ``noderec.*``; events ``node.*``.
"""

from __future__ import annotations

import collections
import math
import os
import random
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshpipe import topology, wire
from meshpipe.actions import (
    Action,
    Deliver,
    Event,
    ForwardingChanged,
    LinkAddr,
    Open,
    Seal,
    SendFrame,
)
from meshpipe.identity import Identity, Sid
from meshpipe.link.neighbours import INFINITY
from meshpipe.mdp import (
    ECHO_PORT,
    PROTO_MDP,
    Mdp,
    MdpDatagram,
    MdpSend,
    max_payload,
)
from meshpipe.msp import PROTO_MSP, Msp, MspParams
from meshpipe.names import Claimant, claimants
from meshpipe.node import InterfaceParams, Limits, NeighbourInfo, NodeCore, RouteInfo, Timing
from meshpipe.noderecord import NodeLink, NodeRecord, NodeRecords, NodeRecordTiming
from meshpipe.services.discovery import (
    AttrValue,
    DiscoveryLimits,
    DiscoveryOut,
    DiscoveryTiming,
    ServiceDiscovery,
)
from meshpipe.session import Plaintext, SessionManager, SessionOut, SessionParams, Transmit
from meshpipe.trace import TraceHop, Tracer


class SessionProtocol(Protocol):
    """A protocol carried in sessions next to MDP (MSP will register as proto 2).

    Each method returns ``(dst, plaintext)`` pairs to send; every plaintext starts
    with the protocol's number. The stack wakes the protocol at ``next_deadline()``.
    """

    def on_plaintext(
        self, src: bytes, plaintext: bytes, hops: int, now: float, /
    ) -> Sequence[tuple[bytes, bytes]]: ...

    def on_timer(self, now: float, /) -> Sequence[tuple[bytes, bytes]]: ...

    def next_deadline(self) -> float: ...


_DISCOVERY_BYTE = wire.kind_byte(wire.KIND_DISCOVERY)
_NODE_BYTE = wire.kind_byte(wire.KIND_NODE)
_TRACE_BYTE = wire.kind_byte(wire.KIND_TRACE)
PING_MAGIC = b"mpng"
_PING = struct.Struct("!4sI")  # magic, sequence number; padding follows
EPHEMERAL_PORTS = range(49152, 65536)
MAX_PINGS_OUTSTANDING = 1024


@dataclass(frozen=True, slots=True)
class PingReply:
    sid: Sid
    seq: int
    rtt: float  # seconds
    hops: int
    size: int  # payload bytes


class NodeStack:
    """NodeCore + SessionManager + Mdp for one node."""

    def __init__(
        self,
        identity: Identity,
        interfaces: Sequence[InterfaceParams],
        timing: Timing | None = None,
        now: float = 0.0,
        rng: random.Random | None = None,
        *,
        epoch_ns: int = 0,
        session_params: SessionParams | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        inbox_limit: int = 1024,
        echo: bool = True,
        discovery_timing: DiscoveryTiming | None = None,
        discovery_limits: DiscoveryLimits | None = None,
        msp_params: MspParams | None = None,
        sharded: bool = False,
        node_name: str | None = None,
        node_timing: NodeRecordTiming | None = None,
        name: str = "",
        limits: Limits | None = None,
    ) -> None:
        self.identity = identity
        self.core = NodeCore(
            identity, interfaces, timing or Timing(), now, rng, limits or Limits()
        )
        session_rng = random.Random(self.core.rng.getrandbits(64))
        # Sharded: the sessions live in crypto shards (meshpipe/dataplane.py); this
        # stack emits Seal/Open actions for them and takes their plaintexts back
        # through on_opened(); it holds no session (None).
        self.session: SessionManager | None = None
        if not sharded:
            self.session = SessionManager(
                identity,
                now,
                session_rng,
                epoch_ns,
                session_params,
                random_bytes=random_bytes if random_bytes is not None else os.urandom,
                routable=self.core.fwd.table.__contains__,
            )
        self.mdp = Mdp(echo=echo)
        # A sharded stack runs in a worker that may be restarted: random stream numbers.
        msp_rng = random.Random(session_rng.getrandbits(64)) if sharded else None
        self.msp = Msp(identity.sid, self.path_mtu, msp_params, rng=msp_rng)
        self._protocols: dict[int, SessionProtocol] = {PROTO_MSP: self.msp}
        self.inbox_limit = inbox_limit
        self._inbox: dict[int, collections.deque[MdpDatagram]] = {}
        self._counters: collections.Counter[str] = collections.Counter()
        self._ping_port: int | None = None
        self._ping_seq = 0
        self._pings: dict[tuple[bytes, int], float] = {}
        self._ping_replies: list[PingReply] = []
        self._now = now
        # Service records carry wall-clock expiry: epoch_ns is the wall clock at ``now``
        # (0 in simulations: the shared simulated clock is then the wall clock).
        self.discovery = ServiceDiscovery(
            identity,
            now,
            clock_offset=epoch_ns / 1e9 - now if epoch_ns else 0.0,
            mtu=min(p.mtu for p in self.core.interfaces),
            timing=discovery_timing,
            limits=discovery_limits,
            route_metric=self._route_metric,
        )
        self.nodes = NodeRecords(
            identity,
            now,
            name=node_name,
            clock_offset=self.discovery.offset,
            mtu=min(p.mtu for p in self.core.interfaces),
            timing=node_timing,
        )
        # Trace probes are answered here (and in the sim); the nonces need not be
        # secret (replies are signed), only unpredictable enough not to collide.
        trace_seed = (random_bytes if random_bytes is not None else os.urandom)(16)
        self.trace = Tracer(
            identity, self.core.fwd, random.Random(int.from_bytes(trace_seed)), name
        )

    @property
    def sid(self) -> Sid:
        return self.core.sid

    # -- the simulator's node protocol ---------------------------------------------------

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        self._now = now
        if frame[:1] == _DISCOVERY_BYTE:
            # Link-local like routing: only from neighbours we have a hello from.
            if (iface, src) not in self.core.links.by_key:
                self._counters["discovery.drop.unknown_neighbour"] += 1
                return []
            return self._discovery_outs(self.discovery.on_message((iface, src), frame, now))
        if frame[:1] == _NODE_BYTE:
            if (iface, src) not in self.core.links.by_key:
                self._counters["noderec.drop.unknown_neighbour"] += 1
                return []
            return self._node_outs(self.nodes.on_message((iface, src), frame, now))
        if frame[:1] == _TRACE_BYTE:
            return self.trace.on_frame(frame, now)
        return self._process(self.core.on_frame(iface, src, frame, now), now, (iface, src))

    def on_timer(self, now: float) -> list[Action]:
        self._now = now
        out: list[Action] = []
        if now >= self.core.next_deadline():
            out = self._process(self.core.on_timer(now), now)
        if self.session is not None and now >= self.session.next_deadline():
            self._session_outs(self.session.on_timer(now), 0, now, out)
        if now >= self.discovery.next_deadline():
            out.extend(self._discovery_outs(self.discovery.on_timer(now)))
        if now >= self.nodes.next_deadline():
            links = [NodeLink(bytes(n.sid), n.cost, (n.iface, n.addr)) for n in self.neighbours()]
            out.extend(self._node_outs(self.nodes.on_timer(now, links)))
        if now >= self.trace.next_deadline():
            out.extend(self.trace.on_timer(now))
        for proto in self._protocols.values():
            if now >= proto.next_deadline():
                for dst, plaintext in proto.on_timer(now):
                    self._send_plain(bytes(dst), bytes(plaintext), now, out)
        return out

    def on_opened(self, src: bytes, plaintext: bytes, hops: int, now: float) -> list[Action]:
        """A plaintext a crypto shard decrypted (sharded stacks only)."""
        self._now = now
        out: list[Action] = []
        self._on_plaintext(bytes(src), bytes(plaintext), hops, now, out)
        return out

    def next_deadline(self) -> float:
        return min(
            self.core.next_deadline(),
            math.inf if self.session is None else self.session.next_deadline(),
            self.discovery.next_deadline(),
            self.nodes.next_deadline(),
            self.trace.next_deadline(),
            *(p.next_deadline() for p in self._protocols.values()),
        )

    # -- application API ---------------------------------------------------------------

    def bind(self, port: int) -> None:
        """Receive MDP datagrams sent to ``port`` (read them with ``recv``)."""
        self.mdp.bind(port)
        self._inbox[port] = collections.deque()

    def unbind(self, port: int) -> None:
        self.mdp.unbind(port)
        self._inbox.pop(port, None)

    def recv(self, port: int | None = None) -> list[MdpDatagram]:
        """Drain the datagrams waiting on ``port`` (all bound ports if None)."""
        ports = list(self._inbox) if port is None else [port]
        out: list[MdpDatagram] = []
        for p in ports:
            q = self._inbox.get(p)
            while q:
                out.append(q.popleft())
        return out

    def path_mtu(self, dst: bytes) -> int:
        """Largest frame that crosses every link to ``dst``: the route's path MTU (learnt
        from route updates) capped by the first hop's interface; the smallest
        interface MTU when there is no route."""
        mtus = [p.mtu for p in self.core.interfaces]
        if bytes(dst) == self.sid:
            return max(mtus)
        hop = self.core.next_hop(dst)
        if hop is None:
            return min(mtus)
        route = self.core.router.route_mtu(dst)
        first = self.core.interfaces[hop[0]].mtu
        return first if route is None else min(first, route)

    def max_datagram(self, dst: bytes) -> int:
        return max_payload(self.path_mtu(dst))

    def mdp_send(
        self,
        dst: bytes,
        src_port: int,
        dst_port: int,
        payload: bytes,
        now: float,
        path_mtu: int | None = None,
    ) -> list[Action]:
        """Send one datagram; raises DatagramTooLarge (or MdpError for bad ports)."""
        self._now = now
        mtu = self.path_mtu(dst) if path_mtu is None else path_mtu
        out: list[Action] = []
        for item in self.mdp.send(dst, src_port, dst_port, payload, now, mtu):
            if isinstance(item, MdpSend):
                self._send_plain(item.dst, item.plaintext, now, out)
        return out

    def send_plaintext(self, dst: bytes, plaintext: bytes, now: float) -> list[Action]:
        """Send a session plaintext (first byte = protocol) to ``dst``: for MSP."""
        self._now = now
        out: list[Action] = []
        self._send_plain(bytes(dst), bytes(plaintext), now, out)
        return out

    def register_protocol(self, number: int, proto: SessionProtocol) -> None:
        """Carry session plaintexts whose first byte is ``number`` to ``proto``."""
        if number == PROTO_MDP or number in self._protocols or not 0 <= number <= 255:
            raise ValueError(f"protocol number {number} is taken or out of range")
        self._protocols[number] = proto

    def ping(self, dst: bytes, now: float, size: int = 0, pattern: bytes = b"") -> list[Action]:
        """Send an echo request to ``dst``'s port 7; the reply becomes a PingReply
        (``ping_replies()``) and a ``ping.reply`` event. The padding up to ``size``
        repeats ``pattern`` (like ping -p), zeros by default."""
        if self._ping_port is None:
            self._ping_port = next(p for p in EPHEMERAL_PORTS if not self.mdp.is_bound(p))
            self.bind(self._ping_port)
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        seq = self._ping_seq
        pad_len = max(0, size - _PING.size)
        pad = (pattern * (pad_len // len(pattern) + 1))[:pad_len] if pattern else bytes(pad_len)
        payload = _PING.pack(PING_MAGIC, seq) + pad
        out = self.mdp_send(dst, self._ping_port, ECHO_PORT, payload, now)
        self._pings[(bytes(dst), seq)] = now
        while len(self._pings) > MAX_PINGS_OUTSTANDING:
            del self._pings[next(iter(self._pings))]
        self._counters["ping.tx"] += 1
        return out

    @property
    def last_ping_seq(self) -> int:
        """Sequence number of the latest ping() probe (to match replies to callers)."""
        return self._ping_seq

    def ping_replies(self) -> list[PingReply]:
        out, self._ping_replies = self._ping_replies, []
        return out

    # -- services (discovery) -------------------------------------------------------------

    def trace_start(self, dst: bytes, now: float, **kw: Any) -> int:
        """Start a trace to ``dst`` (see meshpipe.trace); poll ``trace_result``."""
        route = next((r for r in self.core.routes() if bytes(r.sid) == bytes(dst)), None)
        hops = route.hops if route is not None else 1
        return self.trace.start(dst, hops, now, **kw)

    def trace_result(self, tid: int) -> list[TraceHop] | None:
        return self.trace.result(tid)

    def next_hop(self, dst: bytes) -> tuple[int, LinkAddr] | None:
        return self.core.next_hop(dst)

    def announce_service(
        self,
        name: str,
        port: int,
        now: float,
        kind: str = "tcp",
        attrs: dict[str, AttrValue] | None = None,
        hidden: bool = False,
    ) -> list[Action]:
        """Offer a local service on MSP ``port`` (announced to the mesh unless hidden)."""
        self._now = now
        outs = self.discovery.announce(name, port, now, kind=kind, attrs=attrs, hidden=hidden)
        return self._discovery_outs(outs)

    def withdraw_service(self, name: str, now: float) -> list[Action]:
        self._now = now
        return self._discovery_outs(self.discovery.withdraw(name, now))

    def farewell(self, now: float) -> list[Action]:
        """A node shutting down: withdraw every local service, retract every route."""
        self._now = now
        outs: list[DiscoveryOut] = []
        for name in list(self.discovery.local):
            outs.extend(self.discovery.withdraw(name, now))
        return [*self._discovery_outs(outs), *self.core.farewell()]

    def query_services(
        self, now: float, name: str | None = None, scope: int | None = None
    ) -> list[Action]:
        """Ask the mesh for ``name`` (or everything); answers show up in ``services``."""
        self._now = now
        return self._discovery_outs(self.discovery.query(now, name, scope))

    def services(self, now: float | None = None) -> list[dict[str, Any]]:
        return self.discovery.services(self._now if now is None else now)

    def _route_metric(self, origin: bytes) -> int | None:
        """Our routing metric to ``origin`` (None without a usable route): services
        are ranked by it, never by the unsigned hop count a record carries."""
        sel = self.core.router.selected.get(bytes(origin))
        return None if sel is None or sel.metric >= INFINITY else sel.metric

    def node_records(self, now: float | None = None) -> list[NodeRecord]:
        """Every live node record (name, neighbours and costs), this node's own first."""
        return self.nodes.records(self._now if now is None else now)

    def _metrics(self) -> dict[bytes, int]:
        metrics = {bytes(r.sid): r.metric for r in self.routes()}
        for n in self.neighbours():
            metrics.setdefault(bytes(n.sid), n.cost)
        return metrics

    def node_claimants(self, now: float | None = None) -> list[Claimant]:
        """Who claims which name, with the routing metric to each (meshpipe.names)."""
        return claimants(self.node_records(now), self.sid, self._metrics())

    def topology(self, now: float | None = None) -> dict[str, Any]:
        """Nodes and links of the reachable mesh, from the node records (meshpipe.topology)."""
        return topology.build(self.sid, self.node_records(now), set(self._metrics()))

    def _discovery_outs(self, outs: Sequence[DiscoveryOut]) -> list[Action]:
        return self._link_outs(self.discovery.drain_events(), outs)

    def _node_outs(self, outs: Sequence[DiscoveryOut]) -> list[Action]:
        return self._link_outs(self.nodes.drain_events(), outs)

    def _link_outs(self, events: list[Event], outs: Sequence[DiscoveryOut]) -> list[Action]:
        """Flooded control frames leave link-wide on every interface, others unicast."""
        out: list[Action] = list(events)
        for o in outs:
            if o.to is None:
                for i in range(len(self.core.interfaces)):
                    out.extend(self.core._link_wide(i, o.frame))
            else:
                out.append(SendFrame(o.to[0], o.to[1], o.frame))
        return out

    # -- pass-through --------------------------------------------------------------------

    def sessions(self, now: float | None = None) -> list[dict[str, Any]]:
        if self.session is None:
            return []  # they are in the crypto shards
        return self.session.sessions(self._now if now is None else now)

    def routes(self) -> list[RouteInfo]:
        return self.core.routes()

    def neighbours(self) -> list[NeighbourInfo]:
        return self.core.neighbours()

    def forwarding_table(self) -> dict[bytes, tuple[int, LinkAddr]]:
        return self.core.forwarding_table()

    @property
    def counters(self) -> collections.Counter[str]:
        """All layers' counters merged (a fresh Counter)."""
        merged: collections.Counter[str] = collections.Counter()
        for c in (
            self.core.counters,
            collections.Counter() if self.session is None else self.session.counters,
            self.mdp.counters,
            self.discovery.counters,
            self.nodes.counters,
            self.msp.counters,
            self.trace.counters,
            self._counters,
        ):
            merged.update(c)
        return merged

    # -- plumbing ------------------------------------------------------------------------

    def _process(
        self, actions: Sequence[Action], now: float, ingress: Hashable = None
    ) -> list[Action]:
        """``ingress``: the (interface, link address) the frame came from, if any."""
        out: list[Action] = []
        for a in actions:
            if isinstance(a, Deliver) and self.session is None:
                out.append(Open(a.src, a.payload, a.hops))
            elif isinstance(a, Deliver) and self.session is not None:
                try:
                    outs = self.session.on_packet(a.src, a.payload, now, ingress)
                    self._session_outs(outs, a.hops, now, out)
                except Exception as exc:  # a bug costs one packet, never the node
                    self._counters["stack.drop.internal_error"] += 1
                    out.append(Event("stack.error", {"error": repr(exc)}))
            else:
                out.append(a)
        return out

    def _session_outs(
        self, outs: Sequence[SessionOut], hops: int, now: float, out: list[Action]
    ) -> None:
        for o in outs:
            if isinstance(o, Transmit):
                for a in self.core.send_data(o.dst, o.payload, now):
                    if isinstance(a, (SendFrame, Event, ForwardingChanged)):
                        out.append(a)
            elif isinstance(o, Plaintext):
                # A Plaintext only ever answers the packet being processed: its hops.
                self._on_plaintext(o.src, o.payload, hops, now, out)
            else:
                out.append(o)

    def _send_plain(self, dst: bytes, plaintext: bytes, now: float, out: list[Action]) -> None:
        if dst == self.sid:  # loopback: no session with ourselves
            self._on_plaintext(self.sid, plaintext, 0, now, out)
            return
        if self.session is None:
            out.append(Seal(dst, plaintext))
            return
        self._session_outs(self.session.send(dst, plaintext, now), 0, now, out)

    def _on_plaintext(
        self, src: bytes, plaintext: bytes, hops: int, now: float, out: list[Action]
    ) -> None:
        proto = plaintext[0] if plaintext else -1
        if proto == PROTO_MDP:
            for item in self.mdp.on_plaintext(src, plaintext, hops, now):
                if isinstance(item, MdpSend):
                    self._send_plain(item.dst, item.plaintext, now, out)
                else:
                    self._deliver(item, now, out)
            return
        handler = self._protocols.get(proto)
        if handler is None:
            self._counters["stack.drop.unknown_proto"] += 1
            return
        for dst, reply in handler.on_plaintext(src, plaintext, hops, now):
            self._send_plain(bytes(dst), bytes(reply), now, out)

    def _deliver(self, dg: MdpDatagram, now: float, out: list[Action]) -> None:
        if self._ping_port is not None and dg.dst_port == self._ping_port:
            self._on_ping_reply(dg, now, out)
            return
        q = self._inbox.get(dg.dst_port)
        if q is None:  # bound in Mdp but not through us
            self.mdp.counters["mdp.drop.unbound_port"] += 1
            return
        if len(q) >= self.inbox_limit:
            self._counters["mdp.drop.inbox_full"] += 1
            return
        q.append(dg)

    def _on_ping_reply(self, dg: MdpDatagram, now: float, out: list[Action]) -> None:
        if dg.src_port != ECHO_PORT or len(dg.payload) < _PING.size:
            self._counters["ping.drop.unexpected"] += 1
            return
        magic, seq = _PING.unpack_from(dg.payload)
        sent = self._pings.pop((dg.src, seq), None)
        if magic != PING_MAGIC or sent is None:
            self._counters["ping.drop.unexpected"] += 1
            return
        self._counters["ping.rx"] += 1
        reply = PingReply(Sid(dg.src), seq, now - sent, dg.hops, len(dg.payload))
        self._ping_replies.append(reply)
        out.append(
            Event(
                "ping.reply",
                {
                    "sid": reply.sid.short,
                    "seq": seq,
                    "rtt_ms": round(reply.rtt * 1000.0, 3),
                    "hops": dg.hops,
                },
            )
        )


__all__ = ["EPHEMERAL_PORTS", "NodeStack", "PingReply", "SessionProtocol"]
