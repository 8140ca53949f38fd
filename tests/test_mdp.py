"""meshpipe.mdp: the codec, ports, echo, sizes; and MDP through NodeStack."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe.actions import BROADCAST, Action, Event
from meshpipe.errors import MeshpipeError
from meshpipe.identity import Identity
from meshpipe.mdp import (
    ECHO_PORT,
    MDP_OVERHEAD,
    PROTO_MDP,
    DatagramTooLarge,
    Mdp,
    MdpDatagram,
    MdpError,
    MdpSend,
    encode,
    max_payload,
)
from meshpipe.msp import PROTO_MSP
from meshpipe.node import InterfaceParams
from meshpipe.sim import LinkProfile, SimMesh
from meshpipe.stack import NodeStack
from meshpipe.wire import DATA_HEADER_LEN, KIND_DATA

A = b"\xaa" * 32
B = b"\xbb" * 32


def test_overhead_is_exact() -> None:
    assert MDP_OVERHEAD == 66 + 13 + 16 + 5 == 100
    assert max_payload(1400) == 1300
    assert max_payload(256) == 156
    assert max_payload(50) == 0


def test_send_checks_size_and_ports() -> None:
    m = Mdp()
    (out,) = m.send(B, 4000, 9, b"x" * 1300, 0.0, 1400)
    assert out == MdpSend(B, bytes([PROTO_MDP]) + b"\x0f\xa0\x00\x09" + b"x" * 1300)
    with pytest.raises(DatagramTooLarge) as exc:
        m.send(B, 4000, 9, b"x" * 1301, 0.0, 1400)
    assert isinstance(exc.value, MeshpipeError)
    assert (exc.value.size, exc.value.limit, exc.value.path_mtu) == (1301, 1300, 1400)
    for sp, dp in ((-1, 9), (70000, 9), (1, 0), (1, 65536)):
        with pytest.raises(MdpError):
            m.send(B, sp, dp, b"", 0.0, 1400)
    m.send(B, 0, 65535, b"", 0.0, 1400)  # source port 0 is allowed (no reply wanted)
    assert m.counters["mdp.tx"] == 2


def test_bind_unbind() -> None:
    m = Mdp()
    m.bind(9000)
    with pytest.raises(MdpError):
        m.bind(9000)
    with pytest.raises(MdpError):
        m.bind(ECHO_PORT)  # the echo service has it
    for bad in (0, 65536, -3):
        with pytest.raises(MdpError):
            m.bind(bad)
    assert m.ports == [9000] and m.is_bound(9000)
    m.unbind(9000)
    m.unbind(9000)  # idempotent
    assert m.ports == []
    Mdp(echo=False).bind(ECHO_PORT)


def test_delivery_unbound_and_malformed() -> None:
    m = Mdp()
    m.bind(9000)
    assert m.on_plaintext(A, encode(1234, 9000, b"hi"), 3, 0.0) == [
        MdpDatagram(A, 1234, 9000, b"hi", 3)
    ]
    assert m.on_plaintext(A, encode(1234, 9001, b"hi"), 3, 0.0) == []
    assert m.counters["mdp.drop.unbound_port"] == 1
    for bad in (b"", b"\x01\x00", bytes([PROTO_MSP]) + bytes(4)):
        assert m.on_plaintext(A, bad, 1, 0.0) == []
    assert m.counters["mdp.drop.malformed"] == 3


def test_echo_service() -> None:
    m = Mdp()
    assert m.on_plaintext(A, encode(5555, ECHO_PORT, b"ping!"), 2, 0.0) == [
        MdpSend(A, encode(ECHO_PORT, 5555, b"ping!"))
    ]
    assert m.counters["mdp.echo.answered"] == 1
    # Never answers port 7 (two echo services) or port 0 (no reply wanted).
    assert m.on_plaintext(A, encode(ECHO_PORT, ECHO_PORT, b"x"), 2, 0.0) == []
    assert m.on_plaintext(A, encode(0, ECHO_PORT, b"x"), 2, 0.0) == []
    assert m.counters["mdp.drop.echo_loop"] == 2
    assert Mdp(echo=False).on_plaintext(A, encode(5555, ECHO_PORT, b"x"), 2, 0.0) == []


@given(st.integers(0, 65535), st.integers(1, 65535), st.binary(max_size=300), st.integers(1, 64))
def test_roundtrip(sp: int, dp: int, payload: bytes, hops: int) -> None:
    tx, rx = Mdp(echo=False), Mdp(echo=False)
    rx.bind(dp)
    (out,) = tx.send(B, sp, dp, payload, 0.0, 1400)
    assert isinstance(out, MdpSend)
    assert rx.on_plaintext(A, out.plaintext, hops, 0.0) == [MdpDatagram(A, sp, dp, payload, hops)]


# ---------------------------------------------------------------- through NodeStack


def _line(n: int, mtu: int = 1400, seed: int = 3) -> tuple[SimMesh, list[NodeStack]]:
    mesh = SimMesh(seed=seed, record_frames=True)
    rnd = random.Random(seed)
    stacks = []
    for i in range(n):
        st_ = NodeStack(
            Identity.from_seed(bytes([i + 1]) * 32),
            [InterfaceParams("sim", mtu=mtu, flood_dest=BROADCAST)],
            now=0.0,
            rng=random.Random(i),
            epoch_ns=10**18,
            random_bytes=rnd.randbytes,
        )
        stacks.append(st_)
        mesh.add_node(f"n{i}", st_)
    for i in range(n - 1):
        mesh.connect(f"n{i}", f"n{i + 1}", LinkProfile(mtu=mtu))
    mesh.run_for(3.0)
    return mesh, stacks


def test_ping_over_three_hops() -> None:
    mesh, st_ = _line(4)
    mesh.call("n0", lambda node, now: node.ping(st_[3].sid, now, size=64))
    mesh.run_for(1.0)
    (reply,) = st_[0].ping_replies()
    assert reply.sid == st_[3].sid and reply.seq == 1 and reply.hops == 3 and reply.size == 64
    assert 0.0 < reply.rtt < 0.2
    ev = [e for _, e in mesh.events["n0"] if e.name == "ping.reply"]
    assert ev == [Event("ping.reply", {**ev[0].fields})] and ev[0].fields["hops"] == 3
    # The second ping rides the established session: one round trip.
    mesh.call("n0", lambda node, now: node.ping(st_[3].sid, now))
    mesh.run_for(1.0)
    (reply2,) = st_[0].ping_replies()
    assert reply2.seq == 2 and reply2.rtt == pytest.approx(6 * 0.005, abs=1e-6)
    assert st_[3].counters["mdp.echo.answered"] == 2
    assert st_[0].counters["ping.rx"] == 2


def test_largest_datagram_fills_the_mtu_exactly() -> None:
    mesh, st_ = _line(2, mtu=600)
    st_[1].bind(9000)
    dst = st_[1].sid
    assert st_[0].max_datagram(dst) == 500
    with pytest.raises(DatagramTooLarge):
        st_[0].mdp_send(dst, 1, 9000, b"z" * 501, mesh.now)
    mesh.call("n0", lambda node, now: node.mdp_send(dst, 1, 9000, b"z" * 500, now))
    mesh.run_for(1.0)
    (dg,) = st_[1].recv(9000)
    assert dg.payload == b"z" * 500 and dg.src == st_[0].sid and dg.hops == 1
    assert mesh.frame_log is not None
    data = [f for _, _, _, f in mesh.frame_log if f[0] & 0x0F == KIND_DATA]
    big = [f for f in data if len(f) > 300]
    assert [len(f) for f in big] == [600]  # one frame, exactly the MTU
    assert len(big[0]) - DATA_HEADER_LEN == 13 + 5 + 500 + 16
    assert mesh.stats.dropped_mtu == 0


def test_unbound_port_dropped_without_reply_and_loopback() -> None:
    mesh, st_ = _line(2)
    a, b = st_
    a.bind(4000)
    mesh.call("n0", lambda node, now: node.mdp_send(b.sid, 4000, 9999, b"nobody", now))
    mesh.run_for(1.0)
    assert b.counters["mdp.drop.unbound_port"] == 1
    assert a.recv() == [] and a.counters["session.rx.packets"] == 0
    # A datagram to ourselves never touches a session.
    acts = a.mdp_send(a.sid, 1, 4000, b"me", mesh.now)
    assert acts == []
    assert a.recv(4000) == [MdpDatagram(a.sid, 1, 4000, b"me", 0)]


def _send_to(dst: bytes, payload: bytes, node: NodeStack, now: float) -> list[Action]:
    return node.mdp_send(dst, 1, 9000, payload, now)


class FakeMsp:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes, int]] = []
        self.wake = float("inf")
        self.woken = 0
        self.peer = b""

    def on_plaintext(
        self, src: bytes, plaintext: bytes, hops: int, now: float
    ) -> list[tuple[bytes, bytes]]:
        self.seen.append((src, plaintext, hops))
        self.peer = src
        return []

    def on_timer(self, now: float) -> list[tuple[bytes, bytes]]:
        self.woken += 1
        self.wake = float("inf")
        return [(self.peer, b"\x09timer")]

    def next_deadline(self) -> float:
        return self.wake


def test_protocol_dispatch_and_inbox_limit() -> None:
    mesh, st_ = _line(2)
    a, b = st_
    msp = FakeMsp()
    b.register_protocol(9, msp)
    for taken in (PROTO_MDP, PROTO_MSP, 9, 256):
        with pytest.raises(ValueError):
            b.register_protocol(taken, msp)
    mesh.call("n0", lambda node, now: node.send_plaintext(b.sid, b"\x09stream", now))
    mesh.call("n0", lambda node, now: node.send_plaintext(b.sid, b"\x0awhat", now))
    mesh.run_for(1.0)
    assert msp.seen == [(a.sid, b"\x09stream", 1)]
    assert b.counters["stack.drop.unknown_proto"] == 1
    # The protocol's own timer: it sends through the stack when woken.
    msp.wake = mesh.now + 0.5
    mesh.run_for(1.0)
    assert msp.woken == 1 and msp.wake == float("inf")
    assert b.counters["session.tx.packets"] >= 1
    b.inbox_limit = 3
    b.bind(9000)
    for i in range(5):
        mesh.call("n0", functools.partial(_send_to, b.sid, b"%d" % i))
    mesh.run_for(1.0)
    assert [d.payload for d in b.recv(9000)] == [b"0", b"1", b"2"]
    assert b.counters["mdp.drop.inbox_full"] == 2
    b.unbind(9000)
    assert b.recv(9000) == []
