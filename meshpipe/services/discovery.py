"""Service discovery: signed service records flooded hop by hop, cached until expiry.

A record says "node ORIGIN offers service NAME of KIND on MSP port PORT until
EXPIRY". Its msgpack body is signed by the origin, the way route announcements
are (meshpipe.routing): Ed25519 over a domain string followed by the exact bytes,
so nobody can announce a service in someone else's name or change one in transit::

    body = [1, origin: bin 32, name: str, port: u16, kind: str, attrs: map,
            expiry: u64 (unix seconds), seq: u64, scope: u8, withdrawn: bool]
    signature = Ed25519(origin key, SERVICE_DOMAIN + body)
    item = [body: bin, signature: bin 64, hops: u8]

``hops`` (how far the item has travelled) is not signed: forwarders raise it, and
a liar can claim 0, so it is shown but never ranked by (``services()`` rows carry
``metric``, the routing metric to the origin, for that; see choose.py). The
signed ``scope`` bounds how far a record floods. ``seq`` grows with the origin's
wall clock, so it keeps growing across restarts; ``expiry`` is absolute wall-clock
time, so a replayed record dies when the original would have. A withdraw is a
signed tombstone (``withdrawn`` true, a higher seq) kept until its own expiry, so
an older announcement arriving late cannot resurrect the service.

DISCOVERY frames (``wire.KIND_DISCOVERY``, link-local like routing)::

    [1, [item, ...]]                                  announce (flooded)
    [2, tag: bin 8, name: str | nil, hops_left: u8]  query (flooded)
    [3, tag: bin 8, [item, ...]]                      answer (back along the query's path)

A query floods with a hop budget under a random 8-byte tag (it names neither the
asking node nor anything else); each node remembers the neighbour it first heard
the tag from, answers with the live records it knows that match, and relays
other nodes' answers back along that reverse path.

Cache limits (:class:`DiscoveryLimits`, ``[limits]`` in the config): at most
``max_records`` records in all, ``max_per_origin`` per origin and
``max_per_neighbour`` charged to the neighbour a record first arrived from, so
one link cannot take the whole cache however many fresh keys it makes up. A record
held is never evicted by a newcomer, with one exception: a record whose origin had
no route when it arrived (and still has none) gives way to a new record whose
origin we have a route to, taken from the same neighbour's share when that share is
full, else from the neighbour holding most. A record nobody can reach is worth
least; honest, reachable records stay. Refusals are counted and logged as
``discovery.refused`` (reason, from, refused since the last such line), at most
once per ``REFUSED_LOG_EVERY`` seconds per reason.

Drops (counters): ``discovery.drop.malformed``, ``.oversize``, ``.forged`` (bad
signature, including a transit change to a signed field), ``.conflict`` (two
validly signed different bodies with one seq), ``.stale`` (a seq older than the
one cached: a replay), ``.expired``, ``.bad_expiry`` (too far in the future),
``.scope``, ``.rate`` (the origin's token bucket is empty), ``.neighbour_rate``
(the bucket of the link it came over: signature checks per neighbour),
``.origin_full``,
``.neighbour_full``, ``.cache_full`` (the three caps above), ``.query_rate``,
``.no_path``; ``discovery.evicted.unrouted`` counts records that gave way. Also
``discovery.duplicate``, ``.accepted``,
``.own`` (our own record heard back), ``.tx.frames``, ``.rx.frames``,
``.query.tx``, ``.query.rx``, ``.answer.tx``, ``.answer.rx``, ``.announce.tx``.

Events: ``service.discovered`` / ``service.withdrawn`` / ``service.expired``
(name, sid, hops) and ``service.forged`` (origin, name, from).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meshpipe import wire
from meshpipe.actions import Event
from meshpipe.errors import FrameError, MeshpipeError
from meshpipe.flood import MAX_ITEMS, SEQ_MAX, SignedItem, item_parts, next_seq, pack_items
from meshpipe.identity import SID_LEN, Identity

SERVICE_DOMAIN = b"meshpipe-service-v1"
RECORD_VERSION = 1
# One record with its signature must fit a 256-byte frame (the core's smallest MTU)
# even inside an answer: 192 - 16 (answer header) - 72 (item framing, signature).
MAX_BODY = 104
MAX_NAME = 24
MAX_KIND = 12
MAX_ATTRS = 4
MAX_ATTR_KEY = 16
MAX_ATTR_VALUE = 64
MAX_SCOPE = 32
DEFAULT_SCOPE = 16
# Longest lifetime a record may claim. A protocol constant, not a node's own setting,
# so nodes configured with different lifetimes still accept each other's records.
MAX_LIFETIME = 3600.0
MAX_BUCKETS = 4096
MAX_QUERY_PATHS = 1024

MSG_ANNOUNCE = 1
MSG_QUERY = 2
MSG_ANSWER = 3
TAG_LEN = 8
_ANSWER_OVERHEAD = 16  # kind byte, outer array, type, tag (10), list header (3)
_ANNOUNCE_OVERHEAD = 8

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,23}")
_KIND = re.compile(r"[a-z0-9][a-z0-9_-]{0,11}")

NeighbourKey = tuple[int, Hashable]  # (interface index, link address), as in the core
RecordKey = tuple[bytes, str]  # (origin, name)
RouteMetric = Callable[[bytes], "int | None"]  # origin -> routing metric, None: no route
REFUSED_LOG_EVERY = 10.0  # seconds between two discovery.refused lines of one reason
AttrValue = str | int | bool


class ServiceError(MeshpipeError, ValueError):
    """A local service cannot be announced as given (bad name, too big, unknown)."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ServiceError(
            f"service name {name!r}: 1 to {MAX_NAME} characters from a-z, 0-9, '.', '_', '-' "
            "(starting with a letter or digit)"
        )
    return name


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ServiceError(f"service kind {kind!r}: 1 to {MAX_KIND} characters from a-z, 0-9, _-")
    return kind


