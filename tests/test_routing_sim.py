"""Multi-hop routing in the simulator: convergence, loop freedom, failures, forgery, loss.

Timing is the production default (hello 1 s, neighbour timeout 4 s, full dump every
4 s, route expiry 14 s); the fake clock makes a minute of mesh time cost a second or
two of CPU. Bounds stated here (all in simulated seconds):

* CONVERGE_BOUND: a fresh lossless 50-node mesh gives every node a working route to
  every other within 10 s (hellos and triggered updates make it well under that).
* LINK_RECOVERY_BOUND: after a link is cut, every pair that is still connected has a
  working route again within neighbour_timeout + 2 s (the cut is noticed when the
  ends time each other out; the rest is triggered updates and seqno requests).
* NODE_RETRACT_BOUND: after a node stops, no node keeps a route to it and every other
  pair routes around it within neighbour_timeout + 2 s.
* LINE_RETRACT_BOUND: in A-B-C-D, stopping C retracts A's route to D within
  neighbour_timeout + 1 s; a restarted C (fresh core, same key) is routed again within
  RESTART_BOUND = 5 s.
* LOSSY_CONVERGE_BOUND: with 10 % loss on every link direction a 30-node mesh converges
  within 30 s (a lost triggered update waits for the next 4 s dump).

Loop freedom is checked on every simulator step (``on_step``): for every destination
whose forwarding entry changed anywhere, following the next hops of the running nodes
from every node never revisits a node.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from meshpipe.actions import BROADCAST, Action, ForwardingChanged, LinkAddr
from meshpipe.identity import Identity
from meshpipe.node import InterfaceParams, NodeCore, Timing
from meshpipe.routing import SEQNO_MOD, Update, encode_routing, route_message
from meshpipe.sim import LinkProfile, SimMesh

TIMING = Timing()
CONVERGE_BOUND = 10.0
LINK_RECOVERY_BOUND = TIMING.neighbour_timeout + 2.0
NODE_RETRACT_BOUND = TIMING.neighbour_timeout + 2.0
LINE_RETRACT_BOUND = TIMING.neighbour_timeout + 1.0
RESTART_BOUND = 5.0
LOSSY_CONVERGE_BOUND = 30.0
STEP = 0.1  # how often the tests poll for convergence (loop checks run every event time)


def make_core(ident: Identity, name: str, now: float, seed: int) -> NodeCore:
    return NodeCore(
        ident, [InterfaceParams(name, flood_dest=BROADCAST)], TIMING, now, random.Random(seed)
    )


@dataclass
class Net:
    mesh: SimMesh
    names: list[str]
    ids: dict[str, Identity]
    edges: set[tuple[str, str]]
    sid2name: dict[bytes, str]
    cut: set[frozenset[str]] = field(default_factory=set)
    loops: list[str] = field(default_factory=list)
    dirty: set[bytes] = field(default_factory=set)
    checks: int = 0

    def core(self, name: str) -> NodeCore:
        return self.mesh.node_as(name, NodeCore)

    def sid(self, name: str) -> bytes:
        return bytes(self.ids[name].sid)

    # -- loop-freedom invariant ----------------------------------------------------------

    def _listen(self, node: str, now: float, action: Action) -> None:
        if isinstance(action, ForwardingChanged):
            self.dirty.update(action.entries)

    def on_step(self, mesh: SimMesh) -> None:
        if not self.dirty:
            return
        for dst in self.dirty:
            self._check_dst(dst)
        self.dirty.clear()

    def _next(self, node: str, dst: bytes) -> str | None:
        hop = self.mesh.forwarding[node].get(dst)
        if hop is None:
            return None
        addr: LinkAddr = hop[1]
        assert isinstance(addr, tuple)
        nxt = str(addr[0])
        return nxt if self.mesh.is_running(nxt) else None

    def _check_dst(self, dst: bytes) -> None:
        self.checks += 1
        target = self.sid2name[dst]
        done: set[str] = set()
        for start in self.names:
            if start in done or not self.mesh.is_running(start):
                continue
            path: list[str] = []
            on_path: set[str] = set()
            x: str | None = start
            while x is not None and x != target and x not in done:
                if x in on_path:
                    self.loops.append(f"t={self.mesh.now:.3f} loop towards {target}: {[*path, x]}")
                    break
                path.append(x)
                on_path.add(x)
                x = self._next(x, dst)
            done.update(path)

    def run(self, dt: float) -> None:
        self.mesh.run_for(dt, self.on_step)

    def run_until_ok(self, ok: Callable[[], bool], limit: float) -> float:
        """Run until ``ok()`` holds (polled every STEP); return the time it took."""
        t0 = self.mesh.now
        while not ok():
            if self.mesh.now - t0 > limit:
                raise AssertionError(f"not reached within {limit} s")
            self.run(STEP)
        return self.mesh.now - t0

    # -- ground truth ----------------------------------------------------------------------

    def alive(self) -> list[str]:
        return [n for n in self.names if self.mesh.is_running(n)]

    def components(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = defaultdict(set)
        live = set(self.alive())
        for a, b in self.edges:
            if a in live and b in live and frozenset((a, b)) not in self.cut:
                adj[a].add(b)
                adj[b].add(a)
        comp: dict[str, set[str]] = {}
        for n in live:
            if n in comp:
                continue
            seen, todo = {n}, [n]
            while todo:
                for y in adj[todo.pop()]:
                    if y not in seen:
                        seen.add(y)
                        todo.append(y)
            for m in seen:
                comp[m] = seen
        return comp

    def path_works(self, src: str, dst: str) -> bool:
        """Following the forwarding tables from src reaches dst over live links only."""
        x, d = src, self.sid(dst)
        for _ in range(len(self.names)):
            hop = self.mesh.forwarding[x].get(d)
            if hop is None:
                return False
            addr = hop[1]
            assert isinstance(addr, tuple)
            nxt = str(addr[0])
            if not self.mesh.is_running(nxt) or frozenset((x, nxt)) in self.cut:
                return False
            if nxt == dst:
                return True
            x = nxt
        return False

    def all_correct(self) -> bool:
        """Connected pairs route end to end; nobody lists a route to an unreachable node."""
        comp = self.components()
        for s in self.alive():
            listed = {self.sid2name[bytes(r.sid)] for r in self.core(s).routes()}
            if listed != comp[s] - {s}:
                return False
            if not all(self.path_works(s, d) for d in listed):
                return False
        return True


def sender(dst: bytes, payload: bytes) -> Callable[[NodeCore, float], list[Action]]:
    def send(node: NodeCore, now: float) -> list[Action]:
        return node.send_data(dst, payload, now)

    return send


def build_net(seed: int, n: int, *, extra: float = 0.75, loss: float = 0.0) -> Net:
    """A random connected topology: a random spanning tree plus ``extra * n`` more edges
    (mean degree about 2 + 2 * extra)."""
    rng = random.Random(seed)
    mesh = SimMesh(seed)
    names = [f"n{i:02d}" for i in range(n)]
    ids = {name: Identity.from_seed(rng.randbytes(32)) for name in names}
    for i, name in enumerate(names):
        mesh.add_node(name, make_core(ids[name], name, 0.0, seed * 1000 + i))
    edges: set[tuple[str, str]] = set()
    for i in range(1, n):
        edges.add((names[rng.randrange(i)], names[i]))
    while len(edges) < (n - 1) + int(extra * n):
        a, b = rng.sample(names, 2)
        if (a, b) not in edges and (b, a) not in edges:
            edges.add((a, b))
    for a, b in sorted(edges):
        mesh.connect(a, b, LinkProfile(delay=rng.uniform(0.002, 0.02), jitter=0.002, loss=loss))
    net = Net(mesh, names, ids, edges, {bytes(i.sid): name for name, i in ids.items()})
    mesh.add_listener(net._listen)
    return net


def degree(net: Net) -> Counter[str]:
    deg: Counter[str] = Counter()
    for a, b in net.edges:
        deg[a] += 1
        deg[b] += 1
    return deg


@pytest.fixture(scope="module")
def net50() -> Net:
    net = build_net(seed=11, n=50)
    took = net.run_until_ok(net.all_correct, CONVERGE_BOUND)
    assert took <= CONVERGE_BOUND
    return net


def test_50_nodes_converge_loop_free(net50: Net) -> None:
    net = net50
    assert 3.0 <= 2 * len(net.edges) / len(net.names) <= 4.0  # mean degree ~3-4
    net.run(20.0)  # steady state: periodic dumps, no churn, still loop-free and correct
    assert net.all_correct()
    assert net.loops == []
    assert net.checks > 0
    for name in net.names:
        core = net.core(name)
        assert net.mesh.forwarding[name] == core.forwarding_table()
        assert len(core.routes()) == len(net.names) - 1
        assert core.counters["drop.internal_error"] == 0
        # Every (origin, seqno) is verified once, then the cache answers: no churn, so
        # about one verification per origin however many dumps went by.
        assert core.counters["sig.verified"] <= 2 * (len(net.names) - 1)
        assert core.counters["sig.cache_hit"] > 3 * core.counters["sig.verified"]
    assert net.mesh.stats.timer_min_step == 0  # no node ever asked to be woken in the past


def test_50_nodes_data_follows_routes(net50: Net) -> None:
    net = net50
    rng = random.Random(5)
    pairs = [tuple(rng.sample(net.names, 2)) for _ in range(40)]
    before = {n: len(net.mesh.delivered[n]) for n in net.names}
    for src, dst in pairs:
        net.mesh.call(src, sender(net.sid(dst), f"{src}->{dst}".encode()))
    net.run(1.0)
    for src, dst in pairs:
        got = [
            dv
            for _, dv in net.mesh.delivered[dst][before[dst] :]
            if dv.payload == f"{src}->{dst}".encode()
        ]
        assert len(got) == 1, (src, dst)
        route = next(r for r in net.core(src).routes() if bytes(r.sid) == net.sid(dst))
        assert got[0].hops == route.hops and got[0].src == net.sid(src)


def test_50_nodes_link_failure_recovers_loop_free(net50: Net) -> None:
    net = net50
    deg = degree(net)
    # Cut a link whose ends both have other links, so the mesh stays connected.
    a, b = next(
        (a, b)
        for a, b in sorted(net.edges, key=lambda e: (-deg[e[0]] - deg[e[1]], e))
        if deg[a] > 1 and deg[b] > 1
    )
    net.cut.add(frozenset((a, b)))
    net.mesh.partition(a, b)
    assert len(set(map(id, net.components().values()))) == 1
    took = net.run_until_ok(net.all_correct, LINK_RECOVERY_BOUND)
    assert took <= LINK_RECOVERY_BOUND
    assert net.loops == []
    net.mesh.heal(a, b)
    net.cut.discard(frozenset((a, b)))
    net.run_until_ok(net.all_correct, CONVERGE_BOUND)
    assert net.loops == []


def test_50_nodes_node_failure_retracted_loop_free(net50: Net) -> None:
    net = net50
    deg = degree(net)
    victim = max(net.names, key=lambda n: (deg[n], n))
    net.mesh.stop_node(victim)
    took = net.run_until_ok(net.all_correct, NODE_RETRACT_BOUND)
    assert took <= NODE_RETRACT_BOUND
    vsid = net.sid(victim)
    for name in net.alive():
        assert vsid not in net.core(name).forwarding_table()
    assert net.loops == []
    # And it comes back as a fresh process with the same key.
    net.mesh.replace_node(victim, make_core(net.ids[victim], victim, net.mesh.now, 4242))
    net.run_until_ok(net.all_correct, CONVERGE_BOUND)
    assert net.loops == []


def test_forged_announcement_is_dropped(net50: Net) -> None:
    net = net50
    deg = degree(net)
    x = max(net.names, key=lambda n: (deg[n], n))
    y = next(b if a == x else a for a, b in sorted(net.edges) if x in (a, b))
    victim = next(n for n in net.names if n not in (x, y))
    core = net.core(x)
    before_routes = {bytes(r.sid): (r.next_hop, r.seqno) for r in core.routes()}
    vsid = net.sid(victim)
    seqno = (before_routes[vsid][1] + 100) % SEQNO_MOD
    attacker = Identity.from_seed(b"\x66" * 32)
    forged = [
        # signed by the wrong key
        Update(vsid, seqno, 0, 0, attacker.sign(route_message(vsid, seqno))),
        # a real signature of the victim for another seqno, replayed with a new one
        Update(vsid, seqno, 0, 0, net.core(victim).router.own_update().sig),
        # garbage signature
        Update(vsid, seqno, 0, 0, bytes(64)),
    ]
    drops = core.counters["drop.forged_route"]
    for u in forged:
        net.mesh.inject(x, 0, net.mesh.link_addr(y), encode_routing([u], []))
    assert core.counters["drop.forged_route"] == drops + len(forged)
    assert sum(1 for _, e in net.mesh.events[x] if e.name == "route.forged") >= len(forged)
    after_routes = {bytes(r.sid): (r.next_hop, r.seqno) for r in core.routes()}
    assert after_routes == before_routes
    net.run(2.0)
    assert net.all_correct()
    assert net.loops == []
    # Nobody else saw a seqno the victim never issued.
    for name in net.alive():
        for r in net.core(name).routes():
            if bytes(r.sid) == vsid:
                assert r.seqno != seqno


def line_net(seed: int, first_key: int) -> Net:
    """A-B-C-D with 10 ms links, keys from seeds first_key, first_key + 1, ..."""
    mesh = SimMesh(seed)
    names = ["a", "b", "c", "d"]
    ids = {n: Identity.from_seed(bytes([i + first_key]) * 32) for i, n in enumerate(names)}
    for i, n in enumerate(names):
        mesh.add_node(n, make_core(ids[n], n, 0.0, i))
    for x, y in itertools.pairwise(names):
        mesh.connect(x, y, LinkProfile(delay=0.01))
    net = Net(
        mesh, names, ids, set(itertools.pairwise(names)), {bytes(i.sid): n for n, i in ids.items()}
    )
    mesh.add_listener(net._listen)
    return net


def test_line_retract_and_restart() -> None:
    net = line_net(5, 1)
    mesh, ids = net.mesh, net.ids
    a = net.core("a")
    d_sid = bytes(ids["d"].sid)

    def a_to_d() -> tuple[int, bytes] | None:
        r = next((r for r in a.routes() if bytes(r.sid) == d_sid), None)
        return None if r is None else (r.hops, bytes(r.next_hop))

    net.run_until_ok(lambda: a_to_d() == (3, bytes(ids["b"].sid)), CONVERGE_BOUND)
    # Make C's seqno run ahead so its restart (seqno back at 0) needs the seqno jump.
    net.core("c").router.seqno = 77
    net.run(TIMING.update_interval + 1.0)
    assert any(bytes(r.sid) == net.sid("c") and r.seqno == 77 for r in a.routes())

    mesh.stop_node("c")
    took = net.run_until_ok(lambda: a_to_d() is None, LINE_RETRACT_BOUND)
    assert took <= LINE_RETRACT_BOUND
    assert d_sid not in a.forwarding_table()
    assert any(e.name == "peer.down" for _, e in mesh.events["b"])

    net.run(1.0)
    mesh.replace_node("c", make_core(ids["c"], "c", mesh.now, 99))
    took = net.run_until_ok(lambda: a_to_d() == (3, bytes(ids["b"].sid)), RESTART_BOUND)
    assert took <= RESTART_BOUND
    net.run_until_ok(net.all_correct, RESTART_BOUND)
    c = net.core("c")
    assert c.router.seqno > 77
    assert c.counters["seqno.jump"] + c.counters["seqno.bumped"] >= 1
    assert net.loops == []

    # DATA end to end: A -> D over three hops, delivered with the hop count.
    mesh.call("a", sender(d_sid, b"hello d"))
    net.run(0.5)
    ((_, got),) = mesh.delivered["d"]
    assert got.payload == b"hello d" and got.hops == 3 and got.src == net.sid("a")
    assert net.core("b").counters["data.forwarded"] == 1


def test_lossy_links_converge() -> None:
    net = build_net(seed=23, n=30, loss=0.10)
    took = net.run_until_ok(net.all_correct, LOSSY_CONVERGE_BOUND)
    assert took <= LOSSY_CONVERGE_BOUND
    net.run(10.0)
    # A run of four lost hellos can drop a neighbour for a moment; it heals quickly.
    net.run_until_ok(net.all_correct, LOSSY_CONVERGE_BOUND)
    assert net.loops == []
    assert net.checks > 0
    # Link quality shows the loss: ETX cost above a perfect link's 256 somewhere.
    costs = [nb.cost for name in net.names for nb in net.core(name).neighbours()]
    assert max(costs) > 256


def test_small_mtu_radio_mesh_splits_dumps() -> None:
    """Packet radio: 256-byte frames. Route dumps of 20 origins need several frames."""
    mtu = 256
    rng = random.Random(8)
    mesh = SimMesh(8)
    names = [f"r{i:02d}" for i in range(20)]
    ids = {n: Identity.from_seed(rng.randbytes(32)) for n in names}
    for i, n in enumerate(names):
        mesh.add_node(
            n,
            NodeCore(
                ids[n],
                [InterfaceParams(n, mtu=mtu, flood_dest=BROADCAST)],
                TIMING,
                0.0,
                random.Random(i),
            ),
        )
    edges = {(names[i - 1], names[i]) for i in range(1, len(names))}
    edges |= {(names[i], names[i + 3]) for i in range(0, len(names) - 3, 4)}
    for a, b in sorted(edges):
        mesh.connect(a, b, LinkProfile(mtu=mtu, delay=0.03, bandwidth_bps=9600 * 8))
    net = Net(mesh, names, ids, edges, {bytes(i.sid): n for n, i in ids.items()})
    mesh.add_listener(net._listen)
    net.run_until_ok(net.all_correct, 30.0)
    net.run(10.0)
    assert net.loops == []
    assert mesh.stats.dropped_mtu == 0
    assert all(
        net.core(n).counters["update.tx"] > 2 * net.core(n).counters["update.dump"] for n in names
    )


def test_two_interfaces_bridge_segments() -> None:
    mesh = SimMesh(9)
    ids = {n: Identity.from_seed(bytes([0x40 + i]) * 32) for i, n in enumerate("abc")}
    for i, n in enumerate("ac"):
        mesh.add_node(n, make_core(ids[n], n, 0.0, i))
    mesh.add_node(
        "b",
        NodeCore(
            ids["b"],
            [
                InterfaceParams("wlan0", flood_dest=BROADCAST),
                InterfaceParams("radio0", mtu=300, flood_dest=BROADCAST),
            ],
            TIMING,
            0.0,
            random.Random(7),
        ),
    )
    mesh.connect("a", "b", b_iface=0)
    mesh.connect("b", "c", LinkProfile(mtu=300), a_iface=1)
    net = Net(
        mesh, list("abc"), ids, {("a", "b"), ("b", "c")}, {bytes(i.sid): n for n, i in ids.items()}
    )
    mesh.add_listener(net._listen)
    net.run_until_ok(net.all_correct, CONVERGE_BOUND)
    b = net.core("b")
    assert b.forwarding_table()[net.sid("c")] == (1, ("c", 0))
    assert b.forwarding_table()[net.sid("a")] == (0, ("a", 0))
    (route,) = [r for r in net.core("a").routes() if bytes(r.sid) == net.sid("c")]
    assert route.hops == 2 and route.as_json()["iface"] == "a"
    assert {r.iface_name for r in b.routes()} == {"wlan0", "radio0"}
    assert mesh.stats.dropped_mtu == 0


def test_churn_with_reordering_stays_loop_free() -> None:
    """A minute of random link flaps, node crashes and restarts, seqnos running ahead,
    on links that lose, reorder and duplicate frames: never a forwarding loop, and the
    mesh converges once the churn stops."""
    net = build_net(seed=3, n=30)
    for a, b in sorted(net.edges):
        net.mesh.set_profile(
            a,
            b,
            LinkProfile(
                delay=0.01, jitter=0.02, loss=0.05, reorder=0.1, reorder_delay=0.05, duplicate=0.05
            ),
        )
    rng = random.Random(3)
    edges = sorted(net.edges)
    down: set[tuple[str, str]] = set()
    stopped: set[str] = set()
    for _ in range(60):
        net.run(1.0)
        r = rng.random()
        if r < 0.4:
            e = rng.choice(edges)
            if e in down:
                net.mesh.heal(*e)
                down.discard(e)
            else:
                net.mesh.partition(*e)
                down.add(e)
        elif r < 0.5:
            n = rng.choice(net.names)
            if n in stopped:
                net.mesh.replace_node(n, make_core(net.ids[n], n, net.mesh.now, rng.randrange(999)))
                stopped.discard(n)
            else:
                net.mesh.stop_node(n)
                stopped.add(n)
        elif r < 0.55:
            n = rng.choice(net.names)
            if n not in stopped:
                net.core(n).router.seqno += rng.randrange(1, 50)
    assert net.loops == []
    for e in sorted(down):
        net.mesh.heal(*e)
    for n in sorted(stopped):
        net.mesh.replace_node(n, make_core(net.ids[n], n, net.mesh.now, 5))
    net.run_until_ok(net.all_correct, LOSSY_CONVERGE_BOUND)
    assert net.loops == []
    assert net.checks > 1000


def triangle(seed: int, direct_loss: float = 0.6, side_loss: float = 0.05) -> tuple[SimMesh, Net]:
    """A, B, C, one interface per link (as veths): A-B lossy, A-C and C-B good."""
    mesh = SimMesh(seed)
    names = ["a", "b", "c"]
    ids = {n: Identity.from_seed(bytes([0x21 + i]) * 32) for i, n in enumerate(names)}
    for i, n in enumerate(names):
        ifaces = [InterfaceParams(f"{n}{k}", flood_dest=BROADCAST) for k in range(2)]
        mesh.add_node(n, NodeCore(ids[n], ifaces, TIMING, 0.0, random.Random(seed * 10 + i)))
    mesh.connect("a", "b", LinkProfile(loss=direct_loss), a_iface=0, b_iface=0)
    mesh.connect("a", "c", LinkProfile(loss=side_loss), a_iface=1, b_iface=0)
    mesh.connect("c", "b", LinkProfile(loss=side_loss), a_iface=1, b_iface=1)
    edges = {("a", "b"), ("a", "c"), ("c", "b")}
    net = Net(mesh, names, ids, edges, {bytes(i.sid): n for n, i in ids.items()})
    mesh.add_listener(net._listen)
    return mesh, net


@pytest.mark.parametrize("seed", range(6))
def test_triangle_stays_off_the_lossy_link(seed: int) -> None:
    """Issue 19: direct A-B loses 60 % per frame (cost ~1600), A-C-B 5 % per link
    (~635). Before the fix A's route to B went direct in ~15 % of one-second samples
    (measured over 3 x 600 s): the lossy link times out now and then and came back
    with a fresh, perfect-looking history; a noisy 16-hello estimate dipped below the
    2-hop path for a few seconds; and once A had advertised the direct route's low
    metric, the route via C was unfeasible until B happened to raise its seqno.
    Now: history resumed across a timeout, smoothed-metric hysteresis, and a seqno
    request when an unfeasible route is clearly better. After 10 s every sample of
    the route and the forwarding entry goes via C."""
    mesh, net = triangle(seed)
    a = net.core("a")
    b_sid, c_sid = net.sid("b"), net.ids["c"].sid
    net.run(10.0)
    bad: list[tuple[float, str]] = []
    for _ in range(180):
        net.run(1.0)
        route = next((r for r in a.routes() if bytes(r.sid) == b_sid), None)
        if route is None or route.next_hop != c_sid:
            bad.append((mesh.now, "route"))
        if a.forwarding_table().get(b_sid) != (1, ("c", 0)):
            bad.append((mesh.now, "forwarding"))
    assert bad == []
    assert net.loops == []
    assert a.counters["drop.internal_error"] == 0


FAREWELL_BOUND = 0.5  # a clean shutdown: triggered retractions only, no timer waits


def test_farewell_retracts_at_once() -> None:
    """A node that says goodbye (NodeCore.farewell) before it stops is gone from every
    route at once, well before any neighbour times it out; routes through it switch."""
    net = line_net(6, 11)
    mesh = net.mesh
    net.run_until_ok(net.all_correct, CONVERGE_BOUND)
    d_sid, c_sid = net.sid("d"), net.sid("c")

    def routes_to(dst: bytes) -> list[str]:
        return [n for n in net.alive() if any(bytes(r.sid) == dst for r in net.core(n).routes())]

    sent = mesh.call("d", lambda node, _now: node.farewell())
    assert sent and all(getattr(f, "frame", b"")[:1] for f in sent)
    net.run(0.05)  # the frames are on the link when the process exits
    mesh.stop_node("d")
    took = net.run_until_ok(lambda: routes_to(d_sid) == [], FAREWELL_BOUND)
    assert took <= FAREWELL_BOUND < TIMING.neighbour_timeout
    # D also retracted its routes to the others; C still reaches them directly.
    assert routes_to(c_sid) == ["a", "b"]
    assert net.loops == []
