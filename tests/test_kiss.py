"""KISS codec and radio link header: property tests and a fuzz test."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.errors import FrameError
from meshpipe.identity import Identity
from meshpipe.link import kiss

MAX = 300
frames_st = st.lists(st.binary(min_size=1, max_size=MAX), max_size=12)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def decode_all(chunks: list[bytes], max_len: int = MAX) -> tuple[list[bytes], kiss.KissDecoder]:
    dec = kiss.KissDecoder(max_len)
    out: list[bytes] = []
    for c in chunks:
        out.extend(dec.feed(c))
    return out, dec


@given(st.binary(max_size=2000))
def test_escape_round_trip(data: bytes) -> None:
    esc = kiss.escape(data)
    assert kiss.FEND not in esc  # the delimiter never appears inside a frame
    assert kiss.unescape(esc) == data
    assert kiss.wire_size(data) == len(kiss.encode(data))


@given(frames_st, st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking_gives_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(kiss.encode(f) for f in frames)
    whole, _ = decode_all([stream])
    assert whole == frames
    parts, dec = decode_all(chunked(stream, cuts))
    assert parts == frames
    assert dec.counters["kiss.frames"] == len(frames)


@given(st.binary(max_size=200), frames_st, st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_before_frames_resyncs(
    garbage: bytes, frames: list[bytes], cuts: list[int]
) -> None:
    stream = garbage + b"".join(kiss.encode(f) for f in frames)
    got, _ = decode_all(chunked(stream, cuts))
    # Garbage may decode to junk frames of its own, but never eats a real frame.
    assert got[len(got) - len(frames) :] == frames


@given(st.binary(min_size=1, max_size=MAX), st.integers(min_value=0), frames_st)
def test_truncated_frame_resyncs(victim: bytes, cut: int, frames: list[bytes]) -> None:
    enc = kiss.encode(victim)
    truncated = enc[: 1 + cut % (len(enc) - 1)]  # cut before its closing FEND
    got, _ = decode_all([truncated + b"".join(kiss.encode(f) for f in frames)])
    assert got[len(got) - len(frames) :] == frames
    assert len(got) <= len(frames) + 1


@given(st.integers(min_value=1, max_value=64), st.binary(max_size=200), frames_st)
def test_oversize_frames_are_dropped_and_counted(
    max_len: int, big_extra: bytes, frames: list[bytes]
) -> None:
    big = bytes(max_len + 1) + big_extra
    small = [f for f in frames if len(f) <= max_len]
    stream = kiss.encode(big) + b"".join(kiss.encode(f) for f in small) + kiss.encode(big)
    got, dec = decode_all([stream], max_len)
    assert got == small
    assert dec.counters["kiss.oversize"] == 2


def test_exactly_max_len_passes() -> None:
    got, dec = decode_all([kiss.encode(b"\xc0" * 10)], max_len=10)
    assert got == [b"\xc0" * 10] and dec.counters["kiss.oversize"] == 0


def test_other_commands_ignored_and_counted() -> None:
    stream = kiss.encode(b"\x10", command=0x01) + kiss.encode(b"x", command=0x10)
    stream += kiss.encode(b"data") + b"\xc0\xc0\xc0"  # idle FENDs are not errors
    got, dec = decode_all([stream])
    assert got == [b"data"]
    assert dec.counters["kiss.not_data"] == 2
    assert dec.counters["kiss.bad_escape"] == 0


def test_bad_escape_drops_only_that_frame() -> None:
    got, dec = decode_all([b"\xc0\x00ab\xdb\x01cd\xc0" + kiss.encode(b"ok")])
    assert got == [b"ok"]
    assert dec.counters["kiss.bad_escape"] == 1
    with pytest.raises(FrameError):
        kiss.unescape(b"a\xdb")


@settings(max_examples=300)
@given(st.binary(max_size=4000))
def test_fuzz_decoder_never_crashes(data: bytes) -> None:
    got, _ = decode_all([data], max_len=64)
    assert all(len(f) <= 64 for f in got)


def test_fuzz_mutated_streams() -> None:
    """Flip, drop and insert bytes in a valid stream: the decoder survives, frames
    after the last damage come out intact, and memory stays bounded."""
    rng = random.Random(7)
    for _ in range(300):
        frames = [rng.randbytes(rng.randint(1, 80)) for _ in range(rng.randint(1, 8))]
        stream = bytearray(b"".join(kiss.encode(f) for f in frames))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(stream))
            op = rng.randrange(3)
            if op == 0:
                stream[pos] = rng.choice([kiss.FEND, kiss.FESC, rng.randrange(256)])
            elif op == 1:
                del stream[pos]
            else:
                stream.insert(pos, rng.randrange(256))
        tail = [rng.randbytes(rng.randint(1, 80)) for _ in range(3)]
        data = bytes(stream) + b"".join(kiss.encode(f) for f in tail)
        dec = kiss.KissDecoder(100)
        got: list[bytes] = []
        for c in chunked(data, [rng.randrange(len(data)) for _ in range(5)]):
            got.extend(dec.feed(c))
            assert len(dec._buf) <= 101
        assert got[-3:] == tail


def test_radio_header() -> None:
    sid = Identity.from_seed(b"\x01" * 32).sid
    a = kiss.radio_addr(bytes(sid))
    assert 0 <= a < kiss.RADIO_BROADCAST
    assert a == kiss.radio_addr(bytes(sid))
    f = kiss.encode_radio(kiss.RADIO_BROADCAST, a, b"\x11mesh")
    assert len(f) == kiss.RADIO_HEADER_LEN + 5
    assert kiss.decode_radio(f) == (kiss.RADIO_BROADCAST, a, b"\x11mesh")
    with pytest.raises(FrameError):
        kiss.decode_radio(b"\xff\xff\x00")
    assert kiss.RADIO_OVERHEAD == 7
