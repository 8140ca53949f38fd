"""Discovery with a hostile node (issue 14, items 3 and 4), in the simulator.

    H - A - B - C - D - F          H: hostile neighbour of A, no other link

* Cache fill: H makes up 128 fresh keys and floods 32 validly signed records for
  each (4096: the whole default cache). A takes at most ``max_per_neighbour`` of
  them; honest services announced after the flood are still discovered everywhere
  and a stream to one of them works; the refusals are counted and logged.
* With a cache so small that H's share is all of it, a new honest record whose
  origin A has a route to still gets in (it pushes out a record nobody can reach),
  and honest records held before the flood stay.
* Hijack: F (4 hops from A) offers "web" like C (2 hops), and H relays F's record
  to A claiming hops 0; A's choice follows its routing metric: C.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

from meshpipe.actions import BROADCAST, Action, Event, SendFrame
from meshpipe.identity import Identity, Sid
from meshpipe.msp import StreamAccepted
from meshpipe.services.choose import pick_service
from meshpipe.services.discovery import (
    DiscoveryLimits,
    DiscoveryTiming,
    ServiceRecord,
    encode_announce,
    sign_record,
)
from meshpipe.sim import SimMesh
from meshpipe.stack import NodeStack
from tests.test_discovery_sim import discovery_stack

NAMES = ["H", "A", "B", "C", "D", "F"]
TIMING = DiscoveryTiming(lifetime=600.0, refresh=200.0, startup_query=None)
FRESH_KEYS = 128
PER_KEY = 32
WEB_PORT = 5080


class Net:
    def __init__(self, limits_a: DiscoveryLimits | None = None) -> None:
        self.sim = SimMesh(seed=14)
        self.ids = {n: Identity.from_seed(f"hostile-{n}".encode().ljust(32, b".")) for n in NAMES}
        self.events: list[tuple[str, Event]] = []
        for n in NAMES:
            node = discovery_stack(
                self.ids[n],
                n,
                TIMING,
                discovery_limits=limits_a if n == "A" else None,
                random_bytes=random.Random(f"rb-{n}").randbytes,
            )
            self.sim.add_node(n, node)
        for a, b in itertools.pairwise(NAMES):
            self.sim.connect(a, b)
        self.sim.add_listener(self._listen)
        self.run_until(lambda: len(self.node("A").forwarding_table()) == len(NAMES) - 1, 30)

    def _listen(self, name: str, _now: float, action: Action) -> None:
        if isinstance(action, Event):
            self.events.append((name, action))

    def node(self, name: str) -> NodeStack:
        return self.sim.node_as(name, NodeStack)

    def sid(self, name: str) -> Sid:
        return self.ids[name].sid

    def run_until(self, cond: Callable[[], bool], limit: float) -> float:
        start = self.sim.now
        while not cond():
            assert self.sim.now - start < limit, "condition not met in time"
            self.sim.run_for(0.05)
        return self.sim.now - start

    def announce(self, name: str, service: str, port: int) -> None:
        self.sim.call(name, lambda node, now: node.announce_service(service, port, now))

    def knows(self, name: str, service: str, origin: str) -> bool:
        return any(
            r["name"] == service and r["sid"] == str(self.sid(origin))
            for r in self.node(name).services()
        )

    def hostile_send(self, items: list[list[Any]]) -> None:
        """H puts announce frames on its link (to A), 6 items a frame."""
        frames = [encode_announce(items[i : i + 6]) for i in range(0, len(items), 6)]
        self.sim.call("H", lambda _node, _now: [SendFrame(0, BROADCAST, f) for f in frames])


def fresh_flood(now: float, names: list[str], keys: range = range(FRESH_KEYS)) -> list[list[Any]]:
    """PER_KEY validly signed records for each of FRESH_KEYS made-up origins."""
    items: list[list[Any]] = []
    for k in keys:
        who = Identity.from_seed(f"fresh-{k}".encode().ljust(32, b"."))
        for j, name in enumerate(names[:PER_KEY]):
            rec = ServiceRecord(who.sid, name, 1000 + j, "tcp", {}, int(now) + 500, 1 + j)
            items.append(sign_record(who, rec).item(0))
    return items


def test_fresh_key_flood_cannot_fill_the_cache() -> None:
    net = Net()
    net.announce("C", "web", WEB_PORT)
    net.run_until(lambda: net.knows("A", "web", "C"), 2.0)

    names = ["web"] + [f"svc{j}" for j in range(PER_KEY - 1)]
    net.hostile_send(fresh_flood(net.sim.now, names))
    net.sim.run_for(5.0)

    a = net.node("A")
    lim = DiscoveryLimits()
    held = len(a.discovery.cache)
    assert held <= lim.max_per_neighbour + 16  # H's share and the honest few
    counters = a.counters
    assert counters["discovery.drop.neighbour_full"] >= FRESH_KEYS * PER_KEY - lim.max_per_neighbour
    refused = [e for n, e in net.events if n == "A" and e.name == "discovery.refused"]
    assert 1 <= len(refused) <= 2  # logged, rate-limited (one line per reason per 10 s)
    assert refused[0].fields["reason"] == "neighbour_full"
    for n in NAMES[1:]:
        assert len(net.node(n).discovery.cache) <= lim.max_records

    # H's link has spent its burst of signature checks: more fresh records are
    # refused before verification (128 a second get through; 5 s have passed).
    more = fresh_flood(net.sim.now, names, range(FRESH_KEYS, FRESH_KEYS + 48))
    net.hostile_send(more)
    net.sim.run_for(0.5)
    assert a.counters["discovery.drop.neighbour_rate"] >= len(more) - 6 * 128

    # New honest services, after the flood: found everywhere, quickly.
    net.announce("D", "db", 6000)
    net.announce("B", "mail", 6001)
    took = net.run_until(
        lambda: all(net.knows(n, "db", "D") and net.knows(n, "mail", "B") for n in "ABC"), 2.0
    )
    assert took < 2.0
    assert net.knows("A", "web", "C")  # held before the flood: still there

    # And usable: A's choice for "web" is C (not one of H's 128 unreachable "web"s),
    # and a stream to it carries data.
    sid_c = bytes(net.sid("C"))
    rows = a.services()
    assert sum(r["name"] == "web" for r in rows) > 1
    assert pick_service(rows, "web", None, bytes(a.sid)) == (sid_c, WEB_PORT)
    net.node("C").msp.listen(WEB_PORT)
    box: list[Any] = []

    def open_and_write(node: NodeStack, now: float) -> list[Action]:
        st = node.msp.open(Sid(sid_c), WEB_PORT, now)
        st.write(b"hello web", now)
        box.append(st)
        return list(node.on_timer(now))

    net.sim.call("A", open_and_write)
    got: list[bytes] = []

    def read_c() -> bool:
        for ev in net.node("C").msp.events():
            if isinstance(ev, StreamAccepted):
                box.append(ev.stream)
        for st in box[1:]:
            got.append(st.read())
        return b"".join(got) == b"hello web"

    net.run_until(read_c, 5.0)


def test_small_cache_full_of_junk_still_takes_a_reachable_record() -> None:
    small = DiscoveryLimits(max_records=256, max_per_origin=64, max_per_neighbour=256)
    net = Net(limits_a=small)
    net.announce("C", "web", WEB_PORT)
    net.run_until(lambda: net.knows("A", "web", "C"), 2.0)

    names = [f"svc{j}" for j in range(PER_KEY)]
    net.hostile_send(fresh_flood(net.sim.now, names))
    net.sim.run_for(5.0)
    a = net.node("A")
    assert len(a.discovery.cache) == small.max_records  # full: H's junk and C's web
    assert net.knows("A", "web", "C")  # never evicted by the newcomers

    net.announce("D", "db", 6000)
    net.run_until(lambda: net.knows("A", "db", "D"), 2.0)
    assert len(a.discovery.cache) <= small.max_records
    assert a.counters["discovery.evicted.unrouted"] >= 1
    assert a.counters["discovery.drop.cache_full"] > 0
    assert net.knows("A", "web", "C")


def test_far_node_claiming_hops_zero_is_not_chosen() -> None:
    net = Net()
    net.announce("C", "web", WEB_PORT)
    net.run_until(lambda: net.knows("A", "web", "C"), 2.0)
    # F announces; H relays F's signed record to A at once as if F were next door
    # (hops 0) and so beats the honest copy: the signature verifies, only the
    # unsigned hop count lies.
    net.announce("F", "web", 7000)
    f_rec = net.node("F").discovery.local["web"].signed
    assert f_rec is not None
    net.hostile_send([f_rec.item(0)])
    net.sim.run_for(1.0)
    a = net.node("A")
    rows = {r["sid"]: r for r in a.services() if r["name"] == "web"}
    row_c, row_f = rows[str(net.sid("C"))], rows[str(net.sid("F"))]
    assert row_f["hops"] < row_c["hops"]  # the lie took hold of the claimed hops...
    assert row_c["metric"] < row_f["metric"]  # ...not of the routing metric
    assert pick_service(a.services(), "web", None, bytes(a.sid)) == (bytes(net.sid("C")), WEB_PORT)
