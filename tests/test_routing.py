"""Router unit tests: codec, feasibility, starvation and seqno requests, seqno jump,
signature cache, hop limit, stale frames, expiry."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshpipe import wire
from meshpipe.actions import Event
from meshpipe.errors import FrameError
from meshpipe.identity import Identity
from meshpipe.link.neighbours import INFINITY, Neighbour, NeighbourKey
from meshpipe.routing import (
    MAX_HOPS,
    SEQNO_MOD,
    Outgoing,
    Router,
    RoutingFrame,
    SeqnoRequest,
    Update,
    decode_routing,
    encode_routing,
    pack_routing,
    route_message,
    seqno_newer,
    sign_route,
)

ME = Identity.from_seed(b"\x10" * 32)
N1 = Identity.from_seed(b"\x11" * 32)
N2 = Identity.from_seed(b"\x12" * 32)
ORIG = Identity.from_seed(b"\x13" * 32)  # a distant origin
K1: NeighbourKey = (0, "n1")
K2: NeighbourKey = (0, "n2")
EXPIRY = 14.0


def link(key: NeighbourKey, ident: Identity, cost: int = 256) -> Neighbour:
    nb = Neighbour(
        iface=key[0],
        addr=key[1],
        sid=ident.sid,
        epoch=1,
        interval=1.0,
        last_heard=0.0,
        last_seqno=0,
        seq_at=0.0,
        heard_seqno=0,
        their_ts=0,
        their_ts_at=0.0,
        expect_at=1e9,
    )
    nb.cost = cost
    return nb


class Harness:
    def __init__(self, me: Identity = ME) -> None:
        self.links = {K1: link(K1, N1), K2: link(K2, N2)}
        self.counters: Counter[str] = Counter()
        self.router = Router(
            me,
            self.links,
            self.counters,
            now=0.0,
            rng=random.Random(5),
            update_interval=4.0,
            route_expiry=EXPIRY,
            request_timeout=1.0,
            request_retries=3,
            triggered_delay=0.0,
            source_gc=180.0,
            jitter=0.1,
        )
        self.router.next_dump = 1e9  # periodic dumps only when a test asks
        self.seq: Counter[NeighbourKey] = Counter()

    def hear(
        self,
        key: NeighbourKey,
        *updates: Update,
        requests: list[SeqnoRequest] | None = None,
        now: float = 1.0,
        seq: int | None = None,
    ) -> None:
        self.seq[key] += 1
        frame = RoutingFrame(self.seq[key] if seq is None else seq, list(updates), requests or [])
        self.router.on_routing(key, frame, now)

    def flush(self, now: float = 1.0) -> list[Outgoing]:
        return self.router.flush(now)

    def selected(self, origin: Identity = ORIG) -> tuple[NeighbourKey, int, int, int] | None:
        s = self.router.selected.get(bytes(origin.sid))
        return None if s is None else (s.nb, s.metric, s.seqno, s.hops)


def upd(seqno: int, metric: int, hops: int = 1, origin: Identity = ORIG) -> Update:
    return Update(bytes(origin.sid), seqno, metric, hops, sign_route(origin, seqno))


def linkwide_updates(out: list[Outgoing]) -> list[Update]:
    return [u for o in out if o.to is None for u in o.updates]


def linkwide_requests(out: list[Outgoing]) -> list[SeqnoRequest]:
    return [r for o in out if o.to is None for r in o.requests]


# -- codec ---------------------------------------------------------------------------------


def test_seqno_comparison_wraps() -> None:
    assert seqno_newer(1, 0) and not seqno_newer(0, 1) and not seqno_newer(5, 5)
    assert seqno_newer(0, SEQNO_MOD - 1)
    assert seqno_newer(SEQNO_MOD // 2 - 1, 0) and not seqno_newer(SEQNO_MOD // 2 + 1, 0)


def test_routing_codec_round_trip_and_strictness() -> None:
    ups = [upd(7, 300, 2), Update(bytes(N1.sid), 1, INFINITY, 0, bytes(64))]
    reqs = [SeqnoRequest(bytes(ORIG.sid), 8, 64)]
    frame = encode_routing(ups, reqs, seq=SEQNO_MOD + 3)
    assert decode_routing(frame) == RoutingFrame(3, ups, reqs)
    bad_bodies = [
        [1, [], []][:2],
        [1, [[bytes(ORIG.sid), 1, 2, 3]], []],  # update with 4 fields
        [1, [[bytes(31), 1, 2, 3, bytes(64)]], []],  # short origin
        [1, [[bytes(ORIG.sid), -1, 2, 3, bytes(64)]], []],  # negative seqno
        [1, [[bytes(ORIG.sid), 1, INFINITY + 1, 3, bytes(64)]], []],  # metric too big
        [1, [[bytes(ORIG.sid), 1, 2, 3, bytes(63)]], []],  # short signature
        [1, [], [[bytes(ORIG.sid), 1]]],  # request with 2 fields
        [1, [], [[bytes(ORIG.sid), 1, True]]],  # bool is not an int here
        [1.5, [], []],
        {"u": []},
    ]
    for body in bad_bodies:
        with pytest.raises(FrameError):
            decode_routing(wire.encode_control(wire.KIND_ROUTING, body))


@pytest.mark.parametrize("mtu", [256, 600, 1400])
def test_pack_routing_respects_mtu_and_keeps_order(mtu: int) -> None:
    ups = [upd(i, i, i % 64) for i in range(40)]
    reqs = [SeqnoRequest(bytes(ORIG.sid), i, 64) for i in range(10)]
    seqs = iter(range(100, 200))
    frames = pack_routing(ups, reqs, mtu, lambda: next(seqs))
    assert all(len(f) <= mtu for f in frames)
    decoded = [decode_routing(f) for f in frames]
    assert [d.seq for d in decoded] == list(range(100, 100 + len(frames)))
    assert [u for d in decoded for u in d.updates] == ups
    assert [r for d in decoded for r in d.requests] == reqs


# -- selection and feasibility -------------------------------------------------------------


def test_update_installs_route_with_link_cost_and_hop() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256, 1))
    assert h.selected() == (K1, 512, 5, 2)
    ev = [e for e in h.router.drain()[0] if isinstance(e, Event)]
    assert ev[0].name == "route.changed" and ev[0].fields["next_hop"] == N1.sid.short
    # The triggered update advertises it with our metric and hop count.
    (u,) = [u for u in linkwide_updates(h.flush()) if u.origin == bytes(ORIG.sid)]
    assert (u.seqno, u.metric, u.hops) == (5, 512, 2)
    fd = h.router.fd[bytes(ORIG.sid)]
    assert (fd.seqno, fd.metric) == (5, 512)


def test_feasibility_condition() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    h.flush()  # advertise: FD(ORIG) = (5, 512)
    # Same seqno, advertised metric not below FD: infeasible, never selected.
    h.hear(K2, upd(5, 512))
    assert h.selected()[0] == K1  # type: ignore[index]
    h.hear(K1, Update(bytes(ORIG.sid), 5, INFINITY, 0, sign_route(ORIG, 5)))  # retraction
    assert h.selected() is None  # the infeasible route via K2 is not taken
    out = h.flush(2.0)
    assert [(u.origin, u.metric) for u in linkwide_updates(out)] == [(bytes(ORIG.sid), INFINITY)]
    # Starving: ask for a newer seqno than the FD.
    assert linkwide_requests(out) == [SeqnoRequest(bytes(ORIG.sid), 6, 64)]
    # Same seqno with a smaller metric than FD: feasible.
    h.hear(K2, upd(5, 300), now=2.1)
    assert h.selected() == (K2, 556, 5, 2)
    h.flush(2.2)  # FD(ORIG) = (5, 556)
    # A newer seqno is feasible whatever its metric.
    h.hear(K1, upd(6, 5000), now=2.3)
    h.hear(K2, Update(bytes(ORIG.sid), 5, INFINITY, 0, sign_route(ORIG, 5)), now=2.3)
    assert h.selected() == (K1, 5256, 6, 2)
    # The request is satisfied: no more retries.
    assert linkwide_requests(h.flush(10.0)) == []


def test_infeasible_update_for_selected_route_starves_and_requests() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    h.flush()
    h.hear(K1, upd(5, 1000))  # our own next hop got worse beyond our FD
    assert h.selected() is None
    out = h.flush(1.5)
    assert linkwide_requests(out) == [SeqnoRequest(bytes(ORIG.sid), 6, 64)]
    # Retried every request_timeout, request_retries times, then given up.
    tries = 1 + sum(len(linkwide_requests(h.flush(1.5 + k))) for k in range(1, 10))
    assert tries == 3
    assert h.counters["request.tx"] == 3


def test_hysteresis_keeps_current_route_unless_clearly_better() -> None:
    h = Harness()
    h.hear(K1, upd(5, 400))
    h.hear(K2, upd(5, 390))  # 10 better: not worth a switch
    assert h.selected()[0] == K1  # type: ignore[index]
    h.hear(K2, upd(5, 300))  # 100 better: switch
    assert h.selected() == (K2, 556, 5, 2)


def test_link_cost_change_reselects() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    h.hear(K2, upd(5, 256))
    assert h.selected()[0] == K1  # type: ignore[index]
    h.links[K1].cost = INFINITY  # K1 stopped hearing us
    h.router.link_changed(K1, 2.0)
    assert h.selected() == (K2, 512, 5, 2)
    h.router.neighbour_lost(K2, 2.0)
    assert h.selected() is None
    assert bytes(ORIG.sid) in h.router.retracting


def test_hop_limit_on_updates() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256, MAX_HOPS + 1))
    assert h.selected() is None and h.counters["drop.route_hop_limit"] == 1
    h.hear(K1, upd(5, 256 * MAX_HOPS, MAX_HOPS))
    assert h.selected() == (K1, 256 * MAX_HOPS + 256, 5, MAX_HOPS + 1)
    # We hold it but do not pass on a route that is already too long.
    assert [u for u in linkwide_updates(h.flush()) if u.origin == bytes(ORIG.sid)] == []


def test_stale_frame_cannot_resurrect_retracted_route() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256), seq=10)
    h.hear(K1, Update(bytes(ORIG.sid), 5, INFINITY, 0, sign_route(ORIG, 5)), seq=12)
    h.hear(K1, upd(5, 256), seq=11)  # overtaken on the link by the retraction
    assert h.selected() is None
    assert h.counters["update.stale"] == 1
    h.hear(K1, upd(5, 200), seq=13)
    assert h.selected() is not None


def test_route_entries_expire() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256), now=1.0)
    h.router.tick(1.0 + EXPIRY - 0.5)
    assert h.selected() is not None
    h.hear(K1, upd(5, 256), now=5.0)  # refreshed
    h.router.tick(5.0 + EXPIRY - 0.01)
    assert h.selected() is not None
    h.router.tick(5.0 + EXPIRY + h.router.sweep_interval)
    assert h.selected() is None and bytes(ORIG.sid) not in h.router.entries


# -- signatures ----------------------------------------------------------------------------


def test_signature_cache_verifies_each_triple_once() -> None:
    h = Harness()
    for _ in range(5):
        h.hear(K1, upd(5, 256))
        h.hear(K2, upd(5, 300))
    assert h.router.sigs.verified == 1
    assert h.counters["sig.verified"] == 1 and h.counters["sig.cache_hit"] == 9
    h.hear(K1, upd(6, 256))
    assert h.router.sigs.verified == 2


def test_forged_updates_are_dropped_and_reported() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    evil = Identity.from_seed(b"\x66" * 32)
    forged = [
        Update(bytes(ORIG.sid), 9, 0, 0, evil.sign(route_message(ORIG.sid, 9))),
        Update(bytes(ORIG.sid), 9, 0, 0, sign_route(ORIG, 5)),  # real signature, other seqno
        Update(bytes(ORIG.sid), 9, 0, 0, bytes(64)),
        Update(bytes(32), 9, 0, 0, bytes(64)),  # not even a point on the curve
    ]
    for u in forged:
        h.hear(K2, u)
        h.hear(K2, u)  # the negative verdict is cached too
    assert h.counters["drop.forged_route"] == 2 * len(forged)
    assert h.router.sigs.verified == 1 + len(forged)
    assert h.selected() == (K1, 512, 5, 2)
    names = [e.name for e in h.router.drain()[0] if isinstance(e, Event)]
    assert names.count("route.forged") == 2 * len(forged)


# -- seqno requests and our own seqno --------------------------------------------------------


def test_request_for_own_route_bumps_seqno() -> None:
    o = Harness(me=ORIG)
    assert o.router.seqno == 0
    o.hear(K1, requests=[SeqnoRequest(bytes(ORIG.sid), 4, 60)])
    # One step, whatever the request names (RFC 8966 3.8.1.2).
    assert o.router.seqno == 1 and o.counters["seqno.bumped"] == 1
    (own,) = [u for u in linkwide_updates(o.flush()) if u.origin == bytes(ORIG.sid)]
    assert (own.seqno, own.metric, own.hops) == (1, 0, 0)
    assert ORIG.sid.verify(route_message(ORIG.sid, 1), own.sig)
    # An older request does not move it back; it is answered with the current seqno.
    o.hear(K1, requests=[SeqnoRequest(bytes(ORIG.sid), 0, 60)], now=5.0)
    assert o.router.seqno == 1
    # A newer one within request_timeout of the last raise is not honoured again.
    o.hear(K1, requests=[SeqnoRequest(bytes(ORIG.sid), 9, 60)], now=1.5)
    assert o.router.seqno == 1 and o.counters["seqno.bump_limited"] == 1
    o.hear(K1, requests=[SeqnoRequest(bytes(ORIG.sid), 9, 60)], now=2.5)
    assert o.router.seqno == 2


def test_hearing_own_sid_with_newer_seqno_jumps() -> None:
    # We restarted at seqno 0; the mesh still carries our announcement with seqno 41.
    me = Harness(me=ORIG)
    me.hear(K1, upd(41, 256))
    assert me.router.seqno == 42 and me.counters["seqno.jump"] == 1
    assert bytes(ORIG.sid) not in me.router.entries  # never a route to ourselves
    (own,) = [u for u in linkwide_updates(me.flush()) if u.origin == bytes(ORIG.sid)]
    assert own.seqno == 42
    # Echoes of our current seqno (neighbours re-advertising us) change nothing.
    me.hear(K1, upd(42, 512))
    assert me.router.seqno == 42


def test_request_answered_or_forwarded_towards_origin() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    h.flush()
    # We hold seqno 5: a request for 5 is answered by announcing it.
    h.hear(K2, requests=[SeqnoRequest(bytes(ORIG.sid), 5, 10)])
    assert [u.seqno for u in linkwide_updates(h.flush()) if u.origin == bytes(ORIG.sid)] == [5]
    # A request for 6 goes on to our next hop (K1), one hop count less.
    h.hear(K2, requests=[SeqnoRequest(bytes(ORIG.sid), 6, 10)], now=2.0)
    out = h.flush(2.0)
    assert [(o.to, o.requests) for o in out if o.to is not None] == [
        (K1, [SeqnoRequest(bytes(ORIG.sid), 6, 9)])
    ]
    # Duplicates within request_timeout are not forwarded again.
    h.hear(K2, requests=[SeqnoRequest(bytes(ORIG.sid), 6, 10)], now=2.5)
    assert [o for o in h.flush(2.5) if o.to is not None] == []
    # Never back to where the route points, never past the hop-count limit.
    h.hear(K1, requests=[SeqnoRequest(bytes(ORIG.sid), 7, 10)], now=3.0)
    h.hear(K2, requests=[SeqnoRequest(bytes(ORIG.sid), 8, 1)], now=3.0)
    assert [o for o in h.flush(3.0) if o.to is not None] == []
    assert h.counters["request.dropped"] == 2
    # Unknown origin: nothing to do.
    h.hear(K2, requests=[SeqnoRequest(bytes(N2.sid), 1, 10)], now=3.0)
    assert h.counters["request.unroutable"] == 1


def test_full_dump_contains_own_selected_and_retractions() -> None:
    h = Harness()
    h.hear(K1, upd(5, 256))
    h.hear(K1, upd(3, 256, origin=N2))
    h.hear(K1, Update(bytes(N2.sid), 3, INFINITY, 0, sign_route(N2, 3)))
    h.flush()
    h.router.next_dump = 2.0
    dump = linkwide_updates(h.flush(2.0))
    got = {bytes(u.origin): (u.seqno, u.metric) for u in dump}
    assert got == {bytes(ME.sid): (0, 0), bytes(ORIG.sid): (5, 512), bytes(N2.sid): (3, INFINITY)}
    assert h.counters["update.dump"] == 1
    assert 2.0 + 4.0 * 0.9 <= h.router.next_dump <= 2.0 + 4.0