def _check_attrs(attrs: object) -> dict[str, AttrValue]:
    if not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS:
        raise FrameError(f"attrs: want a map of at most {MAX_ATTRS} entries")
    for k, v in attrs.items():
        if not isinstance(k, str) or not 1 <= len(k) <= MAX_ATTR_KEY:
            raise FrameError("attrs: bad key")
        if isinstance(v, str):
            if len(v) > MAX_ATTR_VALUE:
                raise FrameError("attrs: value too long")
        elif isinstance(v, bool):
            pass
        elif isinstance(v, int):
            wire.expect_int(v, -(1 << 63), (1 << 63) - 1, "attrs value")
        else:
            raise FrameError("attrs: values are strings, integers or booleans")
    return dict(attrs)


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    origin: bytes
    name: str
    port: int
    kind: str
    attrs: Mapping[str, AttrValue]
    expiry: int  # unix seconds
    seq: int
    scope: int = DEFAULT_SCOPE
    withdrawn: bool = False

    def body(self) -> bytes:
        return wire.pack_body(
            [
                RECORD_VERSION,
                bytes(self.origin),
                self.name,
                self.port,
                self.kind,
                dict(self.attrs),
                self.expiry,
                self.seq,
                self.scope,
                self.withdrawn,
            ]
        )

    @classmethod
    def decode(cls, body: bytes) -> ServiceRecord:
        """Strictly parse a signed body (FrameError on anything off)."""
        if len(body) > MAX_BODY:
            raise FrameError("record body too large")
        f = wire.expect_record(wire.unpack_body(body), 10, "service record")
        wire.expect_int(f[0], RECORD_VERSION, RECORD_VERSION, "record version")
        try:
            name, kind = check_name(f[2]), check_kind(f[4])
        except ServiceError as exc:
            raise FrameError(str(exc)) from None
        if not isinstance(f[9], bool):
            raise FrameError("withdrawn: want a boolean")
        return cls(
            origin=wire.expect_bytes(f[1], SID_LEN, "record origin"),
            name=name,
            port=wire.expect_int(f[3], 1, 65535, "record port"),
            kind=kind,
            attrs=_check_attrs(f[5]),
            expiry=wire.expect_int(f[6], 0, SEQ_MAX, "record expiry"),
            seq=wire.expect_int(f[7], 0, SEQ_MAX, "record seq"),
            scope=wire.expect_int(f[8], 1, MAX_SCOPE, "record scope"),
            withdrawn=f[9],
        )


class SignedRecord(SignedItem[ServiceRecord]):
    __slots__ = ()
    DOMAIN: ClassVar[bytes] = SERVICE_DOMAIN


