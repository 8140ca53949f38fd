"""Node records: each node's name and its neighbours with link costs, signed and flooded.

A node record says "node ORIGIN calls itself NAME and has these neighbours at these
link costs, until EXPIRY". It travels like a service record (meshpipe.services.discovery,
sharing meshpipe.flood): an Ed25519 signature by the origin over a domain string and
the exact msgpack body, so nobody can speak for another node or alter a record in
transit; the unsigned ``hops`` is raised by each forwarder::

    body = [1, origin: bin 32, name: str (0..63), expiry: u64 (unix seconds), seq: u64,
            [[neighbour: bin 32, cost: u16], ...]]   (at most MAX_NEIGHBOURS)
    signature = Ed25519(origin key, NODE_DOMAIN + body)
    item = [body: bin, signature: bin 64, hops: u8]

NODE frames (``wire.KIND_NODE``, link-local, flooded like route updates)::

    [1, [item, ...]]

One record per origin is kept: a higher ``seq`` replaces it, and it is forgotten at
its expiry. A node re-issues its own record every ``refresh`` seconds, and when its
neighbour set changes or a cost moves by more than ``cost_change`` (a fraction), but
never twice within ``min_interval``. A new neighbour is sent the live records at once
(the MAX_SYNC nearest), so a node that joins knows the mesh without waiting for
refreshes. The neighbours in a record are the cheapest links, as many as
``max_neighbours`` and as fit one frame of the node's smallest interface MTU. Names
are claims, not proofs: two nodes may claim the same name, and nothing here prefers
one (meshpipe.names does, by distance).

Drops (counters): ``noderec.drop.malformed``, ``.oversize``, ``.forged``,
``.conflict`` (two validly signed bodies with one seq), ``.stale``, ``.expired``,
``.bad_expiry``, ``.hops``, ``.rate``, ``.cache_full``. Also ``noderec.accepted``,
``.duplicate``, ``.own``, ``.issued``, ``.sync``, ``.tx.frames``, ``.rx.frames``,
``.rx.records``. Events: ``node.discovered`` / ``node.expired`` (sid, name, hops),
``node.forged`` (origin, from).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from meshpipe import wire
from meshpipe.actions import Event
from meshpipe.errors import FrameError, MeshpipeError
from meshpipe.flood import (
    MAX_ITEMS,
    SEQ_MAX,
    FloodQueue,
    OriginBuckets,
    SignedItem,
    admit,
    item_parts,
    next_seq,
    pack_items,
)
from meshpipe.identity import SID_LEN, Identity
from meshpipe.services.discovery import DiscoveryOut, NeighbourKey

NODE_DOMAIN = b"meshpipe-node-v1"
RECORD_VERSION = 1
MSG_ANNOUNCE = 1
MAX_NAME = 63  # one DNS label
MAX_NEIGHBOURS = 24  # protocol bound; a node's own limit is NodeRecordTiming.max_neighbours
MAX_COST = 0xFFFE  # 0xFFFF (unusable) links are never listed
MAX_BODY = 1100  # fits MAX_NEIGHBOURS neighbours and the longest name
MAX_HOPS = 64  # as routing's hop limit
MAX_LIFETIME = 3600.0
MAX_CACHE = 4096  # origins
MAX_SYNC = 256  # records sent to a new neighbour, nearest first (the rest come by refresh)
_ANNOUNCE_OVERHEAD = 8  # kind byte, outer array, type, list header
_ITEM_OVERHEAD = 72  # item array, body bin header, signature with header, hops
_NEIGHBOUR_SIZE = 38  # fixarray, bin 8 header + 32, u16 cost
_FIXED_SIZE = 1 + 1 + 34 + 9 + 9 + 3  # array, version, origin, expiry, seq, list header


class NodeRecordError(MeshpipeError, ValueError):
    """A record cannot be made as given (bad name, too many neighbours, wrong key)."""


def check_node_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
        raise NodeRecordError(f"node name {name!r}: at most {MAX_NAME} printable characters")
    return name


@dataclass(frozen=True, slots=True)
class NodeRecord:
    origin: bytes
    name: str
    expiry: int  # unix seconds
    seq: int
    neighbours: tuple[tuple[bytes, int], ...]  # (SID, link cost), cheapest first

    def body(self) -> bytes:
        return wire.pack_body(
            [
                RECORD_VERSION,
                bytes(self.origin),
                self.name,
                self.expiry,
                self.seq,
                [[bytes(s), c] for s, c in self.neighbours],
            ]
        )

    @classmethod
    def decode(cls, body: bytes) -> NodeRecord:
        """Strictly parse a signed body (FrameError on anything off)."""
        if len(body) > MAX_BODY:
            raise FrameError("node record body too large")
        f = wire.expect_record(wire.unpack_body(body), 6, "node record")
        wire.expect_int(f[0], RECORD_VERSION, RECORD_VERSION, "node record version")
        origin = wire.expect_bytes(f[1], SID_LEN, "node record origin")
        try:
            name = check_node_name(f[2])
        except NodeRecordError as exc:
            raise FrameError(str(exc)) from None
        neighbours: list[tuple[bytes, int]] = []
        seen = {origin}
        for raw in wire.expect_list(f[5], MAX_NEIGHBOURS, "node record neighbours"):
            n = wire.expect_record(raw, 2, "node record neighbour")
            sid = wire.expect_bytes(n[0], SID_LEN, "neighbour SID")
            if sid in seen:
                raise FrameError("node record: a neighbour is listed twice (or is the origin)")
            seen.add(sid)
            neighbours.append((sid, wire.expect_int(n[1], 1, MAX_COST, "neighbour cost")))
        return cls(
            origin=origin,
            name=name,
            expiry=wire.expect_int(f[3], 0, SEQ_MAX, "node record expiry"),
            seq=wire.expect_int(f[4], 0, SEQ_MAX, "node record seq"),
            neighbours=tuple(neighbours),
        )


class SignedNodeRecord(SignedItem[NodeRecord]):
    __slots__ = ()
    DOMAIN: ClassVar[bytes] = NODE_DOMAIN


def sign_node_record(identity: Identity, record: NodeRecord) -> SignedNodeRecord:
    if bytes(record.origin) != bytes(identity.sid):
        raise NodeRecordError("a node record can only be signed by its origin")
    body = record.body()
    try:
        NodeRecord.decode(body)  # what we send must pass our own strict parser
    except FrameError as exc:
        raise NodeRecordError(f"node record: {exc}") from None
    return SignedNodeRecord(record, body, identity.sign(NODE_DOMAIN + body))


def encode_announce(items: list[list[Any]]) -> bytes:
    return wire.encode_control(wire.KIND_NODE, [MSG_ANNOUNCE, items])


def decode_announce(frame: bytes) -> list[Any]:
    """The items of a NODE frame (checked one by one later); FrameError if damaged."""
    if wire.frame_kind(frame) != wire.KIND_NODE:
        raise FrameError("not a node frame")
    f = wire.expect_record(wire.decode_control(frame), 2, "node announce")
    wire.expect_int(f[0], MSG_ANNOUNCE, MSG_ANNOUNCE, "node message type")
    return wire.expect_list(f[1], MAX_ITEMS, "node announce items")


def neighbours_that_fit(mtu: int, name: str) -> int:
    """How many neighbours one record can list and still fit a frame of ``mtu`` bytes."""
    room = mtu - _ANNOUNCE_OVERHEAD - _ITEM_OVERHEAD - _FIXED_SIZE - len(name.encode()) - 2
    return max(0, min(MAX_NEIGHBOURS, room // _NEIGHBOUR_SIZE))


@dataclass(frozen=True, slots=True)
class NodeLink:
    """One of this node's links as the record builder sees it."""

    sid: bytes
    cost: int
    key: NeighbourKey  # where a unicast to it goes


