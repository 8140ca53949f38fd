"""NodeCore: the sans-IO node (neighbours + routing + DATA forwarding).

The shell (control worker or simulator) feeds it frames and timer wake-ups with the
current time and executes the actions it returns. Nothing here reads a clock, opens
a socket or draws randomness other than from the ``random.Random`` it is given.

Counters (``NodeCore.counters``, stable names):

* drops: ``drop.malformed`` (any frame that fails to parse), ``drop.bad_signature``
  (hello signature), ``drop.forged_route`` (route update signature),
  ``drop.route_hop_limit`` (update hop count > 64), ``drop.route_table_full`` and
  ``drop.route_neighbour_full`` (a new route entry past ``Limits.max_routes`` /
  ``max_routes_per_neighbour``: refused before its signature is checked),
  ``drop.neighbour_table_full`` (a hello from a new address past
  ``Limits.max_neighbours`` on that interface), ``drop.unknown_neighbour``
  (routing frame from an address we have no hello from), ``drop.hop_limit`` (DATA
  whose hop limit ran out), ``drop.too_big`` (DATA longer than the outgoing MTU),
  ``drop.bad_iface``, ``drop.internal_error`` (a bug: should stay 0);
* hellos: ``hello.rx``, ``hello.tx``, ``hello.own`` (our own looped back),
  ``hello.stale`` (an old seqno, or a late copy of the current one: ignored);
* routing: ``update.rx`` (frames), ``update.tx`` (frames), ``update.entries_rx``,
  ``update.dump``, ``update.triggered``, ``update.stale`` (overtaken by a newer
  frame), ``sig.verified``, ``sig.cache_hit``,
  ``request.rx``, ``request.tx``, ``request.forwarded``, ``request.unroutable``,
  ``request.dropped``, ``request.unfeasible_better`` (we asked for a new seqno
  because an unfeasible route is clearly better than the selected one),
  ``seqno.bumped`` (a request raised our seqno, by one), ``seqno.bump_limited``
  (a request within request_timeout of the last raise: not honoured),
  ``seqno.jump`` (we heard our own SID with a newer seqno), ``update.metric_clamped``
  (a neighbour claimed less than a perfect link per hop, or 0 hops from an origin
  other than itself), ``source.gc_early`` (feasibility distances dropped early
  under churn);
* neighbours: ``peer.up``, ``peer.down``, ``peer.restarted``;
* data: ``data.sent``, ``data.forwarded``, ``data.delivered``, ``data.no_route``.

Events: ``peer.up`` / ``peer.down`` / ``peer.restarted`` (sid, iface, addr),
``route.changed`` (sid, next_hop, hops, metric; or sid, retracted), ``route.forged``
(origin, from, seqno), ``route.refused`` (from, reason, refused counts since the last
one; at most every 10 s), ``peer.refused`` (iface, addr, refused; at most every
10 s), ``frame.error`` (internal errors only).
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshpipe import wire
from meshpipe.actions import (
    BROADCAST,
    MULTICAST,
    Action,
    Event,
    ForwardingChanged,
    LinkAddr,
    SendFrame,
)
from meshpipe.errors import FrameError
from meshpipe.forwarding import Forwarder
from meshpipe.identity import Identity, Sid
from meshpipe.link.neighbours import (
    DEFAULT_MAX_NEIGHBOURS,
    INFINITY,
    BadSignature,
    Neighbour,
    NeighbourTable,
    NeighbourTableFull,
)
from meshpipe.routing import (
    DEFAULT_MAX_ROUTES,
    DEFAULT_MAX_ROUTES_PER_NEIGHBOUR,
    REFUSED_LOG_INTERVAL,
    SEQNO_MOD,
    Outgoing,
    Router,
    decode_routing,
    pack_routing,
)

# A signed hello with one IHU (176 bytes at most) and one signed route update
# (120 bytes) must fit; 192 leaves room for split_hello's slack and lets a
# 255-byte radio frame carry a mesh frame behind its link header.
MIN_MTU = 192

LONELY_HELLO_INTERVAL = 10.0  # seconds; hellos on an interface with no neighbour yet


@dataclass(frozen=True)
class InterfaceParams:
    """One link interface as the core sees it.

    ``flood_dest`` is where link-wide frames (hellos, route updates) go: MULTICAST
    (UDP LAN discovery; known neighbours and static peers also get a unicast copy,
    since they may have found us by their own static config and not hear the group),
    BROADCAST (radio, simulator: one frame reaches everyone) or None (unicast only,
    to static peers and known neighbours).

    ``timing``, when set, overrides the node-wide hello interval, neighbour timeout,
    update interval and route expiry on this interface (a slow radio must keep its
    idle control traffic to a few percent of its rate); the other timers stay global.
    """

    name: str
    mtu: int = 1400
    flood_dest: LinkAddr | None = MULTICAST
    static_peers: tuple[LinkAddr, ...] = ()
    timing: Timing | None = None
    # The largest routed DATA frame the link carries when that is more than ``mtu``: a
    # radio compresses DATA headers per neighbour (meshpipe.link.compress). 0: ``mtu``.
    # Path MTUs, forwarding and MSP segments use it; control frames keep to ``mtu``.
    data_mtu: int = 0

    @property
    def routed_mtu(self) -> int:
        return self.data_mtu or self.mtu


@dataclass(frozen=True)
class Timing:
    """Protocol timers, seconds. All periodic timers fire up to ``jitter`` early."""

    hello_interval: float = 1.0
    neighbour_timeout: float = 4.0  # a neighbour not heard for this long is dropped
    update_interval: float = 4.0  # full route dump period
    route_expiry: float = 14.0  # a route entry not refreshed for this long is removed
    request_timeout: float = 1.0  # resend an unanswered seqno request after this long
    request_retries: int = 3
    triggered_delay: float = 0.02  # batches triggered updates caused by one burst of frames
    source_gc: float = 180.0  # forget the feasibility distance of an origin unseen this long
    jitter: float = 0.1  # timers fire up to this fraction early, against synchronisation


@dataclass(frozen=True)
class Limits:
    """Caps on the tables a neighbour can grow (see docs/threat-model.md, Routing).

    Past a cap a newcomer is refused (counted, logged at most every 10 s); what is
    held is never evicted for it.
    """

    max_routes: int = DEFAULT_MAX_ROUTES  # origins in the route table
    # Route entries learnt from one neighbour, so one cannot take the whole table.
    max_routes_per_neighbour: int = DEFAULT_MAX_ROUTES_PER_NEIGHBOUR
    max_neighbours: int = DEFAULT_MAX_NEIGHBOURS  # per interface


@dataclass(frozen=True)
class NeighbourInfo:
    sid: Sid
    iface: int
    addr: LinkAddr
    rtt_ms: float  # 0.0 until measured
    loss_in: float  # fraction of its hellos we miss
    loss_out: float  # fraction of our hellos it misses (1.0 until it tells us)
    cost: int
    last_heard: float
    iface_name: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": str(self.sid),
            "iface": self.iface_name or str(self.iface),
            "iface_index": self.iface,
            "addr": addr_text(self.addr),
            "rtt_ms": round(self.rtt_ms, 3),
            "loss_in": round(self.loss_in, 4),
            "loss_out": round(self.loss_out, 4),
            "cost": self.cost,
            "last_heard": self.last_heard,
        }


@dataclass(frozen=True)
class RouteInfo:
    sid: Sid
    next_hop: Sid
    hops: int
    metric: int
    seqno: int
    iface: int
    iface_name: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": str(self.sid),
            "next_hop": str(self.next_hop),
            "hops": self.hops,
            "metric": self.metric,
            "seqno": self.seqno,
            "iface": self.iface_name or str(self.iface),
            "iface_index": self.iface,
        }


def addr_text(addr: LinkAddr) -> str:
    if isinstance(addr, int) and not isinstance(addr, bool):
        return f"radio:{addr:04x}"  # a 16-bit radio link address (meshpipe.link.kiss)
    if isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[1], int):
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _default_rng(identity: Identity, now: float) -> random.Random:
    # Deterministic per node and start time; nothing here needs secret randomness.
    seed = hashlib.blake2b(bytes(identity.sid) + repr(now).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(seed, "big"))


class NodeCore:
    """Neighbour discovery, distance-vector routing and DATA forwarding for one node."""

    def __init__(
        self,
        identity: Identity,
        interfaces: Sequence[InterfaceParams],
        timing: Timing = Timing(),  # frozen, so sharing the default is safe
        now: float = 0.0,
        rng: random.Random | None = None,
        limits: Limits = Limits(),  # frozen too
    ) -> None:
        for p in interfaces:
            if p.mtu < MIN_MTU:
                raise ValueError(f"interface {p.name}: mtu {p.mtu} is below {MIN_MTU}")
        self.identity = identity
        self.sid: Sid = identity.sid
        self.interfaces: tuple[InterfaceParams, ...] = tuple(interfaces)
        self.timing = timing
        self.iface_timing = tuple(p.timing or timing for p in self.interfaces)
        self.rng = rng if rng is not None else _default_rng(identity, now)
        self.counters: collections.Counter[str] = collections.Counter()
        # The boot epoch tells neighbours we restarted (state about us must be reset);
        # mixing in the clock keeps it fresh even if a restart reuses the rng seed.
        epoch = self.rng.getrandbits(32) ^ (int(now * 1000) & 0xFFFFFFFF)
        self.links = NeighbourTable(
            identity,
            len(self.interfaces),
            hello_interval=timing.hello_interval,
            neighbour_timeout=timing.neighbour_timeout,
            epoch=epoch,
            rng=self.rng,
            iface_hello_intervals=[t.hello_interval for t in self.iface_timing],
            iface_timeouts=[t.neighbour_timeout for t in self.iface_timing],
            max_neighbours=limits.max_neighbours,
        )
        self._peer_refused_log_at = -math.inf
        self.router = Router(
            identity,
            self.links.by_key,
            self.counters,
            now=now,
            rng=self.rng,
            update_interval=timing.update_interval,
            route_expiry=timing.route_expiry,
            request_timeout=timing.request_timeout,
            request_retries=timing.request_retries,
            triggered_delay=timing.triggered_delay,
            source_gc=timing.source_gc,
            jitter=timing.jitter,
            iface_update_intervals=[
                p.timing.update_interval if p.timing else None for p in interfaces
            ],
            iface_route_expiry=[p.timing.route_expiry if p.timing else None for p in interfaces],
            iface_mtus=[p.routed_mtu for p in interfaces],
            max_routes=limits.max_routes,
            max_routes_per_neighbour=limits.max_routes_per_neighbour,
        )
        # First hellos go out almost at once, spread a little so a mesh booted
        # together does not transmit in lockstep.
        self._next_hello = [
            now + self.rng.random() * timing.jitter * t.hello_interval for t in self.iface_timing
        ]
        self.fwd = Forwarder(self.sid, [p.routed_mtu for p in self.interfaces], self.counters)
        self._dirty: dict[bytes, None] = {}  # ordered set, for deterministic replays
        self.fwd_generation = 0  # bumped whenever the forwarding table changes
        self._frame_seq = self.rng.randrange(SEQNO_MOD)  # routing frame counter
        self._deadline = now
        self._recompute_deadline()

    # -- public entry points -------------------------------------------------------------

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        out: list[Action] = []
        try:
            if not 0 <= iface < len(self.interfaces):
                self.counters["drop.bad_iface"] += 1
                return []
            frame = bytes(frame)
            kind = wire.frame_kind(frame)
            if kind == wire.KIND_HELLO or kind == wire.KIND_HELLO_COPY:
                self._on_hello(iface, src, frame, now, out)
            elif kind == wire.KIND_ROUTING:
                self._on_routing(iface, src, frame, now)
            else:
                self._on_data(frame, out)
        except BadSignature:
            self.counters["drop.bad_signature"] += 1
        except NeighbourTableFull:
            self.counters["drop.neighbour_table_full"] += 1
            if now >= self._peer_refused_log_at:
                self._peer_refused_log_at = now + REFUSED_LOG_INTERVAL
                out.append(
                    Event(
                        "peer.refused",
                        {
                            "iface": self.interfaces[iface].name,
                            "addr": addr_text(src),
                            "refused": self.counters["drop.neighbour_table_full"],
                            "max_neighbours": self.links.max_neighbours,
                        },
                    )
                )
        except FrameError:
            self.counters["drop.malformed"] += 1
        except Exception as exc:  # a bug must cost one frame, never the node
            self.counters["drop.internal_error"] += 1
            out.append(Event("frame.error", {"error": repr(exc), "iface": iface}))
        return self._finish(now, out)

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        tick = self.links.tick(now)
        for nb in tick.dropped:
            self._neighbour_gone(nb, "peer.down", now, out)
        for nb in tick.cost_changed:
            self.router.link_changed(nb.key, now)
            self._dirty[bytes(nb.sid)] = None
        for i, p in enumerate(self.interfaces):
            if now >= self._next_hello[i]:
                interval = self.iface_timing[i].hello_interval
                if not self.links.on_iface(i):
                    # Nobody heard yet (nodes booted together, a first hello lost or
                    # collided): try again soon; it costs a link with neighbours nothing.
                    interval = min(interval, LONELY_HELLO_INTERVAL)
                jitter = self.timing.jitter * self.rng.random()
                self._next_hello[i] = now + interval * (1.0 - jitter)
                for f in self.links.build_hello(i, now, p.mtu):
                    out.extend(self._link_wide(i, f, copy_kind=wire.KIND_HELLO_COPY))
                    self.counters["hello.tx"] += 1
        self.router.tick(now)
        return self._finish(now, out)

    def next_deadline(self) -> float:
        return self._deadline

    def send_data(
        self, dst: bytes, payload: bytes, now: float, hop_limit: int = wire.DEFAULT_HOP_LIMIT
    ) -> list[Action]:
        """Route a DATA frame from this node to ``dst``; [] (and data.no_route) if no route."""
        return self.fwd.send_data(dst, payload, hop_limit)

    def farewell(self) -> list[Action]:
        """Link-wide frames retracting every route this node announces (shutdown)."""
        out: list[Action] = []
        self._emit_routing([Outgoing(None, self.router.farewell())], out)
        return out

    def neighbours(self) -> list[NeighbourInfo]:
        return [
            NeighbourInfo(
                sid=nb.sid,
                iface=nb.iface,
                addr=nb.addr,
                rtt_ms=nb.srtt_ms if nb.srtt_ms is not None else 0.0,
                loss_in=1.0 - nb.p_in,
                loss_out=1.0 - nb.p_out,
                cost=nb.cost,
                last_heard=nb.last_heard,
                iface_name=self.interfaces[nb.iface].name,
            )
            for nb in self.links
        ]

    def routes(self) -> list[RouteInfo]:
        return sorted(
            (
                RouteInfo(
                    sid=Sid(origin),
                    next_hop=sel.next_hop,
                    hops=sel.hops,
                    metric=sel.metric,
                    seqno=sel.seqno,
                    iface=sel.nb[0],
                    iface_name=self.interfaces[sel.nb[0]].name,
                )
                for origin, sel in self.router.selected.items()
                if sel.metric < INFINITY
            ),
            key=lambda r: bytes(r.sid),
        )

    def forwarding_table(self) -> dict[bytes, tuple[int, LinkAddr]]:
        return dict(self.fwd.table)

    def next_hop(self, dst: bytes) -> tuple[int, LinkAddr] | None:
        """(interface, link address) towards ``dst``; no copy of the table."""
        return self.fwd.table.get(bytes(dst))

    # -- frames --------------------------------------------------------------------------

    def _on_hello(
        self, iface: int, src: LinkAddr, frame: bytes, now: float, out: list[Action]
    ) -> None:
        res = self.links.on_hello(iface, src, frame, now)
        if res is None:
            self.counters["hello.stale"] += 1
            return
        if res.own:
            self.counters["hello.own"] += 1
            return
        self.counters["hello.rx"] += 1
        nb = res.neighbour
        if res.replaced is not None:
            self._neighbour_gone(res.replaced, "peer.down", now, out)
        if res.restarted:
            # Routes learned from its previous life are void; it starts from scratch.
            self.router.neighbour_lost(nb.key, now)
            self.counters["peer.restarted"] += 1
            out.append(Event("peer.restarted", self._peer_fields(nb)))
        if res.new:
            self.counters["peer.up"] += 1
            out.append(Event("peer.up", self._peer_fields(nb)))
        if res.new or res.restarted:
            # Answer at once (same seqno, so nobody counts a missed hello): the
            # neighbour learns our IHU now instead of a hello interval later.
            for f in self.links.build_hello(iface, now, self.interfaces[iface].mtu, advance=False):
                out.append(SendFrame(iface, src, f))
                self.counters["hello.tx"] += 1
        if res.cost_changed:
            self.router.link_changed(nb.key, now)
            self._dirty[bytes(nb.sid)] = None
        if res.became_usable:
            self.router.link_up(nb.key, now)

    def _on_routing(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> None:
        parsed = decode_routing(frame)
        nb = self.links.by_key.get((iface, src))
        if nb is None:
            self.counters["drop.unknown_neighbour"] += 1
            return
        self.counters["update.rx"] += 1
        self.router.on_routing(nb.key, parsed, now)

    def _on_data(self, frame: bytes, out: list[Action]) -> None:
        out.extend(self.fwd.on_data(frame))

    # -- helpers -------------------------------------------------------------------------

    def _peer_fields(self, nb: Neighbour) -> dict[str, Any]:
        return {
            "sid": nb.sid.short,
            "iface": self.interfaces[nb.iface].name,
            "addr": addr_text(nb.addr),
        }

    def _neighbour_gone(self, nb: Neighbour, event: str, now: float, out: list[Action]) -> None:
        self.counters[event] += 1
        out.append(Event(event, self._peer_fields(nb)))
        self.router.neighbour_lost(nb.key, now)
        self._dirty[bytes(nb.sid)] = None

    def _link_wide(self, iface: int, frame: bytes, copy_kind: int | None = None) -> list[Action]:
        """One link-wide frame as SendFrames (see InterfaceParams.flood_dest); with
        ``copy_kind``, the unicast copies beside a multicast one carry that kind."""
        p = self.interfaces[iface]
        out: list[Action] = []
        if p.flood_dest is not None:
            out.append(SendFrame(iface, p.flood_dest, frame))
            if p.flood_dest == BROADCAST:
                return out
            if copy_kind is not None:
                frame = wire.kind_byte(copy_kind) + frame[1:]
        targets: dict[LinkAddr, None] = dict.fromkeys(p.static_peers)
        for nb in self.links.on_iface(iface):
            targets[nb.addr] = None
        targets.pop(MULTICAST, None)
        out.extend(SendFrame(iface, a, frame) for a in targets)
        return out

    def _emit_routing(self, items: list[Outgoing], out: list[Action]) -> None:
        by_mtu: dict[tuple[int, int], list[bytes]] = {}
        for item in items:
            if item.to is None:
                for i, p in enumerate(self.interfaces):
                    if item.ifaces is not None and i not in item.ifaces:
                        continue
                    frames = by_mtu.get((id(item), p.mtu))
                    if frames is None:
                        frames = pack_routing(item.updates, item.requests, p.mtu, self._next_seq)
                        by_mtu[(id(item), p.mtu)] = frames
                    for f in frames:
                        out.extend(self._link_wide(i, f))
                        self.counters["update.tx"] += 1
            else:
                iface, addr = item.to
                if (iface, addr) not in self.links.by_key:
                    continue  # the neighbour went away in the meantime
                mtu = self.interfaces[iface].mtu
                for f in pack_routing(item.updates, item.requests, mtu, self._next_seq):
                    out.append(SendFrame(iface, addr, f))
                    self.counters["update.tx"] += 1

    def _next_seq(self) -> int:
        self._frame_seq = (self._frame_seq + 1) % SEQNO_MOD
        return self._frame_seq

    def _forwarding_entry(self, dst: bytes) -> tuple[int, LinkAddr] | None:
        sel = self.router.selected.get(dst)
        if sel is not None and sel.metric < INFINITY:
            return sel.nb
        # A direct neighbour is reachable even before (or without) a route to it.
        peers = self.links.by_sid.get(dst)
        if peers:
            best = min(peers.values(), key=lambda n: n.cost)
            return best.key
        return None

    def _finish(self, now: float, out: list[Action]) -> list[Action]:
        self._emit_routing(self.router.flush(now), out)
        events, dirty = self.router.drain()
        out.extend(events)
        dirty |= self._dirty
        self._dirty = {}
        changes: dict[bytes, tuple[int, LinkAddr] | None] = {}
        for dst in dirty:
            new = self._forwarding_entry(dst)
            if new != self.fwd.table.get(dst):
                changes[dst] = new
                if new is None:
                    del self.fwd.table[dst]
                else:
                    self.fwd.table[dst] = new
        if changes:
            self.fwd_generation += 1
            out.append(ForwardingChanged(changes))
        self._recompute_deadline()
        return out

    def _recompute_deadline(self) -> None:
        self._deadline = min(
            min(self._next_hello, default=math.inf),
            self.links.next_deadline(),
            self.router.next_deadline(),
        )


__all__ = [
    "MIN_MTU",
    "InterfaceParams",
    "Limits",
    "NeighbourInfo",
    "NodeCore",
    "RouteInfo",
    "Timing",
]
