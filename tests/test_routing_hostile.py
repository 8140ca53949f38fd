"""Hostile neighbours against routing (issue 14, items 2 and 5), in the simulator.

The mesh: a ring a-b-c-d-e plus x linked to a and c; h is a hostile neighbour of x
and a (a real node that says hello properly, so its frames are accepted, plus
frames we inject from its link address):

* a route-table flood of 20,000 fresh origins, each with its own key and a valid
  signature: the caps hold, honest routes keep working, no signature is checked for
  a refused entry, refused origins are not passed on, counters show the drops;
* seqno requests for x's own origin asking for seqno + 2^31 - 1, again and again:
  x moves one step per request_timeout at most, never wraps, and a recorded old
  announcement stays old;
* a replay of an origin's current signed (origin, seqno) with metric 0 and hop
  count 0: what we install is at least a perfect link per hop plus our link cost,
  so it never beats a direct link; a longer honest path it can beat (the wormhole
  that per-origin signatures cannot prevent: docs/threat-model.md, Routing).
"""

from __future__ import annotations

import random

import pytest

from meshpipe.actions import BROADCAST
from meshpipe.identity import Identity
from meshpipe.node import InterfaceParams, Limits, NodeCore, Timing
from meshpipe.routing import (
    MIN_LINK_COST,
    SEQNO_MOD,
    SeqnoRequest,
    Update,
    encode_routing,
    sign_route,
)
from meshpipe.sim import LinkProfile, SimMesh

TIMING = Timing()
LIMITS = Limits(max_routes=256, max_routes_per_neighbour=128, max_neighbours=16)
HONEST = ["a", "b", "c", "d", "e", "x"]
EDGES = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("e", "a"), ("x", "a"), ("x", "c")]
FLOOD = 20_000
PER_FRAME = 400  # updates per injected frame (a frame must stay under 64 KiB)


class Mesh:
    def __init__(self, seed: int) -> None:
        self.sim = SimMesh(seed)
        names = [*HONEST, "h"]
        self.ids = {n: Identity.from_seed(bytes([0x50 + i]) * 32) for i, n in enumerate(names)}
        for i, n in enumerate(names):
            core = NodeCore(
                self.ids[n],
                [InterfaceParams(n, flood_dest=BROADCAST)],
                TIMING,
                0.0,
                random.Random(seed * 100 + i),
                LIMITS,
            )
            self.sim.add_node(n, core)
        for a, b in [*EDGES, ("h", "x"), ("h", "a")]:
            self.sim.connect(a, b, LinkProfile(delay=0.005))

    def core(self, n: str) -> NodeCore:
        return self.sim.node_as(n, NodeCore)

    def sid(self, n: str) -> bytes:
        return bytes(self.ids[n].sid)

    def route(self, src: str, dst: str) -> tuple[str, int, int] | None:
        """(next hop name, metric, seqno) of src's route to dst."""
        names = {bytes(i.sid): n for n, i in self.ids.items()}
        for r in self.core(src).routes():
            if bytes(r.sid) == self.sid(dst):
                return names[bytes(r.next_hop)], r.metric, r.seqno
        return None

    def path_works(self, src: str, dst: str) -> bool:
        x = src
        for _ in range(len(HONEST) + 1):
            hop = self.sim.forwarding[x].get(self.sid(dst))
            if hop is None:
                return False
            addr = hop[1]
            assert isinstance(addr, tuple)
            x = str(addr[0])
            if x == dst:
                return True
        return False

    def honest_ok(self, nodes: list[str] = HONEST) -> bool:
        return all(self.path_works(s, d) for s in nodes for d in nodes if s != d)

    def from_h(self, to: str, updates: list[Update], requests: list[SeqnoRequest]) -> None:
        # h's own frame counter, so its real frames and ours are never "stale" to x.
        frame = encode_routing(updates, requests, self.core("h")._next_seq())
        self.sim.inject(to, 0, self.sim.link_addr("h"), frame)

    def run_until_ok(self, limit: float = 15.0) -> None:
        t0 = self.sim.now
        while not self.honest_ok():
            assert self.sim.now - t0 < limit, "honest mesh did not converge"
            self.sim.run_for(0.25)


@pytest.fixture(scope="module")
def flood_updates() -> list[Update]:
    """20,000 fresh origins, one key and one valid signature each (about 4 s to make)."""
    out = []
    for i in range(FLOOD):
        ident = Identity.from_seed(b"flood" + i.to_bytes(27, "big"))
        out.append(Update(bytes(ident.sid), 1, 0, 0, sign_route(ident, 1)))
    return out