def sign_record(identity: Identity, record: ServiceRecord) -> SignedRecord:
    if bytes(record.origin) != bytes(identity.sid):
        raise ServiceError("a record can only be signed by its origin")
    body = record.body()
    if len(body) > MAX_BODY:
        raise ServiceError(f"service record is {len(body)} bytes; the limit is {MAX_BODY}")
    ServiceRecord.decode(body)  # what we send must pass our own strict parser
    return SignedRecord(record, body, identity.sign(SERVICE_DOMAIN + body))


@dataclass(frozen=True, slots=True)
class Announce:
    items: list[Any]


@dataclass(frozen=True, slots=True)
class Query:
    tag: bytes
    name: str | None
    hops_left: int


@dataclass(frozen=True, slots=True)
class Answer:
    tag: bytes
    items: list[Any]


def decode_frame(frame: bytes) -> Announce | Query | Answer:
    """Parse the envelope of a DISCOVERY frame; items are checked one by one later."""
    if wire.frame_kind(frame) != wire.KIND_DISCOVERY:
        raise FrameError("not a discovery frame")
    outer = wire.expect_list(wire.decode_control(frame), 5, "discovery")
    if not outer:
        raise FrameError("discovery: empty message")
    typ = wire.expect_int(outer[0], 1, 3, "discovery message type")
    if typ == MSG_ANNOUNCE:
        f = wire.expect_record(outer, 2, "announce")
        return Announce(wire.expect_list(f[1], MAX_ITEMS, "announce items"))
    if typ == MSG_QUERY:
        f = wire.expect_record(outer, 4, "query")
        name = f[2]
        if name is not None:
            try:
                name = check_name(name)
            except ServiceError as exc:
                raise FrameError(str(exc)) from None
        return Query(
            wire.expect_bytes(f[1], TAG_LEN, "query tag"),
            name,
            wire.expect_int(f[3], 0, MAX_SCOPE, "query hops"),
        )
    f = wire.expect_record(outer, 3, "answer")
    return Answer(
        wire.expect_bytes(f[1], TAG_LEN, "query tag"),
        wire.expect_list(f[2], MAX_ITEMS, "answer items"),
    )


def encode_announce(items: list[list[Any]]) -> bytes:
    return wire.encode_control(wire.KIND_DISCOVERY, [MSG_ANNOUNCE, items])


def encode_query(tag: bytes, name: str | None, hops_left: int) -> bytes:
    return wire.encode_control(wire.KIND_DISCOVERY, [MSG_QUERY, bytes(tag), name, hops_left])


def encode_answer(tag: bytes, items: list[list[Any]]) -> bytes:
    return wire.encode_control(wire.KIND_DISCOVERY, [MSG_ANSWER, bytes(tag), items])


@dataclass(frozen=True)
class DiscoveryTiming:
    """Discovery timers (seconds) and limits."""

    lifetime: float = 120.0  # a record is valid this long after it is issued
    refresh: float = 40.0  # re-announce own services this often (well before expiry)
    flood_delay: float = 0.05  # batch the records of one burst into few frames
    withdraw_repeat: float = 2.0  # a withdraw is flooded twice, this far apart
    query_path_timeout: float = 10.0  # how long answers can travel back
    startup_query: float | None = 3.0  # ask for everything this long after start
    max_skew: float = 30.0  # tolerated wall-clock difference between nodes
    rate: float = 2.0  # records per second accepted from one origin (after a burst)
    burst: float = 32.0
    # New records (signature checks) per second from one neighbour, after a burst
    # big enough for a whole mesh's records in the answers to one query.
    neighbour_rate: float = 128.0
    neighbour_burst: float = 4096.0
    query_rate: float = 8.0  # queries per second this node handles (after a burst)
    query_burst: float = 64.0
    scope: int = DEFAULT_SCOPE  # hop limit of own records and queries
    jitter: float = 0.1


@dataclass(frozen=True)
class DiscoveryLimits:
    """Caps on the cache of other nodes' records (tombstones included)."""

    max_records: int = 4096
    max_per_origin: int = 64
    max_per_neighbour: int = 1024  # charged to the link a record first arrived on

    def __post_init__(self) -> None:
        if not 1 <= self.max_per_origin <= self.max_records:
            raise ServiceError("discovery limits: want 1 <= max_per_origin <= max_records")
        if not 1 <= self.max_per_neighbour <= self.max_records:
            raise ServiceError("discovery limits: want 1 <= max_per_neighbour <= max_records")