@dataclass(frozen=True)
class NodeRecordTiming:
    # Changes re-issue at once (min_interval); the refresh only proves the node is still
    # there, and every refresh floods the whole mesh, radios included (issue 18: an idle
    # radio carries at most 1% of its rate): slow.
    lifetime: float = 450.0  # a record is valid this long after it is issued
    refresh: float = 150.0  # re-issue this often even when nothing changed
    min_interval: float = 5.0  # never re-issue sooner than this (changes are coalesced)
    check: float = 1.0  # look at the links and sweep expired records this often
    cost_change: float = 0.25  # re-issue when a link cost moves by more than this fraction
    max_neighbours: int = 16
    flood_delay: float = 0.05  # batch relayed records into few frames
    max_skew: float = 30.0  # tolerated wall-clock difference between nodes
    rate: float = 0.5  # records per second accepted from one origin (after a burst)
    burst: float = 8.0
    jitter: float = 0.1


@dataclass(slots=True)
class _Cached:
    signed: SignedNodeRecord
    received: float  # local time
    hops: int  # ours: the item's hops + 1


class NodeRecords:
    """This node's own record and the cache of everyone else's."""

    def __init__(
        self,
        identity: Identity,
        now: float,
        *,
        name: str | None = None,
        clock_offset: float = 0.0,
        mtu: int = 1400,
        timing: NodeRecordTiming | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.sid = bytes(identity.sid)
        self.name = check_node_name(name or "")
        self.offset = clock_offset  # wall clock = now + offset
        self.mtu = mtu
        self.t = timing or NodeRecordTiming()
        if not 0 < self.t.refresh < self.t.lifetime <= MAX_LIFETIME:
            raise NodeRecordError(
                f"node record timing: want 0 < refresh < lifetime <= {MAX_LIFETIME:g}"
            )
        if not 0 <= self.t.max_neighbours <= MAX_NEIGHBOURS:
            raise NodeRecordError(f"max_neighbours: want 0..{MAX_NEIGHBOURS}")
        self.rng = rng or random.Random(self.sid)
        self.counters: Counter[str] = Counter()
        self.cache: dict[bytes, _Cached] = {}
        self.buckets = OriginBuckets(self.t.rate, self.t.burst, MAX_CACHE)
        self.own: SignedNodeRecord | None = None
        self.events: list[Event] = []
        self._last_seq = 0
        self._issued_at = -math.inf
        self._refresh_at = now  # the first on_timer issues our record
        self._check_at = now
        self._dirty = False
        self._links: dict[NeighbourKey, NodeLink] = {}
        self._flood = FloodQueue(self.t.flood_delay)
        self._out: list[DiscoveryOut] = []

    def wall(self, now: float) -> float:
        return now + self.offset

    # -- own record ------------------------------------------------------------------

    def _wanted(self) -> tuple[tuple[bytes, int], ...]:
        limit = min(self.t.max_neighbours, neighbours_that_fit(self.mtu, self.name))
        best: dict[bytes, int] = {}
        for link in self._links.values():  # a neighbour on two links: the cheaper one
            if link.sid != self.sid:
                best[link.sid] = min(link.cost, best.get(link.sid, MAX_COST))
        ranked = sorted(best.items(), key=lambda sc: (sc[1], sc[0]))
        return tuple(ranked[:limit])

    def _changed(self, wanted: tuple[tuple[bytes, int], ...]) -> bool:
        if self.own is None:
            return True
        old = dict(self.own.record.neighbours)
        if set(old) != {s for s, _ in wanted}:
            return True
        return any(abs(c - old[s]) > self.t.cost_change * old[s] for s, c in wanted)

    def _issue(self, now: float, wanted: tuple[tuple[bytes, int], ...]) -> None:
        self._last_seq = next_seq(self._last_seq, self.wall(now))
        rec = NodeRecord(
            self.sid,
            self.name,
            math.ceil(self.wall(now) + self.t.lifetime),
            self._last_seq,
            wanted,
        )
        self.own = sign_node_record(self.identity, rec)
        self._issued_at = now
        self._dirty = False
        self._refresh_at = now + self.t.refresh * (1.0 - self.t.jitter * self.rng.random())
        self.counters["noderec.issued"] += 1
        if self._links:  # alone, nobody would take it; new neighbours get it by sync
            self._flood.add(self.own.item(0), now, immediate=True)

    # -- time --------------------------------------------------------------------------

    def on_timer(self, now: float, links: Sequence[NodeLink]) -> list[DiscoveryOut]:
        """Look at the links (new neighbours get every record), re-issue our record when
        due, sweep expired records and send what is queued."""
        if now >= self._check_at:
            self._check_at = now + self.t.check
            # Only links that work both ways: the far end has heard our hellos, so it
            # takes our frames (a neighbour's frames are dropped until it is known).
            current = {link.key: link for link in links if 1 <= link.cost <= MAX_COST}
            for key in current.keys() - self._links.keys():
                self._sync(key)
            self._links = current
            self._sweep(now)
            if self._changed(self._wanted()):
                self._dirty = True
        if (
            self._dirty and now >= self._issued_at + self.t.min_interval
        ) or now >= self._refresh_at:
            self._issue(now, self._wanted())
        return self._flush(now)

    def next_deadline(self) -> float:
        t = min(self._check_at, self._refresh_at, self._flood.deadline)
        if self._dirty:
            t = min(t, self._issued_at + self.t.min_interval)
        return t

    def _sync(self, key: NeighbourKey) -> None:
        items = [] if self.own is None else [self.own.item(0)]
        nearest = sorted(self.cache.values(), key=lambda c: c.hops)[:MAX_SYNC]
        items += [c.signed.item(c.hops) for c in nearest]
        for group in pack_items(items, self.mtu - _ANNOUNCE_OVERHEAD):
            self.counters["noderec.sync"] += 1
            self.counters["noderec.tx.frames"] += 1
            self._out.append(DiscoveryOut(key, encode_announce(group)))

    def _sweep(self, now: float) -> None:
        wall = self.wall(now)
        for origin in [o for o, c in self.cache.items() if c.signed.record.expiry <= wall]:
            c = self.cache.pop(origin)
            self.events.append(Event("node.expired", _ev(c.signed.record, c.hops)))

    # -- receiving -------------------------------------------------------------------

    def on_message(self, link: NeighbourKey, frame: bytes, now: float) -> list[DiscoveryOut]:
        self.counters["noderec.rx.frames"] += 1
        try:
            items = decode_announce(bytes(frame))
        except FrameError:
            self.counters["noderec.drop.malformed"] += 1
            return self._flush(now)
        for raw in items:
            self._ingest(raw, link, now)
        return self._flush(now)

    def _ingest(self, raw: Any, link: NeighbourKey, now: float) -> None:
        self.counters["noderec.rx.records"] += 1
        try:
            body, sig, hops = item_parts(raw)
            if len(body) > MAX_BODY:
                self.counters["noderec.drop.oversize"] += 1
                return
            rec = NodeRecord.decode(body)
        except FrameError:
            self.counters["noderec.drop.malformed"] += 1
            return
        signed = SignedNodeRecord(rec, body, sig, hops)
        origin = bytes(rec.origin)
        if origin == self.sid:
            self.counters["noderec.own"] += 1
            if rec.seq > self._last_seq and signed.verify():
                self._last_seq = rec.seq  # we restarted with a slow clock: stay ahead
            return
        cur = self.cache.get(origin)
        verdict = admit(
            None if cur is None else cur.signed,
            signed,
            self.wall(now),
            MAX_LIFETIME + self.t.max_skew,
        )
        if verdict == "forged":
            self._forged(origin, link)
            return
        if verdict != "new":
            name = "duplicate" if verdict == "duplicate" else f"drop.{verdict}"
            self.counters[f"noderec.{name}"] += 1
            return
        if hops + 1 > MAX_HOPS:
            self.counters["noderec.drop.hops"] += 1
            return
        if not self.buckets.take(origin, now):
            self.counters["noderec.drop.rate"] += 1
            return
        if cur is None and len(self.cache) >= MAX_CACHE:
            self.counters["noderec.drop.cache_full"] += 1
            return
        self.cache[origin] = _Cached(signed, now, hops + 1)
        self.counters["noderec.accepted"] += 1
        if cur is None:
            self.events.append(Event("node.discovered", _ev(rec, hops + 1)))
        if hops + 1 < MAX_HOPS:
            self._flood.add(signed.item(hops + 1), now)

    def _forged(self, origin: bytes, link: NeighbourKey) -> None:
        self.counters["noderec.drop.forged"] += 1
        self.events.append(
            Event("node.forged", {"origin": origin.hex()[:8], "from": repr(link[1])})
        )

    # -- what is known -----------------------------------------------------------------

    def records(self, now: float) -> list[NodeRecord]:
        """Every live record, this node's own first."""
        wall = self.wall(now)
        out = [] if self.own is None else [self.own.record]
        out += [c.signed.record for c in self.cache.values() if c.signed.record.expiry > wall]
        return out

    def hops(self, origin: bytes) -> int | None:
        c = self.cache.get(bytes(origin))
        return None if c is None else c.hops

    def drain_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # -- sending -------------------------------------------------------------------------

    def _flush(self, now: float) -> list[DiscoveryOut]:
        out, self._out = self._out, []
        for group in self._flood.take(now, self.mtu - _ANNOUNCE_OVERHEAD):
            self.counters["noderec.tx.frames"] += 1
            out.append(DiscoveryOut(None, encode_announce(group)))
        return out


def _ev(rec: NodeRecord, hops: int) -> dict[str, Any]:
    return {"sid": bytes(rec.origin).hex()[:8], "name": rec.name, "hops": hops}


__all__ = [
    "MAX_NEIGHBOURS",
    "NODE_DOMAIN",
    "NodeLink",
    "NodeRecord",
    "NodeRecordError",
    "NodeRecordTiming",
    "NodeRecords",
    "SignedNodeRecord",
    "check_node_name",
    "decode_announce",
    "encode_announce",
    "neighbours_that_fit",
    "sign_node_record",
]