def test_route_table_flood_is_capped_per_neighbour(flood_updates: list[Update]) -> None:
    m = Mesh(1)
    m.run_until_ok()
    x = m.core("x")
    verified0 = x.counters["sig.verified"]
    h_key = (0, m.sim.link_addr("h"))
    room = LIMITS.max_routes_per_neighbour - x.router.charged.get(h_key, 0)
    rounds = 8
    for _ in range(rounds):  # re-announced every 4 s, as a dump would be: 32 s
        for i in range(0, FLOOD, PER_FRAME):
            m.from_h("x", flood_updates[i : i + PER_FRAME], [])
        m.sim.run_for(TIMING.update_interval)
    # Honest routes keep working everywhere.
    assert m.honest_ok()
    for n in HONEST:
        r = m.core(n).router
        assert len(r.entries) <= LIMITS.max_routes
        assert all(v <= LIMITS.max_routes_per_neighbour for v in r.charged.values())
        assert sum(r.charged.values()) == len(r.entries)
        assert len(r.fd) <= 2 * LIMITS.max_routes
    assert x.router.charged[h_key] == LIMITS.max_routes_per_neighbour
    refused = x.counters["drop.route_neighbour_full"] + x.counters["drop.route_table_full"]
    assert refused == rounds * (FLOOD - room)
    # No Ed25519 verification for a refused entry; nothing was forged.
    assert x.counters["sig.verified"] - verified0 <= LIMITS.max_routes_per_neighbour + 16
    assert x.counters["drop.forged_route"] == 0
    # Logged, rate-limited: at most one route.refused per 10 s.
    ev = [e for _, e in m.sim.events["x"] if e.name == "route.refused"]
    assert 1 <= len(ev) <= 1 + rounds * TIMING.update_interval / 10
    assert ev[0].fields["reason"] == "route_neighbour_full"
    # Refused origins are not passed on: x's neighbours saw at most the admitted ones.
    fake = {u.origin for u in flood_updates}
    for n in ("a", "c"):
        held = [o for o in m.core(n).router.entries if o in fake]
        assert len(held) <= LIMITS.max_routes_per_neighbour
    # An honest newcomer still gets in: y joins behind c after the flood.
    y_id = Identity.from_seed(b"\x7a" * 32)
    y = NodeCore(
        y_id, [InterfaceParams("y", flood_dest=BROADCAST)], TIMING, m.sim.now, random.Random(9)
    )
    m.sim.add_node("y", y)
    m.sim.connect("y", "c")
    m.ids["y"] = y_id
    t0 = m.sim.now
    while not m.path_works("x", "y"):
        assert m.sim.now - t0 < 10.0
        m.sim.run_for(0.25)
    assert x.counters["drop.internal_error"] == 0


def test_neighbour_table_cap_refuses_newcomers_unverified() -> None:
    m = Mesh(2)
    m.run_until_ok()
    x = m.core("x")
    held = {n.sid for n in x.neighbours()}
    # Hellos from fresh keys at fresh addresses, until well past the cap.
    for i in range(3 * LIMITS.max_neighbours):
        fake = NodeCore(
            Identity.from_seed(b"nb" + i.to_bytes(30, "big")),
            [InterfaceParams("f", flood_dest=BROADCAST)],
            TIMING,
            m.sim.now,
            random.Random(i),
        )
        for f in fake.links.build_hello(0, m.sim.now, 1400):
            m.sim.inject("x", 0, ("fake", i), f)
    assert len(x.links.on_iface(0)) == LIMITS.max_neighbours
    assert x.counters["drop.neighbour_table_full"] == 3 * LIMITS.max_neighbours - (
        LIMITS.max_neighbours - len(held)
    )
    assert held <= {n.sid for n in x.neighbours()}  # nobody held was evicted
    assert sum(1 for _, e in m.sim.events["x"] if e.name == "peer.refused") == 1
    m.sim.run_for(10.0)  # the fakes go silent and time out; honest ones stay
    assert {n.sid for n in x.neighbours()} == held
    assert m.honest_ok()


def test_seqno_requests_move_our_seqno_one_step_at_a_time() -> None:
    m = Mesh(3)
    m.run_until_ok()
    x = m.core("x")
    s0 = x.router.seqno
    old = x.router.own_update()  # recorded by the attacker
    # 100 requests a second for 10 s, each asking for "half the space ahead": two
    # honoured literally would wrap x back to seqnos whose announcements are old.

    def ask(_: SimMesh) -> None:
        want = (x.router.seqno + SEQNO_MOD // 2 - 1) % SEQNO_MOD
        m.from_h("x", [], [SeqnoRequest(m.sid("x"), want, 64)])

    for k in range(1000):
        m.sim.at(m.sim.now + k * 0.01, ask)
    m.sim.run_for(10.5)
    moved = (x.router.seqno - s0) % SEQNO_MOD
    assert 1 <= moved <= 11  # at most one step per request_timeout (1 s)
    assert x.counters["seqno.bump_limited"] >= 900
    # The recorded announcement is old: replayed to a, it changes nothing.
    seq_before = m.route("a", "x")
    assert seq_before is not None and seq_before[2] == x.router.seqno
    m.from_h("a", [Update(old.origin, old.seqno, 0, 0, old.sig)], [])
    m.sim.run_for(1.0)
    r = m.route("a", "x")
    assert r is not None and r[2] == x.router.seqno
    assert m.honest_ok()


def test_replayed_current_update_with_a_smaller_metric_is_bounded() -> None:
    m = Mesh(4)
    m.run_until_ok()
    x = m.core("x")
    # Let h's link to x settle, then replay a's and d's current signed updates to x
    # as if h were their origin's neighbour at no cost (metric 0, hop count 0).
    for target in ("a", "d"):
        u = m.core(target).router.own_update()
        m.from_h("x", [Update(u.origin, u.seqno, 0, 0, u.sig)], [])
    assert x.counters["update.metric_clamped"] == 2
    h_key = (0, m.sim.link_addr("h"))
    for target in ("a", "d"):
        e = x.router.entries[m.sid(target)][h_key]
        assert e.adv_metric >= MIN_LINK_COST and e.hops >= 2
    h_cost = x.links.by_key[h_key].cost
    # a is x's direct neighbour (a perfect link, 256): the lie (>= 256 + h's link)
    # cannot beat it.
    via = m.route("x", "a")
    assert via is not None and via[0] == "a" and via[1] <= 2 * MIN_LINK_COST - 1 < 256 + h_cost
    # d is two honest hops away (512): the lie ties it at best; it cannot go below
    # 256 + h's link cost, which is what x installs if it takes it.
    via = m.route("x", "d")
    assert via is not None and via[1] >= min(2 * MIN_LINK_COST, MIN_LINK_COST + h_cost)
    m.sim.run_for(5.0)
    assert m.honest_ok()
