"""Link header compression (meshpipe.link.compress): round trips, context loss and
resync, and a parser that takes any bytes."""

from __future__ import annotations

import random
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.link import compress as lc
from meshpipe.session import TRANSPORT_HEADER, TYPE_TRANSPORT

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MTU = 251
SIDS = [bytes([i]) * 32 for i in range(1, 5)]


def transport(
    dst: bytes, src: bytes, index: int, counter: int, body: bytes, hop: int = 64
) -> bytes:
    return wire.encode_data(
        dst, src, TRANSPORT_HEADER.pack(TYPE_TRANSPORT, index, counter) + body, hop
    )


def pair(seed: int = 0) -> tuple[lc.LinkCompressor, lc.LinkCompressor, Counter[str], Counter[str]]:
    ca: Counter[str] = Counter()
    cb: Counter[str] = Counter()
    return (
        lc.LinkCompressor(MTU, random.Random(seed), ca),
        lc.LinkCompressor(MTU, random.Random(seed + 1), cb),
        ca,
        cb,
    )


def carry(
    a: lc.LinkCompressor, b: lc.LinkCompressor, frame: bytes, now: float, lose: tuple[int, ...] = ()
) -> list[bytes]:
    """Send ``frame`` from a to b (dropping the link frames whose position is in
    ``lose``), feed b's answers back to a; return what b hands up."""
    up: list[bytes] = []
    for i, f in enumerate(a.encode("b", frame, now)):
        if i in lose:
            continue
        if not lc.is_link_frame(f):
            up.append(f)
            continue
        inner, replies = b.decode("a", f, now)
        if inner is not None:
            up.append(inner)
        for r in replies:
            a.decode("b", r, now)
    return up


flows = st.tuples(
    st.sampled_from(SIDS), st.sampled_from(SIDS), st.integers(0, 2**32 - 1), st.integers(1, 64)
)


@FUZZ
@given(
    st.lists(
        st.tuples(flows, st.integers(0, 40), st.binary(min_size=16, max_size=220)),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 2**64 - 2**20),
)
def test_round_trip_and_shrinks(
    items: list[tuple[tuple[bytes, bytes, int, int], int, bytes]], base: int
) -> None:
    a, b, ca, _ = pair()
    counters: dict[tuple[bytes, bytes, int, int], int] = {}
    for i, (flow, step, body) in enumerate(items):
        counters[flow] = counters.get(flow, base) + step
        frame = transport(flow[0], flow[1], flow[2], counters[flow], body, flow[3])
        out = a.encode("b", frame, float(i))
        assert out[-1] == frame or len(out[-1]) == len(frame) - lc.GAIN
        assert carry(a, b, frame, float(i)) == [frame]
    assert ca["compress.tx.compressed"] + ca["compress.tx.full"] >= len(items)


def test_steady_flow_is_compressed_after_one_define() -> None:
    a, b, ca, cb = pair()
    for n in range(100):
        f = transport(SIDS[0], SIDS[1], 7, 1000 + n, bytes(150))
        assert carry(a, b, f, n * 0.01) == [f]
    assert ca["compress.tx.define"] == 1 and cb["compress.rx.define"] == 1
    assert ca["compress.tx.full"] == 1 and ca["compress.tx.compressed"] == 99


def test_big_frame_goes_compressed_behind_a_define() -> None:
    """A frame over the link MTU (the data MTU counts the gain) never goes whole."""
    a, _b, _ca, _ = pair()
    f = transport(SIDS[0], SIDS[1], 7, 5, bytes(MTU - 79 + 40))
    out = a.encode("b", f, 0.0)
    assert [x[0] for x in out] == [lc.T_DEFINE, lc.COMPRESSED | 0]
    assert len(out[1]) <= MTU
    a2, b2, _, _ = pair()
    assert carry(a2, b2, f, 0.0) == [f]


def test_counter_drift_redefines_and_wraps() -> None:
    a, b, ca, _ = pair()
    c = 2**64 - 70000
    for n in range(0, 69999, 997):
        f = transport(SIDS[0], SIDS[2], 1, c + n, bytes(40))
        assert carry(a, b, f, n * 1.0) == [f]
    assert ca["compress.tx.define"] >= 4


