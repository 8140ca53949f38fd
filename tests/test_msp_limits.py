"""MSP caps against a hostile peer (issue 14): half-open (SYN) floods and datagram
fragments that never complete. Two Msp endpoints wired back to back, sans-IO; the
attacker's segments are made by hand."""

from __future__ import annotations

from collections.abc import Sequence

from meshpipe.msp import (
    Mode,
    Msp,
    MspParams,
    ResetCode,
    State,
    StreamAccepted,
    StreamRefused,
    wire,
)
from meshpipe.msp.buffers import PeerBudget
from meshpipe.msp.endpoint import SYN_RESERVE

SERVER = bytes([0x50]) * 32
HONEST = bytes([0x20]) * 32
ATTACKER = bytes([0x90]) * 32
PORT = 80


def _mtu(_dst: bytes) -> int:
    return 1400


class Wire:
    """The server and an honest client; everything the server sends to anyone else
    is collected (the attacker never answers)."""

    def __init__(self, params: MspParams | None = None) -> None:
        self.server = Msp(SERVER, _mtu, params)
        self.client = Msp(HONEST, _mtu)
        self.server.listen(PORT)
        self.to_attacker: list[bytes] = []
        self.accepted: list[object] = []
        self.refused: list[StreamRefused] = []

    def _route(self, src: bytes, out: Sequence[tuple[bytes, bytes]], now: float) -> None:
        pending = [(src, dst, p) for dst, p in out]
        while pending:
            frm, dst, p = pending.pop(0)
            if dst == HONEST:
                pending += [(HONEST, d, q) for d, q in self.client.on_plaintext(frm, p, 1, now)]
            elif dst == SERVER:
                pending += [(SERVER, d, q) for d, q in self.server.on_plaintext(frm, p, 1, now)]
            else:
                self.to_attacker.append(p)

    def attack(self, segments: list[bytes], now: float) -> None:
        for seg in segments:
            self._route(ATTACKER, self.server.on_plaintext(ATTACKER, seg, 1, now), now)

    def tick(self, now: float) -> None:
        self._route(HONEST, self.client.on_timer(now), now)
        self._route(SERVER, self.server.on_timer(now), now)
        for ev in self.server.events():
            if isinstance(ev, StreamAccepted):
                self.accepted.append(ev.stream)
            elif isinstance(ev, StreamRefused):
                self.refused.append(ev)


def _number(peer: bytes, n: int) -> int:
    return (0x80000000 if peer > SERVER else 0) | n


def _syn(peer: bytes, n: int, mode: Mode = Mode.RELIABLE) -> bytes:
    return wire.encode_syn(wire.Syn(_number(peer, n), PORT, mode, 200, 1 << 20, 0))


def test_syn_flood_is_capped_and_honest_streams_open() -> None:
    params = MspParams()
    w = Wire(params)
    # An honest stream, open before the flood.
    old = w.client.open(SERVER, PORT, 0.0)
    w.tick(0.0)
    old.write(b"before", 0.0)
    w.tick(0.01)

    w.attack([_syn(ATTACKER, n) for n in range(1, 5001)], 0.1)
    w.tick(0.1)
    half_open = [s for s in w.server.streams() if s.peer == ATTACKER]
    assert len(half_open) == params.max_syn_streams_per_peer
    assert w.server.counters["msp.syn_overloaded"] == 5000 - params.max_syn_streams_per_peer
    assert len([r for r in w.refused if r.code is ResetCode.OVERLOADED]) == 1  # not 4936 lines
    rsts = [p for p in w.to_attacker if wire.decode(p).__class__ is wire.Rst]
    assert len(rsts) == 5000 - params.max_syn_streams_per_peer

    # The honest client opens a new stream in the middle of it; both carry data.
    new = w.client.open(SERVER, PORT, 0.2)
    for t in (0.2, 0.21, 0.22):
        w.tick(t)
    new.write(b"during", 0.3)
    old.write(b" and after", 0.3)
    for i in range(10):
        w.tick(0.3 + i * 0.01)
    got = {bytes(s.read()) for s in w.accepted if s.peer == HONEST}
    assert got == {b"before and after", b"during"}

    # Half-open streams time out; the attacker's share comes free again.
    t = 0.3 + params.handshake_timeout + 1.0
    w.tick(t)
    assert not [s for s in w.server.streams() if s.peer == ATTACKER]
    w.attack([_syn(ATTACKER, 9000)], t)
    assert any(s.peer == ATTACKER for s in w.server.streams())


