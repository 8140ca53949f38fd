"""Routing at scale in the simulator: a random geometric mesh of NodeCores, checks
that stay cheap at 1,000 nodes, and control-traffic accounting.

Shared by the scale tests (tests/test_routing_scale.py) and bench/routing_scale.py.

* :func:`geometric_edges`: nodes at random points of the unit square, linked when
  closer than a radius chosen for the wanted mean degree; components are joined to
  the largest one by their shortest edge, so the mesh is connected.
* Loop freedom is checked incrementally: a forwarding loop that exists after a
  simulator step contains an entry changed in that step, so following the next hops
  from each changed (node, destination) is enough (the tests of test_routing_sim.py
  walk from every node, which is quadratic at this size).
* :meth:`ScaleNet.converged` checks that every running node's forwarding path to
  every node of its component arrives, over running nodes only, and that nobody
  keeps an entry for a node it cannot reach; a destination found good stays good
  until a forwarding entry for it changes somewhere.
* Bytes are counted per link direction and frame kind by a tamper hook that
  passes every frame on unchanged.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from meshpipe import wire
from meshpipe.actions import BROADCAST, Action, ForwardingChanged, LinkAddr
from meshpipe.identity import Identity
from meshpipe.node import InterfaceParams, NodeCore, Timing
from meshpipe.sim import LinkProfile, SimMesh


def radio_timing() -> Timing:
    """The node's radio timer defaults (meshpipe.config.RADIO_TIMING) as a Timing."""
    from meshpipe.config import RADIO_TIMING

    return Timing(
        hello_interval=RADIO_TIMING.hello_interval,
        neighbour_timeout=RADIO_TIMING.neighbour_timeout,
        update_interval=RADIO_TIMING.update_interval,
        route_expiry=RADIO_TIMING.route_expiry,
    )


def geometric_edges(n: int, degree: float, rng: random.Random) -> set[tuple[int, int]]:
    """A connected random geometric graph on ``n`` nodes with about ``degree`` links
    per node (the radius is the distance of the ``degree * n / 2``-th closest pair)."""
    pts = [(rng.random(), rng.random()) for _ in range(n)]
    pairs = sorted(
        ((pts[i][0] - pts[j][0]) ** 2 + (pts[i][1] - pts[j][1]) ** 2, i, j)
        for i in range(n)
        for j in range(i + 1, n)
    )
    want = min(len(pairs), int(degree * n / 2))
    edges = {(i, j) for _, i, j in pairs[:want]}
    # Union-find, then join every other component to the rest by its shortest pair.
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        parent[find(i)] = find(j)
    for _, i, j in pairs[want:]:
        if find(i) != find(j):
            parent[find(i)] = find(j)
            edges.add((i, j))
    return edges


def next_node(mesh: SimMesh, node: str, dst: bytes) -> str | None:
    """The running node that ``node`` forwards to for ``dst`` (None: no entry, or the
    next hop is stopped)."""
    hop = mesh.forwarding[node].get(dst)
    if hop is None:
        return None
    addr: LinkAddr = hop[1]
    assert isinstance(addr, tuple)
    nxt = str(addr[0])
    return nxt if mesh.is_running(nxt) else None


def components(
    mesh: SimMesh,
    names: Iterable[str],
    edges: Iterable[tuple[str, str]],
    cut: Container[frozenset[str]] = frozenset(),
) -> dict[str, frozenset[str]]:
    """The connected components of the running nodes over the links not ``cut``."""
    live = {n for n in names if mesh.is_running(n)}
    adj: dict[str, list[str]] = {n: [] for n in live}
    for a, b in edges:
        if a in live and b in live and frozenset((a, b)) not in cut:
            adj[a].append(b)
            adj[b].append(a)
    comp: dict[str, frozenset[str]] = {}
    for n in sorted(live):
        if n in comp:
            continue
        seen, todo = {n}, [n]
        while todo:
            for y in adj[todo.pop()]:
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
        c = frozenset(seen)
        for m in c:
            comp[m] = c
    return comp


