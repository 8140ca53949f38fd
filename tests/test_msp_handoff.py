"""Moving a stream between two Msp endpoints of one node (Msp.export / release / adopt),
as the control worker hands bridged service streams to a crypto worker."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from meshpipe.msp import Mode, Msp, Stream, StreamAccepted, StreamError, stream_number, wire

A_SID = b"\x01" * 32
B_SID = b"\x02" * 32
PORT = 7


def _mtu(_dst: bytes) -> int:
    return 1400


class Pair:
    """Endpoints a (and a2, where a's streams move) and b, joined by a lossy pipe."""

    def __init__(self, loss: float = 0.0, seed: int = 1) -> None:
        self.a = Msp(A_SID, _mtu)
        self.a2 = Msp(A_SID, _mtu)
        self.b = Msp(B_SID, _mtu)
        self.b.listen(PORT)
        self.rng = random.Random(seed)
        self.loss = loss
        self.now = 0.0
        self.moved = False  # b's segments go to a2 once the stream has moved
        self.to_b: list[bytes] = []
        self.to_a: list[bytes] = []

    def _lossy(self, pts: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
        return [bytes(pt) for _dst, pt in pts if self.rng.random() >= self.loss]

    def step(self, dt: float = 0.005) -> None:
        self.now += dt
        now = self.now
        for ep in (self.a, self.a2):
            self.to_b += self._lossy(ep.on_timer(now))
        self.to_a += self._lossy(self.b.on_timer(now))
        to_b, self.to_b = self.to_b, []
        for pt in to_b:
            self.to_a += self._lossy(self.b.on_plaintext(A_SID, pt, 0, now))
        to_a, self.to_a = self.to_a, []
        for pt in to_a:
            n = stream_number(pt)
            ep = self.a2 if self.moved and self.a2.holds(B_SID, n) else self.a
            self.to_b += self._lossy(ep.on_plaintext(B_SID, pt, 0, now))

    def move(self, st: Stream) -> Stream:
        blob = self.a.export(st, 1 << 20)
        assert blob is not None
        self.a.release(st)
        self.moved = True
        return self.a2.adopt(blob, self.now)


@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_stream_moved_mid_transfer_arrives_byte_exact(loss: float) -> None:
    p = Pair(loss=loss)
    data = random.Random(5).randbytes(400_000)
    st = p.a.open(B_SID, PORT, p.now)
    sent = st.write(data[:50_000], p.now)
    p.step()
    accepted = [e for e in p.b.events() if isinstance(e, StreamAccepted)]
    assert accepted
    peer = accepted[0].stream
    got = bytearray(peer.read())
    for _ in range(5):
        p.step()
        got += peer.read()
    st = p.move(st)  # with bytes in flight and unacknowledged
    assert not p.a.streams() and p.a2.streams() == [st]
    for _ in range(20000):
        if sent < len(data):
            sent += st.write(data[sent:], p.now)
            if sent == len(data):
                st.shutdown(p.now)
        p.step()
        got += peer.read()
        if peer.eof and st.fin_acked:
            break
    assert bytes(got) == data
    assert p.a.counters["msp.drop.unknown_stream"] == 0
    assert p.b.counters["msp.drop.unknown_stream"] == 0
    assert p.a2.counters["msp.adopted"] == 1 and p.a.counters["msp.exported"] == 1


def test_export_refuses_datagram_closed_and_too_big() -> None:
    p = Pair()
    dg = p.a.open(B_SID, PORT, p.now, mode=Mode.DATAGRAM)
    assert p.a.export(dg, 1 << 20) is None
    st = p.a.open(B_SID, PORT, p.now)
    st.write(b"x" * 200_000, p.now)
    assert p.a.export(st, 64 * 1024) is None  # its buffer alone is bigger
    assert p.a.export(st, 1 << 20) is not None
    st.reset(p.now)
    assert p.a.export(st, 1 << 20) is None
    other = Msp(A_SID, _mtu)
    with pytest.raises(StreamError):
        other.adopt(b"\x80\x05N.", p.now)  # not a stream


def test_holds_and_stream_number() -> None:
    p = Pair()
    st = p.a.open(B_SID, PORT, p.now)
    blob = p.a.export(st, 1 << 20)
    assert blob is not None
    p.a.release(st)
    moved = p.a2.adopt(blob, p.now)
    assert p.a2.holds(B_SID, moved.number) and not p.a.holds(B_SID, moved.number)
    assert not p.a2.holds(B_SID, None)
    assert stream_number(wire.encode_rst(moved.number, wire.ResetCode.ABORTED)) == moved.number
    assert stream_number(b"\x01" + bytes(8)) is None  # not an MSP segment
    with pytest.raises(StreamError):
        p.a2.adopt(blob, p.now)  # the same stream twice
