"""Multi-hop routing: a Babel-like distance vector (RFC 8966), sans-IO.

Routes are keyed by origin SID. Each origin owns a 32-bit sequence number and
signs ``ROUTE_DOMAIN + origin + seqno (4 bytes, big endian)`` with its key; an
update carries ``(origin, seqno, metric, hops, signature, mtu)``. Forwarders add their
link cost to the metric and one to the hop count, and lower ``mtu`` to the MTU of the
interface the update arrived on, so it ends up as the path MTU: the largest frame
that crosses every link to the origin. Those three fields are not signed (a liar
can only make its own path look worse, or bigger frames die at its own link).
The signature binds origin and seqno, so nobody can announce a route *to* someone
else's address with a seqno that origin never issued (an old, genuinely signed
seqno can still be replayed, but the feasibility condition makes old seqnos lose).

ROUTING frame::

    kind byte + msgpack [frame_seq: u32, [update, ...], [request, ...]]
    update  = [origin: bin 32, seqno: u32, metric: u16, hops: u8, signature: bin 64,
               mtu: u16]
    request = [origin: bin 32, seqno: u32, hop_count: u8]      (seqno request)

A metric of INFINITY (0xFFFF) is a retraction. ``frame_seq`` counts the sender's
routing frames: an update carried by an older frame than the one that last updated
the same (neighbour, origin) entry is stale (the link reordered them) and ignored,
so a delayed announcement cannot resurrect a route its sender already retracted.

Loop freedom (RFC 8966 section 3.5.1): every node keeps a feasibility distance
``FD(origin) = (seqno, metric)``, the best it has *advertised*. An update
``(s, m)`` from a neighbour is feasible if it is a retraction, if ``s`` is newer
than FD's seqno, or if ``s`` equals it and ``m < FD.metric``. Only feasible routes
are selected (feasibility is re-checked against the current FD whenever routes are
re-evaluated), so along any chain of next hops the advertised (seqno, metric) pair
strictly improves and no chain can close into a loop. A node whose only routes
to an origin are infeasible is *starving*: it sends a seqno request for
``FD.seqno + 1``, which is answered by any node holding a route with that seqno
or newer and otherwise forwarded along the selected route towards the origin;
the origin raises its seqno and announces.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshpipe import wire
from meshpipe.actions import Action, Event
from meshpipe.errors import FrameError
from meshpipe.identity import SID_LEN, SIG_LEN, Identity, Sid
from meshpipe.link.neighbours import INFINITY, Neighbour, NeighbourKey

ROUTE_DOMAIN = b"meshpipe-route-v1"
SEQNO_MOD = 1 << 32
MAX_HOPS = 64  # updates with a larger hop count are dropped
REQUEST_HOPS = 64  # hop-count limit a seqno request starts with
MAX_ITEMS = 4096  # per frame and list; no MTU we drive gets near it
SWITCH_HYSTERESIS = 16  # a new route must beat the current one by this much
# An unfeasible route better than the selected one by a 1/8 of its metric asks for a
# new seqno; small wobbles of the link costs do not.
REQUEST_MARGIN_DIV = 8
# Half-lives of the smoothed metric, seconds: an improvement is believed slowly (as
# babeld's 4 s), a worsening at once, so a route that got bad loses its advantage
# quickly and one that looks good for a moment does not win.
SMOOTH_HALF_LIFE = 12.0
SMOOTH_HALF_LIFE_UP = 1.0
SIG_CACHE_SIZE = 16384
MAX_PATH_MTU = 65535  # what the origin announces: no link limits it yet
MIN_PATH_MTU = 64  # below this an update is malformed (no link can be that small)
FRAME_OVERHEAD = 16  # kind byte, outer array, frame seq, the two list headers; generously
MIN_LINK_COST = 256  # what a perfect link costs (meshpipe.link.neighbours): metric floor per hop
DEFAULT_MAX_ROUTES = 4096  # origins in the table
DEFAULT_MAX_ROUTES_PER_NEIGHBOUR = 2048  # route entries learnt from one neighbour
REFUSED_LOG_INTERVAL = 10.0  # route.refused is logged at most this often
MAX_FORWARDED_REQUESTS = 1024  # (origin, seqno) tags of requests forwarded recently


def seqno_newer(a: int, b: int) -> bool:
    """True if seqno ``a`` is newer than ``b`` (modular comparison, RFC 8966 3.2.1)."""
    d = (a - b) % SEQNO_MOD
    return 0 < d < SEQNO_MOD // 2


def route_message(origin: bytes, seqno: int) -> bytes:
    return ROUTE_DOMAIN + bytes(origin) + seqno.to_bytes(4, "big")


def sign_route(identity: Identity, seqno: int) -> bytes:
    return identity.sign(route_message(identity.sid, seqno))


@dataclass(frozen=True, slots=True)
class Update:
    origin: bytes
    seqno: int
    metric: int
    hops: int
    sig: bytes
    mtu: int = MAX_PATH_MTU  # the path MTU to origin along the sender's route

    def as_list(self) -> list[object]:
        return [bytes(self.origin), self.seqno, self.metric, self.hops, self.sig, self.mtu]


@dataclass(frozen=True, slots=True)
class SeqnoRequest:
    origin: bytes
    seqno: int
    hop_count: int

    def as_list(self) -> list[object]:
        return [bytes(self.origin), self.seqno, self.hop_count]


@dataclass(frozen=True, slots=True)
class RoutingFrame:
    seq: int
    updates: list[Update]
    requests: list[SeqnoRequest]


def encode_routing(updates: list[Update], requests: list[SeqnoRequest], seq: int = 0) -> bytes:
    return wire.encode_control(
        wire.KIND_ROUTING,
        [seq % SEQNO_MOD, [u.as_list() for u in updates], [r.as_list() for r in requests]],
    )


def decode_routing(frame: bytes) -> RoutingFrame:
    """Parse and strictly validate a whole routing frame before anything is applied."""
    if wire.frame_kind(frame) != wire.KIND_ROUTING:
        raise FrameError("not a routing frame")
    outer = wire.expect_record(wire.decode_control(frame), 3, "routing")
    seq = wire.expect_int(outer[0], 0, SEQNO_MOD - 1, "routing frame seq")
    updates: list[Update] = []
    for raw in wire.expect_list(outer[1], MAX_ITEMS, "updates"):
        item = wire.expect_record(raw, 6, "update")
        updates.append(
            Update(
                origin=wire.expect_bytes(item[0], SID_LEN, "update origin"),
                seqno=wire.expect_int(item[1], 0, SEQNO_MOD - 1, "update seqno"),
                metric=wire.expect_int(item[2], 0, INFINITY, "update metric"),
                hops=wire.expect_int(item[3], 0, 255, "update hops"),
                sig=wire.expect_bytes(item[4], SIG_LEN, "update signature"),
                mtu=wire.expect_int(item[5], MIN_PATH_MTU, MAX_PATH_MTU, "update mtu"),
            )
        )
    requests: list[SeqnoRequest] = []
    for raw in wire.expect_list(outer[2], MAX_ITEMS, "requests"):
        item = wire.expect_record(raw, 3, "request")
        requests.append(
            SeqnoRequest(
                origin=wire.expect_bytes(item[0], SID_LEN, "request origin"),
                seqno=wire.expect_int(item[1], 0, SEQNO_MOD - 1, "request seqno"),
                hop_count=wire.expect_int(item[2], 0, 255, "request hop count"),
            )
        )
    return RoutingFrame(seq, updates, requests)


def pack_routing(
    updates: list[Update],
    requests: list[SeqnoRequest],
    mtu: int,
    next_seq: Callable[[], int] = lambda: 0,
) -> list[bytes]:
    """Routing frames of at most ``mtu`` bytes carrying all items (dumps are split)."""
    budget = mtu - FRAME_OVERHEAD
    frames: list[bytes] = []
    cur_u: list[Update] = []
    cur_r: list[SeqnoRequest] = []
    used = 0
    items: list[Update | SeqnoRequest] = [*updates, *requests]
    for it in items:
        size = len(wire.pack_body(it.as_list()))
        if (cur_u or cur_r) and used + size > budget:
            frames.append(encode_routing(cur_u, cur_r, next_seq()))
            cur_u, cur_r, used = [], [], 0
        if isinstance(it, Update):
            cur_u.append(it)
        else:
            cur_r.append(it)
        used += size
    if cur_u or cur_r:
        frames.append(encode_routing(cur_u, cur_r, next_seq()))
    return frames


class SignatureCache:
    """Remembers Ed25519 verdicts on (origin, seqno, signature): a dump repeats the same
    triples every few seconds and verification is the expensive part."""

    def __init__(self, size: int = SIG_CACHE_SIZE) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[bytes, int, bytes], bool] = OrderedDict()
        self.verified = 0  # real verifications done
        self.hits = 0

    def check(self, origin: bytes, seqno: int, sig: bytes) -> bool:
        key = (bytes(origin), seqno, bytes(sig))
        ok = self._seen.get(key)
        if ok is not None:
            self.hits += 1
            self._seen.move_to_end(key)
            return ok
        self.verified += 1
        ok = Sid(bytes(origin)).verify(route_message(origin, seqno), sig)
        self._seen[key] = ok
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return ok

    def add_own(self, origin: bytes, seqno: int, sig: bytes) -> None:
        self._seen[(bytes(origin), seqno, bytes(sig))] = True


@dataclass(slots=True)
class RouteEntry:
    """What one neighbour last told us about one origin."""

    seqno: int
    adv_metric: int  # as advertised by the neighbour, before our link cost
    hops: int  # ours: the advertised hop count + 1
    sig: bytes
    updated: float
    frame_seq: int  # the neighbour's routing frame that carried it
    mtu: int = MAX_PATH_MTU  # path MTU through this neighbour (our link included)
    # Time-smoothed route metric (ours, link cost included), for hysteresis: a route
    # whose metric dips for a few seconds (a noisy estimate of a lossy link) does not
    # win unless its smoothed metric is better too. ``held`` is the metric since
    # ``smooth_at``; None until first computed.
    smoothed: float = 0.0
    held: int = INFINITY
    smooth_at: float | None = None

    def smooth(self, metric: int, now: float) -> float:
        """The smoothed metric at ``now`` (the metric was ``held`` until now, ``metric``
        from now on)."""
        if self.smooth_at is None or self.held >= INFINITY:
            self.smoothed = float(metric)
        else:
            half = SMOOTH_HALF_LIFE_UP if self.held > self.smoothed else SMOOTH_HALF_LIFE
            w = 0.5 ** (max(0.0, now - self.smooth_at) / half)
            self.smoothed = self.held + (self.smoothed - self.held) * w
        self.held, self.smooth_at = metric, now
        return self.smoothed


@dataclass(slots=True)
class Selected:
    nb: NeighbourKey
    next_hop: Sid
    metric: int
    seqno: int
    hops: int
    sig: bytes
    mtu: int = MAX_PATH_MTU


@dataclass(slots=True)
class Source:
    """Feasibility distance for one origin: the best (seqno, metric) we advertised."""

    seqno: int
    metric: int
    touched: float


@dataclass(slots=True)
class PendingRequest:
    seqno: int
    next_at: float
    tries: int = 0


@dataclass(slots=True)
class Outgoing:
    """Routing items to send: link-wide (``to`` None) or unicast.

    A link-wide item goes to every interface, or only to ``ifaces`` when set
    (periodic dumps run on per-interface schedules when an interface overrides
    the update interval).
    """

    to: NeighbourKey | None
    updates: list[Update] = field(default_factory=list)
    requests: list[SeqnoRequest] = field(default_factory=list)
    ifaces: frozenset[int] | None = None


class Router:
    """Route table, feasibility distances, selection, dumps and seqno requests."""

    def __init__(
        self,
        identity: Identity,
        links: Mapping[NeighbourKey, Neighbour],
        counters: Counter[str],
        *,
        now: float,
        rng: random.Random,
        update_interval: float,
        route_expiry: float,
        request_timeout: float,
        request_retries: int,
        triggered_delay: float,
        source_gc: float,
        jitter: float,
        iface_update_intervals: Sequence[float | None] = (),
        iface_route_expiry: Sequence[float | None] = (),
        iface_mtus: Sequence[int] = (),
        max_routes: int = DEFAULT_MAX_ROUTES,
        max_routes_per_neighbour: int = DEFAULT_MAX_ROUTES_PER_NEIGHBOUR,
    ) -> None:
        self.identity = identity
        self.max_routes = max_routes
        self.max_routes_per_neighbour = max_routes_per_neighbour
        # Refusals since the last route.refused event, and when the next may go out.
        self._refused: Counter[str] = Counter()
        self._refused_log_at = -math.inf
        # Our own seqno rises at most once per request_timeout on requests
        # (RFC 8966 3.8.1.2: by one, never to what the requester names).
        self._bump_ok_at = -math.inf
        self.iface_mtus = tuple(iface_mtus)
        self.sid = identity.sid
        self.links = links
        self.counters = counters
        self.rng = rng
        self.update_interval = update_interval
        self.route_expiry = route_expiry
        self.request_timeout = request_timeout
        self.request_retries = request_retries
        self.triggered_delay = triggered_delay
        self.source_gc = source_gc
        self.jitter = jitter
        self.sweep_interval = max(0.05, min(1.0, route_expiry / 8))

        self.seqno = 0
        self._own_sig: tuple[int, bytes] | None = None
        self.leaving = False  # set by farewell(): shutting down, retract everything
        self.entries: dict[bytes, dict[NeighbourKey, RouteEntry]] = {}
        # Ordered sets (dicts) throughout: iteration order must not depend on the
        # per-process hash seed, or a simulation would not replay from its seed.
        self.by_nb: dict[NeighbourKey, dict[bytes, None]] = {}
        # Per-ingress accounting: the neighbour each origin is charged to (the one
        # that brought it in, then an heir) and how many origins each one holds.
        self.charged_to: dict[bytes, NeighbourKey] = {}
        self.charged: dict[NeighbourKey, int] = {}
        self.selected: dict[bytes, Selected] = {}
        self.fd: dict[bytes, Source] = {}
        self.retracting: dict[bytes, tuple[int, bytes, float]] = {}  # origin -> seqno, sig, until
        self.sigs = SignatureCache()
        self.requests_out: dict[bytes, PendingRequest] = {}
        self.forwarded: dict[tuple[bytes, int], float] = {}  # (origin, seqno) -> when
        self.pending: dict[bytes, None] = {}  # ordered set of origins for a triggered update
        self.pending_at = math.inf
        self.unicast: list[Outgoing] = []
        self.next_dump = now + self.rng.random() * jitter * update_interval
        # Interfaces with their own update interval (slow radios) dump on their own
        # schedule; the rest share next_dump. Entries learnt on such an interface
        # expire by its own route expiry, since its neighbours refresh them slower.
        self.iface_update_intervals = {
            i: v for i, v in enumerate(iface_update_intervals) if v is not None
        }
        self.iface_route_expiry = {i: v for i, v in enumerate(iface_route_expiry) if v is not None}
        self.iface_next_dump = {
            i: now + self.rng.random() * jitter * v for i, v in self.iface_update_intervals.items()
        }
        self.default_ifaces: frozenset[int] | None = None
        if self.iface_update_intervals:
            n = len(iface_update_intervals)
            self.default_ifaces = frozenset(
                i for i in range(n) if i not in self.iface_update_intervals
            )
        self.next_sweep = now + self.sweep_interval
        self.events: list[Action] = []
        self.dirty: dict[bytes, None] = {}  # destinations whose forwarding may have changed

    # -- helpers -----------------------------------------------------------------------

    def iface_mtu(self, iface: int) -> int:
        return self.iface_mtus[iface] if iface < len(self.iface_mtus) else MAX_PATH_MTU

    def route_mtu(self, origin: bytes) -> int | None:
        """Path MTU of the selected route to ``origin`` (None without a route)."""
        sel = self.selected.get(bytes(origin))
        return None if sel is None else sel.mtu

    def own_update(self) -> Update:
        if self._own_sig is None or self._own_sig[0] != self.seqno:
            sig = sign_route(self.identity, self.seqno)
            self._own_sig = (self.seqno, sig)
            self.sigs.add_own(self.sid, self.seqno, sig)
        return Update(self.sid, self.seqno, 0, 0, self._own_sig[1])

    def _jittered(self, interval: float) -> float:
        return interval * (1.0 - self.jitter * self.rng.random())

    def _trigger(self, origin: bytes, now: float) -> None:
        self.pending[origin] = None
        self.pending_at = min(self.pending_at, now + self.triggered_delay)

    def _feasible(self, origin: bytes, e: RouteEntry) -> bool:
        fd = self.fd.get(origin)
        if fd is None:
            return True
        if seqno_newer(e.seqno, fd.seqno):
            return True
        return e.seqno == fd.seqno and e.adv_metric < fd.metric

    def route_metric(self, e: RouteEntry, link: Neighbour | None) -> int:
        if link is None or e.adv_metric >= INFINITY or link.cost >= INFINITY:
            return INFINITY
        return min(INFINITY, e.adv_metric + link.cost)

    # -- selection ---------------------------------------------------------------------

    def reselect(self, origin: bytes, now: float) -> None:
        """Select the route to ``origin``: the feasible one with the smallest metric,
        except that the current route stays unless a challenger beats it both now
        (by SWITCH_HYSTERESIS) and on the smoothed metric."""
        cur = self.selected.get(origin)
        feasible: list[tuple[int, bytes, float, RouteEntry, Neighbour]] = []
        keep: tuple[int, bytes, float, RouteEntry, Neighbour] | None = None
        unfeasible: tuple[int, float] | None = None
        for key, e in self.entries.get(origin, {}).items():
            link = self.links.get(key)
            m = self.route_metric(e, link)
            if m >= INFINITY or link is None:
                continue
            cand = (m, bytes(link.sid), e.smooth(m, now), e, link)
            if not self._feasible(origin, e):
                if unfeasible is None or cand[:1] < unfeasible[:1]:
                    unfeasible = (m, cand[2])
                continue
            feasible.append(cand)
            if cur is not None and key == cur.nb:
                keep = cand
        if not feasible:
            self._set_selected(origin, None, now)
            if unfeasible is not None:
                self._want_request(origin, now)  # starving (RFC 8966 3.8.2.1)
            return
        if keep is not None:
            k = keep
            challengers = [c for c in feasible if c[0] + SWITCH_HYSTERESIS < k[0] and c[2] < k[2]]
            best = min(challengers, key=lambda c: c[:2]) if challengers else keep
        else:
            best = min(feasible, key=lambda c: c[:2])
        m, _, sm, e, link = best
        self._set_selected(
            origin, Selected(link.key, link.sid, m, e.seqno, e.hops, e.sig, e.mtu), now
        )
        if (
            unfeasible is not None
            and unfeasible[0] + max(SWITCH_HYSTERESIS, m // REQUEST_MARGIN_DIV) < m
            and unfeasible[1] < sm
            and self._want_request(origin, now)
        ):
            # A clearly better route is blocked only by our own feasibility distance
            # (we advertised a better metric once, e.g. over a link that has since got
            # worse): ask for a new seqno, or we stay on the worse path until the
            # origin happens to raise it (RFC 8966 3.8.2.2).
            self.counters["request.unfeasible_better"] += 1

    def _set_selected(self, origin: bytes, new: Selected | None, now: float) -> None:
        old = self.selected.get(origin)
        if new is None:
            if old is None:
                return
            del self.selected[origin]
            self.retracting[origin] = (old.seqno, old.sig, now + self.route_expiry)
            self._trigger(origin, now)
            self.dirty[origin] = None
            self.events.append(Event("route.changed", {"sid": _short(origin), "retracted": True}))
            return
        self.selected[origin] = new
        self.retracting.pop(origin, None)
        req = self.requests_out.get(origin)
        if req is not None and not seqno_newer(req.seqno, new.seqno):
            del self.requests_out[origin]  # answered
        if old is None or old.nb != new.nb:
            self.dirty[origin] = None
        if (
            old is None
            or old.nb != new.nb
            or old.hops != new.hops
            or abs(new.metric - old.metric) >= max(32, old.metric // 8)
        ):
            self._trigger(origin, now)
            self.events.append(
                Event(
                    "route.changed",
                    {
                        "sid": _short(origin),
                        "next_hop": new.next_hop.short,
                        "hops": new.hops,
                        "metric": new.metric,
                    },
                )
            )
        elif seqno_newer(new.seqno, old.seqno):
            self._trigger(origin, now)  # carry a fresh seqno on quickly: someone asked for it

    def _want_request(self, origin: bytes, now: float) -> bool:
        """Start a seqno request for ``origin`` unless one is under way (True if started)."""
        fd = self.fd.get(origin)
        if fd is None or origin in self.requests_out:
            return False
        self.requests_out[origin] = PendingRequest((fd.seqno + 1) % SEQNO_MOD, now)
        self.pending_at = min(self.pending_at, now)
        return True

    # -- events from the neighbour layer -----------------------------------------------

    def link_changed(self, key: NeighbourKey, now: float) -> None:
        for origin in list(self.by_nb.get(key, ())):
            self.reselect(origin, now)

    def link_up(self, key: NeighbourKey, now: float) -> None:
        """A link just became usable: give that neighbour our whole table at once."""
        self.unicast.append(Outgoing(key, self._dump_updates(now)))
        self.pending_at = min(self.pending_at, now)

    def neighbour_lost(self, key: NeighbourKey, now: float) -> None:
        for origin in list(self.by_nb.get(key, ())):
            self._drop_entry(origin, key)
            self.reselect(origin, now)

    def _drop_entry(self, origin: bytes, key: NeighbourKey) -> None:
        """Forget what ``key`` told us about ``origin``; the origin's charge passes to
        another neighbour that announces it, if any."""
        es = self.entries.get(origin)
        if es is not None:
            es.pop(key, None)
            if not es:
                del self.entries[origin]
        nbset = self.by_nb.get(key)
        if nbset is not None:
            nbset.pop(origin, None)
            if not nbset:
                del self.by_nb[key]
        if self.charged_to.get(origin) == key:
            self._uncharge(key)
            if es:
                heir = next(iter(es))
                self.charged_to[origin] = heir
                self.charged[heir] = self.charged.get(heir, 0) + 1
            else:
                del self.charged_to[origin]

    def _uncharge(self, key: NeighbourKey) -> None:
        left = self.charged[key] - 1
        if left:
            self.charged[key] = left
        else:
            del self.charged[key]

    # -- receiving ---------------------------------------------------------------------

    def on_routing(self, key: NeighbourKey, frame: RoutingFrame, now: float) -> None:
        link = self.links.get(key)
        if link is None:
            return
        for u in frame.updates:
            self._on_update(key, link, u, frame.seq, now)
        for r in frame.requests:
            self._on_request(key, link, r, now)

    def _on_update(
        self, key: NeighbourKey, link: Neighbour, u: Update, fseq: int, now: float
    ) -> None:
        self.counters["update.entries_rx"] += 1
        if u.hops > MAX_HOPS:
            self.counters["drop.route_hop_limit"] += 1
            return
        origin = bytes(u.origin)
        es = self.entries.get(origin)
        e = None if es is None else es.get(key)
        if e is None and origin != self.sid and not self._admit(key, link, es is None, now):
            return  # refused before the (expensive) signature check, never re-flooded
        before = self.sigs.verified
        ok = self.sigs.check(u.origin, u.seqno, u.sig)
        self.counters["sig.verified" if self.sigs.verified != before else "sig.cache_hit"] += 1
        if not ok:
            self.counters["drop.forged_route"] += 1
            self.events.append(
                Event(
                    "route.forged",
                    {"origin": _short(u.origin), "from": link.sid.short, "seqno": u.seqno},
                )
            )
            return
        if origin == self.sid:
            if seqno_newer(u.seqno, self.seqno):
                # We restarted and forgot our seqno: jump past what the mesh remembers
                # (only a seqno we signed ourselves can get here).
                self.seqno = (u.seqno + 1) % SEQNO_MOD
                self.counters["seqno.jump"] += 1
                self._trigger(origin, now)
            return
        metric, hops = u.metric, u.hops
        if origin != bytes(link.sid) and metric < INFINITY:
            # Nobody but the origin itself is 0 hops from it, and every hop costs at
            # least a perfect link: a neighbour cannot claim less than that.
            hops = max(1, hops)
            floor = min(INFINITY - 1, MIN_LINK_COST * hops)
            if metric < floor or hops != u.hops:
                self.counters["update.metric_clamped"] += 1
                metric = max(metric, floor)
        mtu = min(u.mtu, self.iface_mtu(key[0]))
        if e is not None and seqno_newer(e.frame_seq, fseq):
            self.counters["update.stale"] += 1
            return
        if e is None:
            # A retraction is kept too (as an unusable entry until it expires), so
            # an older announcement overtaken by it on the link stays overridden.
            if es is None:
                es = self.entries[origin] = {}
                self.charged_to[origin] = key
                self.charged[key] = self.charged.get(key, 0) + 1
            es[key] = RouteEntry(u.seqno, metric, hops + 1, u.sig, now, fseq, mtu)
            self.by_nb.setdefault(key, {})[origin] = None
        else:
            e.seqno, e.adv_metric, e.hops, e.sig, e.updated, e.frame_seq, e.mtu = (
                u.seqno,
                metric,
                hops + 1,
                u.sig,
                now,
                fseq,
                mtu,
            )
        self.reselect(origin, now)

    def _admit(self, key: NeighbourKey, link: Neighbour, new_origin: bool, now: float) -> bool:
        """May ``key`` add a route entry (for a ``new_origin``, or one it had none for)?

        A new origin is charged to the neighbour that brought it in, so its
        neighbours re-announcing a flood's admitted part do not spend their own
        budget. Entries already held are never evicted for newcomers: past a cap,
        the newcomer is refused, counted and logged (rate-limited)."""
        if not new_origin:
            return True  # one entry per (origin, neighbour): bounded by the origin cap
        if len(self.entries) >= self.max_routes:
            reason = "route_table_full"
        elif self.charged.get(key, 0) >= self.max_routes_per_neighbour:
            reason = "route_neighbour_full"
        else:
            return True
        self.counters["drop." + reason] += 1
        self._refused[reason] += 1
        if now >= self._refused_log_at:
            self._refused_log_at = now + REFUSED_LOG_INTERVAL
            self.events.append(
                Event(
                    "route.refused",
                    {
                        "from": link.sid.short,
                        "reason": reason,
                        "refused": dict(self._refused),  # since the last route.refused
                        "routes": len(self.entries),
                        "max_routes": self.max_routes,
                        "max_routes_per_neighbour": self.max_routes_per_neighbour,
                    },
                )
            )
            self._refused.clear()
        return False

    def _on_request(self, key: NeighbourKey, link: Neighbour, r: SeqnoRequest, now: float) -> None:
        self.counters["request.rx"] += 1
        origin = bytes(r.origin)
        if self.leaving:
            return
        if origin == self.sid:
            if seqno_newer(r.seqno, self.seqno):
                if now < self._bump_ok_at:
                    # Raised moments ago and announced: the requester gets that one.
                    self.counters["seqno.bump_limited"] += 1
                    return
                # One step, whatever the request names: a neighbour asking for
                # seqno + 2^31 - 1 twice must not wrap us back to numbers whose old
                # signed announcements could then be replayed as new.
                self.seqno = (self.seqno + 1) % SEQNO_MOD
                self._bump_ok_at = now + self.request_timeout
                self.counters["seqno.bumped"] += 1
            self._trigger(origin, now)
            return
        sel = self.selected.get(origin)
        if sel is None:
            self.counters["request.unroutable"] += 1
            return
        if not seqno_newer(r.seqno, sel.seqno):
            self._trigger(origin, now)  # our route is fresh enough: announce it
            return
        if r.hop_count <= 1 or sel.nb == key or sel.next_hop == link.sid:
            self.counters["request.dropped"] += 1
            return
        tag = (origin, r.seqno)
        if now < self.forwarded.get(tag, -math.inf) + self.request_timeout:
            return  # already forwarded recently (several starving neighbours ask at once)
        if tag not in self.forwarded and len(self.forwarded) >= MAX_FORWARDED_REQUESTS:
            self.counters["request.dropped"] += 1  # a flood of distinct requests
            return
        self.forwarded[tag] = now
        self.counters["request.forwarded"] += 1
        fwd = SeqnoRequest(origin, r.seqno, r.hop_count - 1)
        self.unicast.append(Outgoing(sel.nb, requests=[fwd]))
        self.pending_at = min(self.pending_at, now)

    # -- time --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if now < self.next_sweep:
            return
        self.next_sweep = now + self.sweep_interval
        for origin in list(self.entries):
            es = self.entries[origin]
            stale = [
                k
                for k, e in es.items()
                if now >= e.updated + self.iface_route_expiry.get(k[0], self.route_expiry)
            ]
            if not stale:
                continue
            for k in stale:
                self._drop_entry(origin, k)
            self.reselect(origin, now)
        for origin in [o for o, (_, _, until) in self.retracting.items() if now >= until]:
            del self.retracting[origin]
        unused = [
            (src.touched, o)
            for o, src in self.fd.items()
            if o not in self.entries and o not in self.selected and o not in self.retracting
        ]
        # Feasibility distances of origins nobody announces any more go after
        # source_gc, or sooner, oldest first, when a churn of origins (fresh keys
        # announced and dropped again) would grow them past twice the route cap.
        excess = len(self.fd) - 2 * self.max_routes
        if excess > 0:
            unused.sort()
            self.counters["source.gc_early"] += min(excess, len(unused))
        for i, (touched, origin) in enumerate(unused):
            if i < excess or now >= touched + self.source_gc:
                del self.fd[origin]
        for tag in [t for t, at in self.forwarded.items() if now >= at + self.request_timeout]:
            del self.forwarded[tag]

    def _advertise(self, origin: bytes, now: float) -> Update | None:
        """The update we would send for ``origin`` now, updating its FD (RFC 8966 3.7.3)."""
        if self.leaving:
            return next((u for u in self.farewell() if u.origin == origin), None)
        if origin == self.sid:
            return self.own_update()
        sel = self.selected.get(origin)
        if sel is not None:
            if sel.hops > MAX_HOPS:
                return None
            fd = self.fd.get(origin)
            if fd is None or seqno_newer(sel.seqno, fd.seqno):
                self.fd[origin] = Source(sel.seqno, sel.metric, now)
            else:
                if sel.seqno == fd.seqno and sel.metric < fd.metric:
                    fd.metric = sel.metric
                fd.touched = now
            return Update(origin, sel.seqno, sel.metric, sel.hops, sel.sig, sel.mtu)
        r = self.retracting.get(origin)
        if r is not None:
            return Update(origin, r[0], INFINITY, 0, r[1])
        return None

    def _dump_updates(self, now: float) -> list[Update]:
        if self.leaving:
            return self.farewell()
        out: list[Update] = [self.own_update()]
        for origin in [*self.selected, *self.retracting]:
            u = self._advertise(origin, now)
            if u is not None:
                out.append(u)
        return out

    def farewell(self) -> list[Update]:
        """Retractions (metric INFINITY) of our own route and of every route we
        advertise, for a node that is shutting down: neighbours drop the routes at
        once instead of when they expire, and their triggered retractions carry that
        on. From now on this router only retracts and answers no seqno request, so
        it cannot bring its own route back while it is going."""
        self.leaving = True
        own = self.own_update()
        out = [Update(own.origin, own.seqno, INFINITY, 0, own.sig)]
        for origin, sel in self.selected.items():
            out.append(Update(origin, sel.seqno, INFINITY, 0, sel.sig))
        return out

    def flush(self, now: float) -> list[Outgoing]:
        """Everything due now: a full dump, triggered updates, requests, unicast items."""
        out: list[Outgoing] = []
        linkwide = Outgoing(None)
        own_dumps = [i for i, t in self.iface_next_dump.items() if now >= t]
        for i in own_dumps:
            self.iface_next_dump[i] = now + self._jittered(self.iface_update_intervals[i])
        if own_dumps:
            out.append(Outgoing(None, self._dump_updates(now), ifaces=frozenset(own_dumps)))
            self.counters["update.dump"] += 1
        if now >= self.next_dump and self.default_ifaces is not None:
            # Dump the shared-schedule interfaces; pending triggered updates still
            # go out below for the interfaces on their own schedule.
            self.next_dump = now + self._jittered(self.update_interval)
            if self.default_ifaces:
                out.append(Outgoing(None, self._dump_updates(now), ifaces=self.default_ifaces))
                self.counters["update.dump"] += 1
        if now >= self.next_dump:
            self.next_dump = now + self._jittered(self.update_interval)
            linkwide.updates = self._dump_updates(now)
            self.counters["update.dump"] += 1
            self.pending.clear()
            self.pending_at = math.inf
        elif self.pending and now >= self.pending_at:
            for origin in self.pending:
                u = self._advertise(origin, now)
                if u is not None:
                    linkwide.updates.append(u)
            self.pending.clear()
            self.pending_at = math.inf
            self.counters["update.triggered"] += 1
        for origin, req in list(self.requests_out.items()):
            if now < req.next_at:
                continue
            if req.tries >= self.request_retries:
                del self.requests_out[origin]
                continue
            req.tries += 1
            req.next_at = now + self.request_timeout
            linkwide.requests.append(SeqnoRequest(origin, req.seqno, REQUEST_HOPS))
            self.counters["request.tx"] += 1
        if linkwide.updates or linkwide.requests:
            out.append(linkwide)
        out.extend(self.unicast)
        self.unicast = []
        if not self.pending:
            self.pending_at = math.inf
        return out

    def next_deadline(self) -> float:
        t = min(self.next_dump, self.next_sweep, self.pending_at if self.pending else math.inf)
        t = min(t, *self.iface_next_dump.values()) if self.iface_next_dump else t
        for req in self.requests_out.values():
            t = min(t, req.next_at)
        return t

    def drain(self) -> tuple[list[Action], dict[bytes, None]]:
        events, dirty = self.events, self.dirty
        self.events, self.dirty = [], {}
        return events, dirty


def _short(sid: bytes) -> str:
    return bytes(sid).hex()[:8]
