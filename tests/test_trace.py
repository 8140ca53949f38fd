"""Trace: the TRACE frame codec, the Tracer state machine and traces in the simulator."""

from __future__ import annotations

import collections
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.errors import FrameError
from meshpipe.forwarding import Forwarder
from meshpipe.identity import Identity
from meshpipe.node import MIN_MTU
from meshpipe.sim import LinkProfile
from meshpipe.trace import (
    HEAD_LEN,
    PROBE,
    REACHED,
    REPLY,
    Tracer,
    decode,
    encode_probe,
    encode_reply,
    verify_reply,
)
from tests.msp_sim import Line

ALICE = Identity.from_seed(b"trace-alice".ljust(32, b"."))
BOB = Identity.from_seed(b"trace-bob".ljust(32, b"."))


def _line(**kw: object) -> Line:
    line = Line(4, **kw)  # type: ignore[arg-type]
    for m in line.names:
        line.stack(m).trace.name = f"node-{m.lower()}"
    return line


def _trace(line: Line, src: str, dst: str, **kw: object) -> list[dict[str, object]]:
    box: list[int] = []
    line.act(src, lambda stack, now: box.append(stack.trace_start(line.sid(dst), now, **kw)))
    result: list[list[dict[str, object]]] = []

    def done() -> bool:
        hops = line.stack(src).trace_result(box[0])
        if hops is not None:
            result.append([h.as_json() for h in hops])
        return bool(result)

    line.run_until(done, 10.0)
    return result[0]


# -- codec ---------------------------------------------------------------------------


@given(
    nonce=st.integers(0, 2**64 - 1),
    flags=st.sampled_from([0, REACHED]),
    name=st.text(max_size=64),
)
@settings(max_examples=50, deadline=None)
def test_reply_round_trips_verifies_and_fits_the_smallest_mtu(
    nonce: int, flags: int, name: str
) -> None:
    frame = encode_reply(BOB, bytes(ALICE.sid), nonce, flags, name)
    assert len(frame) <= MIN_MTU
    tf = decode(frame)
    assert (tf.type, tf.dst, tf.src, tf.nonce, tf.flags) == (
        REPLY,
        bytes(ALICE.sid),
        bytes(BOB.sid),
        nonce,
        flags,
    )
    assert name.encode().startswith(tf.name.encode())
    assert verify_reply(tf)
    bad = bytearray(frame)
    bad[HEAD_LEN] ^= REACHED  # a flipped flag no longer matches the signature
    assert not verify_reply(decode(bytes(bad)))


@given(nonce=st.integers(0, 2**64 - 1), hop_limit=st.integers(1, 64))
def test_probe_round_trips(nonce: int, hop_limit: int) -> None:
    tf = decode(encode_probe(bytes(BOB.sid), bytes(ALICE.sid), nonce, hop_limit))
    assert (tf.type, tf.hop_limit, tf.nonce) == (PROBE, hop_limit, nonce)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_bytes_decode_or_raise_frame_error(data: bytes) -> None:
    frame = wire.kind_byte(wire.KIND_TRACE) + data
    try:
        decode(frame)
    except FrameError:
        pass
    tracer = Tracer(
        ALICE, Forwarder(bytes(ALICE.sid), [1400], collections.Counter()), random.Random(1)
    )
    tracer.on_frame(frame, 0.0)  # never raises: counted


# -- simulator -------------------------------------------------------------------------


def test_trace_shows_every_hop_in_order_with_names_and_rtts() -> None:
    line = _line()
    hops = _trace(line, "A", "D")
    assert [h["sid"] for h in hops] == [line.sid(m).hex() for m in "BCD"]
    assert [h["name"] for h in hops] == ["node-b", "node-c", "node-d"]
    rtts = [h["rtt_ms"] for h in hops]
    assert all(isinstance(r, float) and r > 0 for r in rtts)
    assert line.stack("A").counters["trace.reply.rx"] >= 3
    assert line.stack("B").counters["trace.forwarded"] > 0


def test_trace_under_loss_still_finds_every_hop() -> None:
    line = _line(seed=3, profile=LinkProfile(loss=0.15, mtu=1400))
    hops = _trace(line, "A", "D", rounds=6, interval=0.1)
    assert [h["sid"] for h in hops] == [line.sid(m).hex() for m in "BCD"]
    assert any(h["received"] < h["sent"] for h in hops)  # some probes were lost


def test_forged_reply_is_dropped() -> None:
    line = _line()
    a = line.stack("A")
    box: list[int] = []
    line.act("A", lambda stack, now: box.append(stack.trace_start(line.sid("D"), now)))
    line.sim.run_for(0.001)
    nonces = list(a.trace._probes)
    forger = Identity.from_seed(b"forger".ljust(32, b"."))
    good = encode_reply(forger, bytes(line.sid("A")), nonces[0], REACHED, "d")
    forged = good[:34] + bytes(line.sid("D")) + good[66:]  # D's SID, the forger's key
    line.sim.inject("A", 0, line.sim.link_addr("B"), forged)
    assert a.counters["trace.drop.bad_signature"] == 1


def test_replies_are_rate_limited() -> None:
    fwd = Forwarder(bytes(BOB.sid), [1400], collections.Counter())
    fwd.update({bytes(ALICE.sid): (0, ("x", 1))})
    tracer = Tracer(BOB, fwd, random.Random(2), reply_rate=10, reply_burst=5)
    out = []
    for n in range(20):
        out += tracer.on_frame(encode_probe(bytes(BOB.sid), bytes(ALICE.sid), n, 1), 0.0)
    assert len(out) == 5
    assert tracer.counters["trace.drop.rate_limited"] == 15
    assert len(tracer.on_frame(encode_probe(bytes(BOB.sid), bytes(ALICE.sid), 99, 1), 1.0)) == 1


def test_trace_over_radio_sized_links() -> None:
    line = _line(mtu=255)  # a radio's 255-byte frames: replies (<= 189 bytes) still fit
    line.stack("D").trace.name = "ä" * 64  # a long multi-byte name is cut, not broken
    hops = _trace(line, "A", "D")
    assert [h["sid"] for h in hops] == [line.sid(m).hex() for m in "BCD"]
    assert hops[-1]["name"] == "ä" * 24
