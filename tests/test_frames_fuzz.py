"""Property tests: no byte string makes NodeCore.on_frame raise, every bad frame is a
counted drop, and the codecs round-trip."""

from __future__ import annotations

import random
from collections import Counter
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.actions import BROADCAST, Deliver, SendFrame
from meshpipe.identity import Identity
from meshpipe.link.neighbours import INFINITY, Hello, Ihu, decode_hello, encode_hello
from meshpipe.node import InterfaceParams, NodeCore, Timing
from meshpipe.routing import (
    RoutingFrame,
    SeqnoRequest,
    Update,
    decode_routing,
    encode_routing,
    sign_route,
)

X = Identity.from_seed(b"\x21" * 32)
Y = Identity.from_seed(b"\x22" * 32)
Z = Identity.from_seed(b"\x23" * 32)
Y_ADDR = ("198.18.0.2", 7700)

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every frame ends up in exactly one of these (per-update outcomes inside an accepted
# routing frame, such as drop.forged_route, come on top of update.rx).
FRAME_OUTCOMES = (
    "hello.rx",
    "hello.own",
    "hello.stale",
    "update.rx",
    "data.delivered",
    "data.forwarded",
    "data.no_route",
)


def y_hello(seqno: int = 1) -> bytes:
    # The IHU names X's current epoch, so the link counts as two-way.
    ihu = Ihu(bytes(X.sid), node().links.epoch, 255, 0, 0)
    return encode_hello(Y, Hello(Y.sid, 5, seqno, 1000, 1000, (ihu,)))


def y_routing() -> bytes:
    ups = [
        Update(bytes(Y.sid), 3, 0, 0, sign_route(Y, 3)),
        Update(bytes(Z.sid), 8, 256, 1, sign_route(Z, 8)),
    ]
    return encode_routing(ups, [SeqnoRequest(bytes(Z.sid), 9, 5)], seq=1)


def data_frames() -> list[bytes]:
    return [
        wire.encode_data(bytes(X.sid), bytes(Y.sid), b"for x", 60),
        wire.encode_data(bytes(Z.sid), bytes(Y.sid), b"transit to z", 60),
        wire.encode_data(bytes(32), bytes(Y.sid), b"nowhere"),
    ]


@cache
def node() -> NodeCore:
    """One node that knows neighbour Y (and a route to Z through it), shared by all
    examples: state piling up across examples is part of what is being fuzzed."""
    n = NodeCore(
        X, [InterfaceParams("eth0", flood_dest=BROADCAST)], Timing(), 0.0, random.Random(3)
    )
    ihu = Ihu(bytes(X.sid), n.links.epoch, 255, 0, 0)
    n.on_frame(0, Y_ADDR, encode_hello(Y, Hello(Y.sid, 5, 1, 1000, 1000, (ihu,))), 0.1)
    n.on_frame(0, Y_ADDR, y_routing(), 0.2)
    assert n.counters["hello.rx"] == 1 and n.counters["update.rx"] == 1
    assert bytes(Z.sid) in n.forwarding_table()
    return n


def feed(frame: bytes) -> tuple[Counter[str], list[object]]:
    n = node()
    before = Counter(n.counters)
    out = n.on_frame(0, Y_ADDR, frame, 0.3)
    delta = Counter(n.counters)
    delta.subtract(before)
    assert n.counters["drop.internal_error"] == 0, out
    return +delta, list(out)


def drops(delta: Counter[str]) -> int:
    return sum(v for k, v in delta.items() if k.startswith("drop."))


def frame_outcomes(delta: Counter[str]) -> int:
    return sum(delta[k] for k in FRAME_OUTCOMES)


def assert_accounted(delta: Counter[str]) -> None:
    frame_drops = sum(
        v
        for k, v in delta.items()
        if k.startswith("drop.") and k not in ("drop.forged_route", "drop.route_hop_limit")
    )
    assert frame_drops + frame_outcomes(delta) == 1, delta


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_and_are_counted(frame: bytes) -> None:
    delta, _ = feed(frame)
    assert_accounted(delta)


@FUZZ
@given(st.sampled_from([0x11, 0x12, 0x13]), st.binary(max_size=600))
def test_random_bodies_of_each_kind_are_counted(kind: int, body: bytes) -> None:
    delta, _ = feed(bytes([kind]) + body)
    assert_accounted(delta)


# msgpack-shaped values: frames that decode fine but have the wrong structure or types.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=70),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=25,
)


@FUZZ
@given(st.sampled_from([wire.KIND_HELLO, wire.KIND_ROUTING]), msgpack_values, st.booleans())
def test_well_formed_msgpack_with_wrong_shape_is_malformed(
    kind: int, value: object, nest: bool
) -> None:
    if nest:  # a hello-like [body, signature] whose inner body is the odd value
        value = [wire.pack_body(value), bytes(64)]
    delta, _ = feed(wire.encode_control(kind, value))
    assert_accounted(delta)
    assert frame_outcomes(delta) == 0 or kind == wire.KIND_ROUTING


