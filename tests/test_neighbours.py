"""Neighbour layer: hello codec and signatures, link quality, timeouts, flooding."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from meshpipe import wire
from meshpipe.actions import BROADCAST, MULTICAST, Event, SendFrame
from meshpipe.identity import Identity
from meshpipe.link.neighbours import (
    HELLO_DOMAIN,
    INFINITY,
    Hello,
    Ihu,
    Neighbour,
    decode_hello,
    encode_hello,
    split_hello,
)
from meshpipe.node import MIN_MTU, InterfaceParams, NodeCore, Timing
from meshpipe.sim import LinkProfile, SimMesh

A = Identity.from_seed(b"\x01" * 32)
B = Identity.from_seed(b"\x02" * 32)
C = Identity.from_seed(b"\x03" * 32)
TIMING = Timing()


def core(ident: Identity, **iface: object) -> NodeCore:
    params = InterfaceParams("eth0", **iface)  # type: ignore[arg-type]
    return NodeCore(ident, [params], TIMING, 0.0, random.Random(1))


def sends(actions: Sequence[object]) -> list[SendFrame]:
    return [a for a in actions if isinstance(a, SendFrame)]


def hellos(actions: Sequence[object]) -> list[SendFrame]:
    """Hello frames sent, multicast ones and their unicast copies."""
    kinds = (wire.KIND_HELLO, wire.KIND_HELLO_COPY)
    return [s for s in sends(actions) if s.frame[0] & 0x0F in kinds]


def events(actions: Sequence[object], name: str) -> list[Event]:
    return [a for a in actions if isinstance(a, Event) and a.name == name]


def bare_neighbour() -> Neighbour:
    return Neighbour(
        iface=0,
        addr="x",
        sid=B.sid,
        epoch=1,
        interval=1.0,
        last_heard=0.0,
        last_seqno=100,
        seq_at=0.0,
        heard_seqno=100,
        their_ts=0,
        their_ts_at=0.0,
        expect_at=1.5,
    )


# -- codec -------------------------------------------------------------------------------


def test_hello_round_trip_and_signature() -> None:
    ihu = Ihu(bytes(B.sid), epoch=7, rxq=200, echo_ts=123456, hold_us=5000)
    hello = Hello(A.sid, epoch=42, seqno=65535, timestamp=2**32 - 1, interval_ms=1000, ihus=(ihu,))
    frame = encode_hello(A, hello)
    assert frame[0] == (wire.WIRE_VERSION << 4) | wire.KIND_HELLO
    signed = decode_hello(frame)
    assert signed.hello == hello
    assert signed.verify()
    # The signature covers the domain-separated body, nothing else.
    assert A.sid.verify(HELLO_DOMAIN + signed.body, signed.signature)
    assert not A.sid.verify(signed.body, signed.signature)


def test_hello_signed_by_someone_else_is_rejected() -> None:
    # C signs a hello that claims to come from A.
    hello = Hello(A.sid, 1, 1, 0, 1000)
    body = wire.pack_body([bytes(A.sid), 1, 1, 0, 1000, []])
    forged = wire.encode_control(wire.KIND_HELLO, [body, C.sign(HELLO_DOMAIN + body)])
    assert decode_hello(forged).hello == hello
    assert not decode_hello(forged).verify()
    b = core(B)
    b.on_frame(0, "a", forged, 0.1)
    assert b.counters["drop.bad_signature"] == 1
    assert b.neighbours() == []
    # A genuine hello whose body was altered after signing fails the same way.
    good = bytearray(encode_hello(A, Hello(A.sid, 1, 2, 0, 1000)))
    good[good.index(bytes(A.sid)) + 40] ^= 1  # inside the signed body, after the SID
    b.on_frame(0, "a", bytes(good), 0.2)
    assert b.counters["drop.bad_signature"] + b.counters["drop.malformed"] == 2
    assert b.neighbours() == []


@pytest.mark.parametrize("mtu", [MIN_MTU, 300, 1400])
def test_hello_split_over_mtu(mtu: int) -> None:
    ihus = tuple(
        Ihu(Identity.from_seed(bytes([i]) * 32).sid, i, i % 256, i * 1000, i) for i in range(60)
    )
    hello = Hello(A.sid, 9, 77, 1234, 1000, ihus)
    frames = split_hello(A, hello, mtu)
    assert all(len(f) <= mtu for f in frames)
    got: list[Ihu] = []
    for f in frames:
        s = decode_hello(f)
        assert s.verify()
        assert s.hello.seqno == 77 and s.hello.epoch == 9
        got.extend(s.hello.ihus)
    assert tuple(got) == ihus
    assert len(frames) > 1


def test_mtu_below_minimum_is_refused() -> None:
    with pytest.raises(ValueError):
        core(A, mtu=MIN_MTU - 1)


# -- link quality --------------------------------------------------------------------------


def test_receive_history_counts_gaps_duplicates_and_misses() -> None:
    nb = bare_neighbour()
    assert nb.p_in == 1.0
    nb.record_seqno(101, 0.0)
    nb.record_seqno(101, 0.0)  # duplicate (split hello, multicast + unicast copy)
    nb.record_seqno(100, 0.0)  # late: ignored
    assert (nb.history_len, nb.p_in) == (2, 1.0)
    nb.record_seqno(104, 0.0)  # 102 and 103 lost
    assert nb.history_len == 5
    assert nb.p_in == pytest.approx(3 / 5)
    nb.record_miss(0.0)
    assert nb.p_in == pytest.approx(3 / 6)
    assert nb.last_seqno == 105
    for s in range(106, 140):  # the window is the last 16 expected
        nb.record_seqno(s, 0.0)
    assert nb.p_in == 1.0 and nb.history_len == 16
    nb.record_seqno(139 + 40, 0.0)  # a jump beyond the window: one of the last 16 heard
    assert nb.p_in == pytest.approx(1 / 16)
    nb.record_seqno(3, 0.0)  # wraps modulo 2^16 and is "newer" only if within half the space
    assert nb.last_seqno == 179


def test_cost_formula() -> None:
    nb = bare_neighbour()
    assert nb.compute_cost() == INFINITY  # no IHU yet: we do not know it hears us
    nb.txq = 255
    assert nb.compute_cost() == 256
    nb.history, nb.history_len = 0b1010, 4  # half its hellos heard
    assert nb.compute_cost() == 512
    nb.txq = 128  # it hears about half of ours
    assert nb.compute_cost() == round(256 / (0.5 * 128 / 255))
    nb.history, nb.history_len, nb.txq = 1, 1, 255
    nb.srtt_ms = 40.0  # below 50 ms RTT costs nothing
    assert nb.compute_cost() == 256
    nb.srtt_ms = 130.0
    assert nb.compute_cost() == 256 + 10
    nb.srtt_ms = 5000.0
    assert nb.compute_cost() == 256 + 64
    nb.history = 0
    assert nb.compute_cost() == INFINITY


def pair(loss_ab: float = 0.0, loss_ba: float = 0.0, delay: float = 0.01) -> SimMesh:
    mesh = SimMesh(3)
    for name, ident, seed in (("a", A, 1), ("b", B, 2)):
        node = NodeCore(
            ident, [InterfaceParams(name, flood_dest=BROADCAST)], TIMING, 0.0, random.Random(seed)
        )
        mesh.add_node(name, node)
    mesh.connect(
        "a",
        "b",
        LinkProfile(delay=delay, loss=loss_ab),
        b_to_a=LinkProfile(delay=delay, loss=loss_ba),
    )
    return mesh


def test_link_quality_measures_loss_both_ways_and_rtt() -> None:
    mesh = pair(loss_ab=0.3, delay=0.02)
    a = mesh.node_as("a", NodeCore)
    b = mesh.node_as("b", NodeCore)
    samples: list[tuple[float, float, float, int]] = []
    for t in range(20, 400):
        mesh.run_until(float(t))
        if not (a.neighbours() and b.neighbours()):
            continue  # four hellos in a row lost: b timed a out, and meets it again
        (na,) = a.neighbours()
        (nb,) = b.neighbours()
        assert na.sid == B.sid and nb.sid == A.sid
        assert na.loss_in == 0.0  # b -> a is clean
        if na.rtt_ms:
            samples.append((nb.loss_in, na.loss_out, na.rtt_ms, na.cost))
    n = len(samples)
    assert n > 300
    # a -> b loses 30 %: b measures it from the hello seqnos, a learns it from b's IHUs.
    assert sum(s[0] for s in samples) / n == pytest.approx(0.3, abs=0.06)
    assert sum(s[1] for s in samples) / n == pytest.approx(0.3, abs=0.06)
    assert all(s[2] == pytest.approx(40.0, abs=1.0) for s in samples)  # 2 x 20 ms
    assert sum(s[3] for s in samples) / n == pytest.approx(256 / 0.7, rel=0.15)
    assert a.neighbours()[0].as_json()["addr"] == "b:0"


def test_one_way_link_is_not_usable() -> None:
    mesh = pair(loss_ab=1.0)  # b never hears a
    mesh.run_until(10.0)
    a = mesh.node_as("a", NodeCore)
    (na,) = a.neighbours()
    assert na.cost == INFINITY and na.loss_out == 1.0
    assert a.routes() == []
    assert mesh.node_as("b", NodeCore).neighbours() == []


def test_neighbour_timeout_drops_peer_and_routes() -> None:
    mesh = pair()
    mesh.run_until(5.0)
    a = mesh.node_as("a", NodeCore)
    assert [r.sid for r in a.routes()] == [B.sid]
    assert bytes(B.sid) in a.forwarding_table()
    last = a.neighbours()[0].last_heard
    mesh.stop_node("b")
    mesh.run_until(last + TIMING.neighbour_timeout + 0.01)
    assert a.neighbours() == [] and a.routes() == [] and a.forwarding_table() == {}
    downs = [(t, e) for t, e in mesh.events["a"] if e.name == "peer.down"]
    assert len(downs) == 1
    t, ev = downs[0]
    assert t == pytest.approx(last + TIMING.neighbour_timeout, abs=1e-6)
    assert ev.fields == {"sid": B.sid.short, "iface": "a", "addr": "b:0"}
    assert mesh.forwarding["a"] == {}


def test_replayed_hello_does_not_keep_a_dead_neighbour_alive() -> None:
    mesh = pair()
    captured: list[bytes] = []

    def tap(frame: bytes) -> bytes:
        if frame[0] & 0x0F == wire.KIND_HELLO:
            captured.append(frame)
        return frame

    mesh.set_tamper("b", "a", tap)
    mesh.run_until(5.0)
    a = mesh.node_as("a", NodeCore)
    last = a.neighbours()[0].last_heard
    mesh.stop_node("b")
    # An attacker on the link replays b's latest hello (and older ones) every 0.5 s.
    t = mesh.now
    while t < last + TIMING.neighbour_timeout + 1.0:
        t += 0.5
        for f in captured[-3:]:
            mesh.inject("a", 0, mesh.link_addr("b"), f, at=t)
    mesh.run_until(t)
    assert a.neighbours() == []
    assert a.counters["hello.stale"] >= 20
    assert [e.name for _, e in mesh.events["a"]].count("peer.up") == 1
    (t_down,) = [t for t, e in mesh.events["a"] if e.name == "peer.down"]
    assert t_down == pytest.approx(last + TIMING.neighbour_timeout, abs=1e-6)


def test_neighbour_returns_after_partition_heals() -> None:
    mesh = pair()
    mesh.run_until(5.0)
    mesh.partition("a", "b")
    mesh.run_for(TIMING.neighbour_timeout + 2.0)
    a = mesh.node_as("a", NodeCore)
    assert a.neighbours() == [] and a.routes() == []
    mesh.heal("a", "b")
    mesh.run_for(2.0)  # same epoch, newer seqnos: welcome back (no tombstone veto)
    assert [n.sid for n in a.neighbours()] == [B.sid]
    assert [r.sid for r in a.routes()] == [B.sid]
    assert [e.name for _, e in mesh.events["a"]].count("peer.up") == 2


def test_returning_neighbour_resumes_its_history() -> None:
    """A neighbour dropped for silence comes back with the hellos it missed counted as
    missed, not with a fresh one-of-one history that makes a lossy link look perfect."""
    mesh = pair()
    mesh.run_until(20.0)  # a full window of heard hellos
    mesh.partition("a", "b")
    mesh.run_for(TIMING.neighbour_timeout + 1.0)
    a = mesh.node_as("a", NodeCore)
    assert a.neighbours() == []
    mesh.heal("a", "b")
    mesh.run_for(1.5)
    (nb,) = a.neighbours()
    # The 5-7 hellos sent during the partition count as missed.
    assert 0.2 <= nb.loss_in <= 0.6
    assert nb.cost > 256


def test_restart_is_detected_by_epoch() -> None:
    mesh = pair()
    mesh.run_until(5.0)
    mesh.replace_node(
        "b",
        NodeCore(
            B, [InterfaceParams("b", flood_dest=BROADCAST)], TIMING, mesh.now, random.Random(77)
        ),
    )
    mesh.run_for(2.0)
    names = [e.name for _, e in mesh.events["a"]]
    assert "peer.restarted" in names and "peer.down" not in names
    a = mesh.node_as("a", NodeCore)
    assert [r.sid for r in a.routes()] == [B.sid]


def test_own_hello_looped_back_is_ignored() -> None:
    a = core(A)
    frames = [s.frame for s in hellos(a.on_timer(0.5))]
    assert frames
    a.on_frame(0, "me", frames[0], 0.6)
    assert a.counters["hello.own"] == 1
    assert a.neighbours() == []


def test_new_neighbour_gets_an_immediate_hello_and_peer_up() -> None:
    a, b = core(A), core(B)
    hello_b = hellos(b.on_timer(0.5))[0].frame
    out = a.on_frame(0, "b-addr", hello_b, 0.501)
    assert [e.fields["sid"] for e in events(out, "peer.up")] == [B.sid.short]
    reply = [s for s in sends(out) if s.dest == "b-addr"]
    assert reply
    # The reply carries an IHU for b, so b sees the link as two-way at once.
    out_b = b.on_frame(0, "a-addr", reply[0].frame, 0.502)
    (nb,) = b.neighbours()
    assert nb.cost == 256 and nb.rtt_ms == pytest.approx(2.0)
    # The link just became usable: b hands a its routing table straight away.
    routing = [s for s in sends(out_b) if s.frame[0] & 0x0F == wire.KIND_ROUTING]
    assert routing and all(s.dest == "a-addr" for s in routing)


# -- flooding ------------------------------------------------------------------------------


def test_flooding_multicast_adds_static_peers_and_known_neighbours() -> None:
    a = core(A, flood_dest=MULTICAST, static_peers=(("198.18.0.2", 7700),))
    first = hellos(a.on_timer(1.0))
    assert [s.dest for s in first] == [MULTICAST, ("198.18.0.2", 7700)]
    b = core(B)
    hello_b = hellos(b.on_timer(0.5))[0].frame
    a.on_frame(0, ("198.18.0.3", 7700), hello_b, 1.1)
    later = hellos(a.on_timer(2.5))
    assert [s.dest for s in later] == [MULTICAST, ("198.18.0.2", 7700), ("198.18.0.3", 7700)]
    # The copies say they are copies, and carry the multicast hello's body and signature.
    assert [s.frame[0] & 0x0F for s in later] == [wire.KIND_HELLO] + [wire.KIND_HELLO_COPY] * 2
    assert {s.frame[1:] for s in later} == {later[0].frame[1:]}


def test_unicast_copies_do_not_hide_multicast_loss() -> None:
    """A neighbour whose multicast hellos lose 60 % while every unicast copy arrives
    has the loss of one frame per hello in its cost, not of the better of two; one
    heard by its copies alone (it does not hear our group) counts the copies."""
    rng = random.Random(7)
    a = core(A, flood_dest=MULTICAST)
    b = core(B, flood_dest=MULTICAST, static_peers=(("198.18.0.1", 7700),))
    only_copies = core(C, flood_dest=MULTICAST, static_peers=(("198.18.0.1", 7700),))
    now = 0.0
    for _ in range(64):
        now += 1.0
        for sender, addr in ((b, ("198.18.0.2", 7700)), (only_copies, ("198.18.0.3", 7700))):
            for s in hellos(sender.on_timer(now)):
                if s.frame[0] & 0x0F == wire.KIND_HELLO_COPY:
                    lost = False  # every unicast copy arrives
                elif sender is only_copies:
                    lost = True  # C's multicast never reaches A
                else:
                    lost = rng.random() < 0.6
                if not lost:
                    a.on_frame(0, addr, s.frame, now + 0.001)
        a.on_timer(now + 0.5)
    by_sid = {bytes(nb.sid): nb for nb in a.links.on_iface(0)}
    assert 0.2 <= by_sid[bytes(B.sid)].p_in <= 0.6
    assert by_sid[bytes(C.sid)].p_in >= 0.8


def test_flooding_unicast_only_and_broadcast() -> None:
    a = core(A, flood_dest=None, static_peers=(("198.18.0.2", 7700), ("198.18.0.4", 7700)))
    assert [s.dest for s in hellos(a.on_timer(1.0))] == [
        ("198.18.0.2", 7700),
        ("198.18.0.4", 7700),
    ]
    b = core(B, flood_dest=BROADCAST, static_peers=(("198.18.0.2", 7700),))
    assert [s.dest for s in hellos(b.on_timer(1.0))] == [BROADCAST]
    # No interface configured to flood and nobody known: nothing to send, nothing breaks.
    c = core(C, flood_dest=None)
    assert sends(c.on_timer(1.0)) == []


def test_hellos_are_periodic_with_jitter() -> None:
    a = core(A, flood_dest=BROADCAST)
    times = []
    now = 0.0
    while now < 30.0:
        now = a.next_deadline()
        if hellos(a.on_timer(now)):
            times.append(now)
    gaps = [y - x for x, y in itertools.pairwise(times)]
    assert all(0.9 * TIMING.hello_interval - 1e-9 <= g <= TIMING.hello_interval for g in gaps)
    assert len(set(round(g, 6) for g in gaps)) > 5  # actually jittered