@dataclass
class ScaleNet:
    mesh: SimMesh
    names: list[str]
    ids: dict[str, Identity]
    edges: set[tuple[str, str]]
    sid2name: dict[bytes, str] = field(default_factory=dict)
    loops: list[str] = field(default_factory=list)
    changed: dict[tuple[str, bytes], None] = field(default_factory=dict)
    good: set[bytes] = field(default_factory=set)  # destinations checked and unchanged
    loop_walks: int = 0
    # (src, dst, kind) -> bytes and frames carried on that link direction
    bytes_by: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    frames_by: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def core(self, name: str) -> NodeCore:
        return self.mesh.node_as(name, NodeCore)

    # -- invariants -------------------------------------------------------------------

    def _listen(self, node: str, now: float, action: Action) -> None:
        if isinstance(action, ForwardingChanged):
            for dst in action.entries:
                self.changed[(node, dst)] = None
                self.good.discard(dst)

    def _next(self, node: str, dst: bytes) -> str | None:
        return next_node(self.mesh, node, dst)

    def on_step(self, mesh: SimMesh) -> None:
        """After every event time: no changed entry may lead back to itself."""
        if not self.changed:
            return
        limit = len(self.names)
        for start, dst in self.changed:
            if not mesh.is_running(start):
                continue
            target = self.sid2name[dst]
            self.loop_walks += 1
            x: str | None = self._next(start, dst)
            steps = 0
            while x is not None and x != target:
                if x == start or steps > limit:
                    self.loops.append(f"t={mesh.now:.3f} loop towards {target} through {start}")
                    break
                x = self._next(x, dst)
                steps += 1
        self.changed.clear()

    def run(self, dt: float) -> None:
        self.mesh.run_for(dt, self.on_step)

    def components(self) -> dict[str, frozenset[str]]:
        return components(self.mesh, self.names, self.edges)

    def converged(self) -> bool:
        """Every running node's path to every node of its component arrives; no entry
        for anything else (a node that stopped, another component)."""
        comp = self.components()
        fwd = self.mesh.forwarding
        for n, c in comp.items():
            if len(fwd[n]) != len(c) - 1:
                return False
        for d in self.names:
            dst = bytes(self.ids[d].sid)
            if dst in self.good:
                continue
            if d in comp:
                members = comp[d]
                ok: set[str] = {d}
                for start in members:
                    path: list[str] = []
                    x: str | None = start
                    while x is not None and x not in ok and len(path) <= len(members):
                        path.append(x)
                        x = self._next(x, dst)
                    if x is None or x not in ok:
                        return False
                    ok.update(path)
            # Nobody outside the destination's component may hold an entry for it
            # (the entry counts above make this exact for components' members).
            for n in comp:
                if (d not in comp or n not in comp[d]) and dst in fwd[n]:
                    return False
            self.good.add(dst)
        return True

    def run_until_converged(self, limit: float, step: float) -> float:
        """Run until :meth:`converged` (checked every ``step``); the time it took."""
        t0 = self.mesh.now
        while not self.converged():
            if self.mesh.now - t0 > limit:
                raise AssertionError(f"not converged within {limit} s")
            self.run(step)
        return self.mesh.now - t0

    # -- traffic ----------------------------------------------------------------------

    def count_traffic(self) -> None:
        """Count every frame on every link direction by kind from now on."""
        by, frames = self.bytes_by, self.frames_by

        def tap(a: str, b: str) -> Callable[[bytes], bytes]:
            keys = {wire.kind_byte(k)[0]: (a, b, k) for k in wire.KINDS}

            def count(frame: bytes) -> bytes:
                key = keys.get(frame[0]) or (a, b, -1)
                by[key] += len(frame)
                frames[key] += 1
                return frame

            return count

        for a, b in self.edges:
            self.mesh.set_tamper(a, b, tap(a, b))
            self.mesh.set_tamper(b, a, tap(b, a))

    def reset_traffic(self) -> None:
        self.bytes_by.clear()
        self.frames_by.clear()

    def per_direction(self, kind: int, seconds: float) -> tuple[float, float]:
        """Mean and maximum bytes per second of ``kind`` over the link directions."""
        n = 2 * len(self.edges)
        vals = [v for (_, _, k), v in self.bytes_by.items() if k == kind]
        mean = sum(vals) / n / seconds
        return mean, (max(vals) / seconds if vals else 0.0)

    def heard_per_node(self, seconds: float, kinds: frozenset[int]) -> float:
        """The largest number of control bytes per second a node receives from all its
        neighbours together (what one shared radio channel around it would carry)."""
        heard: Counter[str] = Counter()
        for (_, b, k), v in self.bytes_by.items():
            if k in kinds:
                heard[b] += v
        return max(heard.values(), default=0) / seconds


