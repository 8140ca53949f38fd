"""Property tests: every decoder of internal records (the rings between worker
processes) and of the wire formats raises only its typed error on malformed input,
never KeyError, TypeError, IndexError or msgpack's ExtraData (issue 14, item 6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.errors import FrameError, MeshpipeError, RecordError
from meshpipe.link import kiss
from meshpipe.link.neighbours import decode_hello
from meshpipe.msp import wire as msp_wire
from meshpipe.offload import Offload, split_message
from meshpipe.routing import decode_routing
from meshpipe.services import proxy_wire, socks5
from meshpipe.services.discovery import ServiceRecord, decode_frame
from meshpipe.tunnel import parse_header
from meshpipe_workers import messages as msg
from meshpipe_workers import radio

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SID = bytes(range(32))

RECORD_DECODERS: dict[str, Callable[[bytes], object]] = {
    "frame_in": msg.parse_frame_in,
    "send": msg.parse_send,
    "send_run": msg.parse_send_run,
    "forwarding": msg.parse_forwarding,
    "unpacked": msg.unpacked,
    "unpacked_map": msg.unpacked_map,
    "counters": lambda r: msg.unpacked_map(r, ("iface", "worker"), ("counters",)),
    "worker_up": msg.parse_worker_up,
    "crypto_up": msg.parse_crypto_up,
    "sid_record": msg.parse_sid_record,
    "sid_hops_record": msg.parse_sid_hops_record,
    "addr": lambda r: msg.unpack_addr(r, 1),
    "radio_in": radio.parse_radio_in,
    "radio_send": radio.parse_radio_send,
}

VALID_RECORDS = [
    msg.frame_in(1, ("198.18.0.2", 7700), b"frame"),
    msg.frame_in(0, ("fd00::1", 7700), b""),
    msg.send(("198.18.0.2", 7700), b"frame"),
    msg.forwarding({SID: (0, ("198.18.0.2", 7700), 1400), bytes(32): None}, True),
    msg.forwarding({SID: (2, 0x1234, 251)}, False),
    msg.packed(msg.REC_COUNTERS, {"iface": 0, "worker": 1, "counters": {"rx": 5}}),
    msg.worker_up(1, 2),
    bytes((msg.REC_CRYPTO_UP, 3)),
    msg.sid_record(msg.REC_SEAL, SID, b"plaintext"),
    msg.sid_hops_record(msg.REC_OPEN, SID, 3, b"packet"),
    radio.radio_in(0, 0x1234, b"frame"),
    radio.radio_send(0x1234, b"frame"),
    msg.send_run(("198.18.0.2", 7700), [b"abc", b"def", b"g"]),
]


def _only_typed(fn: Callable[[bytes], object], data: bytes, err: type[Exception]) -> None:
    try:
        fn(data)
    except err:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=8) | st.binary(max_size=33) | st.integers(0, 99), inner, max_size=5
        )
    ),
    max_leaves=20,
)


@FUZZ
@given(
    name=st.sampled_from(sorted(RECORD_DECODERS)),
    tag=st.integers(0, 255),
    body=msgpack_values,
    trailer=st.binary(max_size=4),
)
def test_record_decoders_on_msgpack_of_any_shape(
    name: str, tag: int, body: Any, trailer: bytes
) -> None:
    """Well-formed msgpack of the wrong shape (and trailing bytes: ExtraData)."""
    rec = bytes((tag,)) + msgpack.packb(body, use_bin_type=True) + trailer
    _only_typed(RECORD_DECODERS[name], rec, RecordError)


@FUZZ
@given(
    name=st.sampled_from(sorted(RECORD_DECODERS)),
    rec=st.sampled_from(VALID_RECORDS),
    cut=st.integers(0, 200),
    flips=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 255)), max_size=4),
)
def test_record_decoders_on_damaged_valid_records(
    name: str, rec: bytes, cut: int, flips: list[tuple[int, int]]
) -> None:
    buf = bytearray(rec[:cut] if cut < len(rec) else rec)
    for i, x in flips:
        if buf:
            buf[i % len(buf)] ^= x
    _only_typed(RECORD_DECODERS[name], bytes(buf), RecordError)


def test_valid_records_round_trip() -> None:
    assert msg.parse_frame_in(VALID_RECORDS[0]) == (1, ("198.18.0.2", 7700), b"frame")
    full, entries = msg.parse_forwarding(VALID_RECORDS[3])
    assert full and entries == {SID: (0, ("198.18.0.2", 7700), 1400), bytes(32): None}
    assert msg.parse_forwarding(VALID_RECORDS[4]) == (False, {SID: (2, 0x1234, 251)})
    assert msg.unpacked_map(VALID_RECORDS[5], ("iface", "worker"), ("counters",))["counters"] == {
        "rx": 5
    }
    assert msg.parse_worker_up(VALID_RECORDS[6]) == (1, 2)
    assert msg.parse_crypto_up(VALID_RECORDS[7]) == 3
    assert msg.parse_sid_hops_record(VALID_RECORDS[9]) == (SID, 3, b"packet")
    assert msg.parse_send_run(VALID_RECORDS[12]) == (("198.18.0.2", 7700), [b"abc", b"def", b"g"])


@pytest.mark.parametrize(
    "rec",
    [
        bytes((msg.REC_COUNTERS,)) + msgpack.packb({"iface": 0}) + b"\x00",  # ExtraData
        msg.packed(msg.REC_COUNTERS, {"iface": "0", "worker": 1}),  # TypeError before
        msg.packed(msg.REC_COUNTERS, {"worker": 1}),  # KeyError before
        msg.packed(msg.REC_COUNTERS, [1, 2]),
    ],
)
def test_counters_record_cases_that_used_to_escape_untyped(rec: bytes) -> None:
    with pytest.raises(RecordError):
        msg.unpacked_map(rec, ("iface", "worker"), ("counters",))


# -- wire decoders (frames from other nodes) -------------------------------------------

WIRE_DECODERS: dict[str, Callable[[bytes], object]] = {
    "data_header": wire.decode_data_header,
    "control": wire.decode_control,
    "hello": decode_hello,
    "routing": decode_routing,
    "discovery": decode_frame,
    "service_record": ServiceRecord.decode,
    "msp": msp_wire.decode,
    "offload": Offload.parse,
    "tunnel_message": split_message,
    "ip_header": parse_header,
    "radio": kiss.decode_radio,
    "proxy_request": proxy_wire.decode_request,
    "proxy_response": proxy_wire.decode_response,
    "socks_reply": socks5.decode_reply,
}


ALL_DECODERS = [(n, f, RecordError) for n, f in RECORD_DECODERS.items()] + [
    (n, f, MeshpipeError) for n, f in WIRE_DECODERS.items()
]


@FUZZ
@given(case=st.sampled_from(ALL_DECODERS), data=st.binary(max_size=300))
def test_every_decoder_raises_only_its_typed_error_on_bytes(
    case: tuple[str, Callable[[bytes], object], type[Exception]], data: bytes
) -> None:
    _name, fn, err = case
    _only_typed(fn, data, err)


@FUZZ
@given(
    name=st.sampled_from(["control", "hello", "routing", "discovery", "service_record"]),
    body=msgpack_values,
)
def test_msgpack_wire_decoders_on_any_shape(name: str, body: Any) -> None:
    packed = msgpack.packb(body, use_bin_type=True)
    for data in (packed, wire.kind_byte(wire.KIND_DISCOVERY) + packed):
        _only_typed(WIRE_DECODERS[name], data, MeshpipeError)
    assert issubclass(FrameError, MeshpipeError)


def test_frames_queued_in_a_row_for_one_peer_travel_as_one_run_record() -> None:
    from collections import Counter

    from meshpipe.actions import SendFrame
    from meshpipe.config import parse_config
    from meshpipe_workers.txrings import FrameSender

    class FakeRing:
        def __init__(self) -> None:
            self.recs: list[bytes] = []

        def put_batch(self, recs: list[bytes]) -> int:
            self.recs += recs
            return len(recs)

    cfg = parse_config(
        '[node]\nkey = "k"\n[[interface]]\nname = "u"\nkind = "udp"\nlisten = "198.18.0.1:7700"\n',
        "/tmp/meshpipe.toml",
    )
    ring = FakeRing()
    sender = FrameSender(cfg, {0: [ring]}, Counter())  # type: ignore[dict-item]
    peer, other = ("198.18.0.2", 7700), ("198.18.0.3", 7700)
    for f in (b"a" * 10, b"b" * 10, b"c" * 4, b"d" * 10, b"e" * 10):
        sender.queue(SendFrame(0, peer, f))
    sender.queue(SendFrame(0, other, b"x"))
    sender.flush()
    assert ring.recs == [
        msg.send_run(peer, [b"a" * 10, b"b" * 10, b"c" * 4]),  # a shorter frame ends a run
        msg.send_run(peer, [b"d" * 10, b"e" * 10]),
        msg.send(other, b"x"),
    ]