def _no_routes(origin: bytes) -> int | None:
    return None


@dataclass(frozen=True, slots=True)
class DiscoveryOut:
    """A DISCOVERY frame to send: link-wide on every interface (``to`` None) or unicast."""

    to: NeighbourKey | None
    frame: bytes


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float

    def take(self, now: float, rate: float, burst: float) -> bool:
        self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate)
        self.at = max(self.at, now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class _Cached:
    signed: SignedRecord
    received: float  # local time
    hops: int  # ours: the item's hops + 1
    link: NeighbourKey  # the neighbour it first came from: its share pays for it


@dataclass(slots=True)
class _Local:
    name: str
    port: int
    kind: str
    attrs: dict[str, AttrValue]
    hidden: bool
    since: float
    signed: SignedRecord | None = None
    next_refresh: float = math.inf


@dataclass(slots=True)
class _Path:
    to: NeighbourKey
    until: float
    sent: set[tuple[bytes, str, int]] = field(default_factory=set)


class ServiceDiscovery:
    """Local services, the cache of everyone else's, flooding, queries and answers."""

    def __init__(
        self,
        identity: Identity,
        now: float,
        *,
        clock_offset: float = 0.0,
        mtu: int = 1400,
        timing: DiscoveryTiming | None = None,
        rng: random.Random | None = None,
        limits: DiscoveryLimits | None = None,
        route_metric: RouteMetric = _no_routes,
    ) -> None:
        self.identity = identity
        self.limits = limits or DiscoveryLimits()
        self.route_metric = route_metric
        self.sid = identity.sid
        self.offset = clock_offset  # wall clock = now + offset
        self.mtu = mtu
        self.t = timing or DiscoveryTiming()
        if not 0 < self.t.refresh < self.t.lifetime <= MAX_LIFETIME:
            raise ServiceError(
                f"discovery timing: want 0 < refresh < lifetime <= {MAX_LIFETIME:g} seconds"
            )
        self.rng = rng or random.Random(bytes(self.sid))
        self.counters: Counter[str] = Counter()
        self.local: dict[str, _Local] = {}
        self.cache: dict[tuple[bytes, str], _Cached] = {}
        self.per_origin: Counter[bytes] = Counter()
        self.per_link: Counter[NeighbourKey] = Counter()
        # Records whose origin had no route on arrival, oldest first, per link: the
        # only ones a newcomer may push out (checked again before eviction).
        self.unrouted: dict[NeighbourKey, dict[RecordKey, None]] = {}
        self._refused: dict[str, tuple[float, int]] = {}  # reason -> (logged at, since)
        self.buckets: dict[bytes, _Bucket] = {}
        self.link_buckets: dict[NeighbourKey, _Bucket] = {}
        self.query_bucket = _Bucket(self.t.query_burst, now)
        self.paths: dict[bytes, _Path] = {}  # query tag -> where answers go
        self.tombstones: dict[str, tuple[SignedRecord, float]] = {}  # name -> record, resend at
        self._flood: list[list[Any]] = []
        self._flood_at = math.inf
        self._last_seq = 0
        self._queries = 0
        self.my_queries: dict[bytes, float] = {}  # tag -> until (answers for us)
        self._sweep_at = now + 1.0
        self._startup_query_at = (
            now + self.t.startup_query if self.t.startup_query is not None else math.inf
        )
        self.events: list[Event] = []
        self._out: list[DiscoveryOut] = []  # unicast answers and queries, sent at the next flush

    # -- clocks --------------------------------------------------------------------

    def wall(self, now: float) -> float:
        return now + self.offset

    def _next_seq(self, now: float) -> int:
        # Milliseconds of wall clock: a restarted origin still issues newer seqs.
        self._last_seq = next_seq(self._last_seq, self.wall(now))
        return self._last_seq

    # -- local services ------------------------------------------------------------

    def announce(
        self,
        name: str,
        port: int,
        now: float,
        kind: str = "tcp",
        attrs: Mapping[str, AttrValue] | None = None,
        hidden: bool = False,
    ) -> list[DiscoveryOut]:
        """Offer (or change) a local service; a hidden one is served but never announced."""
        check_name(name)
        check_kind(kind)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ServiceError(f"MSP port {port!r} out of range 1..65535")
        try:
            attrs_d = _check_attrs(dict(attrs or {}))
        except FrameError as exc:
            raise ServiceError(str(exc)) from None
        svc = _Local(name, port, kind, attrs_d, hidden, now)
        if not hidden:
            self._sign_local(svc, now)  # raises ServiceError before anything changes
        old = self.local.get(name)
        self.local[name] = svc
        self.tombstones.pop(name, None)
        if hidden:
            if old is not None and not old.hidden:
                self._withdraw_record(old, now)  # it was public: tell the mesh it is gone
            return self._flush(now)
        assert svc.signed is not None
        self._queue(svc.signed.item(0), now, immediate=True)
        return self._flush(now)

    def withdraw(self, name: str, now: float) -> list[DiscoveryOut]:
        svc = self.local.pop(name, None)
        if svc is None:
            raise ServiceError(f"no local service named {name!r}")
        if not svc.hidden:
            self._withdraw_record(svc, now)
        return self._flush(now)

    def _withdraw_record(self, svc: _Local, now: float) -> None:
        rec = ServiceRecord(
            self.sid,
            svc.name,
            svc.port,
            svc.kind,
            {},
            self._expiry(now),
            self._next_seq(now),
            self.t.scope,
            withdrawn=True,
        )
        signed = sign_record(self.identity, rec)
        self.tombstones[svc.name] = (signed, now + self.t.withdraw_repeat)
        self._queue(signed.item(0), now, immediate=True)

    def _expiry(self, now: float) -> int:
        return math.ceil(self.wall(now) + self.t.lifetime)

    def _sign_local(self, svc: _Local, now: float) -> None:
        rec = ServiceRecord(
            self.sid,
            svc.name,
            svc.port,
            svc.kind,
            svc.attrs,
            self._expiry(now),
            self._next_seq(now),
            self.t.scope,
        )
        svc.signed = sign_record(self.identity, rec)
        svc.next_refresh = now + self.t.refresh * (1.0 - self.t.jitter * self.rng.random())

    def query(
        self, now: float, name: str | None = None, scope: int | None = None
    ) -> list[DiscoveryOut]:
        """Ask the mesh for ``name`` (or every service); answers fill the cache."""
        if name is not None:
            check_name(name)
        hops = self.t.scope if scope is None else scope
        if not 1 <= hops <= MAX_SCOPE:
            raise ServiceError(f"query scope {hops} out of range 1..{MAX_SCOPE}")
        # The clock is mixed in so a restarted node does not reuse its old tags (they
        # would be taken for duplicates of the queries of its previous life).
        self._queries += 1
        seed = b"%s|%d|%r" % (bytes(self.sid), self._queries, self.wall(now))
        tag = hashlib.blake2b(seed, digest_size=TAG_LEN, person=b"meshpipe-query").digest()
        self.my_queries[tag] = now + self.t.query_path_timeout
        self.counters["discovery.query.tx"] += 1
        self.counters["discovery.tx.frames"] += 1
        return [DiscoveryOut(None, encode_query(tag, name, hops))]

    # -- what is known ---------------------------------------------------------------

    def services(self, now: float) -> list[dict[str, Any]]:
        """Live services: local ones (hops 0) and every cached, unexpired record.

        ``hops`` is what the record claims (unsigned, raised by each forwarder: a hint,
        not to be trusted); ``metric`` is our routing metric to the origin (0 for
        local services, None without a route): what choices rank by. ``age`` is
        seconds since the current record arrived (since announced, for local ones),
        ``expires`` seconds until it expires (None for local services).
        """
        wall = self.wall(now)
        out: list[dict[str, Any]] = []
        for svc in self.local.values():
            out.append(
                {
                    "name": svc.name,
                    "sid": str(self.sid),
                    "port": svc.port,
                    "kind": svc.kind,
                    "hops": 0,
                    "metric": 0,
                    "age": now - svc.since,
                    "expires": None,
                    "attrs": dict(svc.attrs),
                    "hidden": svc.hidden,
                }
            )
        for c in self.cache.values():
            r = c.signed.record
            if r.withdrawn or r.expiry <= wall:
                continue
            out.append(
                {
                    "name": r.name,
                    "sid": bytes(r.origin).hex(),
                    "port": r.port,
                    "kind": r.kind,
                    "hops": c.hops,
                    "metric": self.route_metric(bytes(r.origin)),
                    "age": now - c.received,
                    "expires": r.expiry - wall,
                    "attrs": dict(r.attrs),
                    "hidden": False,
                }
            )
        out.sort(key=lambda d: (d["name"], d["sid"]))
        return out

    def lookup(self, name: str, now: float) -> list[dict[str, Any]]:
        return [s for s in self.services(now) if s["name"] == name]

    # -- receiving -------------------------------------------------------------------

    def on_message(self, link: NeighbourKey, data: bytes, now: float) -> list[DiscoveryOut]:
        self.counters["discovery.rx.frames"] += 1
        try:
            msg = decode_frame(bytes(data))
        except FrameError:
            self.counters["discovery.drop.malformed"] += 1
            return self._flush(now)
        if isinstance(msg, Announce):
            for raw in msg.items:
                self._ingest(raw, link, now, flood=True)
        elif isinstance(msg, Query):
            self._on_query(link, msg, now)
        else:
            self._on_answer(link, msg, now)
        return self._flush(now)

    def _ingest(self, raw: Any, link: NeighbourKey, now: float, flood: bool) -> SignedRecord | None:
        """Check one item; cache (and queue for flooding) if new. Returns it if valid."""
        self.counters["discovery.rx.records"] += 1
        try:
            body, sig, hops = item_parts(raw)
            if len(body) > MAX_BODY:
                self.counters["discovery.drop.oversize"] += 1
                return None
            rec = ServiceRecord.decode(body)
        except FrameError:
            self.counters["discovery.drop.malformed"] += 1
            return None
        signed = SignedRecord(rec, body, sig, hops)
        origin = bytes(rec.origin)
        if origin == self.sid:
            self.counters["discovery.own"] += 1
            if rec.seq > self._last_seq and signed.verify():
                self._last_seq = rec.seq  # we restarted with a slow clock: stay ahead
            return None
        key = (origin, rec.name)
        cur = self.cache.get(key)
        if cur is not None and cur.signed.record.seq == rec.seq:
            if cur.signed.body == body and cur.signed.sig == sig:
                self.counters["discovery.duplicate"] += 1
                return cur.signed
            if not signed.verify():
                self._forged(signed, link)
            else:
                self.counters["discovery.drop.conflict"] += 1
            return None
        if cur is not None and rec.seq < cur.signed.record.seq:
            self.counters["discovery.drop.stale"] += 1
            return None
        # Each new record costs a signature check; fresh keys dodge the per-origin
        # bucket, so the link it came over has one too.
        if not self._link_bucket(link, now).take(
            now, self.t.neighbour_rate, self.t.neighbour_burst
        ):
            self._refuse("neighbour_rate", link, now)
            return None
        if not signed.verify():
            self._forged(signed, link)
            return None
        wall = self.wall(now)
        if rec.expiry <= wall:
            self.counters["discovery.drop.expired"] += 1
            return None
        if rec.expiry > wall + MAX_LIFETIME + self.t.max_skew:
            self.counters["discovery.drop.bad_expiry"] += 1
            return None
        if hops + 1 > rec.scope:
            self.counters["discovery.drop.scope"] += 1
            return None
        if not self._take(origin, now):
            self.counters["discovery.drop.rate"] += 1
            return None
        if cur is None:
            refused = self._admit(origin, link)
            if refused is not None:
                self._refuse(refused, link, now)
                return None
            self.per_origin[origin] += 1
            self.per_link[link] += 1
            if self.route_metric(origin) is None:
                self.unrouted.setdefault(link, {})[key] = None
            self.cache[key] = _Cached(signed, now, hops + 1, link)
        else:
            self.cache[key] = _Cached(signed, now, hops + 1, cur.link)
        self.counters["discovery.accepted"] += 1
        was_live = cur is not None and not cur.signed.record.withdrawn
        if rec.withdrawn and was_live:
            self.events.append(Event("service.withdrawn", _ev(rec, hops + 1)))
        elif not rec.withdrawn and not was_live:
            self.events.append(Event("service.discovered", _ev(rec, hops + 1)))
        if flood and hops + 1 < rec.scope:
            self._queue(signed.item(hops + 1), now)
        return signed

    def _admit(self, origin: bytes, link: NeighbourKey) -> str | None:
        """Make room for a new record; the reason it is refused, or None."""
        lim = self.limits
        if self.per_origin[origin] >= lim.max_per_origin:
            return "origin_full"
        routed = self.route_metric(origin) is not None
        if self.per_link[link] >= lim.max_per_neighbour and not (
            routed and self._evict_unrouted(link)
        ):
            return "neighbour_full"
        if len(self.cache) >= lim.max_records:
            heavy = sorted(self.unrouted, key=lambda k: self.per_link[k], reverse=True)
            if not (routed and any(self._evict_unrouted(k) for k in heavy)):
                return "cache_full"
        return None

    def _evict_unrouted(self, link: NeighbourKey) -> bool:
        """Drop the oldest record charged to ``link`` whose origin still has no route."""
        keys = self.unrouted.get(link)
        while keys:
            key = next(iter(keys))
            del keys[key]
            if self.route_metric(key[0]) is not None:
                continue  # reachable now: it stays, and is no longer a candidate
            self._remove(key)
            self.counters["discovery.evicted.unrouted"] += 1
            return True
        self.unrouted.pop(link, None)
        return False

    def _remove(self, key: RecordKey) -> _Cached:
        c = self.cache.pop(key)
        _discount(self.per_origin, key[0])
        _discount(self.per_link, c.link)
        keys = self.unrouted.get(c.link)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self.unrouted[c.link]
        return c

    def _refuse(self, reason: str, link: NeighbourKey, now: float) -> None:
        self.counters[f"discovery.drop.{reason}"] += 1
        at, since = self._refused.get(reason, (-math.inf, 0))
        since += 1
        if now - at >= REFUSED_LOG_EVERY:
            self.events.append(
                Event(
                    "discovery.refused", {"reason": reason, "from": repr(link[1]), "refused": since}
                )
            )
            at, since = now, 0
        self._refused[reason] = (at, since)

    def _forged(self, signed: SignedRecord, link: NeighbourKey) -> None:
        self.counters["discovery.drop.forged"] += 1
        self.events.append(
            Event(
                "service.forged",
                {
                    "origin": bytes(signed.record.origin).hex()[:8],
                    "name": signed.record.name,
                    "from": repr(link[1]),
                },
            )
        )

    def _link_bucket(self, link: NeighbourKey, now: float) -> _Bucket:
        b = self.link_buckets.get(link)
        if b is None:
            while len(self.link_buckets) >= MAX_BUCKETS:
                del self.link_buckets[next(iter(self.link_buckets))]
            b = self.link_buckets[link] = _Bucket(self.t.neighbour_burst, now)
        return b

    def _take(self, origin: bytes, now: float) -> bool:
        b = self.buckets.pop(origin, None)
        if b is None:
            b = _Bucket(self.t.burst, now)
            while len(self.buckets) >= MAX_BUCKETS:
                del self.buckets[next(iter(self.buckets))]
        self.buckets[origin] = b  # most recently used last
        return b.take(now, self.t.rate, self.t.burst)

    def _on_query(self, link: NeighbourKey, q: Query, now: float) -> None:
        self.counters["discovery.query.rx"] += 1
        tag = bytes(q.tag)
        if tag in self.my_queries or tag in self.paths:
            self.counters["discovery.query.duplicate"] += 1
            return
        if not self.query_bucket.take(now, self.t.query_rate, self.t.query_burst):
            self.counters["discovery.drop.query_rate"] += 1
            return
        while len(self.paths) >= MAX_QUERY_PATHS:
            del self.paths[next(iter(self.paths))]
        path = _Path(link, now + self.t.query_path_timeout)
        self.paths[tag] = path
        items: list[list[Any]] = []
        wall = self.wall(now)
        for svc in self.local.values():
            if svc.hidden or svc.signed is None or (q.name is not None and svc.name != q.name):
                continue
            items.append(svc.signed.item(0))
            path.sent.add((self.sid, svc.name, svc.signed.record.seq))
        for c in self.cache.values():
            r = c.signed.record
            if r.withdrawn or r.expiry <= wall or (q.name is not None and r.name != q.name):
                continue
            items.append(c.signed.item(c.hops))
            path.sent.add((bytes(r.origin), r.name, r.seq))
        self._answer(link, tag, items)
        if q.hops_left > 1:
            self.counters["discovery.query.forwarded"] += 1
            self.counters["discovery.tx.frames"] += 1
            self._out.append(DiscoveryOut(None, encode_query(tag, q.name, q.hops_left - 1)))

    def _answer(self, to: NeighbourKey, tag: bytes, items: list[list[Any]]) -> None:
        for group in pack_items(items, self.mtu - _ANSWER_OVERHEAD):
            self.counters["discovery.answer.tx"] += 1
            self.counters["discovery.tx.frames"] += 1
            self._out.append(DiscoveryOut(to, encode_answer(tag, group)))

    def _on_answer(self, link: NeighbourKey, a: Answer, now: float) -> None:
        self.counters["discovery.answer.rx"] += 1
        mine = bytes(a.tag) in self.my_queries
        path = None if mine else self.paths.get(bytes(a.tag))
        relay: list[list[Any]] = []
        for raw in a.items:
            signed = self._ingest(raw, link, now, flood=False)
            if signed is None or path is None:
                continue
            r = signed.record
            tag = (bytes(r.origin), r.name, r.seq)
            if tag not in path.sent:
                path.sent.add(tag)
                relay.append(signed.item(signed.hops + 1))
        if not mine and path is None:
            self.counters["discovery.drop.no_path"] += 1
            return
        if path is not None and relay:
            self._answer(path.to, bytes(a.tag), relay)

    # -- time --------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[DiscoveryOut]:
        for svc in self.local.values():
            if not svc.hidden and now >= svc.next_refresh:
                self._sign_local(svc, now)
                assert svc.signed is not None
                self._queue(svc.signed.item(0), now, immediate=True)
                self.counters["discovery.refresh"] += 1
        for name, (signed, at) in list(self.tombstones.items()):
            if now >= at:
                # Once more with a new seq, so nodes that missed the first copy hear it.
                del self.tombstones[name]
                r = signed.record
                again = ServiceRecord(
                    self.sid,
                    r.name,
                    r.port,
                    r.kind,
                    {},
                    self._expiry(now),
                    self._next_seq(now),
                    r.scope,
                    withdrawn=True,
                )
                self._queue(sign_record(self.identity, again).item(0), now, immediate=True)
        if now >= self._startup_query_at:
            self._startup_query_at = math.inf
            self._out.extend(self.query(now))
        if now >= self._sweep_at:
            self._sweep(now)
        return self._flush(now)

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + 1.0
        wall = self.wall(now)
        for key in [k for k, c in self.cache.items() if c.signed.record.expiry <= wall]:
            c = self._remove(key)
            if not c.signed.record.withdrawn:
                self.events.append(Event("service.expired", _ev(c.signed.record, c.hops)))
        for tag in [t for t, p in self.paths.items() if now >= p.until]:
            del self.paths[tag]
        for tag in [t for t, until in self.my_queries.items() if now >= until]:
            del self.my_queries[tag]

    def next_deadline(self) -> float:
        t = min(self._sweep_at, self._startup_query_at, self._flood_at if self._flood else math.inf)
        for svc in self.local.values():
            if not svc.hidden:
                t = min(t, svc.next_refresh)
        for _, at in self.tombstones.values():
            t = min(t, at)
        return t

    def drain_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # -- sending -------------------------------------------------------------------------

    def _queue(self, item: list[Any], now: float, immediate: bool = False) -> None:
        self._flood.append(item)
        self._flood_at = min(self._flood_at, now if immediate else now + self.t.flood_delay)

    def _flush(self, now: float) -> list[DiscoveryOut]:
        out = self._out
        self._out = []
        if self._flood and now >= self._flood_at:
            for group in pack_items(self._flood, self.mtu - _ANNOUNCE_OVERHEAD):
                self.counters["discovery.announce.tx"] += 1
                self.counters["discovery.tx.frames"] += 1
                out.append(DiscoveryOut(None, encode_announce(group)))
            self._flood = []
            self._flood_at = math.inf
        return out


def _discount(counts: Counter[Any], key: Any) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _ev(rec: ServiceRecord, hops: int) -> dict[str, Any]:
    return {"name": rec.name, "sid": bytes(rec.origin).hex()[:8], "hops": hops}


__all__ = [
    "DEFAULT_SCOPE",
    "MAX_BODY",
    "SERVICE_DOMAIN",
    "Announce",
    "Answer",
    "DiscoveryLimits",
    "DiscoveryOut",
    "DiscoveryTiming",
    "Query",
    "ServiceDiscovery",
    "ServiceError",
    "ServiceRecord",
    "SignedRecord",
    "check_kind",
    "check_name",
    "decode_frame",
    "encode_announce",
    "encode_answer",
    "encode_query",
    "sign_record",
]