def build(
    n: int,
    *,
    seed: int,
    degree: float = 6.0,
    timing: Timing | None = None,
    mtu: int = 1400,
    profile: Callable[[random.Random], LinkProfile] | None = None,
) -> ScaleNet:
    """``n`` NodeCores on a random geometric mesh, one broadcast interface each."""
    rng = random.Random(seed)
    idx = geometric_edges(n, degree, rng)
    width = len(str(n - 1))
    names = [f"n{i:0{width}d}" for i in range(n)]
    ids = {name: Identity.from_seed(rng.randbytes(32)) for name in names}
    mesh = SimMesh(seed)
    for i, name in enumerate(names):
        core = NodeCore(
            ids[name],
            [InterfaceParams(name, mtu=mtu, flood_dest=BROADCAST)],
            timing or Timing(),
            0.0,
            random.Random(seed * 100_003 + i),
        )
        mesh.add_node(name, core)
    edges = {(names[i], names[j]) for i, j in idx}
    for a, b in sorted(edges):
        p = (
            profile(rng)
            if profile is not None
            else LinkProfile(delay=rng.uniform(0.002, 0.02), jitter=0.002, mtu=mtu)
        )
        mesh.connect(a, b, p)
    net = ScaleNet(mesh, names, ids, edges, {bytes(i.sid): nm for nm, i in ids.items()})
    mesh.add_listener(net._listen)
    return net


def mean_degree(net: ScaleNet) -> float:
    return 2 * len(net.edges) / len(net.names)



@dataclass
class ScaleResult:
    """What one scale run measured (times in simulated seconds, rates per link
    direction in bytes per second)."""

    nodes: int
    links: int
    mean_degree: float
    converge_s: float
    converge_routing_bytes: float  # per link direction, cold start to converged
    routing_bps: float  # steady state, mean over link directions
    routing_bps_max: float
    hello_bps: float
    heard_bps_max: float  # routing + hellos reaching the busiest node, all neighbours
    failed: int
    recover_s: float
    loops: int
    loop_walks: int
    signatures: int  # signature checks (genuine ones answered by signed_memo)
    cpu_s: float


def run_scale(
    n: int,
    *,
    seed: int,
    timing: Timing | None = None,
    mtu: int = 1400,
    bandwidth_bps: float | None = None,
    converge_limit: float,
    measure_s: float,
    fail_share: float = 0.05,
) -> ScaleResult:
    """Cold start, steady-state traffic over ``measure_s``, then ``fail_share`` of the
    nodes stop at once and the rest must converge again (each within
    ``converge_limit``). Loop freedom is checked at every step throughout."""
    import time

    from meshpipe.identity import signed_memo

    t = timing or Timing()
    step = t.update_interval / 4

    def profile(rng: random.Random) -> LinkProfile:
        return LinkProfile(
            delay=rng.uniform(0.002, 0.02), jitter=0.002, mtu=mtu, bandwidth_bps=bandwidth_bps
        )

    cpu0 = time.process_time()
    with signed_memo() as memo:
        net = build(n, seed=seed, timing=t, mtu=mtu, profile=profile)
        net.count_traffic()
        converge = net.run_until_converged(converge_limit, step)
        dirs = 2 * len(net.edges)
        cold = sum(v for (_, _, k), v in net.bytes_by.items() if k == wire.KIND_ROUTING) / dirs
        net.run(t.update_interval)  # let the last triggered updates settle
        net.reset_traffic()
        net.run(measure_s)
        routing, routing_max = net.per_direction(wire.KIND_ROUTING, measure_s)
        hello, _ = net.per_direction(wire.KIND_HELLO, measure_s)
        heard = net.heard_per_node(measure_s, frozenset((wire.KIND_ROUTING, wire.KIND_HELLO)))
        rng = random.Random(seed + 1)
        victims = rng.sample(net.names, max(1, round(fail_share * n)))
        for v in victims:
            net.mesh.stop_node(v)
        net.good.clear()  # paths through the stopped nodes are broken now
        recover = net.run_until_converged(converge_limit, step)
        sigs = memo.hits + memo.verified
    return ScaleResult(
        nodes=n,
        links=len(net.edges),
        mean_degree=mean_degree(net),
        converge_s=converge,
        converge_routing_bytes=cold,
        routing_bps=routing,
        routing_bps_max=routing_max,
        hello_bps=hello,
        heard_bps_max=heard,
        failed=len(victims),
        recover_s=recover,
        loops=len(net.loops),
        loop_walks=net.loop_walks,
        signatures=sigs,
        cpu_s=time.process_time() - cpu0,
    )