def test_receiver_restart_drops_counts_and_resyncs() -> None:
    a, b, ca, cb = pair()
    frames = [transport(SIDS[0], SIDS[1], 3, n, bytes(100)) for n in range(10)]
    for n in range(3):
        assert carry(a, b, frames[n], 0.0) == [frames[n]]
    b2 = lc.LinkCompressor(MTU, random.Random(9), cb)  # b restarted: no contexts
    assert carry(a, b2, frames[3], 1.0) == []  # dropped, counted, NACKed
    assert cb["compress.drop.unknown_ctx"] == 1 and ca["compress.rx.nack"] == 1
    assert carry(a, b2, frames[4], 1.1) == [frames[4]]  # defined again, sent whole
    assert carry(a, b2, frames[5], 1.2) == [frames[5]]
    assert ca["compress.tx.compressed"] >= 3


def test_sender_restart_clears_stale_contexts() -> None:
    a, b, _, _cb = pair()
    f1 = transport(SIDS[0], SIDS[1], 3, 1, bytes(100))
    for _ in range(2):
        assert carry(a, b, f1, 0.0) == [f1]
    a2 = lc.LinkCompressor(MTU, random.Random(77), Counter())  # new epoch, ctx 0 reused
    f2 = transport(SIDS[2], SIDS[3], 4, 9, bytes(100))
    assert carry(a2, b, f2, 1.0) == [f2]
    assert carry(a2, b, f2, 1.1) == [f2]
    assert len(b.rx["a"].ctx) == 1


def test_lost_define_never_misdelivers_unknown_context() -> None:
    """A compressed frame whose DEFINE was lost is dropped (no context) and the next
    define repairs it; while unacked, frames that fit go whole."""
    a, b, _ca, cb = pair()
    big = transport(SIDS[0], SIDS[1], 3, 1, bytes(MTU))
    assert carry(a, b, big, 0.0, lose=(0,)) == []
    assert cb["compress.drop.unknown_ctx"] == 1
    big2 = transport(SIDS[0], SIDS[1], 3, 2, bytes(MTU))
    assert carry(a, b, big2, 0.3) == [big2]  # NACKed: the next define repairs it


def test_lost_ack_repeats_define_on_interval() -> None:
    a, b, _ca, _ = pair()
    f = transport(SIDS[0], SIDS[1], 3, 1, bytes(50))
    out = a.encode("b", f, 0.0)
    b.decode("a", out[0], 0.0)  # the ACK is lost
    assert a.encode("b", f, 0.1) == [f]  # no second define inside the interval
    out = a.encode("b", f, 0.3)
    assert out[0][0] == lc.T_DEFINE and out[-1] == f


def test_not_compressible_passes_untouched() -> None:
    a, _, _, _ = pair()
    hello = wire.encode_control(wire.KIND_HELLO, {"x": 1})
    init = wire.encode_data(SIDS[0], SIDS[1], bytes([1]) + bytes(112))
    short = transport(SIDS[0], SIDS[1], 1, 1, b"")
    for f in (hello, init, short):
        assert a.encode("b", f, 0.0) == [f]
        assert not lc.is_link_frame(f)


def test_expand_counter_nearest() -> None:
    for ref in (0, 5, 0xFFFF, 0x10000, 2**40 + 3):
        for delta in (-32767, -1, 0, 1, 32767):
            c = ref + delta
            if c >= 0:
                assert lc.expand_counter(ref, c & 0xFFFF) == c


@FUZZ
@given(st.binary(max_size=300))
def test_decode_takes_any_bytes(data: bytes) -> None:
    a, b, _, cb = pair()
    f = transport(SIDS[0], SIDS[1], 3, 1, bytes(50))
    carry(a, b, f, 0.0)
    before = sum(cb.values())
    if lc.is_link_frame(data):
        inner, replies = b.decode("a", data, 1.0)
        assert inner is None or inner[0] == f[0]
        assert all(lc.is_link_frame(r) for r in replies)
        assert sum(cb.values()) > before  # counted
    else:
        assert b.decode("a", data, 1.0) == (None, [])


@FUZZ
@given(st.integers(0, 63), st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(max_size=90))
def test_decode_control_forms(ident: int, epoch: int, gen: int, rest: bytes) -> None:
    a, b, _, _ = pair()
    for kind in (lc.T_DEFINE, lc.T_ACK, lc.T_NACK):
        frame = struct.pack("!BBHB", kind, ident, epoch, gen) + rest
        b.decode("a", frame, 0.0)
        a.decode("b", frame, 0.0)