@FUZZ
@given(st.data())
def test_truncated_valid_frames_are_malformed(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["hello", "routing", "data"]))
    if which == "hello":
        frame = y_hello()
    elif which == "routing":
        frame = y_routing()
    else:
        frame = data.draw(st.sampled_from(data_frames()))
    limit = len(frame) - 1 if which != "data" else wire.DATA_HEADER_LEN - 1
    cut = data.draw(st.integers(min_value=0, max_value=limit))
    delta, _ = feed(frame[:cut])
    assert delta["drop.malformed"] == 1 and frame_outcomes(delta) == 0, delta


@FUZZ
@given(st.data())
def test_mutated_valid_frames_never_raise(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["hello", "routing", "data"]))
    frame = bytearray(
        y_hello(data.draw(st.integers(0, 65535)))
        if which == "hello"
        else y_routing()
        if which == "routing"
        else data.draw(st.sampled_from(data_frames()))
    )
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] ^= data.draw(st.integers(1, 255))  # a real change of that byte
    if data.draw(st.booleans()):
        frame += data.draw(st.binary(min_size=1, max_size=8))
    delta, _ = feed(bytes(frame))
    assert_accounted(delta)
    if which == "hello" and frame[0] == 0x11:
        # Everything but the kind byte is structure or signed: any change is a drop,
        # unless it only hit the signature-free outer framing in an equivalent way.
        try:
            ok = decode_hello(bytes(frame)).verify()
        except ValueError:
            ok = False
        assert ok or drops(delta) == 1, delta
    if which == "routing" and frame[0] == 0x12 and drops(delta) == 0:
        decode_routing(bytes(frame))  # accepted, so it must really be well formed


# -- codec round trips ---------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
sid = st.binary(min_size=32, max_size=32)


@settings(max_examples=100, deadline=None)
@given(
    epoch=u32,
    seqno=st.integers(0, 65535),
    ts=u32,
    interval=st.integers(10, 600_000),
    ihus=st.lists(st.builds(Ihu, sid, u32, st.integers(0, 255), u32, u32), max_size=30),
)
def test_hello_round_trip(epoch: int, seqno: int, ts: int, interval: int, ihus: list[Ihu]) -> None:
    hello = Hello(Y.sid, epoch, seqno, ts, interval, tuple(ihus))
    signed = decode_hello(encode_hello(Y, hello))
    assert signed.hello == hello and signed.verify()


@settings(max_examples=100, deadline=None)
@given(
    seq=u32,
    updates=st.lists(
        st.builds(
            Update,
            sid,
            u32,
            st.integers(0, INFINITY),
            st.integers(0, 255),
            st.binary(min_size=64, max_size=64),
        ),
        max_size=20,
    ),
    requests=st.lists(st.builds(SeqnoRequest, sid, u32, st.integers(0, 255)), max_size=20),
)
def test_routing_round_trip(seq: int, updates: list[Update], requests: list[SeqnoRequest]) -> None:
    assert decode_routing(encode_routing(updates, requests, seq)) == RoutingFrame(
        seq, updates, requests
    )


@settings(max_examples=100, deadline=None)
@given(dst=sid, src=sid, payload=st.binary(max_size=200), hop_limit=st.integers(0, 255))
def test_data_header_round_trip(dst: bytes, src: bytes, payload: bytes, hop_limit: int) -> None:
    frame = wire.encode_data(dst, src, payload, hop_limit)
    assert wire.decode_data_header(frame) == (hop_limit, dst, src)
    assert wire.data_payload(frame) == payload
    assert wire.decode_data_header(wire.with_hop_limit(frame, 3))[0] == 3


def test_data_frames_are_delivered_forwarded_or_dropped() -> None:
    n = node()
    delta, out = feed(wire.encode_data(bytes(X.sid), bytes(Y.sid), b"hi", 62))
    assert delta["data.delivered"] == 1
    (d,) = out
    assert isinstance(d, Deliver)
    assert d.src == bytes(Y.sid) and d.payload == b"hi" and d.hops == 3
    delta, out = feed(wire.encode_data(bytes(Z.sid), bytes(Y.sid), b"on", 9))
    assert delta["data.forwarded"] == 1
    (s,) = out
    assert isinstance(s, SendFrame)
    assert s.frame == wire.encode_data(bytes(Z.sid), bytes(Y.sid), b"on", 8)
    assert s.dest == n.forwarding_table()[bytes(Z.sid)][1]
    for hl in (0, 1):
        delta, out = feed(wire.encode_data(bytes(Z.sid), bytes(Y.sid), b"x", hl))
        assert delta["drop.hop_limit"] == 1 and out == []
    delta, _ = feed(wire.encode_data(bytes(X.sid), bytes(Y.sid), b"x", 0))
    assert delta["drop.hop_limit"] == 1
    assert n.send_data(bytes(32), b"x", 0.4) == []
    assert n.counters["data.no_route"] >= 1
    (s,) = n.send_data(bytes(Z.sid), b"hello", 0.4)
    assert isinstance(s, SendFrame)
    header = wire.decode_data_header(s.frame)
    assert header == (wire.DEFAULT_HOP_LIMIT, bytes(Z.sid), bytes(X.sid))
