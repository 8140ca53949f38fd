"""Service discovery across a simulated 20-node random mesh (NodeStack in SimMesh).

Bounds shown here (lossless links, 5 ms per hop, flood_delay 50 ms):
* an announcement is known at every node within ANNOUNCE_BOUND = 1 s;
* a withdraw removes it everywhere within WITHDRAW_BOUND = 1 s;
* after the origin stops, it disappears everywhere within the record lifetime
  (LIFETIME = 30 s here) plus 1 s, and not before the last refresh's expiry is near;
* forged records (bad signature, a field changed in transit) and replayed older
  records are dropped and counted at every node that receives them: 100 %;
* a hidden service never appears in any frame on the wire or at any other node.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from meshpipe import wire
from meshpipe.actions import BROADCAST
from meshpipe.identity import Identity, Sid
from meshpipe.node import InterfaceParams
from meshpipe.services.discovery import (
    Announce,
    Answer,
    DiscoveryTiming,
    Query,
    ServiceRecord,
    decode_frame,
    encode_announce,
)
from meshpipe.sim import FrameRecord, SimMesh
from meshpipe.stack import NodeStack

N = 20
EXTRA_EDGES = 12
LIFETIME = 30.0
REFRESH = 10.0
ANNOUNCE_BOUND = 1.0
WITHDRAW_BOUND = 1.0
TIMING = DiscoveryTiming(lifetime=LIFETIME, refresh=REFRESH, startup_query=None)
DISC = wire.kind_byte(wire.KIND_DISCOVERY)


def discovery_stack(identity: Identity, name: str, timing: DiscoveryTiming, **kw: Any) -> NodeStack:
    """A NodeStack on one broadcast sim interface, seeded by its name."""
    return NodeStack(
        identity,
        [InterfaceParams("sim", flood_dest=BROADCAST)],
        rng=random.Random(name),
        discovery_timing=timing,
        **kw,
    )


class Mesh:
    def __init__(self, seed: int = 7, record: bool = False) -> None:
        self.sim = SimMesh(seed=seed, record_frames=record)
        rng = random.Random(seed)
        self.names = [f"n{i}" for i in range(N)]
        self.ids = {
            n: Identity.from_seed(f"d{seed}-{n}".encode().ljust(32, b".")) for n in self.names
        }
        for n in self.names:
            self.sim.add_node(n, discovery_stack(self.ids[n], n, TIMING))
        edges: set[tuple[int, int]] = set()
        for i in range(1, N):  # a random spanning tree keeps it connected
            edges.add((rng.randrange(i), i))
        while len(edges) < N - 1 + EXTRA_EDGES:
            a, b = sorted(rng.sample(range(N), 2))
            edges.add((a, b))
        for a, b in sorted(edges):
            self.sim.connect(self.names[a], self.names[b])
        self.edges = edges
        self.run_until(lambda: all(len(self.node(n).neighbours()) > 0 for n in self.names), 10)
        self.sim.run_for(3.0)  # every link is up both ways

    def node(self, name: str) -> NodeStack:
        return self.sim.node_as(name, NodeStack)

    def sid(self, name: str) -> Sid:
        return self.ids[name].sid

    def run_until(self, cond: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        start = self.sim.now
        while not cond():
            assert self.sim.now - start < limit, "condition not met in time"
            self.sim.run_for(step)
        return self.sim.now - start

    def knows(self, name: str, service: str, origin: str) -> bool:
        return any(
            s["name"] == service and s["sid"] == str(self.sid(origin))
            for s in self.node(name).services(self.sim.now)
        )

    def total(self, key: str) -> int:
        return sum(self.node(n).counters[key] for n in self.names if self.sim.is_running(n))

    def neighbour_of(self, name: str) -> str:
        i = self.names.index(name)
        j = next(b if a == i else a for a, b in sorted(self.edges) if i in (a, b))
        return self.names[j]


def test_announce_everywhere_then_withdraw() -> None:
    m = Mesh()
    origin = "n0"
    m.sim.call(origin, lambda node, now: node.announce_service("web", 80, now))
    others = [n for n in m.names if n != origin]
    took = m.run_until(lambda: all(m.knows(n, "web", origin) for n in others), ANNOUNCE_BOUND)
    assert took <= ANNOUNCE_BOUND
    hops = {n: m.node(n).services()[0]["hops"] for n in others}
    assert min(hops.values()) == 1 and max(hops.values()) <= TIMING.scope
    assert m.total("discovery.drop.forged") == 0
    # Refreshes keep it alive well past one lifetime.
    m.sim.run_for(2 * LIFETIME)
    assert all(m.knows(n, "web", origin) for n in others)
    m.sim.call(origin, lambda node, now: node.withdraw_service("web", now))
    took = m.run_until(lambda: not any(m.knows(n, "web", origin) for n in others), WITHDRAW_BOUND)
    assert took <= WITHDRAW_BOUND
    m.sim.run_for(LIFETIME)
    assert not any(m.knows(n, "web", origin) for n in others)


def test_origin_stops_then_expires_everywhere() -> None:
    m = Mesh(seed=8)
    origin = "n5"
    m.sim.call(origin, lambda node, now: node.announce_service("ssh", 22, now))
    others = [n for n in m.names if n != origin]
    m.run_until(lambda: all(m.knows(n, "ssh", origin) for n in others), ANNOUNCE_BOUND)
    m.sim.run_for(REFRESH * 1.5)
    m.sim.stop_node(origin)
    took = m.run_until(lambda: not any(m.knows(n, "ssh", origin) for n in others), LIFETIME + 1)
    assert took <= LIFETIME + 1


def test_forged_and_tampered_records_dropped_and_counted() -> None:
    m = Mesh(seed=9)
    origin = "n3"
    evil = m.neighbour_of(origin)
    tampered = {"items": 0}

    def change_port(frame: bytes) -> bytes:
        if not frame.startswith(DISC):
            return frame
        msg = decode_frame(frame)
        if not isinstance(msg, Announce):
            return frame
        items = []
        for body, sig, hops in msg.items:
            r = ServiceRecord.decode(body)
            fake = ServiceRecord(
                r.origin, r.name, 4444, r.kind, r.attrs, r.expiry, r.seq, r.scope, r.withdrawn
            )
            items.append([fake.body(), sig, hops])
            tampered["items"] += 1
        return encode_announce(items)

    # Every frame the origin's neighbour sends to anyone but the origin is altered.
    for a, b in m.edges:
        for x, y in ((a, b), (b, a)):
            if m.names[x] == evil and m.names[y] != origin:
                m.sim.set_tamper(evil, m.names[y], change_port)
    m.sim.call(origin, lambda node, now: node.announce_service("web", 80, now))
    m.sim.run_for(REFRESH * 2.5)  # the first announcement and two refreshes
    assert tampered["items"] > 0
    assert m.total("discovery.drop.forged") == tampered["items"]  # 100 %
    for n in m.names:
        assert all(s["port"] != 4444 for s in m.node(n).services())
    assert all(m.knows(n, "web", origin) for n in m.names if n != origin)  # other paths

    # A record signed by a key other than the origin's: every receiver drops it.
    liar = Identity.from_seed(b"liar".ljust(32, b"."))
    rec = ServiceRecord(bytes(m.sid(origin)), "bank", 443, "tcp", {}, int(m.sim.now + 20), 1)
    body = rec.body()
    frame = encode_announce([[body, liar.sign(b"meshpipe-service-v1" + body), 0]])
    before = m.total("discovery.drop.forged")
    targets = [n for n in m.names if n != origin]  # the origin ignores its own SID's records
    for n in targets:
        m.sim.inject(n, 0, m.sim.link_addr(m.neighbour_of(n)), frame)
    assert m.total("discovery.drop.forged") - before == len(targets)
    assert not any(m.knows(n, "bank", origin) for n in m.names)


def test_replayed_old_record_dropped_everywhere() -> None:
    m = Mesh(seed=10, record=True)
    origin = "n1"
    m.sim.call(origin, lambda node, now: node.announce_service("web", 80, now))
    m.sim.run_for(1.0)
    assert m.sim.frame_log is not None
    first = next(f for _, _, _, f in m.sim.frame_log if f.startswith(DISC))
    m.sim.run_for(REFRESH + 1.0)  # a refresh with a newer seq has spread
    before = m.total("discovery.drop.stale")
    targets = [n for n in m.names if n != origin]
    for n in targets:
        m.sim.inject(n, 0, m.sim.link_addr(m.neighbour_of(n)), first)
    assert m.total("discovery.drop.stale") - before == len(targets)  # 100 %
    m.sim.run_for(1.0)
    assert m.total("discovery.drop.stale") - before == len(targets)  # and not re-flooded


def records_on_wire(log: list[FrameRecord]) -> set[str]:
    names: set[str] = set()
    for _, _, _, f in log:
        if f.startswith(DISC):
            msg = decode_frame(f)
            if isinstance(msg, Announce | Answer):
                names |= {ServiceRecord.decode(body).name for body, _, _ in msg.items}
    return names


def test_hidden_service_is_never_announced() -> None:
    m = Mesh(seed=11, record=True)
    m.sim.call("n2", lambda node, now: node.announce_service("secret", 2222, now, hidden=True))
    m.sim.call("n2", lambda node, now: node.announce_service("public", 80, now))
    m.sim.call("n9", lambda node, now: node.query_services(now))
    m.sim.run_for(LIFETIME + REFRESH)
    m.sim.call("n12", lambda node, now: node.query_services(now, "secret"))
    m.sim.run_for(2.0)
    assert m.sim.frame_log is not None
    sent = records_on_wire(m.sim.frame_log)
    assert "public" in sent and "secret" not in sent  # not announced, not answered
    queried = [f for _, _, _, f in m.sim.frame_log if f.startswith(DISC) and b"secret" in f]
    assert queried and all(isinstance(decode_frame(f), Query) for f in queried)
    assert not any(m.knows(n, "secret", "n2") for n in m.names if n != "n2")
    assert all(m.knows(n, "public", "n2") for n in m.names if n != "n2")
    assert [s["name"] for s in m.node("n2").services() if s["hidden"]] == ["secret"]
