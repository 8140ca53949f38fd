"""meshpipe.noderecord: the codec, signing, caching, re-issue rules; a simulated line."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.actions import BROADCAST
from meshpipe.errors import FrameError
from meshpipe.identity import Identity
from meshpipe.node import InterfaceParams
from meshpipe.noderecord import (
    MAX_BODY,
    MAX_NEIGHBOURS,
    NodeLink,
    NodeRecord,
    NodeRecordError,
    NodeRecords,
    NodeRecordTiming,
    SignedNodeRecord,
    decode_announce,
    encode_announce,
    neighbours_that_fit,
    sign_node_record,
)
from meshpipe.services.discovery import DiscoveryOut
from meshpipe.sim import SimMesh
from meshpipe.stack import NodeStack
from meshpipe.topology import to_dot

A = Identity.from_seed(b"A" * 32)
B = Identity.from_seed(b"B" * 32)
C = Identity.from_seed(b"C" * 32)
T = NodeRecordTiming(lifetime=60.0, refresh=20.0, min_interval=5.0)
LA, LB = (0, "a"), (0, "b")

sids = st.binary(min_size=32, max_size=32)
names = st.text(min_size=0, max_size=63).filter(str.isprintable)


def items_of(outs: list[DiscoveryOut]) -> list[SignedNodeRecord]:
    got = []
    for o in outs:
        for body, sig, hops in decode_announce(o.frame):
            got.append(SignedNodeRecord(NodeRecord.decode(body), body, sig, hops))
    return got


def deliver(outs: list[DiscoveryOut], dst: NodeRecords, link: Any, now: float) -> None:
    for o in outs:
        dst.on_message(link, o.frame, now)


@given(
    name=names,
    expiry=st.integers(0, (1 << 63) - 1),
    seq=st.integers(0, (1 << 63) - 1),
    nbs=st.dictionaries(sids, st.integers(1, 0xFFFE), max_size=MAX_NEIGHBOURS),
)
def test_codec_round_trip(name: str, expiry: int, seq: int, nbs: dict[bytes, int]) -> None:
    nbs.pop(bytes(A.sid), None)
    rec = NodeRecord(bytes(A.sid), name, expiry, seq, tuple(nbs.items()))
    body = rec.body()
    assert len(body) <= MAX_BODY
    assert NodeRecord.decode(body) == rec
    signed = sign_node_record(A, rec)
    assert signed.verify()


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_decode_garbage_is_a_frame_error(data: bytes) -> None:
    for fn in (NodeRecord.decode, decode_announce):
        try:
            fn(data)
        except FrameError:
            pass


@given(
    st.recursive(
        st.none()
        | st.integers(-(1 << 63), (1 << 64) - 1)
        | st.binary(max_size=40)
        | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=6),
        max_leaves=30,
    )
)
def test_decode_msgpack_shapes_is_a_frame_error(obj: Any) -> None:
    body = wire.pack_body([1, bytes(A.sid), "x", 1, 1, obj])
    try:
        NodeRecord.decode(body)
    except FrameError:
        pass
    node = NodeRecords(B, 0.0, timing=T)
    node.on_message(LA, wire.encode_control(wire.KIND_NODE, [1, [obj]]), 0.0)
    node.on_message(LA, wire.encode_control(wire.KIND_NODE, obj), 0.0)
    assert not node.cache


def test_bad_records_are_refused_with_typed_errors() -> None:
    with pytest.raises(NodeRecordError):
        sign_node_record(A, NodeRecord(bytes(B.sid), "b", 1, 1, ()))
    with pytest.raises(NodeRecordError):
        NodeRecords(A, 0.0, name="x" * 64)
    dup = ((bytes(B.sid), 1), (bytes(B.sid), 2))
    with pytest.raises(NodeRecordError):
        sign_node_record(A, NodeRecord(bytes(A.sid), "a", 1, 1, dup))
    with pytest.raises(NodeRecordError):
        sign_node_record(A, NodeRecord(bytes(A.sid), "a", 1, 1, ((bytes(A.sid), 1),)))


def test_own_record_flood_accept_and_forgery() -> None:
    a = NodeRecords(A, 0.0, name="alpha", timing=T)
    b = NodeRecords(B, 0.0, name="beta", timing=T)
    b.on_timer(0.0, [])
    outs = [o for o in a.on_timer(0.0, [NodeLink(bytes(B.sid), 300, LB)]) if o.to is None]
    recs = items_of(outs)
    assert [r.record.name for r in recs] == ["alpha"]
    assert recs[0].record.neighbours == ((bytes(B.sid), 300),)
    deliver(outs, b, LA, 0.1)
    assert b.counters["noderec.accepted"] == 1
    assert [r.name for r in b.records(0.1)] == ["beta", "alpha"]
    deliver(outs, b, LA, 0.2)
    assert b.counters["noderec.duplicate"] == 1
    # A change to a signed field in transit: dropped as forged.
    body = bytearray(recs[0].body)
    body[body.index(b"alpha")] ^= 0x01
    forged = encode_announce([[bytes(body), recs[0].sig, 0]])
    b2 = NodeRecords(B, 0.0, timing=T)
    b2.on_message(LA, forged, 0.1)
    assert b2.counters["noderec.drop.forged"] == 1 and not b2.cache
    # Our own record heard back is not cached.
    a.on_message(LB, outs[0].frame, 0.3)
    assert a.counters["noderec.own"] == 1 and not a.cache


def test_reissue_rules_and_expiry() -> None:
    a = NodeRecords(A, 0.0, timing=T)
    b = NodeRecords(B, 0.0, timing=T)
    b.on_timer(0.0, [])
    link_b = NodeLink(bytes(B.sid), 300, LB)
    deliver(a.on_timer(0.0, []), b, LA, 0.0)  # startup: an empty record
    assert a.counters["noderec.issued"] == 1
    # A new neighbour: changed, but not re-issued before min_interval.
    now = 1.0
    a.on_timer(now, [link_b])
    assert a.counters["noderec.issued"] == 1
    assert a.next_deadline() <= T.min_interval
    deliver(a.on_timer(T.min_interval, [link_b]), b, LA, T.min_interval)
    assert a.counters["noderec.issued"] == 2
    assert b.records(6.0)[1].neighbours == ((bytes(B.sid), 300),)
    # A small cost change is not news; a large one is.
    a.on_timer(12.0, [NodeLink(bytes(B.sid), 320, LB)])
    assert a.counters["noderec.issued"] == 2
    a.on_timer(13.0, [NodeLink(bytes(B.sid), 900, LB)])
    assert a.counters["noderec.issued"] == 3
    # Without refreshes the record expires at B.
    b.on_timer(5.0 + T.lifetime + 2.0, [])
    assert [r.origin for r in b.records(5.0 + T.lifetime + 2.0)] == [bytes(B.sid)]
    assert b.drain_events()[-1].name == "node.expired"


def test_stale_and_rate_limited() -> None:
    a = NodeRecords(A, 0.0, timing=T)
    link_b = [NodeLink(bytes(B.sid), 300, LB)]
    old = [o for o in a.on_timer(0.0, link_b) if o.to is None]
    new = a.on_timer(T.refresh + 1, link_b)
    b = NodeRecords(B, 0.0, timing=T)
    deliver(new, b, LA, 22.0)
    deliver(old, b, LA, 22.5)
    assert b.counters["noderec.drop.stale"] == 1
    fast = NodeRecords(B, 0.0, timing=NodeRecordTiming(rate=0.0, burst=1.0))
    deliver(old, fast, LA, 1.0)
    deliver(new, fast, LA, 22.0)
    assert fast.counters["noderec.drop.rate"] == 1


def test_new_neighbour_gets_every_record_at_once() -> None:
    a = NodeRecords(A, 0.0, timing=T)
    c = NodeRecords(C, 0.0, timing=T)
    deliver(c.on_timer(0.0, [NodeLink(bytes(A.sid), 256, (0, "a"))]), a, (0, "c"), 0.1)
    assert a.on_timer(0.0, [NodeLink(bytes(B.sid), 0xFFFF, LB)]) == []  # not both ways yet
    outs = a.on_timer(1.0, [NodeLink(bytes(B.sid), 256, LB)])
    sync = [o for o in outs if o.to == LB]
    assert {r.record.origin for r in items_of(sync)} == {bytes(A.sid), bytes(C.sid)}


def test_a_node_alone_floods_nothing() -> None:
    a = NodeRecords(A, 0.0, name="alone", timing=T)
    assert a.on_timer(0.0, []) == []
    assert a.own is not None and [r.name for r in a.records(0.0)] == ["alone"]


def test_neighbours_bounded_by_limit_and_mtu() -> None:
    assert neighbours_that_fit(256, "") < neighbours_that_fit(1400, "") == MAX_NEIGHBOURS
    many = [NodeLink(bytes([i]) * 32, 256 + i, (0, i)) for i in range(1, 40)]
    a = NodeRecords(A, 0.0, timing=NodeRecordTiming(max_neighbours=5))
    (rec,) = items_of([o for o in a.on_timer(0.0, many) if o.to is None])
    assert [c for _, c in rec.record.neighbours] == [257, 258, 259, 260, 261]
    small = NodeRecords(A, 0.0, name="radio-node", mtu=256)
    outs = [o for o in small.on_timer(0.0, many) if o.to is None]
    assert all(len(o.frame) <= 256 for o in outs)
    assert len(items_of(outs)[0].record.neighbours) == neighbours_that_fit(256, "radio-node")


# -- a simulated line: NodeStacks -------------------------------------------------------


def line(n: int = 4) -> tuple[SimMesh, list[str], dict[str, Identity]]:
    sim = SimMesh(seed=3)
    names = [chr(ord("a") + i) for i in range(n)]
    ids = {x: Identity.from_seed(f"line-{x}".encode().ljust(32, b".")) for x in names}
    for x in names:
        sim.add_node(
            x,
            NodeStack(
                ids[x],
                [InterfaceParams("sim", flood_dest=BROADCAST)],
                rng=random.Random(x),
                node_name=x,
                node_timing=NodeRecordTiming(lifetime=60.0, refresh=20.0),
            ),
        )
    for x, y in itertools.pairwise(names):
        sim.connect(x, y)
    return sim, names, ids


def run_until(sim: SimMesh, cond: Callable[[], bool], limit: float) -> float:
    start = sim.now
    while not cond():
        assert sim.now - start < limit, "condition not met in time"
        sim.run_for(0.1)
    return sim.now - start


def test_line_topology_names_and_a_stopped_node() -> None:
    sim, names, ids = line()
    a = sim.node_as("a", NodeStack)

    def topo_ok() -> bool:
        t = a.topology()
        return len(t["nodes"]) == 4 and len(t["links"]) == 3

    took = run_until(sim, topo_ok, 30.0)
    assert took < 15.0
    t = a.topology()
    assert {n["name"] for n in t["nodes"]} == set(names)
    pairs = {frozenset((lk["a"], lk["b"])) for lk in t["links"]}
    want = {
        frozenset((bytes(ids[x].sid).hex(), bytes(ids[y].sid).hex()))
        for x, y in [("a", "b"), ("b", "c"), ("c", "d")]
    }
    assert pairs == want
    dot = to_dot(t)
    assert dot.startswith("graph mesh {") and "fillcolor" in dot and dot.count(" -- ") == 3
    claim = {c.name: c for c in a.node_claimants()}
    assert claim["a"].metric == 0 and claim["d"].metric is not None
    assert claim["d"].metric > claim["b"].metric
    sim.stop_node("c")
    c_hex = bytes(ids["c"].sid).hex()

    def c_gone() -> bool:
        t = a.topology()
        return all(n["sid"] != c_hex for n in t["nodes"]) and all(
            c_hex not in (lk["a"], lk["b"]) for lk in t["links"]
        )

    assert run_until(sim, c_gone, 30.0) < 30.0


@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 8.0),
            st.dictionaries(st.integers(1, 30), st.integers(1, 0xFFFF), max_size=30),
        ),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=60, deadline=None)
def test_own_record_state_machine(steps: list[tuple[float, dict[int, int]]]) -> None:
    """Issues are at least min_interval apart, always within the bounds, and a link set
    that holds still is what the record says once min_interval has passed."""
    t = NodeRecordTiming(max_neighbours=8)
    a = NodeRecords(A, 0.0, timing=t)
    now, issued, links = 0.0, [], []
    for dt, nbs in steps:
        now += dt
        links = [NodeLink(bytes([k]) * 32, c, (0, k)) for k, c in nbs.items()]
        while a.next_deadline() <= now:
            before = a.counters["noderec.issued"]
            a.on_timer(a.next_deadline(), links)
            if a.counters["noderec.issued"] > before:
                issued.append(a._issued_at)
        a.on_timer(now, links)
        if a.own is not None and (not issued or issued[-1] != a._issued_at):
            issued.append(a._issued_at)
        assert a.own is not None and len(a.own.record.neighbours) <= t.max_neighbours
        NodeRecord.decode(a.own.body)
    assert all(b - x >= t.min_interval - 1e-9 for x, b in itertools.pairwise(issued))
    end = now + t.min_interval + t.check
    while a.next_deadline() <= end:
        a.on_timer(a.next_deadline(), links)
    a.on_timer(end, links)
    usable = sorted(
        (c, bytes([k]) * 32) for k, c in {lk.key[1]: lk.cost for lk in links}.items() if c <= 0xFFFE
    )
    got = {s: c for s, c in a.own.record.neighbours}
    assert set(got) == {s for _, s in usable[: t.max_neighbours]}