def test_many_flooding_peers_hit_the_overall_cap_a_newcomer_still_gets_in() -> None:
    params = MspParams(max_syn_streams=100, max_syn_streams_per_peer=20)
    w = Wire(params)
    for k in range(10):  # ten peers, twenty SYNs each: 200 > 100
        peer = bytes([0xA0 + k]) * 32
        for n in range(1, 21):
            w.server.on_plaintext(peer, _syn(peer, n), 1, 0.0)
    # Five peers reach the overall cap; the other five get their reserve only.
    assert len(w.server.streams()) == params.max_syn_streams + 5 * SYN_RESERVE
    assert w.server.counters["msp.syn_overloaded"] == 200 - 100 - 5 * SYN_RESERVE
    st = w.client.open(SERVER, PORT, 0.1)  # a peer with nothing half-open
    for i in range(5):
        w.tick(0.1 + i * 0.01)
    assert st.state is State.OPEN


def test_never_completing_fragments_stay_in_the_peers_budget() -> None:
    params = MspParams(max_reassembly_per_peer=256 * 1024, max_reassembly=1 << 20)
    w = Wire(params)
    w.server.unlisten(PORT)
    w.server.listen(PORT)
    frag = b"x" * 1200
    segments: list[bytes] = []
    for n in range(1, 201):  # 200 datagram streams, each 40 first fragments
        segments.append(_syn(ATTACKER, n, Mode.DATAGRAM))
    w.attack(segments, 0.0)
    w.tick(0.0)
    segments = [
        wire.encode_dgram(wire.Dgram(_number(ATTACKER, n), m, 0, 50, frag))
        for n in range(1, 201)
        for m in range(40)
    ]
    w.attack(segments, 0.01)
    budget = w.server.fragments
    assert budget.held(ATTACKER) <= params.max_reassembly_per_peer
    assert budget.total <= params.max_reassembly
    assert w.server.counters["msp.dgram.drop.peer_budget"] > 0
    held = sum(s.buffered for s in w.server.streams() if s.peer == ATTACKER)
    assert held <= params.max_reassembly_per_peer

    # An honest datagram stream still reassembles 5-fragment messages.
    st = w.client.open(SERVER, PORT, 0.02, mode=Mode.DATAGRAM)
    for i in range(5):
        w.tick(0.02 + i * 0.01)
    msg = bytes(range(256)) * 25  # 6400 bytes: 5+ fragments
    st.send_datagram(msg, 0.1)
    for i in range(5):
        w.tick(0.1 + i * 0.01)
    honest = [s for s in w.accepted if s.peer == HONEST]
    assert honest and honest[0].recv_datagram() == msg

    # Timed-out partials and closed streams give the budget back.
    w.tick(0.1 + params.dgram_timeout + 1.0)
    assert budget.held(ATTACKER) == 0


def test_peer_budget() -> None:
    b = PeerBudget(per_peer=10, total=15)
    assert b.fits(ATTACKER, 10) and not b.fits(ATTACKER, 11)
    b.change(ATTACKER, 10)
    assert not b.fits(ATTACKER, 1) and b.fits(HONEST, 5) and not b.fits(HONEST, 6)
    b.change(ATTACKER, -10)
    assert b.held(ATTACKER) == 0 and b.total == 0 and b.peers() == 0
